"""One process of `test_multiprocess_inference`: the inference commands, each as a user runs it
on every host of a job (the BLSPKD_* variables join the processes), in one process start-up.

    python tests/_multiprocess_inference.py WORKDIR ASSETS OUT
"""

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets it

from blspkd_jax import evaluate, export, generate, labels  # noqa: E402
from blspkd_jax.inference import multihost  # noqa: E402

ARGS = {  # command -> its arguments after the paths
    "export": ["--max-shard-size", "40000"],
    "evaluate": ["--task", "asr", "--max-new-tokens", "8", "--batch-size", "4"],
    "generate": ["--max-new-tokens", "8", "--batch-size", "4"],
    "labels": ["--max-new-tokens", "8", "--batch-size", "4", "--no-progress"],
}


def run_all(workdir: Path, assets: Path, out: Path) -> dict[str, int]:
    """Every command's exit code; their outputs go to `out`."""
    w = str(workdir)
    return {
        "export": export.main(["--workdir", w, "--out", str(out / "export"), *ARGS["export"]]),
        "evaluate": evaluate.main(
            ["--workdir", w, "--manifest", str(assets / "eval.jsonl"), "--out", str(out / "eval")]
            + ARGS["evaluate"]
        ),
        "generate": generate.main(
            ["speech", "--workdir", w, "--manifest", str(assets / "eval.jsonl")]
            + ["--out", str(out / "responses.jsonl"), *ARGS["generate"]]
        ),
        "labels": labels.main(
            ["--llm", str(assets / "llm"), "--manifest", str(assets / "train.jsonl")]
            + ["--out", str(out / "labels.jsonl"), *ARGS["labels"]]
        ),
    }


if __name__ == "__main__":
    workdir, assets, out = (Path(a) for a in sys.argv[1:4])
    multihost.initialize()
    codes = run_all(workdir, assets, out)
    seen = {"processes": jax.process_count(), "devices": jax.device_count(), "codes": codes}
    print("RESULT " + json.dumps(seen), flush=True)
    sys.exit(max(codes.values()))
