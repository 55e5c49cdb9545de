"""Stable name of the config machinery that config files import: `from blspkd_jax.config import
base_config` (every key with its default). The code is `blspkd_jax.training.config`."""

from blspkd_jax.training.config import (
    ConfigError,
    apply_overrides,
    base_config,
    load_config,
    save_config,
    set_key,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "base_config",
    "load_config",
    "save_config",
    "set_key",
]
