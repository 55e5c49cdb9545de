"""N JAX processes on this machine, joined through a coordinator on 127.0.0.1 (CPU: gloo).

  python launch/multiprocess.py --num-processes 2 --devices-per-process 2 -- \
      --config configs/tiny.py --workdir runs/mp [--config.key=value ...]

Each process gets BLSPKD_COORDINATOR / BLSPKD_NUM_PROCESSES / BLSPKD_PROCESS_ID (read by
`blspkd_jax.training.distributed.initialize`) and, on CPU, its own virtual devices. Process 0's
output is shown here as it runs and kept in LOGS/process0.log; process p logs to
LOGS/process{p}.log, where LOGS is --log-dir (default: the workdir, or ./process-logs when the
workdir is a URL such as gs://bucket/run). The launcher exits non-zero if any process fails,
and stops the others when one dies.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE_SECONDS = 60  # for the other processes to save and exit once one has stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tee(stream, log) -> None:
    """Copy a process's output to this terminal and its log as it comes (progress bars too)."""
    out = sys.stdout.buffer
    while chunk := os.read(stream.fileno(), 4096):
        out.write(chunk)
        out.flush()
        log.write(chunk)
        log.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=1, help="CPU virtual devices")
    ap.add_argument("--module", default="blspkd_jax.train")
    ap.add_argument("--log-dir", type=Path, help="process logs (default: the workdir)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's arguments")
    a = ap.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    workdir = args[args.index("--workdir") + 1] if "--workdir" in args else "."
    logs = a.log_dir or Path("process-logs" if "://" in workdir else workdir)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for p in range(a.num_processes):
        env = {
            **os.environ,
            "BLSPKD_COORDINATOR": f"127.0.0.1:{port}",
            "BLSPKD_NUM_PROCESSES": str(a.num_processes),
            "BLSPKD_PROCESS_ID": str(p),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={a.devices_per_process}",
        }
        log = open(logs / f"process{p}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", a.module, *args],
            env=env,
            stdout=subprocess.PIPE if p == 0 else log,
            stderr=subprocess.STDOUT,
        )
        if p == 0:  # process 0 speaks for the job: its output goes to the terminal and its log
            tee = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
            tee.start()
        procs.append((proc, log))
    others = ", ".join(str(logs / f"process{p}.log") for p in range(1, a.num_processes))
    print(
        f"{a.num_processes} processes started; process 0's output follows (also in "
        f"{logs / 'process0.log'}), the others log to {others or '-'}",
        file=sys.stderr,
        flush=True,
    )
    # Ctrl-C reaches every process of the terminal's group: the training processes agree on a
    # step, save it and exit, and the launcher waits for them rather than dying first.
    signal.signal(signal.SIGINT, lambda *_: None)
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        for i, (proc, _) in enumerate(procs):
            if codes[i] is None:
                codes[i] = proc.poll()
        if any(c not in (None, 0) for c in codes):
            # SIGTERM is a preemption notice to a training process: it saves at the step all
            # agree on and exits. One blocked in a collective with a dead peer never gets there,
            # so after a grace period it is killed.
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + GRACE_SECONDS
            for i, (proc, _) in enumerate(procs):
                try:
                    codes[i] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes[i] = proc.wait()
        time.sleep(0.2)
    tee.join(timeout=10)  # the rest of process 0's output
    for _, log in procs:
        log.close()
    for i, c in enumerate(codes):
        if c:
            print(f"process {i} exited with {c}; see {logs / f'process{i}.log'}", file=sys.stderr)
    return max(abs(c) for c in codes)


if __name__ == "__main__":
    sys.exit(main())
