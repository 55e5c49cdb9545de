"""Autoregressive generation with the LLM's KV cache: text prompts (ids) or speech prompts
(embeddings with PLoRA at the speech positions), greedy or temperature/top-p sampling; and greedy
responses from a trained run's speech (SPEC section 8):

    python -m blspkd_jax.generate speech --workdir DIR --manifest M --out OUT.jsonl \\
        [--instruction TEXT] [--max-new-tokens N] [--step N] [--batch-size N]

One call is one jit-compiled program: a prefill over the whole left-padded prompt, then a
`lax.while_loop` of one-token decode steps that exits as soon as every row has stopped. It compiles
once per (batch, prompt length, max_new_tokens) shape, so callers bucket their prompt lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax.llm import LLM, init_cache
from blspkd_jax.model import BLSPKD, splice_speech


def token_ids(eos) -> tuple[int, ...]:
    """An id, a list of ids or None, as a tuple of ints."""
    if eos is None:
        return ()
    if isinstance(eos, int | np.integer):
        return (int(eos),)
    return tuple(int(t) for t in eos)


def default_pad_id(config, stop_ids: Sequence[int]) -> int:
    """transformers' rule for the fill after a row stops: pad_token_id, else the first eos."""
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    return int(stop_ids[0]) if stop_ids else 0


def select_token(logits, key, temperature, top_p, sample: bool):
    """Next token `[B]` from logits `[B, V]`: argmax, or a draw from `softmax(logits / temperature)`
    restricted to the top-p nucleus (the fewest most-probable tokens whose mass reaches `top_p`;
    the most probable token is always kept)."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    # A token is in the nucleus when the mass strictly above it is still short of top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _head(llm: LLM, hidden):
    """The LLM's output head on `[B, L, H]` (tied or not), as the module computes it."""
    if llm.config.tie_word_embeddings:
        return llm.embed_tokens.attend(hidden)
    return llm.lm_head(hidden)


@functools.partial(
    jax.jit,
    static_argnames=("module", "max_new_tokens", "stop_ids", "pad_id", "sample", "embeds"),
)
def _generate(
    params,
    prompt,
    attention_mask,
    lora_mask,
    temperature,
    top_p,
    rng,
    *,
    module: LLM,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sample: bool,
    embeds: bool,
):
    B, P = attention_mask.shape
    N = max_new_tokens
    # The last generated token is never fed back, so the cache needs P + N - 1 slots.
    cache = init_cache(module.config, B, P + N - 1)
    prompt_kw = {"inputs_embeds": prompt} if embeds else {"input_ids": prompt}
    hidden, v = module.apply(
        {"params": params, "cache": cache},
        **prompt_kw,
        attention_mask=attention_mask,
        lora_mask=lora_mask,  # PLoRA at the prompt's speech positions, prefill only
        return_hidden=True,
        decode=True,
        mutable=["cache"],
    )
    # Only the last prompt position predicts anything: never build [B, P, V] logits.
    logits = module.apply({"params": params}, hidden[:, -1:], method=_head)[:, 0]

    stops = jnp.asarray(stop_ids, jnp.int32)
    is_stop = lambda t: (t[:, None] == stops[None, :]).any(-1)
    alive = attention_mask.any(-1)  # an all-padding row (batch filler) generates nothing
    token = select_token(logits, jax.random.fold_in(rng, 0), temperature, top_p, sample)
    token = jnp.where(alive, token, pad_id)
    done = ~alive | is_stop(token)
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(token)
    feed_mask = jnp.ones((B, 1), jnp.int32)

    def cond(state):
        i, _, done, _, _ = state
        return (i < N) & ~done.all()

    def body(state):
        i, token, done, out, cache = state
        logits, v = module.apply(
            {"params": params, "cache": cache},
            token[:, None],
            attention_mask=feed_mask,
            decode=True,
            mutable=["cache"],
        )
        nxt = select_token(logits[:, 0], jax.random.fold_in(rng, i), temperature, top_p, sample)
        nxt = jnp.where(done, pad_id, nxt)  # transformers' fill after a row has stopped
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, done | is_stop(nxt), out, v["cache"]

    state = (jnp.ones((), jnp.int32), token, done, out, v["cache"])
    return jax.lax.while_loop(cond, body, state)[3]


def generate(
    module: LLM,
    params,
    *,
    input_ids=None,
    inputs_embeds=None,
    attention_mask=None,
    lora_mask=None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng=None,
) -> jax.Array:
    """New tokens `[B, max_new_tokens]` int32 after a left-padded prompt.

    - Prompt: `input_ids [B, L]` (text) or `inputs_embeds [B, L, H]` (e.g. a text prompt with CIF
      vectors spliced in) plus `lora_mask [B, L]`, 1 at the speech positions: PLoRA is on there
      during the prefill and off for every generated token.
    - `attention_mask [B, L]`: 1 = token, 0 = left padding (default all ones). A row with no token
      at all is batch filler: it generates only `pad_token_id`.
    - Stops a row at any id of `eos_token_id` (None: the module config's eos; `()` never stops);
      positions after a stop hold `pad_token_id` (None: the config's pad, else the first eos, else
      0), as transformers' generate does. The loop ends when every row has stopped.
    - `temperature == 0` is greedy (argmax); `temperature > 0` samples from the tempered softmax
      restricted to the top-p nucleus, which needs `rng` (a jax.random key).
    """
    config = module.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            "generate: pass exactly one of input_ids [B, L] and inputs_embeds [B, L, H]"
        )
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"generate: temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]"
        )
    sample = temperature > 0
    if sample and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng, a jax.random key")
    prompt = jnp.asarray(input_ids if inputs_embeds is None else inputs_embeds)
    B, L = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((B, L), jnp.int32)
    elif not isinstance(attention_mask, jax.core.Tracer):
        m = np.asarray(attention_mask).astype(np.int32)
        if m.shape != (B, L) or np.any(np.diff(m, axis=-1) < 0):
            raise ValueError(
                f"generate: attention_mask {m.shape} must be [B, L] = {(B, L)} and left-padded "
                "(zeros before ones in every row)"
            )
    if lora_mask is not None and not config.lora_rank:
        raise ValueError("generate: lora_mask given but the LLM config has lora_rank 0 (no PLoRA)")
    stop_ids = token_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    pad_id = default_pad_id(config, stop_ids) if pad_token_id is None else int(pad_token_id)
    return _generate(
        nn.unbox(params),
        prompt,
        jnp.asarray(attention_mask),
        None if lora_mask is None else jnp.asarray(lora_mask),
        jnp.float32(max(temperature, 1e-6)),  # only divides when sampling
        jnp.float32(top_p),
        jax.random.key(0) if rng is None else rng,
        module=module,
        max_new_tokens=int(max_new_tokens),
        stop_ids=stop_ids,
        pad_id=pad_id,
        sample=sample,
        embeds=inputs_embeds is not None,
    )


def greedy(
    module: LLM,
    params,
    input_ids,
    *,
    max_new_tokens: int,
    attention_mask=None,
    eos_token_id: int | Sequence[int] | None = None,
) -> jax.Array:
    """Prompt and greedy continuation, `[B, L + max_new_tokens]` (SPEC section 8).

    The same ids as transformers' `generate(do_sample=False)` for that model on left-padded
    prompts: `eos_token_id` None means the model config's eos; after a row's eos come pad ids
    (the config's pad, else the first eos), also once every row has stopped early.
    """
    new = generate(
        module,
        params,
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
    )
    return jnp.concatenate([jnp.asarray(input_ids, jnp.int32), new], axis=1)


# ----------------------------------------------------------------------------------------------
# Responses from a trained run: speech prompts (the CFormer's vectors spliced into the chat
# template where the transcript would be) and, for comparison, the transcript's text prompts.


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded generation prompts `[B, P]`: the prompt part of the training layout (system
    turn, user turn = instruction + transcript-or-speech, assistant header)."""

    input_ids: np.ndarray  # int32; speech slots and padding hold the layout's pad id
    attention_mask: np.ndarray  # bool: False = left padding; an all-False row is batch filler
    speech_mask: np.ndarray  # bool: the speech slots (the speech vectors go here, PLoRA on)


def build_prompts(
    layout, spans: Sequence, instructions: Sequence[str | None] | None = None, *, batch_size=None
) -> PromptBatch:
    """Prompts from the layout's template pieces around each row's span.

    `spans[b]` is an int N (N speech slots: inference's CIF length, which varies per row) or a
    sequence of token ids (a text prompt). `instructions[b]` None means the layout's default.
    The length is `labels.bucket_length` of the longest; rows beyond `len(spans)` up to
    `batch_size` are filler (no tokens).
    """
    from blspkd_jax.labels import bucket_length

    instructions = [None] * len(spans) if instructions is None else list(instructions)
    B = len(spans) if batch_size is None else batch_size
    if len(spans) > B or len(instructions) != len(spans):
        raise ValueError(
            f"build_prompts: {len(spans)} spans, {len(instructions)} instructions, batch {B}"
        )
    pieces = []
    for span, ins in zip(spans, instructions, strict=True):
        t = layout.template(ins)
        speech = isinstance(span, int | np.integer)
        mid = [layout.pad_id] * int(span) if speech else [int(i) for i in span]
        ids = [*t.prefix, *mid, *t.middle]
        mask = [False] * len(t.prefix) + [speech] * len(mid) + [False] * len(t.middle)
        pieces.append((ids, mask))
    P = bucket_length(max((len(ids) for ids, _ in pieces), default=1))
    out = PromptBatch(
        input_ids=np.full((B, P), layout.pad_id, np.int32),
        attention_mask=np.zeros((B, P), bool),
        speech_mask=np.zeros((B, P), bool),
    )
    for b, (ids, mask) in enumerate(pieces):
        out.input_ids[b, P - len(ids) :] = ids
        out.attention_mask[b, P - len(ids) :] = True
        out.speech_mask[b, P - len(ids) :] = mask
    return out


@functools.partial(jax.jit, static_argnames=("model",))
def _speech_vectors(params, features, feature_mask, *, model: BLSPKD):
    tokens, token_mask, _ = model.apply(
        {"params": params}, features, feature_mask, method=BLSPKD.speech
    )
    return tokens, token_mask.sum(-1)


def speech_vectors(run, features, feature_mask) -> tuple[jax.Array, np.ndarray]:
    """Encoder + CFormer in inference mode (no target lengths: CIF emits
    `N_b = max(1, round(sum(alpha_b)))` vectors, at most `model.adapter.max_tokens`).

    log-mel `[B, n_mels, F]`, mask `[B, F]` -> (vectors `[B, max_tokens, H]`, N `[B]` int).
    """
    tokens, counts = _speech_vectors(
        run.params, jnp.asarray(features), jnp.asarray(feature_mask), model=run.model
    )
    return tokens, np.asarray(counts)


@functools.partial(jax.jit, static_argnames=("module",))
def _splice(params, input_ids, speech_mask, vectors, *, module: LLM):
    text = module.apply({"params": params}, input_ids, method=LLM.embed)
    return splice_speech(text, vectors, speech_mask)


def generate_from_prompts(
    run,
    prompts: PromptBatch,
    vectors=None,
    *,
    lora: bool = True,
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> np.ndarray:
    """Greedy new tokens `[B, max_new_tokens]` for a prompt batch.

    With `vectors [B, N, H]`, the k-th speech slot of row b gets `vectors[b, k]` and PLoRA is on
    at the speech slots (`lora=False` switches it off: the base LLM); without, the prompt's ids
    are read as text.
    """
    llm_cfg = run.model.config.llm
    module = LLM(llm_cfg)
    kw = dict(
        attention_mask=jnp.asarray(prompts.attention_mask),
        max_new_tokens=max_new_tokens,
        eos_token_id=tuple(stop_ids),
        pad_token_id=run.layout.pad_id,
    )
    if vectors is None:
        return np.asarray(generate(module, run.llm_params, input_ids=prompts.input_ids, **kw))
    embeds = _splice(
        run.llm_params,
        jnp.asarray(prompts.input_ids),
        jnp.asarray(prompts.speech_mask),
        jnp.asarray(vectors),
        module=module,
    )
    lora_mask = jnp.asarray(prompts.speech_mask) if lora and llm_cfg.lora_rank else None
    return np.asarray(
        generate(module, run.llm_params, inputs_embeds=embeds, lora_mask=lora_mask, **kw)
    )


def stop_ids_for(run, instructions: Sequence[str | None]) -> tuple[int, ...]:
    """Every id that ends the assistant turn under any of these instructions (the template's
    end-of-turn token, the tokenizer's and the LLM config's eos), as `labels` uses."""
    from blspkd_jax.labels import stop_token_ids

    ids: set[int] = set()
    for ins in set(instructions) or {None}:
        ids.update(stop_token_ids(run.model.config.llm, run.tokenizer, run.layout, ins))
    return tuple(sorted(ids))


def decode_response(tokenizer, new_ids, stop_ids: Sequence[int]) -> str:
    """New tokens up to the first stop id, decoded without special tokens and stripped."""
    toks = [int(t) for t in new_ids]
    stops = set(stop_ids)
    cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
    return tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()


def _instructions(rows, instruction: str | None) -> list[str | None]:
    """`instruction` overrides every row's; else the row's own; else None (the run's default)."""
    return [instruction if instruction is not None else r.instruction for r in rows]


def frame_bucket(run, frames: int) -> int:
    """Mel frames to pad a batch to: the encoder's full window in 30 s mode, else the smallest
    of the run's `data.frame_buckets` that fits (else the encoder's window)."""
    enc = run.model.config.encoder
    window = 2 * enc.max_source_positions
    if frames > window:
        raise ValueError(
            f"{frames} mel frames ({frames / 100:.2f} s) exceed the encoder's window of "
            f"{window} frames (model.encoder.max_source_positions={enc.max_source_positions})"
        )
    if enc.pad_to_30s:
        return window
    return next((int(f) for f in run.config.data.frame_buckets if f >= frames), window)


def load_features(run, rows) -> tuple[np.ndarray, np.ndarray]:
    """Decode rows' audio (any format, resampled to 16 kHz mono) to padded log-mels
    `([B, n_mels, F], mask [B, F])`, as the training pipeline pads them."""
    from blspkd_jax.data import audio as audio_lib
    from blspkd_jax.data.manifest import DataError
    from blspkd_jax.features import log_mel, pad_features

    n_mels = run.model.config.encoder.num_mel_bins
    feats = []
    for r in rows:
        try:
            f = log_mel(audio_lib.load(r.audio, r.offset, r.duration), n_mels)
            frame_bucket(run, f.shape[1])  # raises for audio beyond the encoder's window
        except ValueError as e:  # AudioError, too short for one STFT window, or too long
            raise DataError(f"line {r.line} (id {r.id!r}): {e}") from None
        feats.append(f)
    longest = max(f.shape[1] for f in feats)
    return pad_features(feats, frame_bucket(run, longest))


def audio_lengths(rows) -> list[int]:
    """16 kHz samples of each row's audio from the file headers (cheap: nothing is decoded);
    a DataError names the first row whose file is missing or unreadable."""
    from blspkd_jax.data import audio as audio_lib
    from blspkd_jax.data.manifest import DataError

    lengths = []
    for r in rows:
        try:
            lengths.append(audio_lib.probe(r.audio, r.offset, r.duration).num_samples_16k)
        except audio_lib.AudioError as e:
            raise DataError(f"line {r.line} (id {r.id!r}): {e}") from None
    return lengths


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length, so padding and compiled shapes stay few."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _respond(
    run,
    rows: list,
    instruction: str | None,
    lengths: Callable[[list], Sequence[int]],
    batch_inputs: Callable[[list[int]], tuple[list, jax.Array | None]],
    desc: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> list[str]:
    """The batch loop that `speech_responses` and `text_responses` share (their arguments, in
    their order; `desc` names the progress bar): rows in batches of similar `lengths(rows)`, each
    batch's prompts (filler rows complete the last), greedy decoding, each row's response decoded
    up to its first stop id, returned in the rows' order.

    `batch_inputs(idx)` gives the batch's transcript slots (per row of `idx`: token ids, or a count
    of speech slots) and the speech vectors `[batch_size, N, H]` to splice there (None: text).
    """
    from tqdm import tqdm

    instructions = _instructions(rows, instruction)
    stops = stop_ids_for(run, instructions)
    out: list[str | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not progress)
    for idx in _by_length(lengths(rows), batch_size):
        slots, vectors = batch_inputs(idx)
        prompts = build_prompts(
            run.layout, slots, [instructions[i] for i in idx], batch_size=batch_size
        )
        new = generate_from_prompts(
            run, prompts, vectors, max_new_tokens=max_new_tokens, stop_ids=stops
        )
        for j, i in enumerate(idx):
            out[i] = decode_response(run.tokenizer, new[j], stops)
        bar.update(len(idx))
    bar.close()
    return out


def speech_responses(
    run,
    rows,
    *,
    instruction: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy responses to each row's speech (manifest `Row`s, in their order).

    Per batch (rows sorted by audio length, filler rows completing the last): log-mel ->
    encoder + CFormer in inference mode (N_b vectors) -> a prompt with N_b speech slots where the
    transcript would be -> spliced embeddings, PLoRA on at those slots during the prefill ->
    greedy decoding until an end-of-turn token.
    """
    rows = list(rows)

    def speech(idx):
        feats, mask = load_features(run, [rows[i] for i in idx])
        fill = batch_size - len(idx)  # filler rows repeat row 0's audio; their prompt is empty
        feats = np.concatenate([feats, np.repeat(feats[:1], fill, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], fill, 0)])
        vectors, counts = speech_vectors(run, feats, mask)
        return [int(n) for n in counts[: len(idx)]], vectors

    args = (max_new_tokens, batch_size, progress)
    return _respond(run, rows, instruction, audio_lengths, speech, "speech", *args)


def text_responses(
    run,
    rows,
    *,
    instruction: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy responses to each row's transcript (`Row.text`) in the same prompt: what the
    frozen LLM (PLoRA off) says when it reads the text. Speech and text responses that agree
    are the exact-match metric (SPEC section 9)."""
    from blspkd_jax.data.layout import text_ids

    rows = list(rows)
    spans = text_ids(run.tokenizer, [r.text for r in rows]) if rows else []
    lengths = lambda _rows: [len(s) for s in spans]  # tokenized once, above
    text = lambda idx: ([spans[i] for i in idx], None)
    args = (max_new_tokens, batch_size, progress)
    return _respond(run, rows, instruction, lengths, text, "text", *args)


def read_rows(manifest: str | os.PathLike):
    """A manifest's rows; a DataError lists each malformed line (`MANIFEST:LINE: reason`)."""
    from blspkd_jax.data.manifest import DataError, read_manifest

    rows, bad = read_manifest(manifest)
    if bad:
        raise DataError("\n".join(str(b) for b in bad))
    return rows


def write_jsonl(path: str | os.PathLike, records) -> None:
    """One JSON object a line, written to a temporary file and renamed into place."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.generate", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speech", help="greedy responses to a manifest's audio from a trained run")
    sp.add_argument("--workdir", required=True, help="a training run's workdir")
    sp.add_argument("--manifest", required=True, help="JSON Lines with 'audio' (and 'id')")
    sp.add_argument("--out", required=True, help='output JSON Lines: {"id", "response"} per row')
    sp.add_argument(
        "--instruction",
        default=None,
        help="replaces every row's instruction (default: the "
        "row's 'instruction', else the run's data.instruction)",
    )
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    sp.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    from blspkd_jax.data.manifest import DataError
    from blspkd_jax.workdir import RunError, load_run

    try:
        rows = read_rows(args.manifest)
        audio_lengths(rows)  # fail on a missing file before loading the model
        run = load_run(args.workdir, args.step)
        responses = speech_responses(
            run,
            rows,
            instruction=args.instruction,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
    except (DataError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_jsonl(
        args.out, ({"id": r.id, "response": s} for r, s in zip(rows, responses, strict=True))
    )
    print(f"wrote {len(rows)} responses to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
