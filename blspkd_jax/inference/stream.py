"""Streaming speech input: the model hears while the user speaks and answers the moment they stop.

Audio arrives in pieces. The causal log-mel (`features.StreamingLogMel`) turns it into frames;
each chunk of `chunk_frames` encoder frames, once its audio is in, runs through the chunk-causal
Whisper encoder and the CFormer's pre-CIF layers with their keys and values carried over
(`WhisperEncoderChunk`, `CFormerStream`); CIF's threshold rule (`cif.StreamingCIF`) fires a
token as soon as its weight is complete; each fired token goes through the causal post-CIF layers
and is appended to the LLM's KV cache at once, PLoRA on. At the end of speech only the tail
token, the rest of the prompt (end of the user turn, the assistant header) and the response are
left to compute.

A model streams when it was built chunk-causal (`model.encoder.chunk_frames > 0`) with
variable-length input (`model.encoder.pad_to_30s=false`). What it answers equals offline
inference under the same rule, `respond.speech_responses(run, rows, rule="stream")`: the same
tokens fire from the same frames, and the token ids generated are identical (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax.data.features import StreamingLogMel
from blspkd_jax.errors import UserError
from blspkd_jax.inference.generate import batch_rules, bucket_length, output_head, stop_token_ids
from blspkd_jax.models import sharding
from blspkd_jax.models.adapter import CFormerStream
from blspkd_jax.models.cif import StreamingCIF
from blspkd_jax.models.encoder import WhisperEncoderChunk, chunk_mel_frames
from blspkd_jax.models.llm import LLM, init_cache


class StreamError(UserError):
    """The run cannot stream, or the audio does not fit (one line naming what and why)."""


def check_streamable(config) -> None:
    """A StreamError unless the model is chunk-causal with variable-length input."""
    enc = config.encoder
    if not enc.chunk_frames:
        raise StreamError(
            "this model has full attention over the whole utterance "
            "(model.encoder.chunk_frames=0): train it chunk-causal to stream, e.g. "
            "--config.model.encoder.chunk_frames=25 (README, Streaming)"
        )
    if enc.pad_to_30s:
        raise StreamError(
            "this model pads every input to 30 s (model.encoder.pad_to_30s=true); streaming "
            "needs variable-length input: train with --config.model.encoder.pad_to_30s=false"
        )


@dataclasses.dataclass
class Timing:
    """Seconds spent, for the latency benchmark and the web demo."""

    audio_s: float = 0.0  # audio received
    compute_s: float = 0.0  # spent in push() and finish() while the audio arrived
    end_to_first_token_s: float | None = None  # from finish() to the first response token
    end_speech_s: float | None = None  # of which: the last frames, chunks and tail token
    end_llm_s: float | None = None  # of which: the LLM's one call (last tokens, end of prompt)


class Streamer:
    """A trained run's compiled streaming pieces (batch 1); `session()` starts an utterance.

    Every piece has a fixed shape (one chunk of frames, one token, one response token), so each
    compiles once, on first use (the end of the prompt: once per instruction length).
    """

    def __init__(self, run, *, max_new_tokens: int = 128):
        check_streamable(run.model.config)
        self.run = run
        self.config = run.model.config
        self.max_new_tokens = int(max_new_tokens)
        c = self.config
        self.K = c.encoder.chunk_frames
        self.window = c.encoder.max_source_positions  # encoder frames: the 30 s limit
        params = nn.unbox(run.params)
        self.params = (params["encoder"], params["adapter"], params["llm"])
        self._encoder = WhisperEncoderChunk(c.encoder)
        self._adapter = CFormerStream(c.adapter)
        self._llm = LLM(c.llm)
        self._rules = batch_rules(run.mesh, 1)

    def session(self, instruction: str | None = None) -> StreamSession:
        return StreamSession(self, instruction)

    def _call(self, fn, *args):
        with sharding.activate(self.run.mesh, self._rules):
            return fn(self, *args)

    # Each jitted piece takes `self` as a static argument (hashable by identity): one program
    # per Streamer and shape.

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
    def _frames(self, params, caches, mel, mel_valid, start):
        """One chunk: encoder + pre-CIF layers -> (CIF values [1, K, D-1], alphas [1, K])."""
        enc_p, ad_p, _ = params
        (ek, ev, evalid), pre = caches
        h, (k, v) = self._encoder.apply({"params": enc_p}, mel, mel_valid, start, (ek, ev), evalid)
        valid = mel_valid[:, 2:-1:2]
        put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(cache, new, start, axis=2)  # noqa: E731
        enc = (put(ek, k), put(ev, v), jax.lax.dynamic_update_slice_in_dim(evalid, valid, start, 1))
        # The pre-CIF layers see the same frames as the encoder: one validity mask for both.
        values, alphas, kv = self._adapter.apply(
            {"params": ad_p}, "frames", h, valid, pre or (None, None), evalid
        )
        if kv is not None:
            pre = (put(pre[0], kv[0]), put(pre[1], kv[1]))
        return values, alphas, (enc, pre)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3))
    def _token(self, params, post, llm_cache, vec, index):
        """One fired token: post-CIF layers, appended to the LLM's cache with PLoRA on."""
        _, ad_p, llm_p = params
        pk, pv, pvalid = post if post is not None else (None, None, jnp.zeros((1, 1), bool))
        y, kv = self._adapter.apply({"params": ad_p}, "tokens", vec, None, (pk, pv), pvalid)
        if kv is not None:
            put = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, index, axis=2)  # noqa: E731
            valid = jax.lax.dynamic_update_slice_in_dim(pvalid, jnp.ones((1, 1), bool), index, 1)
            post = (put(pk, kv[0]), put(pv, kv[1]), valid)
        lora = jnp.ones((1, 1), bool) if self.config.llm.lora_rank else None
        _, v = self._llm.apply(
            {"params": llm_p, "cache": llm_cache},
            inputs_embeds=y,
            lora_mask=lora,
            return_hidden=True,
            decode=True,
            mutable=["cache"],
        )
        return post, v["cache"]

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
    def _last(self, params, post, llm_cache, vecs, n, middle):
        """At the end of speech, one LLM call: the last speech tokens `vecs [1, M, D-1]` (the
        first `n` real; the rest fill a bucket, masked) through the post-CIF layers, then with
        the end of the prompt `middle [1, L]` -> the first response token."""
        _, ad_p, llm_p = params
        real = jnp.arange(vecs.shape[1])[None] < n
        pk, pv, pvalid = post if post is not None else (None, None, jnp.zeros((1, 1), bool))
        y, _ = self._adapter.apply({"params": ad_p}, "tokens", vecs, None, (pk, pv), pvalid)
        text = self._llm.apply({"params": llm_p}, middle, method=LLM.embed)
        embeds = jnp.concatenate([y.astype(text.dtype), text], axis=1)
        mask = jnp.concatenate([real, jnp.ones(middle.shape, bool)], axis=1)
        lora = jnp.concatenate([real, jnp.zeros(middle.shape, bool)], axis=1)
        hidden, v = self._llm.apply(
            {"params": llm_p, "cache": llm_cache},
            inputs_embeds=embeds,
            attention_mask=mask,  # filler slots are never attended and take no position
            lora_mask=lora if self.config.llm.lora_rank else None,
            return_hidden=True,
            decode=True,
            mutable=["cache"],
        )
        return self._next(llm_p, hidden), v["cache"]

    def _next(self, llm_params, hidden):
        """The greedy token after the last position of `hidden [1, L, H]` (the vocabulary
        projection of that one position only)."""
        logits = self._llm.apply({"params": llm_params}, hidden[:, -1:], method=output_head)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
    def _text(self, params, llm_cache, ids):
        """Text tokens `[1, L]` appended to the cache -> (the greedy next token [1], cache)."""
        hidden, v = self._llm.apply(
            {"params": params[2], "cache": llm_cache},
            ids,
            return_hidden=True,
            decode=True,
            mutable=["cache"],
        )
        return self._next(params[2], hidden), v["cache"]


class StreamSession:
    """One utterance: `push(samples)` as audio arrives (returns the tokens fired so far),
    `finish()` at the end of speech, then `response_ids()` / `response_text()` stream the greedy
    answer. `fire_frames` lists the encoder frame (20 ms each) where each token fired, `alphas`
    the firing weights, `mel` the log-mel so far `[n_mels, F]`."""

    def __init__(self, streamer: Streamer, instruction: str | None):
        self.s = streamer
        run, c = streamer.run, streamer.config
        self.template = run.layout.template(instruction)
        self.stop_ids = set(
            stop_token_ids(c.llm.eos_token_id, run.tokenizer, run.layout, instruction)
        )
        self.features = StreamingLogMel(c.encoder.num_mel_bins)
        # Every mel frame the window can hold, filled as they come (no copy of the whole so far
        # at each push); `mel` is the part received.
        self._mel = np.zeros((c.encoder.num_mel_bins, 2 * streamer.window + 1), np.float32)
        self._frames = 0
        self.start = 0  # first encoder frame of the next chunk
        self.cif = StreamingCIF(c.adapter.d_model - 1)
        self.tokens = 0
        self.fire_frames: list[int] = []
        self._alphas: list[np.ndarray] = []
        self.timing = Timing()
        self._finished = False
        self._first: int | None = None  # the first response token, once finish() ran

        K = streamer.K
        W, dt = -(-streamer.window // K) * K, c.encoder.dtype  # whole chunks: no clamped write
        enc_heads = c.encoder.encoder_attention_heads
        enc_kv = (1, W, enc_heads, c.encoder.d_model // enc_heads)
        kv = lambda n, shape: (jnp.zeros((n, *shape), dt), jnp.zeros((n, *shape), dt))  # noqa: E731
        enc = (*kv(c.encoder.encoder_layers, enc_kv), jnp.zeros((1, W), bool))
        a = c.adapter
        ad_kv = (a.num_heads, a.d_model // a.num_heads)
        dt = a.dtype
        pre = kv(a.n_pre, (1, W, *ad_kv)) if a.n_pre else None
        self._caches = (enc, pre)
        self._post = (
            (*kv(a.n_post, (1, a.max_tokens, *ad_kv)), jnp.zeros((1, a.max_tokens), bool))
            if a.n_post
            else None
        )
        t = self.template
        # The LLM's cache: prompt text, every speech token (and the filler slots of the last
        # call, fewer than the tokens or 4), the response; bucketed so that instructions of
        # similar length share the compiled programs.
        prompt = bucket_length(len(t.prefix) + 2 * a.max_tokens + 4 + len(t.middle))
        size = prompt + streamer.max_new_tokens
        self._llm_cache = init_cache(c.llm, 1, size)
        t0 = time.perf_counter()
        _, self._llm_cache = streamer._call(
            Streamer._text, streamer.params, self._llm_cache, np.asarray([t.prefix], np.int32)
        )
        self.timing.compute_s += time.perf_counter() - t0

    def push(self, samples) -> int:
        """Take more 16 kHz mono float samples; run every chunk whose audio is complete."""
        if self._finished:
            raise StreamError("push() after finish(): start a new session")
        t0 = time.perf_counter()
        samples = np.asarray(samples, np.float32)
        self.timing.audio_s += samples.size / 16000
        self._add_mel(self.features.push(samples))
        K = self.s.K
        # Chunk s .. s+K-1 reads mel frames up to 2(s+K): run it once that frame is in.
        while self.mel.shape[1] > 2 * (self.start + K):
            self._append(self._chunk())
        self.timing.compute_s += time.perf_counter() - t0
        return self.tokens

    def finish(self) -> int:
        """End of speech: the last frames and chunks, the tail token, the rest of the prompt."""
        if self._finished:
            return self.tokens
        t0 = time.perf_counter()
        self._finished = True
        self._add_mel(self.features.finish())
        F = self.mel.shape[1]
        last = []  # the tokens still to fire go into the LLM with the end of the prompt, at once
        while self.start < (F + 1) // 2:
            last.append(self._chunk())
        tail = self.cif.finish()
        self.fire_frames += [self.cif.frames - 1] * len(tail)
        last = np.concatenate([*last, tail])
        self._check_room(len(last))
        self.tokens += len(last)
        slots = 4  # a power of two: a few compiled programs serve every count
        while slots < len(last):
            slots *= 2
        vecs = np.zeros((1, slots, last.shape[1]), np.float32)
        vecs[0, : len(last)] = last
        t1 = time.perf_counter()
        self.timing.end_speech_s = t1 - t0
        first, self._llm_cache = self.s._call(
            Streamer._last, self.s.params, self._post, self._llm_cache, vecs,
            np.int32(len(last)), np.asarray([self.template.middle], np.int32),
        )  # fmt: skip
        self._first = int(first[0])
        self.timing.end_llm_s = time.perf_counter() - t1
        self.timing.end_to_first_token_s = time.perf_counter() - t0
        return self.tokens

    def response_ids(self) -> Iterator[int]:
        """The greedy response's ids one by one, up to (not including) a stop id."""
        if not self._finished:
            raise StreamError("response_ids() before finish(): the user is still speaking")
        token = self._first
        for _ in range(self.s.max_new_tokens):
            if token in self.stop_ids:
                return
            yield token
            nxt, self._llm_cache = self.s._call(
                Streamer._text, self.s.params, self._llm_cache, np.asarray([[token]], np.int32)
            )
            token = int(nxt[0])

    def response_text(self) -> Iterator[str]:
        """The response as it grows (the whole text so far at each new token)."""
        ids: list[int] = []
        for t in self.response_ids():
            ids.append(t)
            yield self.s.run.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def mel(self) -> np.ndarray:
        """The log-mel received so far `[n_mels, F]` (a view)."""
        return self._mel[:, : self._frames]

    @property
    def alphas(self) -> np.ndarray:
        """CIF's firing weights of the encoder frames so far `[E]` (20 ms each)."""
        return np.concatenate(self._alphas) if self._alphas else np.zeros(0, np.float32)

    # ------------------------------------------------------------------------------------------

    def _add_mel(self, frames: np.ndarray) -> None:
        n = self._frames + frames.shape[1]
        if (n + 1) // 2 > self.s.window:
            raise StreamError(
                f"audio longer than the encoder's window of {self.s.window * 2 / 100:g} s "
                f"(model.encoder.max_source_positions={self.s.window})"
            )
        self._mel[:, self._frames : n] = frames
        self._frames = n

    def _chunk(self) -> np.ndarray:
        """Run the chunk at `self.start` on the mel frames received (any later frame of its
        window is past the end of the audio: push() runs a chunk only once its frames are in)
        -> the CIF vectors that fired in it `[m, D-1]`."""
        K, s, F = self.s.K, self.start, self.mel.shape[1]
        idx = np.arange(2 * s - 2, 2 * s + chunk_mel_frames(K) - 2)
        valid = (idx >= 0) & (idx < F)
        mel = np.where(valid, self.mel[:, np.clip(idx, 0, max(F - 1, 0))], 0)
        values, alphas, self._caches = self.s._call(
            Streamer._frames, self.s.params, self._caches, mel[None].astype(np.float32),
            valid[None], np.int32(s),
        )  # fmt: skip
        fired_before = self.cif.fired
        alphas = np.asarray(alphas[0])[: int(valid[2:-1:2].sum())]  # this chunk's valid frames
        self._alphas.append(alphas)
        fired = self.cif.push(np.asarray(values[0])[: alphas.size], alphas)
        self.fire_frames += list(self.cif.fire_frames[fired_before:])
        self.start += K
        return fired

    def _check_room(self, more: int) -> None:
        if self.tokens + more > self.s.config.adapter.max_tokens:
            raise StreamError(
                f"more than model.adapter.max_tokens={self.s.config.adapter.max_tokens} speech "
                "tokens fired"
            )

    def _append(self, vectors: np.ndarray) -> None:
        """Fired CIF vectors `[m, D-1]` into the post-CIF layers and the LLM's cache."""
        for vec in vectors:
            self._check_room(1)
            self._post, self._llm_cache = self.s._call(
                Streamer._token, self.s.params, self._post, self._llm_cache,
                vec[None, None].astype(np.float32), np.int32(self.tokens),
            )  # fmt: skip
            self.tokens += 1
