"""Evaluate a trained run: `python -m blspkd_jax.evaluate --workdir DIR --manifest EVAL.jsonl
[--step N] [--instruction TEXT] [--task asr|translation|continuation] [--out DIR/eval]
[--rule offline|stream]`.

Reports teacher/student consistency (input_kl, response_kl, top-1 agreement, CIF length error),
exact match of the greedy responses from speech and from the transcript, WER (`--task asr`) and
BLEU (rows with a "reference") in OUT/metrics.json and OUT/metrics.md. The code is
`blspkd_jax.inference.evaluate`.
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax import cli
from blspkd_jax.inference import multihost
from blspkd_jax.inference.evaluate import (
    REFERENCE_KEY,
    TASKS,
    evaluate_run,
    metrics_markdown,
)
from blspkd_jax.inference.respond import RULES

__all__ = ["evaluate_run", "main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.evaluate", description=__doc__)
    ap.add_argument("--workdir", required=True, help="a training run's workdir")
    ap.add_argument("--manifest", required=True, help="eval JSON Lines (audio, text, ...)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--instruction", default=None, help="replaces every row's instruction")
    ap.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="asr: WER against the transcript; translation: BLEU against each row's "
        f"'{REFERENCE_KEY}'; default: translation if every row has one, else continuation",
    )
    ap.add_argument("--out", default=None, help="output folder (default: WORKDIR/eval)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=0, help="evaluate the first N rows (0: all)")
    ap.add_argument(
        "--rule",
        choices=RULES,
        default="offline",
        help="how speech becomes vectors: offline (the paper's: whole-utterance log-mel, CIF "
        "rescaled to round(sum(alpha)) tokens) or stream (causal log-mel, CIF fires by threshold: "
        "what a stream computes)",
    )
    cli.add_verbose_flag(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        multihost.initialize()  # several hosts: every process runs this command alike
        metrics = evaluate_run(
            args.workdir,
            args.manifest,
            step=args.step,
            instruction=args.instruction,
            task=args.task,
            out=args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_rows=args.max_rows,
            rule=args.rule,
        )
        if multihost.is_writer():
            print(metrics_markdown(metrics))
        return 0

    return cli.run(body, interrupted="interrupted: the evaluation was not finished")


if __name__ == "__main__":
    sys.exit(main())
