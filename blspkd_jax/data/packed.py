"""Packed datasets: a manifest's rows with their decoded audio (or log-mel features) in
ArrayRecord shards (grain's native format), written by `python -m blspkd_jax.data.pack`.

A packed directory works wherever a manifest path does (`data.train_manifest`, mixtures, eval):
training reads one record per example instead of opening, decoding and resampling a file, and
start-up reads the stored lengths instead of probing audio headers. It holds

- `shard-NNNNN.array_record`: one record per usable row, in manifest order;
- `rows.jsonl`: the same rows' fields (text, response, instruction, id, the manifest line and the
  audio as written there), plus `num_samples` (16 kHz samples), one line per record;
- `packed.json`, written last (a directory without it is unfinished): the format, what is
  stored (`audio`: the 16 kHz float32 waveform the pipeline would decode; `features`: the
  float32 log-mel `[n_mels, T]` it would compute), the shards and their record counts.

A record is the row's fields as one JSON line, then the array's bytes. Batches built from a pack
equal, bit for bit, those built from its manifest (same rows, same order).
"""

from __future__ import annotations

import json
import os

import numpy as np

from blspkd_jax.data import storage
from blspkd_jax.data.manifest import DataError

FORMAT, VERSION = "blspkd-packed", 1
META, ROWS = "packed.json", "rows.jsonl"
STORES = ("audio", "features")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.array_record"


def is_packed(path: str) -> bool:
    """True for a directory `pack` wrote (it holds packed.json)."""
    return storage.isfile(storage.join(os.fspath(path), META))


def encode(fields: dict, array: np.ndarray) -> bytes:
    """One record: `fields` and the array's dtype and shape as a JSON line, then its bytes."""
    array = np.ascontiguousarray(array)
    header = {**fields, "_dtype": array.dtype.str, "_shape": list(array.shape)}
    return json.dumps(header, ensure_ascii=False).encode() + b"\n" + array.tobytes()


def decode(record: bytes) -> tuple[dict, np.ndarray]:
    head, _, body = record.partition(b"\n")
    fields = json.loads(head)
    dtype, shape = np.dtype(fields.pop("_dtype")), tuple(fields.pop("_shape"))
    return fields, np.frombuffer(body, dtype).reshape(shape)


class Pack:
    """A packed directory, read: its metadata at once, records on demand (each worker process
    opens its own readers; a remote shard is copied to local disk the first time it is read)."""

    def __init__(self, path: str):
        self.path = os.fspath(path).rstrip("/")
        meta_path = storage.join(self.path, META)
        if not storage.isfile(meta_path):
            raise DataError(
                f"{self.path}: not a finished pack (no {META}); rerun python -m "
                "blspkd_jax.data.pack to finish it"
            )
        with storage.open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("store") not in STORES:
            raise DataError(f"{meta_path}: not a {FORMAT} file")
        self.store, self.n_mels = meta["store"], meta.get("n_mels")
        self.shards = [s["name"] for s in meta["shards"]]
        self.counts = np.array([s["records"] for s in meta["shards"]], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def rows_file(self) -> str:
        return storage.join(self.path, ROWS)

    def __getstate__(self):
        return {**self.__dict__, "_readers": {}}  # readers hold file handles: reopened per process

    def _reader(self, shard: int):
        if shard not in self._readers:
            from array_record.python.array_record_module import ArrayRecordReader

            path = storage.join(self.path, self.shards[shard])
            try:
                reader = ArrayRecordReader(storage.local_copy(path), "readahead_buffer_size:0")
                found = reader.num_records()
            except (OSError, RuntimeError, ValueError) as e:
                raise DataError(f"{path}: corrupt shard ({e})") from None
            if found != self.counts[shard]:
                raise DataError(
                    f"{path}: corrupt shard ({found} records, {META} says {self.counts[shard]})"
                )
            self._readers[shard] = reader
        return self._readers[shard]

    def read(self, record: int) -> tuple[dict, np.ndarray]:
        """Record number `record` (0-based over all shards): (fields, array)."""
        shard = int(np.searchsorted(self.starts, record, side="right")) - 1
        try:
            return decode(self._reader(shard).read([int(record - self.starts[shard])])[0])
        except (RuntimeError, ValueError) as e:
            path = storage.join(self.path, self.shards[shard])
            raise DataError(f"{path}: corrupt shard (record {record}: {e})") from None
