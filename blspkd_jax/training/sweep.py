"""Sweeps (big_vision style): a config file's `get_sweep(arg)` returns a list of override dicts
(`product` builds one from axes); each becomes one run in its own workdir, launched as
`python -m blspkd_jax.train` (the command is `python -m blspkd_jax.sweep`).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from blspkd_jax.training import config as config_lib


def product(axes: Mapping[str, Sequence]) -> list[dict]:
    """{"optim.learning_rate": [1e-4, 3e-4], "seed": [0, 1]} -> the 4 combinations."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def run_name(overrides: Mapping) -> str:
    """A readable, filesystem-safe name for one run ("optim.learning_rate=0.0003,seed=1")."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    name = ",".join(parts) or "default"
    return "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in name)


def expand(config_spec: str, extra: Sequence[str] = ()) -> list[dict]:
    """The runs of a config file's `get_sweep(arg)`, after checking that every key they set, and
    every `--config.key=value` in `extra` (passed to every run), names a key of the config: a typo
    fails before the first run starts (or before `--print` prints anything)."""
    path, _, arg = config_spec.partition(":")
    module = config_lib.load_module(path)
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(f"{path}: defines no get_sweep(arg) function")
    runs = module.get_sweep(arg) if arg else module.get_sweep()
    base = config_lib.load_config(config_spec)
    config_lib.apply_overrides(base, extra)
    for overrides in runs:
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
