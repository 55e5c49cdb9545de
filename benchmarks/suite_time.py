"""Where the test suite's time goes: README's test command, with every process it starts (xdist
workers, the CLI and multi-process runs they launch) reporting JAX's compile and trace events.

    .venv/bin/python benchmarks/suite_time.py               # the whole suite, as `make test`
    .venv/bin/python benchmarks/suite_time.py tests/test_cif.py -k segment   # any pytest args

A `sitecustomize` put on PYTHONPATH registers a `jax.monitoring` listener in each process the
suite starts (a subprocess that replaces PYTHONPATH is not seen) and appends one line per event:
the test it belongs to (PYTEST_CURRENT_TEST, which the subprocesses inherit), XLA's backend compile
time or JAX's trace time. Printed: wall and CPU seconds of the whole run (CPU from the children's
rusage: every process the run waited for), the compile and trace totals with their share of the
CPU time, and the files costing the most, each with its compile count.
"""

from __future__ import annotations

import collections
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside every Python process of the suite: records compile and trace durations only.
SITECUSTOMIZE = """
import importlib.machinery, os, sys

_LOG = os.environ["BLSPKD_SUITE_TIME_LOG"]
_KINDS = {"backend_compile_duration": "compile", "jaxpr_trace_duration": "trace"}


def _record(event, seconds, **_):
    kind = _KINDS.get(event.rsplit("/", 1)[-1])
    if kind:
        test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
        with open(_LOG, "a") as f:
            f.write(f"{test}\\t{kind}\\t{seconds:.4f}\\n")


class _Hook:  # registers the listener as soon as jax._src.monitoring is first imported
    def find_spec(self, name, path=None, target=None):
        if name != "jax._src.monitoring":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.register_event_duration_secs_listener(_record)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
"""


def main(argv: list[str]) -> int:
    pytest_args = argv or ["-n", "auto", "--maxprocesses", "4", "--dist", "loadfile", "tests"]
    with tempfile.TemporaryDirectory(prefix="suite-time-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = Path(tmp) / "events.tsv"
        log.touch()
        env = {**os.environ, "BLSPKD_SUITE_TIME_LOG": str(log)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH", "")]))
        env.setdefault("BLSPKD_TEST_LIBTPU", str(REPO / ".venv" / "libtpu"))
        start = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", *pytest_args], cwd=REPO, env=env
        )
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [line.split("\t") for line in log.read_text().splitlines()]

    cpu = usage.ru_utime + usage.ru_stime
    total = collections.Counter()
    by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for test, kind, seconds in rows:
        total[kind] += float(seconds)
        f = by_file[test.split("::")[0]]
        f[kind] += float(seconds)
        f[kind + "_n"] += 1
    print(f"\npytest exit code {code}; wall {wall:.0f} s, CPU {cpu:.0f} s (user + system)")
    for kind in ("compile", "trace"):
        print(f"{kind}: {total[kind]:.0f} s, {total[kind] / cpu:.0%} of the CPU time")
    print("\n| file | compile s (programs) | trace s |\n|---|---:|---:|")
    for name, c in sorted(by_file.items(), key=lambda kv: -kv[1]["compile"])[:15]:
        print(f"| {name} | {c['compile']:.0f} ({c['compile_n']}) | {c['trace']:.0f} |")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
