"""The composed BLSP-KD model: Whisper encoder -> CFormer -> LLM with PLoRA (its losses are in
`blspkd_jax.training.objective`).

One batch layout (`blspkd_jax.data.layout`) serves both passes. The teacher reads `input_ids`; the
student reads the same sequence with the transcript span (`speech_mask`) replaced, in order, by the
N speech vectors the CFormer cut from the audio. Because CIF emits exactly N vectors in training,
both sequences have the same length, positions and attention mask (docs/method.md §4).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax.models.adapter import CFormer, CFormerConfig
from blspkd_jax.models.encoder import WhisperEncoder, WhisperEncoderConfig, encoder_frame_mask
from blspkd_jax.models.llm import LLM, LLMConfig


@dataclasses.dataclass(frozen=True)
class BLSPKDConfig:
    encoder: WhisperEncoderConfig
    adapter: CFormerConfig
    llm: LLMConfig


def splice_speech(text_embeds, speech_tokens, speech_mask):
    """Put the N speech vectors, in order, at the transcript positions of the text embeddings.

    text_embeds [B, L, H], speech_tokens [B, N, H], speech_mask [B, L] -> [B, L, H]. The k-th True
    of `speech_mask[b]` receives `speech_tokens[b, k]`.
    """
    rank = jnp.cumsum(speech_mask.astype(jnp.int32), axis=-1) - 1
    rank = jnp.clip(rank, 0, speech_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(speech_tokens, rank[..., None], axis=1)
    return jnp.where(speech_mask[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class BLSPKD(nn.Module):
    """Encoder, adapter and LLM under one parameter tree {"encoder", "adapter", "llm"}."""

    config: BLSPKDConfig

    def setup(self):
        self.encoder = WhisperEncoder(self.config.encoder)
        self.adapter = CFormer(self.config.adapter)
        self.llm = LLM(self.config.llm)

    def speech(self, features, feature_mask, target_lengths=None, deterministic=True):
        """log-mel [B, n_mels, F] -> (speech tokens [B, N, H], token mask [B, N], adapter aux)."""
        h = self.encoder(features, feature_mask)
        frame_mask = encoder_frame_mask(feature_mask)
        return self.adapter(h, frame_mask, target_lengths, deterministic=deterministic)

    def teacher(self, batch, keep_kv: int = 0):
        """The frozen LLM reading the transcript: final hidden states [B, L, H] (and the first
        `keep_kv` positions' per-layer keys and values, see `LLM`)."""
        return self.llm(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            return_hidden=True,
            keep_kv=keep_kv,
        )

    def student(self, batch, deterministic=True, prefix_kv=None):
        """The LLM hearing the speech, PLoRA on at speech positions: (hidden [B, L, H], aux).
        PLoRA's branch runs on N rows per sequence (the CIF's N vectors), not on all L.

        With `prefix_kv` (the teacher's keys and values of the first P positions, before any
        speech position) only positions P.. are computed: hidden is then [B, L - P, H].
        """
        tokens, token_mask, aux = self.speech(
            batch["features"], batch["feature_mask"], batch["text_lengths"], deterministic
        )
        p = 0 if prefix_kv is None else prefix_kv["k"].shape[2]
        text = self.llm.embed(batch["input_ids"][:, p:])
        embeds = splice_speech(text, tokens, batch["speech_mask"][:, p:])
        hidden = self.llm(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"][:, p:],
            lora_mask=batch["speech_mask"][:, p:],
            lora_capacity=tokens.shape[1],  # CIF's N vectors: no sequence has more speech rows
            return_hidden=True,
            deterministic=deterministic,
            prefix_kv=prefix_kv,
            prefix_mask=None if prefix_kv is None else batch["attention_mask"][:, :p],
        )
        return hidden, {**aux, "token_mask": token_mask}

    def __call__(self, batch, deterministic=True, shared_prefix: int = 0):
        """(student hidden [B, L, H], teacher hidden [B, L, H], aux).

        `shared_prefix = P > 0` promises that no example has a speech position before P (the
        layout's shortest prompt prefix: system turn, user header, instruction). The two passes
        read the same tokens there with PLoRA off, so their hidden states, keys and values are
        equal; the student then starts from the teacher's keys and values at position P instead
        of computing the prefix again, forward and backward. Equal outputs up to float rounding
        (tests/test_train_step.py); only valid while the LLM's base weights are frozen, since no
        gradient reaches the prefix through the teacher.
        """
        if self.is_initializing():  # the losses read the output head without calling it
            self.llm(batch["input_ids"][:, :1])
        if not shared_prefix:
            teacher = jax.lax.stop_gradient(self.teacher(batch))
            student, aux = self.student(batch, deterministic)
            return student, teacher, aux
        teacher, kv = jax.lax.stop_gradient(self.teacher(batch, keep_kv=shared_prefix))
        tail, aux = self.student(batch, deterministic, prefix_kv=kv)
        student = jnp.concatenate([teacher[:, :shared_prefix].astype(tail.dtype), tail], axis=1)
        return student, teacher, aux


def example_batch(
    config: BLSPKDConfig, batch: int = 1, frames: int | None = None, tokens: int = 8
) -> dict[str, jax.ShapeDtypeStruct]:
    """The model's batch as abstract arrays (the keys `data.layout.make_batch` produces).

    `frames` defaults to the encoder's full window in 30 s mode (the only length it accepts) and to
    32 otherwise: parameter shapes don't depend on the batch, so this is what tracing an init needs.
    """
    enc = config.encoder
    if frames is None:
        frames = 2 * enc.max_source_positions if enc.pad_to_30s else 32
    shapes = {
        "features": ((batch, enc.num_mel_bins, frames), np.float32),
        "feature_mask": ((batch, frames), np.bool_),
        "input_ids": ((batch, tokens), np.int32),
        "attention_mask": ((batch, tokens), np.bool_),
        "speech_mask": ((batch, tokens), np.bool_),
        "response_mask": ((batch, tokens), np.bool_),
        "text_lengths": ((batch,), np.int32),
        "example_mask": ((batch,), np.bool_),
    }
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def init_fn(model: BLSPKD):
    """`rng -> boxed params` (logical axis names attached). One rng serves "params" and
    "dropout", so every caller draws the same random values for the same seed."""
    batch = example_batch(model.config)

    def init(rng):
        dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch)
        return model.init({"params": rng, "dropout": rng}, dummy)["params"]

    return init


def param_shapes(config: BLSPKDConfig) -> dict:
    """The nested parameter tree as `jax.ShapeDtypeStruct`s, unboxed: nothing is computed."""
    return nn.unbox(jax.eval_shape(init_fn(BLSPKD(config)), jax.random.key(0)))
