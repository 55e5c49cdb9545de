"""PyTorch modeling files that `blspkd_jax.export` copies into every export (loaded there by
transformers with `trust_remote_code=True`); they depend on torch and transformers only."""
