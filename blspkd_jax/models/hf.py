"""Hugging Face checkpoints: config.json + safetensors in, and back out.

The name maps live beside the modules they describe (`encoder.py`, `llm_hf.py`); this file only
moves tensors between disk and those maps (the composed model's export format is `blspkd_hf.py`).
Weights are read from safetensors (single file or sharded with an index). A pickled
`pytorch_model.bin` is read only through `torch.load(weights_only=True)`, which refuses arbitrary
objects; nothing here ever unpickles with full pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from blspkd_jax.errors import UserError
from blspkd_jax.models import encoder, lazy, llm, llm_hf, sharding

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(UserError):
    """A checkpoint file is missing or malformed; the message names the file."""


# ----------------------------------------------------------------------------------------------
# safetensors, read and written directly so that bf16 stays bf16 (numpy has no bfloat16 of its own;
# ml_dtypes provides it) and large files are memory-mapped rather than copied.


def _safetensors_entries(path: Path) -> tuple[int, dict[str, tuple[np.dtype, tuple, int, int]]]:
    """(payload offset, {name: (dtype, shape, start, end)}) from a .safetensors header, every entry
    checked against the file's size; errors name the file and the tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: header length {header_len} exceeds file size {size}"
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    payload = size - 8 - header_len
    out = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for tensor {name!r}: {e}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtype.itemsize or end > payload:
            raise CheckpointError(
                f"{path}: tensor {name!r} claims bytes [{start}, {end}) which do not fit "
                f"shape {shape} of {info['dtype']} in a {payload}-byte payload"
            )
        out[name] = (dtype, shape, start, end)
    return 8 + header_len, out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as read-only memory-mapped numpy arrays."""
    path = Path(path)
    offset, entries = _safetensors_entries(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
    return {
        name: data[start:end].view(dtype).reshape(shape)
        for name, (dtype, shape, start, end) in entries.items()
    }


def lazy_safetensors(path: str | os.PathLike) -> dict[str, lazy.FileTensor]:
    """All tensors of one .safetensors file as `lazy.FileTensor`s: nothing is read until sliced."""
    path = Path(path)
    _, entries = _safetensors_entries(path)
    return {
        name: lazy.FileTensor(path, name, shape, dtype)
        for name, (dtype, shape, _, _) in entries.items()
    }


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Write `tensors` to one .safetensors file (atomically: a temporary file, then a rename)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays = {}
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray turns 0-d into 1-d
        if a.dtype not in _ST_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        header[name] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        arrays[name] = a
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the payload 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Hugging Face directories.


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a Hugging Face directory, with an error naming the file if absent or bad."""
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{cfg}: not found (expected a Hugging Face model directory)"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: malformed JSON ({e})") from None


def _read_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index, expected a 'weight_map' ({e})") from None
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _torch_load_safe(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: pickled PyTorch weights need torch to read (with weights_only=True); "
            "install torch or convert the checkpoint to safetensors"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # torch raises UnpicklingError and friends
        raise CheckpointError(
            f"{path}: refused or unreadable as weights-only pickle ({e})"
        ) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.dtype == torch.bfloat16:
            out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def read_state_dict(path: str | os.PathLike, lazy_read: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face directory: safetensors first, sharded or not.

    Safetensors come memory-mapped, or with `lazy_read` as `lazy.FileTensor`s that read only the
    slices asked for (what loading into a mesh uses). Falls back to `pytorch_model.bin` (plain or
    sharded) read whole with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if (path / SAFE_INDEX).exists():
        files = _read_index(path / SAFE_INDEX)
        reader = lazy_safetensors if lazy_read else read_safetensors
    elif (path / SAFE_NAME).exists():
        files = [path / SAFE_NAME]
        reader = lazy_safetensors if lazy_read else read_safetensors
    elif (path / BIN_INDEX).exists():
        files, reader = _read_index(path / BIN_INDEX), _torch_load_safe
    elif (path / BIN_NAME).exists():
        files, reader = [path / BIN_NAME], _torch_load_safe
    else:
        raise CheckpointError(
            f"{path}: no weights found (expected {SAFE_NAME}, {SAFE_INDEX}, or a pytorch_model.bin)"
        )
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(reader(f))
    return tensors


def write_state_dict(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int = 5 << 30
) -> None:
    """Write model.safetensors, or shards plus an index when over `max_shard_bytes`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    # Remove what an earlier save left in this directory: readers prefer an index over a single
    # file, so a stale index would shadow the new weights.
    for stale in [path / SAFE_INDEX, path / SAFE_NAME, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(path / SAFE_NAME, shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, shard)
        for name, a in shard.items():
            weight_map[name] = fname
            total += np.asarray(a).nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def write_config(path: str | os.PathLike, config: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `out` to write into; when the block ends without an error it
    replaces `out` whole, otherwise it is deleted. So a reader never sees a half-written `out`,
    nor a mix of old and new files."""
    final = Path(out)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Public loaders (README's Python API) and their inverses.


def load_whisper_encoder(path, dtype=jnp.float32, mesh: Mesh | None = None, **overrides):
    """(module, params) for the encoder of a Hugging Face Whisper directory.

    `module.apply({"params": params}, input_features)` with `input_features [B, n_mels, T]` gives
    the final hidden states `[B, T/2, D]`. `dtype` is the compute and parameter dtype; `overrides`
    set other `WhisperEncoderConfig` fields (e.g. `param_dtype`, `pad_to_30s`, `scan_layers`).
    With a `mesh` (`sharding.make_mesh`), every parameter is read slice by slice straight into the
    sharding the rules table gives it (global arrays; no process holds a whole tensor).
    """
    overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    config = encoder.WhisperEncoderConfig.from_hf(read_config(path), **overrides)
    module = encoder.WhisperEncoder(config)
    if mesh is None:
        return module, encoder.params_from_hf(config, read_state_dict(path))
    host = encoder.host_params_from_hf(config, read_state_dict(path, lazy_read=True))
    unpadded = encoder.WhisperEncoder(dataclasses.replace(config, pad_to_30s=False))
    x = jax.ShapeDtypeStruct((1, config.num_mel_bins, 2), jnp.float32)
    abstract = jax.eval_shape(unpadded.init, jax.random.key(0), x)["params"]
    return module, sharding.place_host_tree(mesh, host, abstract, config.param_dtype)


def save_whisper_encoder(path, config, params) -> None:
    """Write a Whisper encoder as a Hugging Face directory (see `encoder.params_to_hf`)."""
    write_config(path, config.to_hf())
    write_state_dict(path, encoder.params_to_hf(config, params))


def load_llm(path, dtype=jnp.float32, mesh: Mesh | None = None, **overrides):
    """(module, params) for a Hugging Face decoder LLM directory (Llama, Qwen2/3, Mistral).

    `module.apply({"params": params}, input_ids)` gives logits `[B, L, V]`. `dtype` is the compute
    and parameter dtype; `overrides` set other `LLMConfig` fields. With a `mesh`, every parameter
    is read slice by slice straight into its sharding, as `load_whisper_encoder` does. The params
    are the checkpoint's base weights (no PLoRA, whatever `lora_rank` says).
    """
    overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    config = llm.LLMConfig.from_hf(read_config(path), **overrides)
    module = llm.LLM(config)
    if mesh is None:
        return module, llm_hf.params_from_hf(config, read_state_dict(path))
    host = llm_hf.host_params_from_hf(config, read_state_dict(path, lazy_read=True))
    base = llm.LLM(dataclasses.replace(config, lora_rank=0))
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(base.init, jax.random.key(0), ids)["params"]
    return module, sharding.place_host_tree(mesh, host, abstract, config.param_dtype)


def save_llm(path, config, params) -> None:
    """Write an LLM as a Hugging Face directory that transformers' AutoModelForCausalLM loads."""
    write_config(path, config.to_hf())
    write_state_dict(path, llm_hf.params_to_hf(config, params))
