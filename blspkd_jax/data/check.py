"""`python -m blspkd_jax.data.check MANIFEST`: validate every manifest row, report all bad ones.

Each bad row prints as `MANIFEST:LINE: reason` (in line order); the exit status is 1 if any row is
bad, 0 otherwise. Every file is decoded in full (in parallel threads), so NaN samples and
truncated files are caught, not just missing ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data import storage
from blspkd_jax.data.layout import text_ids
from blspkd_jax.data.manifest import MAX_SECONDS, MAX_TEXT_TOKENS, MIN_SECONDS, BadRow, Row


def check_manifest(
    path: str,
    tokenizer=None,
    *,
    min_seconds: float | None = MIN_SECONDS,
    max_seconds: float | None = MAX_SECONDS,
    max_text_tokens: int | None = MAX_TEXT_TOKENS,
    workers: int | None = None,
) -> list[BadRow]:
    """Every bad row of `path`, in line order. Checks JSON and keys, transcript non-empty (and,
    given a tokenizer, 1..max_text_tokens tokens), audio present, decodable, finite, and
    `min_seconds <= length <= max_seconds` at 16 kHz. `tokenizer`: object or directory."""
    if isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    rows, bad = manifest_lib.read_manifest(path)
    counts = [None] * len(rows)
    if tokenizer is not None and rows:
        counts = [len(x) for x in text_ids(tokenizer, [r.text for r in rows])]

    def check(i: int) -> BadRow | None:
        row: Row = rows[i]
        try:
            manifest_lib.check_text(row, counts[i], max_text_tokens)
            info = audio_lib.probe(row.audio, row.offset, row.duration)
            audio_lib.read(row.audio, row.offset, row.duration, info)
            manifest_lib.check_seconds(
                info.num_samples_16k / audio_lib.SAMPLE_RATE, min_seconds, max_seconds
            )
        except ValueError as e:  # AudioError is a ValueError
            return BadRow(path, row.line, str(e), row.audio)
        return None

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        bad += [b for b in pool.map(check, range(len(rows))) if b is not None]
    return sorted(bad, key=lambda b: b.line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.data.check",
        description="Validate a JSON Lines manifest; print MANIFEST:LINE: reason per bad row.",
    )
    ap.add_argument("manifest")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer directory (counts tokens)")
    ap.add_argument("--min-seconds", type=float, default=MIN_SECONDS)
    ap.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    ap.add_argument(
        "--max-text-tokens",
        type=int,
        default=None,
        help=f"transcript token limit (needs --tokenizer; default {MAX_TEXT_TOKENS} with one)",
    )
    ap.add_argument("--workers", type=int, default=None, help="decoding threads (default: cores)")
    args = ap.parse_args(argv)
    if args.max_text_tokens is not None and args.tokenizer is None:
        ap.error("--max-text-tokens counts tokens: it needs --tokenizer LLM_DIR")
    if not storage.isfile(args.manifest):
        print(f"{args.manifest}: manifest not found", file=sys.stderr)
        return 1
    rows = sum(1 for _ in manifest_lib.iter_lines(args.manifest))
    if not rows:
        print(f"{args.manifest}: no rows (the manifest is empty)", file=sys.stderr)
        return 1
    bad = check_manifest(
        args.manifest,
        args.tokenizer,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        max_text_tokens=args.max_text_tokens or MAX_TEXT_TOKENS,
        workers=args.workers,
    )
    for b in bad:
        print(b)
    print(f"{args.manifest}: {rows - len(bad)} of {rows} rows usable", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
