"""One process of `test_multiprocess_inference`: export, evaluation (both generations included)
and continuation labels, each called as every process of a multi-host job calls it (the BLSPKD_*
variables join the processes), the run loaded once for the first two.

    python tests/_multiprocess_inference.py WORKDIR ASSETS OUT

OUT may be a URL (gs://...): every output is then written to the bucket.
"""

import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets it

from blspkd_jax import labels  # noqa: E402
from blspkd_jax.inference import multihost  # noqa: E402
from blspkd_jax.inference.evaluate import evaluate_run  # noqa: E402
from blspkd_jax.inference.export import export_run  # noqa: E402
from blspkd_jax.inference.workdir import load_run  # noqa: E402

BATCH = "8"  # one batch of every kind: 5 eval rows, 8 label rows (fewer programs to compile)


def run_all(workdir: Path, assets: Path, out: str) -> dict[str, float]:
    """Each step's seconds (shown when the test fails); the outputs go to `out`."""
    seconds, start = {}, time.perf_counter()

    def lap(name):
        nonlocal start
        seconds[name] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()

    run = load_run(workdir)
    lap("load")
    export_run(workdir, f"{out}/export", run=run, max_shard_bytes=40000)
    lap("export")
    eval_args = dict(task="asr", max_new_tokens=8, batch_size=int(BATCH), progress=False)
    evaluate_run(run, assets / "eval.jsonl", out=f"{out}/eval", **eval_args)
    lap("evaluate")
    code = labels.main(
        ["--llm", str(assets / "llm"), "--manifest", str(assets / "train.jsonl")]
        + ["--out", f"{out}/labels.jsonl", "--max-new-tokens", "8", "--batch-size", BATCH]
        + ["--no-progress"]
    )
    assert code == 0, "labels failed"
    lap("labels")
    return seconds


if __name__ == "__main__":
    workdir, assets, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    multihost.initialize()
    seconds = run_all(workdir, assets, out)
    seen = {"processes": jax.process_count(), "devices": jax.device_count(), "seconds": seconds}
    print("RESULT " + json.dumps(seen), flush=True)
