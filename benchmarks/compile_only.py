"""Do the paper-scale configs fit their TPU slices? `--compile-only` for each, as a table.

    python benchmarks/compile_only.py [--libtpu .venv/libtpu] [--only NAME ...]

Runs `python -m blspkd_jax.train --config C --workdir unused --compile-only TOPOLOGY [overrides]`
for every row of RUNS (the real TPU compiler from libtpu, on this CPU machine: no weights, data or
TPU needed) and prints a Markdown table of what each reports: memory a chip against its HBM,
whether it fits, FLOPs a step and the MFU bound; the full reports go to benchmarks/results/.
`--libtpu` is a folder holding the libtpu package (`make test` installs one into .venv/libtpu);
without it, libtpu must be importable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).parent.parent

# (name, config, topology, overrides): the paper's runs at their global batches.
RUNS = [
    ("qwen7b-v2 stage1", "configs/qwen2_5_7b_large_v2.py:stage1", "v5p:4x4x4", []),
    ("qwen7b-v2 stage2", "configs/qwen2_5_7b_large_v2.py:stage2", "v5p:4x4x4", []),
    ("qwen7b-v2 stage1", "configs/qwen2_5_7b_large_v2.py:stage1", "v5p:2x2x1", []),
    ("qwen7b-v2 stage2", "configs/qwen2_5_7b_large_v2.py:stage2", "v5p:2x2x1", []),
    ("llama8b-v3 stage1", "configs/llama3_1_8b_large_v3.py:stage1", "v5p:4x4x4", []),
    ("llama8b-v3 stage2", "configs/llama3_1_8b_large_v3.py:stage2", "v5p:4x4x4", []),
]


def run(config: str, topology: str, overrides: list[str], libtpu: str) -> tuple[dict, str, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if libtpu:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "blspkd_jax.train", "--config", config, "--workdir", "unused"]
    cmd += ["--compile-only", topology, *overrides]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    lines = out.stdout.strip().splitlines()
    if out.returncode not in (0, 1) or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1]), out.stdout, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = REPO / ".venv" / "libtpu"
    ap.add_argument("--libtpu", default=str(default) if default.is_dir() else "")
    ap.add_argument("--only", nargs="*", help="rows whose name or topology contains any of these")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        "| run | topology | global batch / accum | a chip: state / temp / total | HBM | fits "
        "| PFLOP / step | MFU bound | compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, config, topology, overrides in RUNS:
        if args.only and not any(o in f"{name} {topology}" for o in args.only):
            continue
        s, text, secs = run(config, topology, overrides, args.libtpu)
        stem = f"{name.replace(' ', '_')}_{topology.replace(':', '_')}"
        (out_dir / f"{stem}.txt").write_text(text)
        m, gib = s["memory"], 2**30
        state = m.get("argument", 0) + m.get("output", 0) - m.get("alias", 0)
        cells = (
            f"{state / gib:.1f} / {m.get('temp', 0) / gib:.1f} / {s['per_chip_bytes'] / gib:.1f}"
            if "argument" in m
            else f"refused: {s['per_chip_bytes'] / gib:.1f} GiB"
        )
        print(
            f"| {name} | {topology} | {s['batch_size']} / {s['grad_accum_steps']} | {cells} GiB "
            f"| {s['hbm_bytes'] / gib:.0f} GiB | {'yes' if s['fits'] else 'no'} "
            f"| {s['flops_per_step'] / 1e15:.1f} | {100 * s['mfu_bound']:.0f}% | {secs:.0f} s |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
