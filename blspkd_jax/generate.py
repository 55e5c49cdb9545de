"""Generate: `python -m blspkd_jax.generate speech --workdir DIR --manifest M --out OUT.jsonl
[--instruction TEXT] [--max-new-tokens N] [--step N] [--batch-size N]` writes the greedy response
to each row's audio as `{"id", "response"}` lines; rows it cannot use (malformed, unreadable, too
long for the encoder) are skipped and listed as `MANIFEST:LINE: reason`. On several hosts, start it
on each (as training): each process decodes its rows of every batch, process 0 writes OUT.

Also the stable name of the generation API: `greedy` and `generate` (KV-cache decoding,
`blspkd_jax.inference.generate`) and `speech_responses` / `text_responses` (a trained run's
responses, `blspkd_jax.inference.respond`).
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax import cli
from blspkd_jax.data.manifest import DataError, read_manifest, write_jsonl
from blspkd_jax.inference import multihost
from blspkd_jax.inference.generate import generate, greedy
from blspkd_jax.inference.respond import speech_responses, text_responses, usable_rows
from blspkd_jax.inference.workdir import load_run

__all__ = ["generate", "greedy", "main", "speech_responses", "text_responses"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.generate", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speech", help="greedy responses to a manifest's audio from a trained run")
    sp.add_argument("--workdir", required=True, help="a training run's workdir")
    sp.add_argument("--manifest", required=True, help="JSON Lines with 'audio' (and 'id')")
    sp.add_argument("--out", required=True, help='output JSON Lines: {"id", "response"} per row')
    sp.add_argument(
        "--instruction",
        default=None,
        help="replaces every row's instruction (default: the "
        "row's 'instruction', else the run's data.instruction)",
    )
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    sp.add_argument("--batch-size", type=int, default=8)
    cli.add_verbose_flag(sp)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        multihost.initialize()  # several hosts: every process runs this command alike
        rows, bad = read_manifest(args.manifest)
        run = load_run(args.workdir, args.step)
        rows, unusable = usable_rows(run, rows, args.manifest)
        bad += unusable
        writer = multihost.is_writer()  # every process generates its rows; process 0 writes
        for b in sorted(bad, key=lambda b: b.line) if writer else ():
            print(f"skipped {b}", file=sys.stderr)
        if not rows:
            raise DataError(f"{args.manifest}: no usable rows ({len(bad)} skipped)")
        responses = speech_responses(
            run,
            rows,
            instruction=args.instruction,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        if writer:
            pairs = zip(rows, responses, strict=True)
            write_jsonl(args.out, ({"id": r.id, "response": s} for r, s in pairs))
            skipped = f" ({len(bad)} rows skipped, listed above)" if bad else ""
            print(f"wrote {len(rows)} responses to {args.out}{skipped}", file=sys.stderr)
        multihost.barrier("responses written")
        return 0

    return cli.run(body, interrupted="interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(main())
