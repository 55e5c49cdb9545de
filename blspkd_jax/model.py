"""The composed BLSP-KD model: Whisper encoder -> CFormer -> LLM with PLoRA, and its losses.

One batch layout (`blspkd_jax.data.layout`) serves both passes. The teacher reads `input_ids`; the
student reads the same sequence with the transcript span (`speech_mask`) replaced, in order, by the
N speech vectors the CFormer cut from the audio. Because CIF emits exactly N vectors in training,
both sequences have the same length, positions and attention mask (SPEC section 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from blspkd_jax import losses
from blspkd_jax.adapter import CFormer, CFormerConfig
from blspkd_jax.encoder import WhisperEncoder, WhisperEncoderConfig, encoder_frame_mask
from blspkd_jax.llm import LLM, LLMConfig, lm_head_kernel

LOSS_NAMES = ("input_kl", "response_kl", "response_ce", "cif")


@dataclasses.dataclass(frozen=True)
class BLSPKDConfig:
    encoder: WhisperEncoderConfig
    adapter: CFormerConfig
    llm: LLMConfig


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (SPEC section 4 defaults) and the KL temperature."""

    input_kl: float = 1.0
    response_kl: float = 1.0
    cif: float = 1.0
    response_ce: float = 0.0
    temperature: float = 2.0
    tile_rows: int = 0  # rows per loss tile; 0: losses.default_tile_rows() for the backend

    def weight(self, name: str) -> float:
        return float(getattr(self, name))


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

    def teacher(self, batch):
        """The frozen LLM reading the transcript: final hidden states [B, L, H]."""
        return self.llm(
            batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True
        )

    def student(self, batch, deterministic=True):
        """The LLM hearing the speech, PLoRA on at speech positions: (hidden [B, L, H], aux)."""
        tokens, token_mask, aux = self.speech(
            batch["features"], batch["feature_mask"], batch["text_lengths"], deterministic
        )
        text = self.llm.embed(batch["input_ids"])
        embeds = splice_speech(text, tokens, batch["speech_mask"])
        hidden = self.llm(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            lora_mask=batch["speech_mask"],
            return_hidden=True,
            deterministic=deterministic,
        )
        return hidden, {**aux, "token_mask": token_mask}

    def __call__(self, batch, deterministic=True):
        if self.is_initializing():  # the losses read the output head without calling it
            self.llm(batch["input_ids"][:, :1])
        teacher = jax.lax.stop_gradient(self.teacher(batch))
        student, aux = self.student(batch, deterministic)
        return student, teacher, aux


def loss_rows(batch) -> dict[str, jax.Array]:
    """Row weights [B, L] for each loss, from the layout (the hidden state at i predicts i + 1).

    input_kl: the N transcript positions. response_kl / response_ce: every position whose next
    token is a response or end-of-turn token.
    """
    example = batch["example_mask"][:, None]
    speech = batch["speech_mask"] & example
    nxt = jnp.pad(batch["response_mask"][:, 1:], ((0, 0), (0, 1)))
    return {"input": speech, "response": nxt & example & batch["attention_mask"]}


def compute_losses(
    model: BLSPKD, params, batch, loss_cfg: LossConfig, *, rng=None, deterministic=True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics) for one batch. Metrics hold every loss term by name, unweighted."""
    rngs = {"dropout": rng} if rng is not None else {}
    student, teacher, aux = model.apply(
        {"params": params}, batch, deterministic=deterministic, rngs=rngs
    )
    B, L, H = student.shape
    head = lm_head_kernel(model.config.llm, params["llm"])
    rows = loss_rows(batch)
    s = student.reshape(B * L, H)
    t = teacher.reshape(B * L, H)
    terms = _vocabulary_terms(s, t, head, batch, rows, loss_cfg)
    if loss_cfg.cif:
        terms["cif"] = aux_quantity_loss(aux, batch)
    total = sum(loss_cfg.weight(k) * v for k, v in terms.items())
    metrics = {
        "loss": total,
        **terms,
        "cif_overflow": aux.get("overflow", jnp.zeros((), jnp.int32)),
        "num_examples": batch["example_mask"].sum(),
        "num_tokens": (batch["attention_mask"] & batch["example_mask"][:, None]).sum(),
    }
    return total, metrics


def _vocabulary_terms(s, t, head, batch, rows, loss_cfg: LossConfig) -> dict[str, jax.Array]:
    """The enabled KL and cross-entropy terms from one tiled pass over the vocabulary.

    s, t [B*L, H], head [H, V]. input_kl and response_kl are the same per-row KL averaged over
    two row selections, and response_ce reads the same student logits, so one call computes them
    all (`losses.kd_kl_and_cross_entropy`) instead of sweeping V once per term.
    """
    selection = {"input_kl": rows["input"], "response_kl": rows["response"]}
    kl_names = [n for n in selection if loss_cfg.weight(n)]
    # [B*L, K]: one weight column per enabled KL term.
    kl_weights = jnp.stack([selection[n].reshape(-1) for n in kl_names], -1) if kl_names else None
    kw = {"tile_rows": loss_cfg.tile_rows or None}
    kl, ce = None, None
    if loss_cfg.response_ce:
        labels = jnp.pad(batch["input_ids"][:, 1:], ((0, 0), (0, 1))).reshape(-1)
        ce_weights = rows["response"].reshape(-1)
        if kl_names:
            kl, ce = losses.kd_kl_and_cross_entropy(
                s, t, head, kl_weights, labels, ce_weights, temperature=loss_cfg.temperature, **kw
            )
        else:
            ce = losses.tiled_cross_entropy(s, head, labels, ce_weights, **kw)
    elif kl_names:
        kl = losses.kd_kl(s, t, head, kl_weights, temperature=loss_cfg.temperature, **kw)
    terms = {n: kl[k] for k, n in enumerate(kl_names)}
    if ce is not None:
        terms["response_ce"] = ce
    return terms


def aux_quantity_loss(aux: Mapping[str, jax.Array], batch) -> jax.Array:
    """SPEC section 3's `|sum(alpha) - n| / n`, averaged over the real examples of the batch."""
    n = batch["text_lengths"].astype(jnp.float32)
    err = jnp.abs(aux["alpha_sum"] - n) / jnp.maximum(n, 1.0)
    ex = batch["example_mask"].astype(jnp.float32)
    return jnp.sum(err * ex) / jnp.maximum(ex.sum(), 1.0)
