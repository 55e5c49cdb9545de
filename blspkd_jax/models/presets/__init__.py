"""Architectures the shipped configs name, kept as data: each preset is a directory holding the
architecture fields of one Hugging Face repository's config.json (nothing else), named as the
directory `huggingface-cli download REPO --local-dir hf/NAME` creates. So a run can be planned
(`python -m blspkd_jax.train ... --compile-only TOPOLOGY`) before a single weight is downloaded.

`resolve(hf_path)` gives the directory to read a part's config.json from: `hf_path` itself when it
exists (after checking it against the preset of the same name, if there is one), else the preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from blspkd_jax.models.encoder import WhisperEncoderConfig
from blspkd_jax.models.hf import CheckpointError
from blspkd_jax.models.llm_config import LLMConfig

ROOT = Path(__file__).parent

# Preset directory -> the Hugging Face repository its config.json comes from.
REPOS = {
    "whisper-small": "openai/whisper-small",
    "whisper-large-v2": "openai/whisper-large-v2",
    "whisper-large-v3": "openai/whisper-large-v3",
    "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B",
    "Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B-Instruct",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
}

# LLMConfig fields whose config.json key has another name (messages name the key; Whisper's
# fields are config.json's own names).
_HF_KEY = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rope_factor": "rope_scaling.factor",
    "rope_low_freq_factor": "rope_scaling.low_freq_factor",
    "rope_high_freq_factor": "rope_scaling.high_freq_factor",
    "rope_original_max_position_embeddings": "rope_scaling.original_max_position_embeddings",
    "rope_type": "rope_scaling.rope_type",
    "qkv_bias": "attention_bias",
    "o_bias": "attention_bias",
}


def names() -> list[str]:
    return sorted(REPOS)


def find(hf_path: str | os.PathLike) -> Path | None:
    """The preset whose name is `hf_path`'s last component (case-insensitive), or None."""
    name = Path(os.fspath(hf_path).rstrip("/")).name.lower()
    for preset in REPOS:
        if preset.lower() == name:
            return ROOT / preset
    return None


def read(preset: str) -> dict:
    """A preset's config.json as a dict (`preset` is a directory name, see `names()`)."""
    if preset not in REPOS:
        raise KeyError(f"no preset {preset!r}; presets: {', '.join(names())}")
    return json.loads((ROOT / preset / "config.json").read_text())


def architecture(hf: dict) -> dict:
    """What a config.json decides about our model: the LLMConfig (every field) or the Whisper
    encoder's sizes, as a dict. Spelling differences between transformers versions (top-level
    `rope_theta` or `rope_parameters`) give the same dict."""
    if hf.get("model_type") == "whisper":
        return dataclasses.asdict(WhisperEncoderConfig.from_hf(hf))
    return dataclasses.asdict(LLMConfig.from_hf(hf))


def check(hf_path: str | os.PathLike, key: str = "hf_path") -> None:
    """Raise CheckpointError naming the first field where `hf_path/config.json` and the preset of
    the same name disagree about the model (a directory holding another model than its name
    says, or a wrong preset); nothing when no preset has that name."""
    preset = find(hf_path)
    if preset is None:
        return
    path = Path(hf_path) / "config.json"
    try:
        got = architecture(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{key}={hf_path}: no config.json in it") from None
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    want = architecture(read(preset.name))
    for field in want:
        if got[field] != want[field]:
            name = _HF_KEY.get(field, field)
            raise CheckpointError(
                f"{path}: {name} is {got[field]!r} but preset {preset.name} "
                f"({REPOS[preset.name]}) says {want[field]!r}: {key} holds another model than "
                "its name says"
            )


def resolve(hf_path: str | os.PathLike, key: str = "hf_path") -> str:
    """The directory to read a part's config.json from: `hf_path` when it is a directory (checked
    against its preset), else the preset of that name; CheckpointError naming `key` and the
    presets when neither exists."""
    if os.path.isdir(hf_path):
        check(hf_path, key)
        return os.fspath(hf_path)
    preset = find(hf_path)
    if preset is None:
        raise CheckpointError(
            f"{key}={hf_path}: not a directory, and no preset of that name to plan with "
            f"(presets: {', '.join(names())})"
        )
    return str(preset)
