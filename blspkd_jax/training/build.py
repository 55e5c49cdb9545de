"""From a run's config to its model: the BLSP-KD model config, the loss config, the tokenizer.

Shared by training, generation, evaluation and export, so every entry point rebuilds exactly the
model a run trained (its weights come from `weights.assemble_params`). An empty `hf_path` means
random initialisation from the config's own sizes.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from blspkd_jax.models import hf
from blspkd_jax.models.adapter import CFormerConfig
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.models.encoder import HF_CONFIG_KEYS as ENCODER_SIZE_KEYS
from blspkd_jax.models.encoder import WhisperEncoderConfig
from blspkd_jax.models.llm_config import LLMConfig
from blspkd_jax.training.objective import LossConfig

LLM_SIZE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "tie_word_embeddings",
)


def _pad_to_30s(value: str, has_checkpoint: bool) -> bool:
    if value == "auto":
        return has_checkpoint
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"model.encoder.pad_to_30s: expected 'auto', 'true' or 'false', got {value!r}")


def encoder_config(c: ml_collections.ConfigDict) -> WhisperEncoderConfig:
    switches = dict(
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        scan_layers=c.scan_layers,
        remat=c.remat,
        pad_to_30s=_pad_to_30s(c.pad_to_30s, bool(c.hf_path)),
    )
    if c.hf_path:
        return WhisperEncoderConfig.from_hf(hf.read_config(c.hf_path), **switches)
    return WhisperEncoderConfig(**{k: c[k] for k in ENCODER_SIZE_KEYS}, **switches)


def llm_config(c: ml_collections.ConfigDict) -> LLMConfig:
    switches = dict(
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        scan_layers=c.scan_layers,
        remat=c.remat,
        lora_rank=c.lora_rank,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        lora_targets=tuple(c.lora_targets),
    )
    if c.hf_path:
        return LLMConfig.from_hf(hf.read_config(c.hf_path), **switches)
    return LLMConfig(**{k: c[k] for k in LLM_SIZE_KEYS}, **switches)


def model_config(config: ml_collections.ConfigDict) -> BLSPKDConfig:
    enc = encoder_config(config.model.encoder)
    llm = llm_config(config.model.llm)
    a = config.model.adapter
    adapter = CFormerConfig(
        d_model=enc.d_model,
        num_heads=a.num_heads or enc.encoder_attention_heads,
        ffn_dim=a.ffn_dim or enc.encoder_ffn_dim,
        n_pre=a.n_pre,
        n_post=a.n_post,
        llm_hidden=llm.hidden_size,
        max_tokens=a.max_tokens,
        out_norm=a.out_norm,
        cif_method=a.cif_method,
        dtype=a.dtype,
        param_dtype=a.param_dtype,
        scan_layers=a.scan_layers,
        remat=a.remat,
    )
    return BLSPKDConfig(encoder=enc, adapter=adapter, llm=llm)


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
    path = config.model.llm.tokenizer_path or config.model.llm.hf_path
    if not path:
        raise ValueError(
            "model.llm.tokenizer_path (or model.llm.hf_path) must name a Hugging Face tokenizer "
            "directory: the chat template and the transcript tokens come from it"
        )
    return path


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(**{f.name: config.loss[f.name] for f in dataclasses.fields(LossConfig)})
