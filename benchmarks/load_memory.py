"""Peak host memory while loading a >= 1 GB checkpoint onto 8 devices (issue 15): straight into
the mesh (`hf.load_llm(..., mesh=)`, slice by slice) vs loading whole and then sharding
(`hf.load_llm(...)` then `jax.device_put` into the same shardings, what the library did before).

    .venv/bin/python benchmarks/load_memory.py              # a 1.2 GiB bf16 Llama, fsdp=8
    .venv/bin/python benchmarks/load_memory.py --layers 2   # a small smoke run

Each way runs in a fresh process on 8 virtual CPU devices, so device memory is host memory and
the process's peak resident set (ru_maxrss) counts everything: the device buffers, what the load
held on the side, and the checkpoint pages mapped while read. Reported: that peak minus the
resident set just before loading, as a multiple of the checkpoint's size (1.0x is the loaded
model itself: nothing less is possible when the devices are this host's memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
from blspkd_jax.models import hf, sharding
from blspkd_jax.models.llm import LLM

path, way = sys.argv[1], sys.argv[2]
mesh = sharding.make_mesh(fsdp=8)
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kib()
t = time.perf_counter()
if way == "mesh":
    module, params = hf.load_llm(path, "bfloat16", mesh=mesh, scan_layers=True)
else:
    module, params = hf.load_llm(path, "bfloat16", scan_layers=True)
    ids = jax.ShapeDtypeStruct((1, 1), np.int32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    params = jax.device_put(params, sharding.logical_shardings(mesh, abstract))
jax.block_until_ready(params)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
shards = {len(x.addressable_shards) for x in jax.tree.leaves(params)}
print(json.dumps({"way": way, "rise_bytes": (peak - before) * 1024, "param_bytes": nbytes,
                  "seconds": seconds, "shards_per_array": sorted(shards)}))
"""


def write_checkpoint(path: Path, layers: int) -> int:
    """A Llama-shaped bf16 checkpoint (width 2048, MLP 5632, vocab 32000, untied head) written
    tensor by tensor; returns its size in bytes. Values are a cheap pattern, not random: only
    the bytes moved matter here."""
    import ml_dtypes
    import numpy as np

    from blspkd_jax.models import hf
    from blspkd_jax.models.llm_config import LLMConfig

    cfg = LLMConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=16,
        tie_word_embeddings=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    hf.write_config(path, cfg.to_hf())
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "model.embed_tokens.weight": (V, H),
        "lm_head.weight": (V, H),
        "model.norm.weight": (H,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (H, H)
        shapes[p + "mlp.gate_proj.weight"] = (F, H)
        shapes[p + "mlp.up_proj.weight"] = (F, H)
        shapes[p + "mlp.down_proj.weight"] = (H, F)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    # One file per tensor group keeps the writer's own memory at one tensor (an index maps them).
    weight_map, total = {}, 0
    for j, (name, shape) in enumerate(sorted(shapes.items())):
        a = (np.arange(np.prod(shape), dtype=np.float32) % 251 / 251).reshape(shape)
        fname = f"model-{j:05d}.safetensors"
        hf.write_safetensors(path / fname, {name: a.astype(ml_dtypes.bfloat16)})
        weight_map[name] = fname
        total += a.size * 2
        del a
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / hf.SAFE_INDEX).write_text(json.dumps(index))
    return total


def measure(path: Path, way: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), way],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{way}: child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=10, help="decoder layers (10: 1.2 GiB)")
    ap.add_argument("--dir", default="", help="where to write the checkpoint (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        path = Path(tmp) / "llm"
        t = time.perf_counter()
        size = write_checkpoint(path, args.layers)
        print(
            f"checkpoint: {size / 2**30:.2f} GiB bf16, written in {time.perf_counter() - t:.0f} s"
        )
        rows = [measure(path, way) for way in ("mesh", "whole-then-shard")]
    print("\n| way | peak host memory rise | x checkpoint | load time |")
    print("|---|---|---|---|")
    for r in rows:
        assert r["param_bytes"] == size, (r["param_bytes"], size)
        print(
            f"| {r['way']} | {r['rise_bytes'] / 2**30:.2f} GiB | "
            f"{r['rise_bytes'] / size:.2f}x | {r['seconds']:.1f} s |"
        )
    print(json.dumps({"checkpoint_bytes": size, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
