"""Pod-safe preemption, in a bucket: a 2-process run (gloo on 127.0.0.1) whose workdir and
manifest are gs:// URLs (fake-gcs-server, as in test_storage.py). SIGTERM to one process makes
both save the same step into the bucket and exit; config, metrics, TensorBoard events, skipped
rows and the checkpoint are all there and nothing is written locally; the rerun resumes there
on both."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from _runs import REPO, build_assets, start_processes, train_args, upload_assets, wait_all
from test_storage import BUCKET, gcs  # noqa: F401 - the bucket's fixture

from blspkd_jax.data import storage
from blspkd_jax.training import checkpoint


@pytest.fixture(scope="module")
def assets(gcs, tmp_path_factory):  # noqa: F811 - gcs is the imported fixture
    """The tiny run's LLM locally; its manifest (plus a row whose recording is missing) and
    recordings in gs://bkt/preempt-data."""
    root = build_assets(tmp_path_factory.mktemp("preemption"))
    upload_assets(root, f"{BUCKET}/preempt-data")
    return root


def _steps_shown(log) -> int:
    """The last step process 0's progress bar shows (metrics reach a bucket only every 30 s)."""
    shown = re.findall(r"(\d+)/100000 ", log.read_text()) if log.exists() else []
    return int(shown[-1]) if shown else 0


@pytest.mark.slow
def test_sigterm_to_one_process_in_a_bucket_stops_both_at_one_step_and_the_rerun_resumes(
    gcs,  # noqa: F811
    assets,
    tmp_path,
):
    workdir = f"{BUCKET}/preempt"
    args = train_args(
        workdir,
        f"{BUCKET}/preempt-data/train.jsonl",
        assets / "llm",
        # Long enough never to finish on its own; no periodic save before the preemption.
        "--config.total_steps=100000",
        "--config.checkpoint_every_steps=100000",
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    logs = [tmp_path / f"process{p}.log" for p in range(2)]
    procs = start_processes(args, logs, env_extra=gcs, cwd=cwd)
    try:
        deadline = time.time() + 600  # start-up compiles: minutes on a loaded 2-core machine
        while _steps_shown(logs[0]) < 2:  # training is under way on both (steps are collective)
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            assert time.time() < deadline, [log.read_text()[-2000:] for log in logs]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # the process that is not the coordinator
        codes = wait_all(procs, 120, logs)
    finally:  # a failed assertion above must not leave a process waiting on its peer
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [log.read_text() for log in logs]
    assert codes == [128 + signal.SIGTERM] * 2, [o[-3000:] for o in outs]
    stopped = [re.search(r"stopped at step (\d+) \(SIGTERM", o) for o in outs]
    assert all(stopped), [o[-3000:] for o in outs]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step and step >= 2
    assert "Traceback" not in outs[0] + outs[1]
    assert checkpoint.steps(workdir) == [step]

    # Everything the run writes is in the bucket, nothing in the working directory.
    run = storage.as_path(workdir)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["train_manifest"].startswith(BUCKET)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, step + 1))
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    skipped = json.loads((run / "skipped.jsonl").read_text())
    assert skipped["reason"].startswith("audio file not found")
    assert list(cwd.iterdir()) == []

    # The same command, now ending two steps later (total_steps may change on resume).
    rerun = [a for a in args if not a.startswith("--config.total_steps=")]
    rerun.append(f"--config.total_steps={step + 2}")
    logs = [tmp_path / f"rerun{p}.log" for p in range(2)]
    codes = wait_all(start_processes(rerun, logs, env_extra=gcs, cwd=cwd), 600, logs)
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], [o[-3000:] for o in outs]
    assert all(f"resumed from step {step}" in o for o in outs), [o[-3000:] for o in outs]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-3:] == [step, step + 1, step + 2]
    assert checkpoint.steps(workdir) == [step, step + 2]
    assert list(cwd.iterdir()) == []


def test_a_signal_is_forwarded_to_the_preemption_service_when_processes_must_agree():
    """StopRequest(agree=True), as every process of a multi-process run builds it: the first
    signal records the request and sends SIGTERM to its own process, where JAX's preemption
    notifier takes it (here a stand-in handler prints instead); the loop then stops at the agreed
    step. A second signal still quits at once."""
    script = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('notifier got SIGTERM', flush=True))\n"
        "from blspkd_jax.training.trainer import StopRequest\n"
        "stop = StopRequest([signal.SIGUSR1], agree=True)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(1)\n"
        "print('asked:', stop.signum == signal.SIGUSR1, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(5)\n"
        "print('still alive', flush=True)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 128 + signal.SIGUSR1, p.stdout + p.stderr
    assert "notifier got SIGTERM" in p.stdout and "asked: True" in p.stdout, p.stdout
    assert "still alive" not in p.stdout
    assert "SIGUSR1: saving a checkpoint at the step all processes agree on" in p.stderr
