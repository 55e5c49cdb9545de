"""The training program end to end, through the command line: a tiny run completes, writes
metrics and checkpoints, skips bad rows, resumes exactly after a kill, and rejects unknown keys."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_layout import tiny_chat_tokenizer
from tiny import tiny_llm_config

from blspkd_jax import hf
from blspkd_jax.data.corpus import build_corpus
from blspkd_jax.llm import LLM

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
    """A 16-sentence espeak corpus, a tokenizer and a random tiny LLM saved as an HF directory."""
    root = tmp_path_factory.mktemp("train")
    build_corpus(
        root / "corpus", num_sentences=16, variants=2, heldout_fraction=0.25, progress=False
    )
    tok = tiny_chat_tokenizer(root / "llm")
    cfg = tiny_llm_config(len(tok), tie_word_embeddings=True)
    params = LLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    hf.save_llm(root / "llm", cfg, jax.tree.map(np.asarray, nn.unbox(params)))
    return root


def _args(assets, workdir, *extra, manifest=None):
    return [
        "--config",
        str(REPO / "configs/tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.train_manifest={manifest or assets / 'corpus/train.jsonl'}",
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
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_tiny_run_then_kill_and_resume_matches(assets, tmp_path):
    full = tmp_path / "full"
    p = _train(_args(assets, full))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    metrics = _metrics(full)
    assert sorted(metrics) == [1, 2, 3, 4]
    for name in ("loss", "input_kl", "response_kl", "cif"):
        assert all(np.isfinite(m[name]) for m in metrics.values()), name
    assert (full / "checkpoints" / "4").is_dir() and (full / "config.json").exists()
    assert (full / "tensorboard").is_dir()
    eval_rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/input_kl" in r for r in eval_rows)

    # Kill a second run after its first checkpoint, rerun the same command: same metrics.
    part = tmp_path / "part"
    p = _train(_args(assets, part))
    deadline = time.time() + 900
    while not (part / "checkpoints" / "2").is_dir() and p.poll() is None:
        assert time.time() < deadline
        time.sleep(0.5)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    p.communicate(timeout=300)
    p = _train(_args(assets, part))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    resumed = _metrics(part)
    for step in (3, 4):
        for name in ("loss", "input_kl", "response_kl", "cif"):
            np.testing.assert_allclose(resumed[step][name], metrics[step][name], rtol=1e-6)


def test_bad_rows_are_skipped_and_reported(assets, tmp_path):
    rows = (assets / "corpus/train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    corpus = assets / "corpus"
    lines = [
        json.dumps({**json.loads(r), "audio": str(corpus / json.loads(r)["audio"])}) for r in rows
    ]
    lines[1] = "{not json"
    lines[3] = json.dumps({"audio": str(tmp_path / "missing.wav"), "text": "gone"})
    bad.write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "w"
    p = _train(_args(assets, workdir, "--config.total_steps=2", manifest=bad))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    skipped = [json.loads(x) for x in (workdir / "skipped.jsonl").read_text().splitlines()]
    assert {s["line"] for s in skipped} >= {2, 4}
    assert sorted(_metrics(workdir)) == [1, 2]


def test_unknown_config_key_is_rejected_by_name(assets, tmp_path):
    p = _train(_args(assets, tmp_path, "--config.optim.learning_rat=1e-3"))
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "learning_rat" in out and "learning_rate" in out


def test_multiprocess_launcher_runs_a_tiny_job(assets, tmp_path):
    workdir = tmp_path / "mp"
    cmd = [
        sys.executable,
        str(REPO / "launch/multiprocess.py"),
        "--num-processes=2",
        "--devices-per-process=1",
        "--",
        *_args(assets, workdir, "--config.total_steps=2", "--config.data.eval_manifest="),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    logs = "".join((workdir / f"process{i}.log").read_text()[-2000:] for i in range(2))
    assert p.returncode == 0, p.stderr + logs
    assert sorted(_metrics(workdir)) == [1, 2]
    assert "2 processes" in (workdir / "process0.log").read_text()


def test_mesh_2x2x2_on_8_devices_matches_one_device(assets, tmp_path):
    one, eight = tmp_path / "one", tmp_path / "eight"
    steps = ["--config.total_steps=2", "--config.data.eval_manifest="]
    p1 = _train(_args(assets, one, *steps, "--config.mesh.fsdp=1"))
    p8 = _train(
        _args(assets, eight, *steps, "--config.mesh.data=2", "--config.mesh.fsdp=2",
              "--config.mesh.tensor=2"),
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )  # fmt: skip
    for p in (p1, p8):
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    a, b = _metrics(one), _metrics(eight)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        for name in ("loss", "input_kl", "response_kl", "cif", "grad_norm"):
            np.testing.assert_allclose(b[step][name], a[step][name], rtol=1e-5, atol=1e-6)


def test_interrupted_save_leaves_previous_checkpoint_loadable(assets, tmp_path):
    """orbax writes a step into a temporary folder and renames it when complete; a half-written
    step (what a kill mid-save leaves) must be ignored and the previous one restored."""
    import shutil

    from blspkd_jax import checkpoint

    workdir = tmp_path / "w"
    p = _train(_args(assets, workdir, "--config.total_steps=2", "--config.data.eval_manifest="))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    ckpts = workdir / "checkpoints"
    partial = ckpts / "3.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpts / "2", partial)
    (partial / "state" / "commit_success.txt").unlink(missing_ok=True)
    for f in list(partial.rglob("*"))[::2]:  # a torn write: half the files missing
        if f.is_file():
            f.unlink()
    mngr = checkpoint.manager(workdir)
    assert mngr.latest_step() == 2
    p = _train(_args(assets, workdir, "--config.total_steps=3", "--config.data.eval_manifest="))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    assert "resumed from step 2" in out
    assert sorted(_metrics(workdir)) == [1, 2, 3]
