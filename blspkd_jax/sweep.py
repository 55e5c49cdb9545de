"""Run a sweep: `python -m blspkd_jax.sweep --config configs/tiny.py --workdir runs/sweep [--print]
[--config.key=value ...]`.

The config file's `get_sweep(arg)` lists the runs (`product` builds them from axes). They go one
after another locally, each as `python -m blspkd_jax.train` in WORKDIR/<run name> (rerunning the
sweep resumes every unfinished run), or `--print` prints each run's launch command for a
scheduler instead. At the end WORKDIR/summary.md and summary.json hold every run's final metrics.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from blspkd_jax.training import config as config_lib
from blspkd_jax.training.sweep import expand, launch_command, product, run_name, summarize

__all__ = ["main", "product"]


def main(argv=None) -> int:
    rest, extra = config_lib.split_argv(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.sweep", description=__doc__)
    ap.add_argument("--config", required=True, help="config file with get_sweep, path.py[:arg]")
    ap.add_argument("--workdir", required=True, help="each run goes to WORKDIR/<run name>")
    ap.add_argument("--print", action="store_true", help="print launch commands, run nothing")
    args = ap.parse_args(rest)
    try:
        runs = [(run_name(o), o) for o in expand(args.config, extra)]
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
