"""Can SmolLM2-135M-Instruct be `make demo`'s teacher? Its cost against the demo's own teacher.

Two costs decide it on a CPU: writing the continuation labels (greedy generation over every
training transcript) and the stage-1 train step (the frozen LLM runs forward for the teacher and
forward and backward for the student). Both teachers are measured in one run on the same machine,
with Whisper tiny.en as the encoder and `configs/tiny.py`'s stage 1 otherwise: labels per second
on 32 transcripts (batch 32, at most 48 new tokens), and train steps per second (batch 16) after
compilation. Needs a finished `make demo` workdir (its corpus, teacher and labels).

    .venv/bin/python benchmarks/teacher_cost.py --demo runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from transformers import AutoTokenizer  # noqa: E402

from blspkd_jax.convert import common, gguf_llm  # noqa: E402
from blspkd_jax.data.manifest import read_rows, write_jsonl  # noqa: E402
from blspkd_jax.inference import labels  # noqa: E402
from blspkd_jax.models import hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = (
    "Continue the following text in a coherent and engaging style with less than 40 words."
)


def label_rate(llm_dir: Path, manifest: Path, out: Path, rows: int = 32) -> float:
    small = out.with_suffix(".in.jsonl")
    write_jsonl(small, [r.fields for r in read_rows(manifest)[:rows]])
    module, params = hf.load_llm(llm_dir)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    kw = dict(instruction=INSTRUCTION + "\n\n", system=None, batch_size=32, max_new_tokens=48)
    labels.label_manifest(
        str(small), str(out.with_suffix(".warm.jsonl")), module, params, tok, **kw
    )
    t = time.perf_counter()  # the second pass runs compiled programs only
    labels.label_manifest(str(small), str(out), module, params, tok, **kw)
    return rows / (time.perf_counter() - t)


def step_rate(llm_dir: Path, whisper_dir: Path, demo: Path, workdir: Path, steps: int = 6) -> float:
    cmd = [
        sys.executable, "-m", "blspkd_jax.train", "--config", "configs/tiny.py",
        "--workdir", str(workdir),
        f"--config.data.train_manifest={demo / 'labels/train.jsonl'}",
        "--config.data.eval_manifest=", f"--config.model.llm.hf_path={llm_dir}",
        f"--config.model.encoder.hf_path={whisper_dir}", "--config.model.encoder.pad_to_30s=false",
        "--config.train.trainable=('^adapter/',)", f"--config.total_steps={steps}",
        "--config.log_every_steps=1", "--config.data.frame_buckets=(500,)",
        "--config.data.token_buckets=(80,)", "--config.data.max_seconds=5.0",
        "--config.peak_tflops_per_device=1",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    # One bucket shape, so only step 1 compiles; the rest are timed.
    times = [1 / r["steps_per_sec"] for r in rows[1:]]
    return len(times) / sum(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--demo", default="runs/demo", help="a finished make demo workdir")
    args = ap.parse_args()
    demo = Path(args.demo)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        smollm2 = gguf_llm.convert(common.packaged_path("smollm2-135m-instruct"), tmp / "smollm2")
        results = {}
        for name, llm_dir in (
            ("demo teacher", demo / "teacher"),
            ("SmolLM2-135M-Instruct", smollm2),
        ):
            results[name] = {
                "labels_per_s": label_rate(
                    llm_dir, demo / "corpus/train.jsonl", tmp / f"{name}.jsonl"
                ),
                "steps_per_s": step_rate(llm_dir, demo / "whisper", demo, tmp / f"run-{name}"),
            }
    rows = len(read_rows(demo / "corpus/train.jsonl"))
    print(
        "| teacher | labels / s | train steps / s (batch 16) | labels for the corpus | 900 steps |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['labels_per_s']:.2f} | {r['steps_per_s']:.3f} | "
            f"{rows / r['labels_per_s'] / 60:.1f} min | {900 / r['steps_per_s'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
