"""Stable name of the Hugging Face loaders: `blspkd_jax.hf.load_whisper_encoder(path)` and
`blspkd_jax.hf.load_llm(path)` give `(module, params)` equal to transformers' models; `save_*`
write directories transformers loads. The code is `blspkd_jax.models.hf`."""

from blspkd_jax.models.hf import (
    CheckpointError,
    load_llm,
    load_whisper_encoder,
    read_config,
    read_safetensors,
    read_state_dict,
    save_llm,
    save_whisper_encoder,
    write_config,
    write_safetensors,
    write_state_dict,
)

__all__ = [
    "CheckpointError",
    "load_llm",
    "load_whisper_encoder",
    "read_config",
    "read_safetensors",
    "read_state_dict",
    "save_llm",
    "save_whisper_encoder",
    "write_config",
    "write_safetensors",
    "write_state_dict",
]
