"""Stable name of continuous integrate-and-fire: `blspkd_jax.cif.cif(values, alphas, frame_mask, *,
max_tokens, target_lengths=None, method="parallel")`. The code is `blspkd_jax.models.cif`."""

from blspkd_jax.models.cif import METHODS, PARALLEL, cif, quantity_loss, token_lengths

__all__ = ["METHODS", "PARALLEL", "cif", "quantity_loss", "token_lengths"]
