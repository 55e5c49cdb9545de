"""From a run's config to its model and data: the BLSP-KD model config, the loss config, the
tokenizer, and the data options the encoder decides (mel bins, frame buckets), each checked
before anything is compiled, with errors that name the config key.

Shared by training, generation, evaluation and export, so every entry point rebuilds exactly the
model a run trained (its weights come from `weights.assemble_params`). An empty `hf_path` means
random initialisation from the config's own sizes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import ml_collections

from blspkd_jax.data import packed, storage
from blspkd_jax.data.pipeline import DataConfig
from blspkd_jax.data.sources import parse_sources
from blspkd_jax.models import hf
from blspkd_jax.models.adapter import CFormerConfig
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.models.encoder import HF_CONFIG_KEYS as ENCODER_SIZE_KEYS
from blspkd_jax.models.encoder import WhisperEncoderConfig
from blspkd_jax.models.llm_config import LLMConfig
from blspkd_jax.training import optim
from blspkd_jax.training.config import ConfigError
from blspkd_jax.training.objective import LossConfig
from blspkd_jax.training.train_state import StepConfig

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
    raise ConfigError(
        f"model.encoder.pad_to_30s: expected 'auto', 'true' or 'false', got {value!r}"
    )


def encoder_config(c: ml_collections.ConfigDict) -> WhisperEncoderConfig:
    switches = dict(
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        scan_layers=c.scan_layers,
        remat=c.remat,
        pad_to_30s=_pad_to_30s(c.pad_to_30s, bool(c.hf_path)),
        chunk_frames=c.get("chunk_frames", 0),  # runs saved before the key existed
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
    """The model a run's config describes; a value out of range is a ConfigError naming its
    `model.*` key (a pretrained part's sizes come from its own config.json)."""
    try:
        return _model_config(config)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError | hf.CheckpointError):
            raise
        raise ConfigError(f"model: {e}") from None


def _model_config(config: ml_collections.ConfigDict) -> BLSPKDConfig:
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
        firing=a.get("firing", "rescale"),
        chunk_frames=enc.chunk_frames,
        dtype=a.dtype,
        param_dtype=a.param_dtype,
        scan_layers=a.scan_layers,
        remat=a.remat,
    )
    return BLSPKDConfig(encoder=enc, adapter=adapter, llm=llm)


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
    path = config.model.llm.tokenizer_path or config.model.llm.hf_path
    if not path:
        raise ConfigError(
            "model.llm.tokenizer_path (or model.llm.hf_path) must name a Hugging Face tokenizer "
            "directory: the chat template and the transcript tokens come from it"
        )
    return path


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(**{f.name: config.loss[f.name] for f in dataclasses.fields(LossConfig)})


def step_config(config: ml_collections.ConfigDict) -> StepConfig:
    """What the train step trains and how: `train.trainable`, `loss.*`, `grad_accum_steps`."""
    return StepConfig(
        trainable=tuple(config.train.trainable),
        loss=loss_config(config),
        grad_accum_steps=config.grad_accum_steps,
    )


def optimizer(config: ml_collections.ConfigDict):
    """(optax transformation, learning-rate schedule) from `optim.*` and `total_steps`; a value
    out of range is a ConfigError."""
    o = config.optim
    try:
        return optim.make_optimizer(
            learning_rate=o.learning_rate,
            warmup_steps=o.warmup_steps,
            total_steps=config.total_steps,
            decay=o.decay,
            end_factor=o.end_factor,
            weight_decay=o.weight_decay,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            grad_clip_norm=o.grad_clip_norm,
        )
    except ValueError as e:  # optim.* out of range
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# What the encoder decides, and everything else checked before a compile.


def _auto_frame_buckets(window: int, pad_to_30s: bool) -> tuple[int, ...]:
    """The encoder's full window in 30 s mode (the only length it accepts), else a quarter, half
    and all of it."""
    if pad_to_30s:
        return (window,)
    return tuple(sorted({2 * (window // 8), 2 * (window // 4), window}))


def data_config(
    config: ml_collections.ConfigDict, model_cfg: BLSPKDConfig, process_count: int
) -> DataConfig:
    """This process's data options. `data.n_mels` 0 takes the encoder's mel bins and
    `data.frame_buckets` () the buckets its padding mode allows; explicit values that clash with
    the encoder are a ConfigError naming both keys."""
    enc = model_cfg.encoder
    source = (
        f"model.encoder.hf_path={config.model.encoder.hf_path}"
        if config.model.encoder.hf_path
        else "model.encoder.num_mel_bins"
    )
    n_mels = config.data.n_mels or enc.num_mel_bins
    if n_mels != enc.num_mel_bins:
        raise ConfigError(
            f"data.n_mels={config.data.n_mels} but the encoder reads {enc.num_mel_bins} mel bins "
            f"({source}): leave data.n_mels at 0 to follow the encoder"
        )
    window = 2 * enc.max_source_positions
    buckets = tuple(int(b) for b in config.data.frame_buckets)
    if not buckets:
        buckets = _auto_frame_buckets(window, enc.pad_to_30s)
    why = "auto: a pretrained encoder" if config.model.encoder.pad_to_30s == "auto" else "set"
    if enc.pad_to_30s and buckets != (window,):
        raise ConfigError(
            f"model.encoder.pad_to_30s is true ({why}), so every input is padded to the "
            f"encoder's {window}-frame window, but data.frame_buckets={buckets}: set "
            f"--config.data.frame_buckets='({window},)', or --config.model.encoder.pad_to_30s="
            "false for variable-length input"
        )
    if max(buckets) > window:
        raise ConfigError(
            f"data.frame_buckets={buckets} exceeds the encoder's window of {window} frames "
            f"(model.encoder.max_source_positions={enc.max_source_positions})"
        )
    try:
        data = DataConfig.from_config(config, process_count)
        data = dataclasses.replace(data, n_mels=n_mels, frame_buckets=buckets)
        data.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return data


def check_config(config: ml_collections.ConfigDict, model_cfg: BLSPKDConfig) -> None:
    """The checks no single part makes, each a ConfigError naming its key: the run's lengths, the
    files it names, the trainable patterns, and what the model can hold."""
    positive = (
        "total_steps",
        "batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    )
    for key in positive:
        least = 0 if key == "total_steps" else 1
        if config[key] < least:
            raise ConfigError(f"{key}={config[key]}: expected a number >= {least}")
    if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps}: expected a positive divisor of "
            f"batch_size={config.batch_size}"
        )
    for key in ("data.train_manifest", "data.eval_manifest"):
        path = config.data[key.split(".")[1]]
        if key == "data.train_manifest" and not path:
            raise ConfigError(
                "data.train_manifest is empty: set --config.data.train_manifest=PATH (a JSON "
                "Lines manifest, see python -m blspkd_jax.data.check)"
            )
        if not path:
            continue
        try:
            sources = parse_sources(path, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for source in sources:  # a local path or a URL (gs://...), a manifest or a pack
            try:
                found = storage.isfile(source.path) or packed.is_packed(source.path)
            except ValueError as e:  # a scheme epath cannot open
                raise ConfigError(f"{key}: {e}") from None
            if not found:
                raise ConfigError(
                    f"{key}: {source.path}: no manifest or finished pack (data.packed) there"
                )
    tokenizer_path(config)
    for key in ("model.encoder.hf_path", "model.llm.hf_path", "model.llm.tokenizer_path"):
        part, name = key.rsplit(".", 1)
        path = config[part.split(".")[0]][part.split(".")[1]][name]
        if path and not os.path.isdir(path):
            raise ConfigError(f"{key}={path}: not a directory (expected a Hugging Face directory)")
    trainable = config.train.trainable
    if isinstance(trainable, str) or not all(isinstance(p, str) for p in trainable):
        raise ConfigError(
            f"train.trainable={trainable!r}: expected a tuple of regular expressions, e.g. "
            "--config.train.trainable=\"('^adapter/', 'lora_')\""
        )
    for pattern in trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"train.trainable: {pattern!r} is not a regular expression ({e})"
            ) from None
    max_n = int(config.data.max_text_tokens)
    if max_n > model_cfg.adapter.max_tokens:
        raise ConfigError(
            f"data.max_text_tokens={max_n} exceeds model.adapter.max_tokens="
            f"{model_cfg.adapter.max_tokens}: CIF could not emit one vector per token"
        )
