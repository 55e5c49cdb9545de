"""Generate: `python -m blspkd_jax.generate speech --workdir DIR --manifest M --out OUT.jsonl
[--instruction TEXT] [--max-new-tokens N] [--step N] [--batch-size N]` writes the greedy response
to each row's audio as `{"id", "response"}` lines.

Also the stable name of the generation API: `greedy` and `generate` (KV-cache decoding,
`blspkd_jax.inference.generate`) and `speech_responses` / `text_responses` (a trained run's
responses, `blspkd_jax.inference.respond`).
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax.data.manifest import DataError, read_rows, write_jsonl
from blspkd_jax.inference.generate import generate, greedy
from blspkd_jax.inference.respond import audio_lengths, speech_responses, text_responses
from blspkd_jax.inference.workdir import RunError, load_run

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
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    try:
        rows = read_rows(args.manifest)
        audio_lengths(rows)  # fail on a missing file before loading the model
        run = load_run(args.workdir, args.step)
        responses = speech_responses(
            run,
            rows,
            instruction=args.instruction,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
    except (DataError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_jsonl(
        args.out, ({"id": r.id, "response": s} for r, s in zip(rows, responses, strict=True))
    )
    print(f"wrote {len(rows)} responses to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
