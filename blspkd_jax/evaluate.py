"""Text-speech consistency on held-out pairs (SPEC section 9).

Per batch, one jitted pass of teacher and student gives sums that add up over the eval set:
input_kl and response_kl (mean KL at the positions their losses use), top-1 agreement of the two
passes' next-token predictions at those positions, and the CIF length error |N_pred - N| / N with
N_pred = max(1, round(sum(alpha))) as inference would cut it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blspkd_jax import losses, sharding, train_state
from blspkd_jax.llm import lm_head_kernel
from blspkd_jax.model import BLSPKD, LossConfig, loss_rows

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
    out = {}
    for name, w in (("input", rows["input"]), ("response", rows["response"])):
        w = w.astype(jnp.float32)
        kl = losses.kd_kl(
            s, t, head, w, temperature=loss_cfg.temperature, tile_rows=loss_cfg.tile_rows or None
        )
        out[f"{name}_kl"] = (kl * w.sum(), w.sum())
        out[f"top1_{name}"] = ((agree * w).sum(), w.sum())
    n = batch["text_lengths"].astype(jnp.float32)
    pred = jnp.maximum(1.0, jnp.round(aux["alpha_sum"]))
    ex = batch["example_mask"].astype(jnp.float32)
    err = jnp.abs(pred - n) / jnp.maximum(n, 1.0)
    out["cif_length_error"] = ((err * ex).sum(), ex.sum())
    return out


def consistency(
    model: BLSPKD, params, pipeline, mesh, loss_cfg: LossConfig, *, max_batches: int = 0
) -> dict[str, float]:
    """Consistency metrics over an eval pipeline (one ordered pass, or `max_batches`)."""
    step = jax.jit(functools.partial(consistency_sums, model, loss_cfg=loss_cfg))
    totals: dict[str, list[float]] = {k: [0.0, 0.0] for k in CONSISTENCY_KEYS}
    it = iter(pipeline)
    try:
        for i, batch in enumerate(it):
            if max_batches and i >= max_batches:
                break
            batch.pop("line", None)
            with sharding.activate(mesh):
                sums = step(params, train_state.global_batch(mesh, batch))
            for k, (num, den) in jax.device_get(sums).items():
                totals[k][0] += float(num)
                totals[k][1] += float(den)
    finally:
        it.close()
    return {k: (num / den if den else float("nan")) for k, (num, den) in totals.items()}
