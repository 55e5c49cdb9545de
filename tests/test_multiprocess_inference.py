"""Export, evaluation, generation and labels on a 2-process mesh (2 local processes x 2 CPU
devices, joined over 127.0.0.1 with gloo collectives; parameters sharded over all 4 devices, so no
process holds the model) give what one process gives: the same export directory byte for byte,
the same responses, labels and evaluation rows, and the same metrics (the consistency sums up to
the float rounding of a 4-way split)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _multiprocess_inference import run_all

REPO = Path(__file__).parent.parent
SCRIPT = Path(__file__).parent / "_multiprocess_inference.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, assets, out) -> list[subprocess.Popen]:
    port = _free_port()
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
        cmd = [sys.executable, str(SCRIPT), str(workdir), str(assets), str(out)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_inference_commands_on_two_processes_match_one(tiny_run, tmp_path):
    workdir, assets, _ = tiny_run
    many, one = tmp_path / "many", tmp_path / "one"
    procs = _start(workdir, assets, many)
    try:
        # The single-process reference runs here meanwhile (1 device).
        assert run_all(workdir, assets, one) == dict.fromkeys(
            ("export", "evaluate", "generate", "labels"), 0
        )
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    result = json.loads(outs[0].split("RESULT ", 1)[1].splitlines()[0])
    assert result["processes"] == 2 and result["devices"] == 4

    # Export: every file the same, the weights' shards and index, OUT/llm and the card included.
    a, b = _files(many / "export"), _files(one / "export")
    assert sorted(a) == sorted(b) and len([n for n in a if n.endswith(".safetensors")]) > 3
    assert [n for n in a if a[n] != b[n]] == []

    # Generation and labels: the same files.
    assert (many / "responses.jsonl").read_text() == (one / "responses.jsonl").read_text()
    assert (many / "labels.jsonl").read_text() == (one / "labels.jsonl").read_text()
    assert len(_rows(one / "labels.jsonl")) == 8

    # Evaluation: the same rows and responses; metrics equal (text metrics exactly).
    for name in ("manifest.jsonl", "responses.jsonl"):
        assert (many / "eval" / name).read_text() == (one / "eval" / name).read_text(), name
    m_many = json.loads((many / "eval" / "metrics.json").read_text())
    m_one = json.loads((one / "eval" / "metrics.json").read_text())
    assert m_many.keys() == m_one.keys() and m_one["rows"] == 5
    for k, v in m_one.items():
        if isinstance(v, float) and k not in ("wer", "wer_text", "exact_match"):
            assert m_many[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
        else:
            assert m_many[k] == v, k
    # Process 1 wrote nothing of its own (no scratch left, no second copy of the outputs).
    assert not list(many.glob("**/*.process1*")) and not list(tmp_path.glob("**/.*partial*"))
