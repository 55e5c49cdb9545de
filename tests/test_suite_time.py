"""benchmarks/suite_time.py: the suite's compile and trace time, counted in the processes pytest
starts, attributed to the test files that caused them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_compile_events_of_the_inner_run_are_counted_per_file():
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/suite_time.py",
            "tests/test_optim.py",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("pytest exit code 0; wall") for line in lines), out.stdout
    assert any(line.startswith("compile: ") and "of the CPU time" in line for line in lines)
    row = next(line for line in lines if line.startswith("| tests/test_optim.py |"))
    programs = int(row.split("(")[1].split(")")[0])
    assert programs > 0, row  # the optimizer tests jit their updates: each is a compile event
