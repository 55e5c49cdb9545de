"""Config files (big_vision style): a Python file whose `get_config(arg)` returns a ConfigDict,
picked as `--config path.py[:arg]` and overridden leaf by leaf as `--config.a.b=value`.

Unknown keys are rejected by name, values are parsed to the type the config already holds, and
the resolved config is written to the workdir so a run can be reproduced from it alone.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_collections

from blspkd_jax.data import storage
from blspkd_jax.errors import UserError


class ConfigError(UserError):
    """A config file, key or value is wrong; the message names it."""


def load_module(path: str | Path):
    """Import a config file as a module (its folder need not be a package)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path.py` or `path.py:arg` -> the ConfigDict its `get_config(arg)` returns (unlocked)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg) function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (TypeError, AttributeError, KeyError) as e:
        # ml-collections refuses a value of another type, and an unknown key of a locked dict.
        raise ConfigError(f"{path}: get_config({arg!r}): {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    check_keys(config, path)
    return config


def check_keys(config: ml_collections.ConfigDict, where: str) -> None:
    """Refuse a config whose keys differ from `base_config()`'s, naming the first unknown key (a
    typo such as `optim.learning_rat`) with the closest known one, or the first missing key."""
    known, have = flatten(base_config()), flatten(config)
    unknown = [k for k in have if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown config key {unknown[0]!r}{hint}")
    missing = [k for k in known if k not in have]
    if missing:
        raise ConfigError(f"{where}: config has no {missing[0]!r}; start from base_config()")


def _parse_value(key: str, text: str, current):
    """Parse `text` to the type of `current` (the default held by the config)."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool, got {text!r}")
    if isinstance(current, str) or current is None:
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        return text
    # A tuple is the value people most often write without its syntax (--config.x=^adapter/).
    hint = ""
    if isinstance(current, tuple | list):
        hint = f'; a tuple is written with quotes and a comma: --config.{key}="({text!r},)"'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"--config.{key}: could not parse {text!r} as {type(current).__name__}{hint}"
        ) from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if not isinstance(value, type(current)):
        raise ConfigError(
            f"--config.{key}: expected {type(current).__name__} (default {current!r}), "
            f"got {text!r}{hint}"
        )
    return value


def set_key(config: ml_collections.ConfigDict, key: str, value, *, parse: bool = True) -> None:
    """Set dotted `key` in place, refusing keys the config does not have."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            close = difflib.get_close_matches(key, list(flatten(config)), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where = ".".join(parts[:i]) or "<top level>"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config key {key!r} ({hint}{where} has no {part!r}; its keys: "
                f"{', '.join(known)})"
            )
        if i < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    if parse and isinstance(value, str):
        value = _parse_value(key, value, node[last])
    with node.ignore_type():
        node[last] = value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply `--config.a.b=value` strings (or `a.b=value`) in order."""
    for item in overrides:
        text = item.removeprefix("--config.").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --config.KEY=VALUE")
        key, value = text.split("=", 1)
        set_key(config, key, value)


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.x=y` overrides from the other arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def save_config(config: ml_collections.ConfigDict, path: str | Path) -> None:
    """Write the resolved config as JSON (tuples become lists) for the record; `path` may be a
    URL (`gs://...`). Atomic: other processes of a resumed run read it while process 0 writes it,
    so a local file is written beside and renamed into place (an object store's write is whole)."""
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
    storage.write_atomic(path, text.encode())


def _tuples(x):
    """JSON lists back to the tuples the config held (`save_config` wrote tuples as lists)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def read_saved_config(path: str | Path) -> ml_collections.ConfigDict:
    """A config written by `save_config` (a run's `config.json`, local or a URL), tuples
    restored."""
    try:
        data = json.loads(storage.as_path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    return ml_collections.ConfigDict(_tuples(data))


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """{dotted key: leaf value}."""
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Every key a training config has, with its default. Config files start from this and change
# values; since overrides must name existing keys, a typo fails instead of being ignored.


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8  # global, over all processes
    c.grad_accum_steps = 1
    c.log_every_steps = 10
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.eval_every_steps = 0  # 0: only at the end
    c.eval_max_batches = 0  # 0: the whole eval manifest
    # Stop after this many skipped (non-finite) steps in a row. The host counts them on the
    # device and reads the count at log and checkpoint steps only, so the run stops at the
    # first of those after the streak (and saves no checkpoint after it).
    c.max_consecutive_nonfinite = 5
    c.peak_tflops_per_device = 0.0  # for MFU; 0: measure this device's matmul peak at start

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1}
    )

    c.data = ml_collections.ConfigDict(
        {
            "train_manifest": "",
            "eval_manifest": "",
            # (): the encoder's window in 30 s mode, else a quarter, half and all of it.
            "frame_buckets": (),
            "token_buckets": (64, 128, 256),
            "min_seconds": 0.1,
            "max_seconds": 30.0,
            "max_text_tokens": 200,
            "n_mels": 0,  # 0: the encoder's num_mel_bins
            "worker_count": 2,
            "worker_buffer_size": 2,
            # Each manifest's index (lengths in frames and tokens, bad rows) is kept beside it,
            # MANIFEST.index-KEY.npz, and read by later starts (blspkd_jax.data.index).
            "cache_index": True,
            "shuffle": True,
            "strict": False,
            "instruction": "",
            "system_prompt": "You are a helpful assistant.",
            "chat_template": "",
        }
    )

    m = ml_collections.ConfigDict()
    m.encoder = ml_collections.ConfigDict(
        {
            "hf_path": "",
            # Sizes for random init (ignored when hf_path is set): whisper-base.
            "num_mel_bins": 80,
            "d_model": 512,
            "encoder_layers": 6,
            "encoder_attention_heads": 8,
            "encoder_ffn_dim": 2048,
            "max_source_positions": 1500,
            "pad_to_30s": "auto",  # "auto" = true for a pretrained checkpoint, else false
            # > 0: chunk-causal attention by chunks of this many encoder frames (20 ms each) in
            # the encoder and the CFormer's pre-CIF layers, causal post-CIF layers: a model that
            # streams (README "Streaming"). 0: full attention, as Whisper was trained.
            "chunk_frames": 0,
            "dtype": "float32",
            "param_dtype": "float32",
            "scan_layers": False,
            "remat": "none",
        }
    )
    m.adapter = ml_collections.ConfigDict(
        {
            "num_heads": 0,  # 0: the encoder's
            "ffn_dim": 0,  # 0: the encoder's
            "n_pre": 4,
            "n_post": 4,
            "max_tokens": 256,
            "out_norm": False,
            "cif_method": "parallel",
            # CIF's rule at inference (training uses the transcript's length): "rescale" (the
            # paper's) or "threshold" (the stream's; README "Streaming").
            "firing": "rescale",
            "dtype": "float32",
            "param_dtype": "float32",
            "scan_layers": False,
            "remat": "none",
        }
    )
    m.llm = ml_collections.ConfigDict(
        {
            "hf_path": "",
            "tokenizer_path": "",  # "": hf_path's tokenizer
            # Sizes for random init (ignored when hf_path is set).
            "model_type": "qwen2",
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_layers": 24,
            "num_heads": 14,
            "num_kv_heads": 2,
            "tie_word_embeddings": True,
            "lora_rank": 0,  # > 0 adds PLoRA (stage 2)
            "lora_alpha": 16.0,
            "lora_dropout": 0.05,
            "lora_targets": ("q", "k", "v", "o", "gate", "up", "down"),
            "dtype": "float32",
            "param_dtype": "float32",
            "scan_layers": False,
            "remat": "none",
        }
    )
    c.model = m

    c.loss = ml_collections.ConfigDict(
        {
            "input_kl": 1.0,
            "response_kl": 1.0,
            "cif": 1.0,
            "response_ce": 0.0,
            "temperature": 2.0,
            "tile_rows": 0,  # 0: the backend default (losses.default_tile_rows)
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,
            "warmup_steps": 1000,
            "decay": "cosine",
            "end_factor": 0.0,
            "weight_decay": 0.05,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "grad_clip_norm": 1.0,
        }
    )
    # Regexes over parameter paths ("adapter/...", "encoder/...", "llm/.../lora_a"): stage 1
    # trains the adapter; stage 2 adds "lora_" (and optionally "^encoder/"). frozen_dtype: the
    # dtype of every parameter that does not train ("": the model's param_dtype; "bfloat16"
    # halves a frozen LLM's memory), while trained ones keep param_dtype as master copies.
    # share_prompt_prefix: the student takes the teacher's keys and values for the positions
    # before every example's transcript (system turn, user header, instruction: the same tokens
    # in both passes) instead of computing them forward and backward; off by itself when the
    # LLM's own weights train (LoRA aside), since their gradient must then flow through them.
    c.train = ml_collections.ConfigDict(
        {
            "trainable": ("^adapter/",),
            "init_from": "",
            "frozen_dtype": "",
            "share_prompt_prefix": True,
        }
    )
    return c
