"""hf.py's checkpoint I/O against the `safetensors` library, torch and transformers' own files."""

import json
import pathlib
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.torch import load_file as st_load_torch
from safetensors.torch import save_file as st_save_torch

from blspkd_jax.models import hf


def _tensors():
    rs = np.random.RandomState(0)
    return {
        "w": rs.randn(3, 5).astype(np.float32),
        "w16": rs.randn(4).astype(np.float16),
        "wbf16": rs.randn(2, 3).astype(ml_dtypes.bfloat16),
        "w64": rs.randn(2).astype(np.float64),
        "ids": np.arange(7, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(rs.randn(3, 4).astype(np.float32)),
    }


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), k


def test_safetensors_round_trip_all_dtypes(tmp_path):
    t = _tensors()
    hf.write_safetensors(tmp_path / "a.safetensors", t)
    _assert_same(hf.read_safetensors(tmp_path / "a.safetensors"), t)
    # The reference library reads what we write, bf16 included (via torch: numpy lacks bf16).
    ref = st_load_torch(tmp_path / "a.safetensors")
    assert ref["wbf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(ref["wbf16"].float().numpy(), t["wbf16"].astype(np.float32))
    no_bf16 = {k: v for k, v in t.items() if k != "wbf16"}
    hf.write_safetensors(tmp_path / "b.safetensors", no_bf16)
    _assert_same(st_load_numpy(tmp_path / "b.safetensors"), no_bf16)


def test_reads_files_written_by_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {
        "a": torch.randn(4, 3, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }
    st_save_torch(t, tmp_path / "m.safetensors")
    got = hf.read_safetensors(tmp_path / "m.safetensors")
    assert got["b"].dtype == ml_dtypes.bfloat16
    for k, v in t.items():
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), v.float().numpy())


def test_sharded_write_and_read_with_index(tmp_path):
    t = {f"layer{i}": np.full((64,), i, np.float32) for i in range(5)}  # 256 bytes each
    t["bf"] = np.ones((8,), ml_dtypes.bfloat16)
    hf.write_state_dict(tmp_path, t, max_shard_bytes=600)
    index = json.loads((tmp_path / hf.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and not (tmp_path / hf.SAFE_NAME).exists()
    assert sorted(index["weight_map"]) == sorted(t)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in t.values())
    for name, shard in index["weight_map"].items():  # each tensor is where the index says
        assert name in st_load_torch(tmp_path / shard)
    _assert_same(hf.read_state_dict(tmp_path), t)
    # Saving again unsharded into the same directory must not leave a stale index behind.
    small = {"x": np.arange(3, dtype=np.float32)}
    hf.write_state_dict(tmp_path, small)
    assert sorted(p.name for p in tmp_path.iterdir()) == [hf.SAFE_NAME]
    _assert_same(hf.read_state_dict(tmp_path), small)


def test_reads_transformers_sharded_checkpoint(tmp_path):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(
        num_mel_bins=8, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        encoder_ffn_dim=32, max_source_positions=8,
    )  # fmt: skip
    model = WhisperEncoder(cfg)
    model.save_pretrained(tmp_path, max_shard_size="4KB")
    assert (tmp_path / hf.SAFE_INDEX).exists()
    got = hf.read_state_dict(tmp_path)
    sd = model.state_dict()
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v.numpy())


def test_pytorch_bin_weights_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g).bfloat16()}
    torch.save(sd, tmp_path / hf.BIN_NAME)
    got = hf.read_state_dict(tmp_path)
    np.testing.assert_array_equal(got["a"], sd["a"].numpy())
    assert got["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["b"].astype(np.float32), sd["b"].float().numpy())
    # Sharded .bin with its index.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"a": sd["a"]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": sd["b"]}, sharded / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (sharded / hf.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    got = hf.read_state_dict(sharded)
    np.testing.assert_array_equal(got["a"], sd["a"].numpy())
    # safetensors wins when both are present.
    hf.write_safetensors(tmp_path / hf.SAFE_NAME, {"only": np.zeros(1, np.float32)})
    assert list(hf.read_state_dict(tmp_path)) == ["only"]


class _Payload:
    """Unpickling this would create `marker`: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"a": torch.zeros(2), "evil": _Payload(str(marker))}, ckpt / hf.BIN_NAME)
    with pytest.raises(hf.CheckpointError, match=r"pytorch_model\.bin: refused"):
        hf.read_state_dict(ckpt)
    assert not marker.exists()
    # A weights-only-legal pickle that is not a flat state dict is refused too, naming the entry.
    torch.save({"a": torch.zeros(2), "step": 3}, ckpt / hf.BIN_NAME)
    with pytest.raises(hf.CheckpointError, match="'step' is a int"):
        hf.read_state_dict(ckpt)


def _write_raw(path, header: bytes, payload: bytes = b"", header_len=None):
    n = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + header + payload)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(hf.CheckpointError, match="nowhere: not a directory"):
        hf.read_state_dict(tmp_path / "nowhere")
    with pytest.raises(hf.CheckpointError, match="no weights found"):
        hf.read_state_dict(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"config\.json: not found"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(hf.CheckpointError, match=r"config\.json: malformed JSON"):
        hf.read_config(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"x\.safetensors: file not found"):
        hf.read_safetensors(tmp_path / "x.safetensors")

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"abc")  # shorter than the 8-byte header length
    with pytest.raises(hf.CheckpointError, match="bad.safetensors: not a safetensors file"):
        hf.read_safetensors(bad)
    _write_raw(bad, b"{}", header_len=1000)
    with pytest.raises(hf.CheckpointError, match="bad.safetensors: header length 1000 exceeds"):
        hf.read_safetensors(bad)
    _write_raw(bad, b"{oops    ")
    with pytest.raises(hf.CheckpointError, match="bad.safetensors: not a safetensors file"):
        hf.read_safetensors(bad)
    _write_raw(bad, b"[1, 2]  ")
    with pytest.raises(hf.CheckpointError, match="bad.safetensors: not a safetensors file"):
        hf.read_safetensors(bad)
    entry = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    _write_raw(bad, json.dumps(entry).encode(), payload=b"\0" * 8)  # payload too short
    with pytest.raises(hf.CheckpointError, match="bad.safetensors: tensor 't' claims bytes"):
        hf.read_safetensors(bad)
    entry = {"t": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}
    _write_raw(bad, json.dumps(entry).encode(), payload=b"\0")
    with pytest.raises(
        hf.CheckpointError, match="bad.safetensors: bad header entry for tensor 't'"
    ):
        hf.read_safetensors(bad)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / hf.SAFE_INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(hf.CheckpointError, match=r"index\.json: malformed index"):
        hf.read_state_dict(ckpt)
    (ckpt / hf.SAFE_INDEX).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match=r"gone\.safetensors: file not found"):
        hf.read_state_dict(ckpt)
    (ckpt / hf.SAFE_INDEX).unlink()
    (ckpt / hf.BIN_NAME).write_bytes(b"not a pickle at all")
    with pytest.raises(hf.CheckpointError, match=r"pytorch_model\.bin: refused or unreadable"):
        hf.read_state_dict(ckpt)

    with pytest.raises(TypeError, match="'c'.*complex64"):
        hf.write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
