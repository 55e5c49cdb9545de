"""Export, evaluation (speech and text generation included) and continuation labels on a
2-process mesh (2 local processes x 2 CPU devices, joined over 127.0.0.1 with gloo collectives;
parameters sharded over all 4 devices, so no process holds the model), writing to a gs:// bucket
(fake-gcs-server, as in test_storage.py), give what one process writes to local disk: the same
export directory byte for byte, the same responses and labels, and the same metrics (the
consistency sums up to the float rounding of a 4-way split)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from _multiprocess_inference import run_all
from _runs import free_port
from test_storage import BUCKET, gcs  # noqa: F401 - the bucket's fixture

from blspkd_jax.data import storage

REPO = Path(__file__).parent.parent
SCRIPT = Path(__file__).parent / "_multiprocess_inference.py"


def _start(workdir, assets, out) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for p in range(2):
        env = {
            **os.environ,
            "BLSPKD_COORDINATOR": f"127.0.0.1:{port}",
            "BLSPKD_NUM_PROCESSES": "2",
            "BLSPKD_PROCESS_ID": str(p),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONPATH": str(REPO / "tests"),
        }
        cmd = [sys.executable, str(SCRIPT), str(workdir), str(assets), os.fspath(out)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _files(root) -> dict[str, bytes]:
    """Every file under a local folder or a bucket's prefix, by relative path."""
    if storage.is_url(root):
        fs, prefix = fsspec.core.url_to_fs(os.fspath(root))
        return {f[len(prefix) + 1 :]: fs.cat_file(f) for f in fs.find(prefix)}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("gcs")
def test_inference_on_two_processes_into_a_bucket_matches_one_process(tiny_run, tmp_path):
    workdir, assets, _ = tiny_run
    many, one = storage.as_path(f"{BUCKET}/mp"), tmp_path / "one"
    procs = _start(workdir, assets, many)
    try:
        # The single-process reference runs here meanwhile (1 device, local disk).
        run_all(workdir, assets, str(one))
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    result = json.loads(outs[0].split("RESULT ", 1)[1].splitlines()[0])
    assert result["processes"] == 2 and result["devices"] == 4, result

    # Export: every file the same, the weights' shards and index, OUT/llm and the card included.
    a, b = _files(many / "export"), _files(one / "export")
    assert sorted(a) == sorted(b) and len([n for n in a if n.endswith(".safetensors")]) > 3
    assert [n for n in a if a[n] != b[n]] == []

    # Labels: the same rows and responses (audio paths absolute in the bucket: no relative path
    # leads from it to local disk).
    labelled, want = _rows(many / "labels.jsonl"), _rows(one / "labels.jsonl")
    assert [{**r, "audio": None} for r in labelled] == [{**r, "audio": None} for r in want]
    assert [r["audio"] for r in labelled] == [os.path.normpath(one / r["audio"]) for r in want]
    assert sum(bool(r["response"]) for r in want) >= 4  # words, not ""
    assert len(_rows(one / "labels.jsonl")) == 8

    # Evaluation: the same rows and responses; metrics equal (text metrics exactly).
    for name in ("manifest.jsonl", "responses.jsonl"):
        assert (many / "eval" / name).read_text() == (one / "eval" / name).read_text(), name
    responses = _rows(one / "eval" / "responses.jsonl")
    assert all(r["speech_response"] and r["text_response"] for r in responses)
    m_many = json.loads((many / "eval" / "metrics.json").read_text())
    m_one = json.loads((one / "eval" / "metrics.json").read_text())
    assert m_many.keys() == m_one.keys() and m_one["rows"] == 5
    for k, v in m_one.items():
        if isinstance(v, float) and k not in ("wer", "wer_text", "exact_match"):
            assert m_many[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
        else:
            assert m_many[k] == v, k
    # Nothing else in the bucket: no partial export, no second process's copies.
    assert sorted(p.name for p in many.iterdir()) == ["eval", "export", "labels.jsonl"]
