"""The manifest index: one pass over a manifest at start-up (JSON, keys, transcript tokens, audio
headers; no decoding) giving every usable row's length in frames and tokens, so each row's bucket
is known before any audio is read; and the bad rows with their reasons.

The index of a manifest depends only on the manifest's bytes, the tokenizer and chat layout, and
the length limits; it is kept beside the manifest as `MANIFEST.index-KEY.npz` (KEY: a hash of
those), so later starts and restarts, and the other processes of a multi-host run, read it
instead of re-tokenising every transcript and probing every audio header. Any change to what it
depends on gives another KEY and a new index. Recordings changed in place after the index was
written are not noticed: delete the index file (or set `data.cache_index=False`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data import packed, storage
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.data.manifest import BadRow, DataError
from blspkd_jax.data.options import DataConfig

log = logging.getLogger(__name__)

VERSION = 1  # of the file's contents; part of KEY


@dataclasses.dataclass(frozen=True)
class Index:
    """Usable rows of one manifest or of several (a mixture), as flat arrays (cheap to pickle
    into every worker)."""

    manifests: tuple[str, ...]  # per source
    files: tuple[str, ...]  # per source, the file workers re-read lines from (a URL's local copy)
    source_ids: np.ndarray  # int64 [R]: the row's source
    lines: np.ndarray  # int64 [R]: 1-based manifest line
    offsets: np.ndarray  # int64 [R]: byte offset of the line to re-read (a pack's: record number)
    sample_rates: np.ndarray  # int64 [R]: the file's rate
    num_samples: np.ndarray  # int64 [R]: samples of the segment at that rate
    frames: np.ndarray  # int64 [R]: mel frames after resampling to 16 kHz
    lengths: np.ndarray  # int64 [R]: teacher sequence length
    prefixes: (
        np.ndarray
    )  # int64 [R]: tokens before the transcript (system, user header, instruction)

    def __len__(self) -> int:
        return len(self.lines)

    @classmethod
    def concat(cls, parts: list[Index]) -> Index:
        """One index over several sources' (each a one-manifest index), in order."""
        arrays = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(cls)
            if f.name not in ("manifests", "files", "source_ids")
        }
        sources = [np.full(len(p), i, np.int64) for i, p in enumerate(parts)]
        return cls(
            manifests=tuple(m for p in parts for m in p.manifests),
            files=tuple(f for p in parts for f in p.files),
            source_ids=np.concatenate(sources),
            **arrays,
        )


# The arrays of an Index that the index file holds (the rest is where the manifest is now).
_SAVED = ("lines", "offsets", "sample_rates", "num_samples", "frames", "lengths", "prefixes")


def index_manifest(
    manifest: str, layout: ChatLayout, config: DataConfig, *, write: bool = True
) -> tuple[Index, list[BadRow]]:
    """The usable rows of `manifest` and the bad ones: read from its index file when one was
    written for the same manifest, tokenizer, layout and limits (`config.cache_index`), else
    built (`build_index`) and, if `write`, saved beside the manifest for the next start. In strict
    mode the first bad row raises DataError either way."""
    manifest = os.fspath(manifest).rstrip("/")
    pack = packed.Pack(manifest) if packed.is_packed(manifest) else None
    if pack is None and not storage.isfile(manifest):
        if os.path.isdir(manifest):  # a folder: an unfinished pack, or not a pack at all
            packed.Pack(manifest)
        raise FileNotFoundError(f"data manifest not found: {manifest}")
    # Workers re-read single lines of a manifest: one download, not many.
    source = storage.local_copy(manifest if pack is None else pack.rows_file)
    if not config.cache_index:
        return build_index(manifest, layout, config, source=source, pack=pack)
    key = index_key(source, manifest, layout, config)
    # A pack's index goes inside it; a manifest's beside it.
    path = f"{manifest}.index-{key}.npz" if pack is None else f"{manifest}/index-{key}.npz"
    if storage.isfile(path):
        try:
            index, bad = _read(path, manifest, source)
        except (OSError, ValueError, KeyError) as e:  # a damaged file: build it again
            log.warning("%s: unreadable index (%s): rebuilding it", path, e)
        else:
            log.info("%s: %d rows, %d bad, from its index %s", manifest, len(index), len(bad), path)
            if config.strict and bad:
                raise DataError(str(bad[0]))
            return index, bad
    index, bad = build_index(manifest, layout, config, source=source, pack=pack)
    if write:
        try:
            _write(path, index, bad)
        except OSError as e:  # a read-only dataset folder: the index is only a shortcut
            log.warning("%s: could not write the index (%s); every start will rebuild it", path, e)
    return index, bad


def index_key(source: str, manifest: str, layout: ChatLayout, config: DataConfig) -> str:
    """16 hex digits naming everything an index depends on: the manifest's bytes (`source`, its
    local copy) and location (relative audio paths resolve from it), the tokenizer, the chat
    layout and the length limits."""
    h = hashlib.sha256()
    with storage.open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    tok = layout.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer's whole definition
    vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    h.update(hashlib.sha256(vocab.encode()).digest())
    settings = [
        VERSION,
        manifest if storage.is_url(manifest) else os.path.abspath(manifest),
        layout.system,
        layout.chat_template or getattr(tok, "chat_template", None),
        layout.default_instruction,
        config.max_text_tokens,
        config.token_buckets[-1],
        config.min_seconds,
        config.max_seconds,
    ]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:16]


def _write(path: str, index: Index, bad: list[BadRow]) -> None:
    """The index file, whole or absent (`storage.write_atomic`)."""
    buf = io.BytesIO()
    arrays = {k: getattr(index, k) for k in _SAVED}
    np.savez(buf, **arrays, bad=np.array(json.dumps([b.to_json() for b in bad])))
    storage.write_atomic(path, buf.getvalue())


def _read(path: str, manifest: str, source: str) -> tuple[Index, list[BadRow]]:
    with storage.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        arrays = {k: np.asarray(data[k], np.int64) for k in _SAVED}
        bad = [BadRow.from_json(d) for d in json.loads(str(data["bad"]))]
    if len({len(a) for a in arrays.values()}) != 1:
        raise ValueError("arrays of different lengths")
    n = len(arrays["lines"])
    index = Index(
        manifests=(manifest,), files=(source,), source_ids=np.zeros(n, np.int64), **arrays
    )
    return index, bad


def build_index(
    manifest: str,
    layout: ChatLayout,
    config: DataConfig,
    *,
    source: str | None = None,
    pack: packed.Pack | None = None,
) -> tuple[Index, list[BadRow]]:
    """Validate every row without decoding audio; returns the usable rows and the bad ones.

    Checks: JSON and keys, transcript non-empty and within `max_text_tokens`, the whole sequence
    within the largest token bucket, the file present with a readable header, segment inside the
    file, length within [min_seconds, max_seconds]. In strict mode raises DataError for the first
    bad row (by line). `source`, `pack`: the manifest's local copy and its pack, if opened already.

    `manifest` may be a packed directory (`data.packed`): its rows.jsonl is read instead, the
    lengths are the stored ones (no audio header is read), `offsets` are record numbers and
    `lines` the lines of the manifest it was packed from.
    """
    manifest = os.fspath(manifest).rstrip("/")
    if pack is None and packed.is_packed(manifest):
        pack = packed.Pack(manifest)
    if pack is None and not storage.isfile(manifest):
        raise FileNotFoundError(f"data manifest not found: {manifest}")
    base = storage.parent(manifest)
    source = source or storage.local_copy(manifest if pack is None else pack.rows_file)
    rows, offsets, stored, bad = [], [], [], []
    for number, offset, text in manifest_lib.iter_lines(source):
        try:
            row = manifest_lib.parse_line(text, number, base)
            manifest_lib.check_text(row, None, None)
            if pack is not None:  # the manifest's line, the record's number, the stored length
                row = dataclasses.replace(row, line=int(row.fields["line"]))
                offset = number - 1
                samples = int(row.fields["num_samples"])
                stored.append(audio_lib.AudioInfo(audio_lib.SAMPLE_RATE, 1, samples))
        except (ValueError, KeyError, TypeError) as e:
            bad.append(BadRow(manifest, number, str(e)))
            continue
        rows.append(row)
        offsets.append(offset)

    num_text, lengths = layout.lengths(
        [r.text for r in rows], [r.response for r in rows], [r.instruction for r in rows]
    )

    def check(i: int) -> tuple[audio_lib.AudioInfo | None, str | None]:
        row = rows[i]
        try:
            manifest_lib.check_text(row, int(num_text[i]), config.max_text_tokens)
            if lengths[i] > config.token_buckets[-1]:
                raise ValueError(
                    f"sequence has {lengths[i]} tokens (template, instruction, transcript, "
                    f"response), more than the largest of data.token_buckets="
                    f"{config.token_buckets}"
                )
            info = stored[i] if stored else audio_lib.probe(row.audio, row.offset, row.duration)
            if info.num_samples == 0:
                raise ValueError(f"audio is empty (0 samples): {row.audio}")
            manifest_lib.check_seconds(
                info.num_samples_16k / audio_lib.SAMPLE_RATE, config.min_seconds, config.max_seconds
            )
        except ValueError as e:
            return None, str(e)
        return info, None

    checked = []
    with ThreadPoolExecutor(config.probe_threads) as pool:
        for s in range(0, len(rows), 4096):  # bounded: one future per row of a chunk
            checked += pool.map(check, range(s, min(s + 4096, len(rows))))
    keep = []
    for i, (info, reason) in enumerate(checked):
        if reason is None:
            keep.append((i, info))
        else:
            bad.append(BadRow(manifest, rows[i].line, reason, rows[i].audio))
    bad.sort(key=lambda b: b.line)
    if config.strict and bad:
        raise DataError(str(bad[0]))
    idx = [i for i, _ in keep]
    infos = [info for _, info in keep]
    index = Index(
        manifests=(manifest,),
        files=(source,),
        source_ids=np.zeros(len(idx), np.int64),
        lines=np.array([rows[i].line for i in idx], np.int64),
        offsets=np.array([offsets[i] for i in idx], np.int64),
        sample_rates=np.array([x.sample_rate for x in infos], np.int64),
        num_samples=np.array([x.num_samples for x in infos], np.int64),
        frames=np.array([audio_lib.num_frames(x.num_samples_16k) for x in infos], np.int64),
        lengths=np.asarray(lengths[idx], np.int64),
        prefixes=np.array(
            [len(layout.template(rows[i].instruction).prefix) for i in idx], np.int64
        ),
    )
    return index, bad
