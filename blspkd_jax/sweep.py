"""Sweeps (big_vision style): a config file's `get_sweep(arg)` returns a list of override dicts
(`product` builds one from axes); each becomes one run in its own workdir.

  python -m blspkd_jax.sweep --config configs/tiny.py --workdir runs/sweep [--print] \
      [--config.key=value ...]

Runs go one after another locally (each as `python -m blspkd_jax.train`, so rerunning the sweep
resumes every unfinished run), or `--print` prints each run's launch command instead. At the end
`WORKDIR/summary.md` and `summary.json` hold every run's final metrics.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from blspkd_jax import config as config_lib


def product(axes: Mapping[str, Sequence]) -> list[dict]:
    """{"optim.learning_rate": [1e-4, 3e-4], "seed": [0, 1]} -> the 4 combinations."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def run_name(overrides: Mapping) -> str:
    """A readable, filesystem-safe name for one run ("optim.learning_rate=0.0003,seed=1")."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    name = ",".join(parts) or "default"
    return "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in name)


def expand(config_spec: str) -> list[dict]:
    path, _, arg = config_spec.partition(":")
    module = config_lib.load_module(path)
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(f"{path}: defines no get_sweep(arg) function")
    runs = module.get_sweep(arg) if arg else module.get_sweep()
    base = config_lib.load_config(config_spec)
    for overrides in runs:  # fail before the first run if any key is unknown
        for key in overrides:
            config_lib.set_key(base.copy_and_resolve_references(), key, str(overrides[key]))
    return list(runs)


def launch_command(config_spec: str, workdir: Path, overrides: Mapping, extra: Sequence[str]):
    args = [sys.executable, "-m", "blspkd_jax.train", "--config", config_spec]
    args += ["--workdir", str(workdir), *extra]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args


def final_metrics(workdir: Path) -> dict:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    last: dict = {}
    for line in path.read_text().splitlines():
        last.update(json.loads(line))
    return last


def summarize(root: Path, runs: list[tuple[str, dict]]) -> str:
    rows = {name: final_metrics(root / name) for name, _ in runs}
    keys = ["step", "loss", "input_kl", "response_kl", "cif", "eval/input_kl", "eval/top1_input"]
    keys = [k for k in keys if any(k in r for r in rows.values())]
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    table = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(table)
    return table


def main(argv=None) -> int:
    rest, extra = config_lib.split_argv(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.sweep", description=__doc__)
    ap.add_argument("--config", required=True, help="config file with get_sweep, path.py[:arg]")
    ap.add_argument("--workdir", required=True, help="each run goes to WORKDIR/<run name>")
    ap.add_argument("--print", action="store_true", help="print launch commands, run nothing")
    args = ap.parse_args(rest)
    try:
        runs = [(run_name(o), o) for o in expand(args.config)]
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = Path(args.workdir)
    failed = []
    for name, overrides in runs:
        cmd = launch_command(args.config, root / name, overrides, extra)
        if args.print:
            print(shlex.join(cmd))
            continue
        print(f"=== run {name} ===", flush=True)
        if subprocess.run(cmd).returncode:
            failed.append(name)
    if args.print:
        return 0
    print(summarize(root, runs))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
