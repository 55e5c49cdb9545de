"""`python -m blspkd_jax.data.pack MANIFEST OUT_DIR [--examples-per-shard N] [--features N_MELS]`:
a manifest's rows with their decoded audio in ArrayRecord shards (the format: `data.packed`).

Each row is decoded once, here, as the pipeline would (mono, 16 kHz, its segment); `--features
N_MELS` stores the log-mel features instead (half the bytes of the waveform at 80 bins, and no
feature computation in training; only for an encoder of N_MELS bins). Rows that cannot be used
(malformed, audio missing or undecodable) are left out and listed in OUT_DIR/skipped.jsonl, and
the command says how many. Shard i holds the usable rows among the manifest's rows
[i * N, (i + 1) * N). Interrupted, it resumes: finished shards are kept. A shard is written to a
temporary name and renamed (uploaded whole, for a gs:// OUT_DIR), and packed.json last, so a
reader never sees a half-written pack. OUT_DIR may be local or a URL; MANIFEST too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import packed, storage
from blspkd_jax.data.features import log_mel
from blspkd_jax.data.manifest import BadRow, DataError, Row, read_manifest, write_jsonl

DONE = ".rows.json"  # beside each finished shard until packed.json exists: its rows and skips


def _decode(row: Row) -> tuple[np.ndarray | None, str | None]:
    """(the 16 kHz waveform the pipeline would decode, None) or (None, reason)."""
    try:
        info = audio_lib.probe(row.audio, row.offset, row.duration)
        if info.num_samples == 0:
            raise audio_lib.AudioError(f"audio is empty (0 samples): {row.audio}")
        return audio_lib.load_pinned(row.audio, row.offset, row.duration, info), None
    except (audio_lib.AudioError, ValueError) as e:
        return None, str(e)


def _put(local: str, target: str) -> None:
    """Move a finished local file to `target` (renamed locally, uploaded whole to a bucket)."""
    if storage.is_url(target):
        with open(local, "rb") as f:
            storage.as_path(target).write_bytes(f.read())
        os.remove(local)
    else:
        os.replace(local, target)


def _write_shard(
    i: int, rows: list[Row], manifest: str, out: str, features: int, pool: ThreadPoolExecutor, bar
) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    name = packed.shard_name(i)
    scratch = out if not storage.is_url(out) else tempfile.mkdtemp(prefix="blspkd-pack-")
    tmp = os.path.join(scratch, name + ".tmp")
    writer = ArrayRecordWriter(tmp, "group_size:1")
    kept, skipped = [], []
    try:
        for row, (wave, reason) in zip(rows, pool.map(_decode, rows), strict=True):
            bar.update(1)
            if wave is None:
                skipped.append(BadRow(manifest, row.line, reason, row.audio))
                continue
            fields = {**row.fields, "line": row.line, "num_samples": len(wave)}
            if features:  # one BLAS thread, as the pipeline's workers: the same float sums
                with threadpool_limits(limits=1, user_api="blas"):
                    array = log_mel(wave, features)
            else:
                array = wave
            writer.write(packed.encode(fields, array))
            kept.append(fields)
    finally:
        writer.close()
    _put(tmp, storage.join(out, name))
    lines = [r.line for r in rows]
    done = {"name": name, "lines": lines, "rows": kept, "skipped": [b.to_json() for b in skipped]}
    local = os.path.join(scratch, name + DONE + ".tmp")
    with open(local, "w", encoding="utf-8") as f:
        json.dump(done, f, ensure_ascii=False)
    _put(local, storage.join(out, name + DONE))
    if scratch != out:
        os.rmdir(scratch)  # emptied by the uploads
    return done


def pack(
    manifest: str,
    out: str,
    *,
    examples_per_shard: int = 1000,
    features: int = 0,
    workers: int = 8,
    progress: bool = True,
) -> dict:
    """Pack `manifest` into `out`; returns the summary (also printed by the command)."""
    from tqdm import tqdm

    manifest, out = os.fspath(manifest), os.fspath(out).rstrip("/")
    if not storage.is_url(manifest):
        manifest = os.path.abspath(manifest)
    if examples_per_shard < 1:
        raise ValueError(f"--examples-per-shard must be >= 1, got {examples_per_shard}")
    if packed.is_packed(out):
        meta = packed.Pack(out)
        print(f"{out}: already packed ({len(meta)} rows in {len(meta.shards)} shards)")
        return {"rows": len(meta), "shards": len(meta.shards), "skipped": None}
    rows, malformed = read_manifest(manifest)
    storage.makedirs(out)
    chunks = [rows[s : s + examples_per_shard] for s in range(0, len(rows), examples_per_shard)]
    done = []
    bar = tqdm(total=len(rows), desc="pack", unit="row", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for i, chunk in enumerate(chunks):
            finished = storage.join(out, packed.shard_name(i) + DONE)
            if storage.isfile(finished) and storage.isfile(storage.join(out, packed.shard_name(i))):
                with storage.open(finished) as f:
                    kept = json.load(f)
                if kept["lines"] == [r.line for r in chunk]:  # the same manifest rows: keep it
                    done.append(kept)
                    bar.update(len(chunk))
                    continue
            done.append(_write_shard(i, chunk, manifest, out, features, pool, bar))
    bar.close()
    skipped = [b.to_json() for b in malformed] + [s for d in done for s in d["skipped"]]
    write_jsonl(storage.join(out, "skipped.jsonl"), skipped)
    write_jsonl(storage.join(out, packed.ROWS), [r for d in done for r in d["rows"]])
    meta = {
        "format": packed.FORMAT,
        "version": packed.VERSION,
        "manifest": manifest,
        "store": "features" if features else "audio",
        "n_mels": features or None,
        "rows": sum(len(d["rows"]) for d in done),
        "shards": [{"name": d["name"], "records": len(d["rows"])} for d in done],
    }
    storage.write_atomic(storage.join(out, packed.META), json.dumps(meta, indent=1).encode())
    for d in done:  # the pack is whole now: the per-shard records of progress go
        path = storage.join(out, d["name"] + DONE)
        if storage.is_url(path):
            storage.as_path(path).unlink()
        else:
            os.remove(path)
    summary = {"rows": meta["rows"], "shards": len(done), "skipped": len(skipped)}
    if not progress:
        return summary
    print(
        f"{out}: {meta['rows']} rows in {len(done)} shards ({meta['store']}); "
        f"{len(skipped)} skipped"
        + (f", listed in {storage.join(out, 'skipped.jsonl')}" if skipped else "")
    )
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.data.pack", description=__doc__)
    ap.add_argument("manifest", help="the JSON Lines manifest to pack (local or gs://)")
    ap.add_argument("out", help="the packed directory to write (local or gs://)")
    ap.add_argument("--examples-per-shard", type=int, default=1000)
    ap.add_argument(
        "--features",
        type=int,
        default=0,
        metavar="N_MELS",
        help="store log-mel features of N_MELS bins instead of the waveform",
    )
    ap.add_argument("--workers", type=int, default=8, help="decoding threads")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        pack(
            args.manifest,
            args.out,
            examples_per_shard=args.examples_per_shard,
            features=args.features,
            workers=args.workers,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished shards are kept)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
