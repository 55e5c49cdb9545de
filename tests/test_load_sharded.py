"""Loading straight into a mesh: lazy checkpoint tensors read only the slices asked for, equal to
numpy on the whole array; `hf.load_llm`/`hf.load_whisper_encoder(..., mesh=)` on 8 virtual devices
equal the unsharded load, in the rules table's shardings, with no read larger than one device's
shard; `train.frozen_dtype` keeps frozen parameters in bf16 and trained ones in fp32."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from tiny import OVERRIDES, run_on_cpu_devices

from blspkd_jax.models import hf, lazy, sharding
from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.training import build, optim, weights
from blspkd_jax.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]


def _indices(shape, rs, n=40):
    """Random basic indices: slices (with negative bounds and steps), ints (negative too),
    Ellipsis, and fewer entries than dimensions."""
    out = []
    for _ in range(n):
        idx = []
        for d in shape[: rs.randint(1, len(shape) + 1)]:
            kind = rs.randint(4)
            if kind == 0:
                idx.append(int(rs.randint(-d, d)))
            elif kind == 1:
                a, b = sorted(rs.randint(-d, d + 1, size=2))
                idx.append(slice(int(a), int(b)))
            elif kind == 2:
                idx.append(slice(int(rs.randint(d)), None, int(rs.randint(1, 3))))
            else:
                idx.append(slice(None))
        if len(idx) == len(shape) and rs.rand() < 0.3:
            idx = [Ellipsis, *idx[1:]]
        out.append(tuple(idx))
    return out


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_lazy_tensors_read_what_numpy_slices(tmp_path, dtype):
    rs = np.random.RandomState(0)
    arrays = {f"w{i}": rs.randn(5, 7, 3).astype(dtype) for i in range(3)}
    arrays["scalar"] = np.asarray(2.5, dtype)
    hf.write_safetensors(tmp_path / "m.safetensors", arrays)
    lazy_sd = hf.lazy_safetensors(tmp_path / "m.safetensors")
    assert isinstance(lazy_sd["w0"], lazy.FileTensor)
    assert np.asarray(lazy_sd["scalar"]) == arrays["scalar"]

    cases = {
        "file": (lazy_sd["w0"], arrays["w0"]),
        "T": (lazy_sd["w1"].T, arrays["w1"].T),
        "transpose": (lazy_sd["w1"].transpose(1, 2, 0), arrays["w1"].transpose(1, 2, 0)),
        "stack": (
            lazy.stack([lazy_sd[f"w{i}"].T for i in range(3)]),
            np.stack([arrays[f"w{i}"].T for i in range(3)]),
        ),
        "stack of numpy": (
            lazy.stack([arrays["w0"], arrays["w2"]]),
            np.stack([arrays["w0"], arrays["w2"]]),
        ),
    }
    for name, (lz, ref) in cases.items():
        assert lz.shape == ref.shape and lz.dtype == ref.dtype, name
        np.testing.assert_array_equal(np.asarray(lz), ref, err_msg=name)
        for idx in _indices(ref.shape, rs):
            got = lz[idx]
            assert got.shape == ref[idx].shape, (name, idx)
            np.testing.assert_array_equal(got, ref[idx], err_msg=f"{name} {idx}")
    with pytest.raises(IndexError, match="out of bounds"):
        lazy_sd["w0"][5]
    with pytest.raises(TypeError, match="integers and slices"):
        lazy_sd["w0"][np.array([0, 1])]


_MESH_SCRIPT = r"""
import dataclasses, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from tiny import tiny_llm_config
from blspkd_jax.models import encoder, hf, lazy, llm, sharding
from blspkd_jax.models.encoder import WhisperEncoderConfig
import flax.linen as nn
import ml_dtypes

out = sys.argv[1]
assert jax.device_count() == 8
# A checkpoint in bf16 (as real ones are), loaded in bf16 and in fp32.
cfg = tiny_llm_config(96, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=8)
params = llm.LLM(cfg).init(jax.random.key(1), np.zeros((1, 4), np.int32))["params"]
to_bf16 = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)
hf.save_llm(out + "/llm", cfg, jax.tree.map(to_bf16, nn.unbox(params)))
enc = WhisperEncoderConfig(num_mel_bins=16, d_model=64, encoder_layers=2,
    encoder_attention_heads=4, encoder_ffn_dim=128, max_source_positions=32, pad_to_30s=False)
x = np.zeros((1, 16, 64), np.float32)
eparams = encoder.WhisperEncoder(enc).init(jax.random.key(2), x)["params"]
hf.save_whisper_encoder(out + "/enc", enc, jax.tree.map(to_bf16, nn.unbox(eparams)))

# Record every slice a lazy tensor hands out: none may be bigger than one device's shard.
reads = []
orig = lazy.FileTensor._read
def counted(self, index):
    a = orig(self, index)
    reads.append((self.name, a.size, self.size))
    return a
lazy.FileTensor._read = counted

mesh = sharding.make_mesh(fsdp=8)
for dtype in ("bfloat16", "float32"):
    for scan in (False, True):
        loads = [
            (hf.load_llm, out + "/llm", dict(scan_layers=scan)),
            (hf.load_whisper_encoder, out + "/enc", dict(scan_layers=scan)),
        ]
        for load, path, kw in loads:
            reads.clear()
            _, ref = load(path, dtype, **kw)
            assert not reads  # the plain load reads memory-mapped arrays, not lazily
            module, got = load(path, dtype, mesh=mesh, **kw)
            flat_ref = jax.tree_util.tree_leaves_with_path(ref)
            flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
            assert len(flat_ref) == len(flat_got)
            sharded = 0
            for key, r in flat_ref:
                g = flat_got[key]
                assert g.dtype == r.dtype == np.dtype(dtype), key
                np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=str(key))
                assert g.sharding.mesh.shape == mesh.shape
                shard = g.sharding.shard_shape(g.shape)
                assert g.addressable_shards[0].data.shape == shard, key
                sharded += shard != g.shape
            assert sharded >= 4, sharded  # the big kernels are split over fsdp
            # Each read is one device's part of one tensor: never a whole sharded tensor.
            big = [n for n, got_size, size in reads if got_size > size // 8 and size >= 64 * 64]
            assert not big, big
print("sharded load == unsharded load")
"""


@pytest.mark.slow
def test_load_into_mesh_equals_plain_load(tmp_path):
    assert "sharded load == unsharded load" in run_on_cpu_devices(_MESH_SCRIPT, str(tmp_path))


def _tiny_config(*extra):
    config = config_lib.load_config(str(REPO / "configs/tiny.py"))
    # One LLM layer: each random initialisation below is compiled, threefry for every tensor.
    overrides = [*(o.removeprefix("--config.") for o in OVERRIDES), "model.llm.num_layers=1"]
    config_lib.apply_overrides(config, [*overrides, *extra])
    return config


def test_frozen_dtype_keeps_frozen_weights_in_bf16_and_trained_in_fp32():
    mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
    base = _tiny_config()
    model = BLSPKD(build.model_config(base))
    ref = weights.assemble_params(base, model, mesh)
    config = _tiny_config("train.frozen_dtype=bfloat16")
    got = weights.assemble_params(config, model, mesh)
    trainable, frozen = optim.split_trainable(got, config.train.trainable)
    assert trainable and frozen
    for k, v in trainable.items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref[k]))
    for k, v in frozen.items():
        assert v.dtype == ml_dtypes.bfloat16, k
        want = np.asarray(ref[k]).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(v), want)
    abstract, _ = weights.run_layout(config, model, mesh)
    assert {k: v.dtype for k, v in abstract.items()} == {k: v.dtype for k, v in got.items()}

    for bad in ("int8", "float33"):
        with pytest.raises(weights.WeightsError, match="train.frozen_dtype"):
            weights.run_layout(_tiny_config(f"train.frozen_dtype={bad}"), model, mesh)
