"""Generate: `python -m blspkd_jax.generate speech --workdir DIR --manifest M --out OUT.jsonl
[--instruction TEXT] [--max-new-tokens N] [--step N] [--batch-size N] [--rule offline|stream]
[--stream [--chunk-ms MS]]` writes the greedy response to each row's audio as `{"id",
"response"}` lines; rows it cannot use (malformed, unreadable, too long for the encoder) are
skipped and listed as `MANIFEST:LINE: reason`. On several hosts, start it on each (as training):
each process decodes its rows of every batch, process 0 writes OUT.

`--rule stream` computes offline what a stream computes (causal log-mel, CIF firing by
threshold); `--stream` feeds each row's audio to the streaming path (`inference.stream`) in
pieces of `--chunk-ms` as a microphone would, one row at a time on one process, and adds
`first_token_s` (seconds from the end of the audio to the first response token) to each line.
A chunk-causal run gives the same responses both ways.

Also the stable name of the generation API: `greedy` and `generate` (KV-cache decoding,
`blspkd_jax.inference.generate`), `speech_responses` / `text_responses` (a trained run's
responses, `blspkd_jax.inference.respond`) and `Streamer` (`blspkd_jax.inference.stream`).
"""

from __future__ import annotations

import argparse
import sys

import jax

from blspkd_jax import cli
from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data.manifest import DataError, read_manifest, write_jsonl
from blspkd_jax.inference import multihost
from blspkd_jax.inference.generate import generate, greedy
from blspkd_jax.inference.respond import RULES, speech_responses, text_responses, usable_rows
from blspkd_jax.inference.stream import Streamer
from blspkd_jax.inference.workdir import load_run

__all__ = ["Streamer", "generate", "greedy", "main", "speech_responses", "text_responses"]


def stream_rows(run, rows, *, instruction, max_new_tokens: int, chunk_ms: float) -> list[dict]:
    """Each row's audio through the streaming path in pieces of `chunk_ms`: `{"id", "response",
    "first_token_s"}` per row."""
    streamer = Streamer(run, max_new_tokens=max_new_tokens)
    step = max(1, int(16000 * chunk_ms / 1000))
    out = []
    for r in rows:
        wave = audio_lib.load(r.audio, r.offset, r.duration)
        session = streamer.session(instruction if instruction is not None else r.instruction)
        for i in range(0, wave.size, step):
            session.push(wave[i : i + step])
        session.finish()
        ids = list(session.response_ids())
        text = run.tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(
            {"id": r.id, "response": text, "first_token_s": session.timing.end_to_first_token_s}
        )
    return out


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
    sp.add_argument(
        "--rule",
        choices=RULES,
        default=None,
        help="offline (the default): the paper's (whole-utterance log-mel, CIF rescaled); "
        "stream: what a stream computes (causal log-mel, CIF fires by threshold)",
    )
    sp.add_argument(
        "--stream",
        action="store_true",
        help="feed each row's audio to the streaming path (a chunk-causal run)",
    )
    sp.add_argument("--chunk-ms", type=float, default=100.0, help="--stream: audio per push")
    cli.add_verbose_flag(sp)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)
    if args.stream and args.rule == "offline":
        ap.error("--stream computes the stream rule: drop --rule offline")
    if args.chunk_ms <= 0:
        ap.error(f"--chunk-ms must be > 0, got {args.chunk_ms}")

    def body() -> int:
        multihost.initialize()  # several hosts: every process runs this command alike
        if args.stream and jax.process_count() > 1:
            raise DataError("--stream runs on one process (it serves one utterance at a time)")
        rows, bad = read_manifest(args.manifest)
        run = load_run(args.workdir, args.step)
        rows, unusable = usable_rows(run, rows, args.manifest)
        bad += unusable
        writer = multihost.is_writer()  # every process generates its rows; process 0 writes
        for b in sorted(bad, key=lambda b: b.line) if writer else ():
            print(f"skipped {b}", file=sys.stderr)
        if not rows:
            raise DataError(f"{args.manifest}: no usable rows ({len(bad)} skipped)")
        if args.stream:
            lines = stream_rows(
                run,
                rows,
                instruction=args.instruction,
                max_new_tokens=args.max_new_tokens,
                chunk_ms=args.chunk_ms,
            )
        else:
            responses = speech_responses(
                run,
                rows,
                instruction=args.instruction,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                rule=args.rule or "offline",
            )
            lines = [{"id": r.id, "response": s} for r, s in zip(rows, responses, strict=True)]
        if writer:
            write_jsonl(args.out, lines)
            skipped = f" ({len(bad)} rows skipped, listed above)" if bad else ""
            print(f"wrote {len(rows)} responses to {args.out}{skipped}", file=sys.stderr)
        multihost.barrier("responses written")
        return 0

    return cli.run(body, interrupted="interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(main())
