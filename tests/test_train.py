"""The training program end to end, through the command line: a tiny run completes, writes
metrics and checkpoints, skips bad rows, resumes exactly after a kill, and rejects unknown keys;
two processes on a 2x2x2 mesh training into a bucket stop together on SIGTERM, resume, and
match the single-device run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import psutil
import pytest
from test_storage import BUCKET, gcs  # noqa: F401 - the bucket's fixture
from tiny import tiny_chat_tokenizer, tiny_llm_config

from blspkd_jax.data import storage
from blspkd_jax.demo.corpus import build_corpus
from blspkd_jax.models import hf
from blspkd_jax.models.llm import LLM
from blspkd_jax.training import checkpoint

REPO = Path(__file__).parent.parent

TINY = [
    "--config.total_steps=4",
    "--config.batch_size=4",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.data.worker_count=0",
    "--config.data.frame_buckets=(800,)",
    "--config.data.token_buckets=(96,)",
    "--config.data.max_text_tokens=40",
    "--config.model.encoder.d_model=32",
    "--config.model.encoder.encoder_layers=1",
    "--config.model.encoder.encoder_attention_heads=2",
    "--config.model.encoder.encoder_ffn_dim=64",
    "--config.model.adapter.n_pre=1",
    "--config.model.adapter.n_post=1",
    "--config.optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 16-sentence espeak corpus whose training manifest has two bad rows (line 2: malformed
    JSON, line 4: a missing file), a tokenizer and a random tiny LLM saved as an HF directory."""
    root = tmp_path_factory.mktemp("train")
    build_corpus(
        root / "corpus", num_sentences=16, variants=2, heldout_fraction=0.25, progress=False
    )
    lines = (root / "corpus/train.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    lines[3] = json.dumps({"audio": "missing.wav", "text": "gone"})
    (root / "corpus/train_with_bad_rows.jsonl").write_text("\n".join(lines) + "\n")
    tok = tiny_chat_tokenizer(root / "llm")
    cfg = tiny_llm_config(len(tok), tie_word_embeddings=True)
    params = LLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    hf.save_llm(root / "llm", cfg, jax.tree.map(np.asarray, nn.unbox(params)))
    return root


def _args(assets, workdir, *extra, manifest=None):
    """The training command line of the tests' tiny runs."""
    return [
        "--config",
        str(REPO / "configs/tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.train_manifest={manifest or assets / 'corpus/train_with_bad_rows.jsonl'}",
        f"--config.data.eval_manifest={assets / 'corpus/eval.jsonl'}",
        f"--config.model.llm.hf_path={assets / 'llm'}",
        *TINY,
        *extra,
    ]


def _train(args, env_extra=None, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "blspkd_jax.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _metrics(workdir):
    text = (storage.as_path(workdir) / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


STEPS = 6  # checkpoints at 2, 4, 6 (checkpoint_every_steps=2, the last 3 kept)
TERMS = ("loss", "input_kl", "response_kl", "cif")


def _assert_same_metrics(got, want, steps, names=TERMS, rtol=1e-6, atol=0.0):
    for step in steps:
        for name in names:
            np.testing.assert_allclose(got[step][name], want[step][name], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted single-device run of STEPS steps with a final evaluation: what the
    interrupted, resumed, sharded and multi-process runs below must reproduce."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    p = _train(_args(assets, workdir, f"--config.total_steps={STEPS}"))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    return workdir


def test_tiny_run_writes_metrics_checkpoints_and_logs(reference):
    metrics = _metrics(reference)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for name in TERMS:
        assert all(np.isfinite(m[name]) for m in metrics.values()), name
    assert sorted(int(d.name) for d in (reference / "checkpoints").iterdir()) == [2, 4, 6]
    assert (reference / "config.json").exists() and (reference / "tensorboard").is_dir()
    eval_rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/input_kl" in r for r in eval_rows)


def test_kill_and_resume_matches_the_uninterrupted_run(assets, reference, tmp_path):
    """Ctrl-C (SIGINT) a run once its first checkpoint exists: it says so at once, saves where
    it is and exits 128 + SIGINT before its last step; the same command then resumes from that
    checkpoint and logs the uninterrupted run's metrics. (SIGTERM takes the same path.)"""
    part = tmp_path / "part"
    p = _train(_args(assets, part, f"--config.total_steps={STEPS}"))
    deadline = time.time() + 900
    while not (part / "checkpoints" / "2").is_dir():
        assert p.poll() is None and time.time() < deadline, "the run ended before its first save"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "SIGINT: saving a checkpoint after this step" in out
    assert "rerun the same command to resume" in out and "Traceback" not in out
    stopped = max(int(d.name) for d in (part / "checkpoints").iterdir() if d.name.isdigit())
    assert 2 <= stopped < STEPS, stopped
    p = _train(_args(assets, part, f"--config.total_steps={STEPS}"))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    assert f"resumed from step {stopped}" in out
    resumed = _metrics(part)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _assert_same_metrics(resumed, _metrics(reference), range(stopped + 1, STEPS + 1))


def test_interrupted_save_leaves_previous_checkpoint_loadable(assets, reference, tmp_path):
    """orbax writes a step into a temporary folder and renames it when complete; a half-written
    step (what a kill mid-save leaves) must be ignored and the previous one restored."""
    from blspkd_jax.training import checkpoint

    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    ckpts = workdir / "checkpoints"
    for step in (4, 6):  # as if killed while writing step 4
        shutil.rmtree(ckpts / str(step))
    partial = ckpts / "4.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpts / "2", partial)
    (partial / "state" / "commit_success.txt").unlink(missing_ok=True)
    for f in list(partial.rglob("*"))[::2]:  # a torn write: half the files missing
        if f.is_file():
            f.unlink()
    mngr = checkpoint.manager(workdir)
    assert mngr.latest_step() == 2
    p = _train(_args(assets, workdir, f"--config.total_steps={STEPS}"))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    assert "resumed from step 2" in out
    _assert_same_metrics(_metrics(workdir), _metrics(reference), range(3, STEPS + 1))


def test_bad_rows_are_skipped_and_reported(reference):
    skipped = [json.loads(x) for x in (reference / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["line"]: s["reason"] for s in skipped}
    assert reasons[2].startswith("malformed JSON")
    assert reasons[4].startswith("audio file not found")


def test_mistakes_are_one_line_naming_the_key(assets, tmp_path):
    for extra, key in (
        ("--config.optim.learning_rat=1e-3", "'optim.learning_rate'"),
        ("--config.batch_size=-4", "batch_size=-4"),
        ("--config.data.train_manifest=", "data.train_manifest is empty"),
        ("--config.data.eval_manifest=nope://b/e.jsonl", "unsupported storage scheme nope://"),
    ):
        p = _train(_args(assets, tmp_path / "w", extra))
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 2, out
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and key in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "w" / "config.json").exists()  # nothing written for a bad config


def test_a_mistyped_key_is_reported_before_any_heavy_import():
    """The command line and the config file are checked first: a typo costs well under a second,
    not the seconds JAX, grain, orbax and transformers take to import."""
    heavy = ("jax", "flax", "grain", "orbax", "transformers", "torch")
    proc = _python(
        "import sys\n"
        "from blspkd_jax import train\n"
        "code = train.main(['--config', 'configs/tiny.py', '--workdir', 'unused',"
        " '--config.optim.learning_rat=1e-3'])\n"
        f"print(code, [m for m in {heavy!r} if m in sys.modules])\n"
    )
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: unknown config key 'optim.learning_rat'"), proc.stderr


def test_ctrl_c_during_start_up_ends_cleanly(assets, tmp_path):
    """Ctrl-C while the run is still starting (building the model, compiling): one line saying
    there is nothing to save, exit code 130, no traceback and no crash of the runtime."""
    p = _train(_args(assets, tmp_path / "w", "--config.total_steps=2"))
    for line in p.stdout:  # the mesh is built: the model, data and compilation come next
        if "processes," in line:
            break
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-3000:]
    assert "interrupted before training started" in out
    assert "Traceback" not in out and "Segmentation" not in out


def _skipped_lines(workdir) -> set[int]:
    text = (storage.as_path(workdir) / "skipped.jsonl").read_text()
    return {json.loads(x)["line"] for x in text.splitlines()}


def _launch(args, cwd, env_extra, log_dir):
    """launch/multiprocess.py: 2 processes x 4 virtual devices running `blspkd_jax.train args`,
    the launcher's own output to LOG_DIR/launcher.log (a pipe nobody reads would fill up and
    stall process 0, whose output the launcher copies)."""
    cmd = [sys.executable, str(REPO / "launch/multiprocess.py"), "--num-processes=2",
           "--devices-per-process=4", f"--log-dir={log_dir}", "--", *args]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "launcher.log", "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _process_logs(log_dir) -> list[str]:
    return [(log_dir / f"process{p}.log").read_text() for p in range(2)]


def _process(launcher, process_id: int):
    """The training process the launcher started as process `process_id`."""
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("BLSPKD_PROCESS_ID") == str(process_id):
            return child
    raise AssertionError(f"the launcher has no process {process_id}")


@pytest.mark.slow
def test_two_processes_in_a_bucket_stop_together_resume_and_match_one_device(
    assets,
    reference,
    gcs,  # noqa: F811 - the bucket's fixture, imported
    tmp_path,
):
    """The launcher's 2 processes x 4 devices (mesh data=2, fsdp=2, tensor=2; each process decodes
    its own half of every batch), their workdir in a bucket (fake-gcs-server, test_storage.py).
    SIGTERM to the process that is not the coordinator, once the first checkpoint is in the
    bucket, makes both save the same step (agreed through JAX's preemption service) and exit;
    the same command resumes there on both. Config, metrics, TensorBoard events, skipped rows
    and checkpoints are in the bucket, nothing in the working directory, and every step's
    metrics equal the single-device reference's."""
    workdir = f"{BUCKET}/mp"
    mesh = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    args = _args(
        assets, workdir, f"--config.total_steps={STEPS}", "--config.data.eval_manifest=", *mesh
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log_dir = tmp_path / "logs"
    launcher = _launch(args, cwd, gcs, log_dir)
    try:
        deadline = time.time() + 600  # start-up compiles: minutes on a loaded 2-core machine
        while not checkpoint.steps(workdir):
            assert launcher.poll() is None, (log_dir / "launcher.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        _process(launcher, 1).send_signal(signal.SIGTERM)
        launcher.wait(timeout=300)
    finally:  # a failed assertion above must not leave the processes running
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children():
                child.kill()
            launcher.kill()
            launcher.wait()
    logs = _process_logs(log_dir)
    assert launcher.returncode != 0, (log_dir / "launcher.log").read_text()[-3000:]
    stopped = [re.search(r"stopped at step (\d+) \(SIGTERM", log) for log in logs]
    assert all(stopped), [log[-3000:] for log in logs]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step and 2 <= step < STEPS, step
    assert "Traceback" not in logs[0] + logs[1]
    assert "2 processes, 8 devices" in logs[0]
    assert checkpoint.steps(workdir)[-1] == step

    # Everything the run writes is in the bucket, nothing in the working directory.
    run = storage.as_path(workdir)
    config = json.loads((run / "config.json").read_text())
    assert config["mesh"] == {**config["mesh"], "data": 2, "fsdp": 2, "tensor": 2}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert _skipped_lines(run) == _skipped_lines(reference) >= {2, 4}
    assert list(cwd.iterdir()) == []

    # The same command resumes on both processes and ends the run.
    launcher = _launch(args, cwd, gcs, log_dir)
    launcher.wait(timeout=900)
    logs = _process_logs(log_dir)
    assert launcher.returncode == 0, [log[-3000:] for log in logs]
    assert all(f"resumed from step {step}" in log for log in logs), [log[-3000:] for log in logs]
    assert checkpoint.steps(workdir)[-1] == STEPS
    assert list(cwd.iterdir()) == []
    names = (*TERMS, "grad_norm")
    _assert_same_metrics(
        _metrics(workdir), _metrics(reference), range(1, STEPS + 1), names, 1e-5, 1e-6
    )


def _python(script: str) -> subprocess.CompletedProcess:
    """`python -c script` in the repository, its output captured."""
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _signalled_twice(stop_request: str, prelude: str = "") -> subprocess.CompletedProcess:
    """A process that builds `StopRequest(...)` with the arguments `stop_request`, sends itself
    SIGUSR1, reports whether the request recorded it, sends it again and sleeps."""
    return _python(
        "import os, signal, time\n"
        f"{prelude}"
        "from blspkd_jax.training.trainer import StopRequest\n"
        f"stop = StopRequest({stop_request})\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(1)\n"
        "print('asked:', stop.signum == signal.SIGUSR1, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(5)\n"
        "print('still alive', flush=True)\n"
    )


def test_a_second_signal_quits_at_once():
    """StopRequest: the first signal only asks the loop to stop (the process lives on), the
    second ends the process at once with 128 + the signal, each acknowledged as it arrives."""
    p = _signalled_twice("[signal.SIGUSR1]")
    assert p.returncode == 128 + signal.SIGUSR1, p.stdout + p.stderr
    assert "asked: True" in p.stdout and "still alive" not in p.stdout
    assert "SIGUSR1: saving a checkpoint after this step" in p.stderr
    assert "SIGUSR1: quitting now; the last complete checkpoint is kept" in p.stderr


def test_a_signal_while_starting_exits_even_inside_a_gc_callback():
    """Before `started()`, a signal exits at once with the starting message, even when it lands
    inside a garbage-collector callback (where Python drops a KeyboardInterrupt)."""
    script = (
        "import gc, os, signal, time\n"
        "from blspkd_jax.training.trainer import StopRequest\n"
        "stop = StopRequest([signal.SIGUSR1], starting='nothing to save yet')\n"
        "def callback(phase, info):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(2)\n"
        "gc.callbacks.append(callback)\n"
        "gc.collect()\n"
        "time.sleep(5)\n"
        "print('still alive', flush=True)\n"
    )
    p = _python(script)
    assert p.returncode == 128 + signal.SIGUSR1, p.stdout + p.stderr
    assert "SIGUSR1: nothing to save yet" in p.stderr and "still alive" not in p.stdout


def test_a_signal_is_forwarded_to_the_preemption_service_when_processes_must_agree():
    """StopRequest(agree=True), as every process of a multi-process run builds it: the first
    signal records the request and sends SIGTERM to its own process, where JAX's preemption
    notifier takes it (here a stand-in handler prints instead); the loop then stops at the agreed
    step. A second signal still quits at once."""
    stand_in = "lambda *_: print('notifier got SIGTERM', flush=True)"
    notifier = f"signal.signal(signal.SIGTERM, {stand_in})\n"
    p = _signalled_twice("[signal.SIGUSR1], agree=True", prelude=notifier)
    assert p.returncode == 128 + signal.SIGUSR1, p.stdout + p.stderr
    assert "notifier got SIGTERM" in p.stdout and "asked: True" in p.stdout, p.stdout
    assert "still alive" not in p.stdout
    assert "SIGUSR1: saving a checkpoint at the step all processes agree on" in p.stderr
