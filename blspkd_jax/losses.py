"""Stable name of the row-tiled distillation losses: `blspkd_jax.losses.kd_kl(student_hidden,
teacher_hidden, lm_head, weights, *, temperature=2.0)` and its siblings. The code is
`blspkd_jax.training.losses`."""

from blspkd_jax.training.losses import (
    default_tile_rows,
    kd_kl,
    kd_kl_and_cross_entropy,
    tiled_cross_entropy,
    top1_predictions,
)

__all__ = [
    "default_tile_rows",
    "kd_kl",
    "kd_kl_and_cross_entropy",
    "tiled_cross_entropy",
    "top1_predictions",
]
