"""The BLSP-KD objective on the composed model (docs/method.md §4): which rows each loss reads, the
loss terms from one tiled pass over the vocabulary, and the teacher/student consistency metrics
that evaluation reports with the same row selections.

input_kl: KL(teacher || student) at the N transcript positions; response_kl: at every logit that
predicts a response or end-of-turn token (shifted by one); response_ce: the student's cross-entropy
there; cif: the quantity loss. Losses are computed tile by tile from hidden states and the frozen
output head (`losses.py`), so no [B, L, V] logits are ever held for both passes; traced under the
trainer's mesh, each device tiles its own rows of the batch against the head gathered once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax.data.layout import HOST_KEYS
from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.models.cif import quantity_loss
from blspkd_jax.models.llm import lm_head_kernel
from blspkd_jax.models.sharding import global_batch
from blspkd_jax.training import losses

LOSS_NAMES = ("input_kl", "response_kl", "response_ce", "cif")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (docs/method.md §4 defaults) and the KL temperature."""

    input_kl: float = 1.0
    response_kl: float = 1.0
    cif: float = 1.0
    response_ce: float = 0.0
    temperature: float = 2.0
    # Rows per loss tile on each device (each tiles the rows it holds under the trainer's mesh);
    # 0: losses.default_tile_rows() for the backend.
    tile_rows: int = 0

    def weight(self, name: str) -> float:
        return float(getattr(self, name))


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
    model: BLSPKD,
    params,
    batch,
    loss_cfg: LossConfig,
    *,
    rng=None,
    deterministic=True,
    shared_prefix: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics) for one batch. Metrics hold every loss term by name, unweighted.

    `shared_prefix`: positions before every example's first speech position, which the student
    takes from the teacher instead of computing (`BLSPKD.__call__`); 0 computes everything.
    """
    rngs = {"dropout": rng} if rng is not None else {}
    student, teacher, aux = model.apply(
        {"params": params},
        batch,
        deterministic=deterministic,
        shared_prefix=shared_prefix,
        rngs=rngs,
    )
    B, L, H = student.shape
    head = lm_head_kernel(model.config.llm, params["llm"])
    rows = loss_rows(batch)
    s = student.reshape(B * L, H)
    t = teacher.reshape(B * L, H)
    terms = _vocabulary_terms(s, t, head, batch, rows, loss_cfg)
    if loss_cfg.cif:
        terms["cif"] = quantity_loss(
            aux["alphas"], None, batch["text_lengths"], batch["example_mask"]
        )
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


# ----------------------------------------------------------------------------------------------
# Consistency: how far the student's next-token predictions are from the teacher's on held-out
# pairs (docs/method.md §7), from one jitted pass of both per batch.

CONSISTENCY_KEYS = ("input_kl", "response_kl", "top1_input", "top1_response", "cif_length_error")


def consistency_sums(model: BLSPKD, params, batch, loss_cfg: LossConfig) -> dict[str, jax.Array]:
    """{name: (weighted sum, weight)} for one batch; divide after summing over batches."""
    student, teacher, aux = model.apply({"params": params}, batch)
    B, L, H = student.shape
    head = lm_head_kernel(model.config.llm, params["llm"])
    s, t = student.reshape(B * L, H), teacher.reshape(B * L, H)
    rows = {k: v.reshape(-1) for k, v in loss_rows(batch).items()}
    top_s = losses.top1_predictions(s, head, tile_rows=loss_cfg.tile_rows or None)
    top_t = losses.top1_predictions(t, head, tile_rows=loss_cfg.tile_rows or None)
    agree = (top_s == top_t).astype(jnp.float32)
    # Both KL terms from one pass over the vocabulary: one weight column per selection.
    names = ("input", "response")
    w = jnp.stack([rows[n] for n in names], -1).astype(jnp.float32)
    kl = losses.kd_kl(
        s, t, head, w, temperature=loss_cfg.temperature, tile_rows=loss_cfg.tile_rows or None
    )
    out = {}
    for k, name in enumerate(names):
        total = w[:, k].sum()
        out[f"{name}_kl"] = (kl[k] * total, total)
        out[f"top1_{name}"] = ((agree * w[:, k]).sum(), total)
    n = batch["text_lengths"].astype(jnp.float32)
    pred = jnp.maximum(1.0, jnp.round(aux["alpha_sum"]))
    ex = batch["example_mask"].astype(jnp.float32)
    err = jnp.abs(pred - n) / jnp.maximum(n, 1.0)
    out["cif_length_error"] = ((err * ex).sum(), ex.sum())
    return out


def consistency_fn(model: BLSPKD, loss_cfg: LossConfig):
    """`consistency_sums` jitted for `model` and `loss_cfg`: `(params, batch) -> sums`. Build it
    once and pass it to every `consistency()` call of a run, so that each eval batch shape
    compiles once, not at every evaluation (a new jitted function would trace and compile anew)."""
    return jax.jit(functools.partial(consistency_sums, model, loss_cfg=loss_cfg))


def cast_features(batch: dict, dtype) -> dict:
    """`batch` (host arrays) with its log-mel `features` [B, n_mels, F] cast to `dtype`, the
    encoder's compute dtype. The encoder's first op casts them to it anyway, so the result is the
    same, but bfloat16 halves the bytes sent to the device; float32 features stay as they are."""
    dtype = jnp.dtype(dtype)
    if batch["features"].dtype == dtype:
        return batch
    return {**batch, "features": np.asarray(batch["features"]).astype(dtype)}


# Eval batches dispatched but not finished that `consistency` lets pile up: the device has the next
# one queued while the host decodes, and a long eval set never sits in device memory at once.
EVAL_IN_FLIGHT = 2


def consistency(
    model: BLSPKD,
    params,
    pipeline,
    mesh,
    loss_cfg: LossConfig,
    *,
    max_batches: int = 0,
    sums_fn=None,
) -> dict[str, float]:
    """Consistency metrics over an eval pipeline (one ordered pass, or `max_batches`).

    `sums_fn`: `consistency_fn(model, loss_cfg)`, kept by a caller that evaluates repeatedly (the
    trainer); by default a new one (which compiles). The host reads the device once, at the end:
    each batch is dispatched and the next one decoded while it runs, and the per-batch sums are
    added up on the host in float64, in batch order.
    """
    if sums_fn is None:
        sums_fn = consistency_fn(model, loss_cfg)
    dtype = model.config.encoder.dtype
    results = []
    it = iter(pipeline)
    try:
        for i, batch in enumerate(it):
            if max_batches and i >= max_batches:
                break
            for key in HOST_KEYS:
                batch.pop(key, None)
            batch = cast_features(batch, dtype)
            with sharding.activate(mesh):
                results.append(sums_fn(params, global_batch(mesh, batch)))
            if len(results) > EVAL_IN_FLIGHT:
                jax.block_until_ready(results[-EVAL_IN_FLIGHT - 1])
    finally:
        it.close()
    totals: dict[str, list[float]] = {k: [0.0, 0.0] for k in CONSISTENCY_KEYS}
    for sums in jax.device_get(results):
        for k, (num, den) in sums.items():
            totals[k][0] += float(num)
            totals[k][1] += float(den)
    return {k: (num / den if den else float("nan")) for k, (num, den) in totals.items()}
