"""The grain input pipeline: manifest -> bucketed, padded batches in the docs/method.md §4 layout.
A source may also be a packed directory (`data.packed`): records in place of audio files.

Startup indexes the manifest (JSON, keys, transcript tokens, audio headers: cheap, no decoding;
`data.index` keeps it beside the manifest for later starts), so every usable row's bucket is
known before any audio is read. From that index a pure function of (seed, epoch) plans the epoch
(`data.plan`, which also draws a mixture's sources by weight): rows are shuffled, grouped by
bucket, cut into *global* batches, and the batch order shuffled. Batch k is therefore a pure
function of k, which gives three things:

- exact resumption: the iterator's state is just the next batch number;
- multi-host: every process plans the same global batches (so all agree on each step's bucket,
  which `jax.make_array_from_process_local_data` requires) and decodes only its own slice of
  rows [p * B, (p + 1) * B) of each: disjoint slices that together cover the data, in process
  order, as `train_state.global_batch` assembles them;
- parallel decoding: grain's `mp_prefetch` hands batch numbers to worker processes.

Bad rows found at startup are skipped and logged; a row that fails only when decoded (NaN samples,
a truncated file) becomes a padding row (`example_mask` False) of its batch, and the main process
logs it, since workers share no file handle. Each skipped row goes to `WORKDIR/skipped.jsonl`
as `{"manifest", "line", "file", "reason"}`, once even across restarts (in a multi-host run,
process p > 0 writes the decode failures of its own rows to `skipped.process{p}.jsonl`).
With `strict=True` the first bad row raises `DataError("MANIFEST:LINE: reason")` instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import grain
import numpy as np

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data import packed, storage
from blspkd_jax.data.features import log_mel
from blspkd_jax.data.index import Index, index_manifest
from blspkd_jax.data.layout import ChatLayout, make_batch
from blspkd_jax.data.manifest import BadRow, DataError
from blspkd_jax.data.options import DataConfig
from blspkd_jax.data.plan import Plan, make_plan
from blspkd_jax.data.sources import parse_sources

log = logging.getLogger(__name__)

BATCH_KEYS = (
    "features",
    "feature_mask",
    "input_ids",
    "attention_mask",
    "speech_mask",
    "response_mask",
    "text_lengths",
    "example_mask",
    "line",
    "source",
)
_SKIPPED = "_skipped"  # per-batch JSON list of decode-time failures; popped by BatchIterator


# ----------------------------------------------------------------------------------------------
# LoadBatch: batch number -> padded batch. Runs in grain's worker processes.


class LoadBatch(grain.transforms.Map):
    """Decodes this process's slice of global batch k into a padded bucket."""

    def __init__(
        self,
        index: Index,
        plan: Plan,
        layout: ChatLayout,
        config: DataConfig,
        process_index: int,
        batch_size: int,
        packs: dict[int, packed.Pack],
    ):
        self.index, self.plan, self.layout = index, plan, layout
        self.packs = packs  # each packed source's reader, by source number
        self.n_mels = config.n_mels
        self.process_index, self.batch_size = process_index, batch_size
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._blas = None

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, *self.plan.epoch(epoch))
        return self._epoch[1], self._epoch[2]

    def rows(self, k: int) -> tuple[np.ndarray, int]:
        """(index rows of this process's slice of global batch k, -1 = padding; bucket id)."""
        rows, bucket = self.global_rows(k)
        p, b = self.process_index, self.batch_size
        return rows[p * b : (p + 1) * b], bucket

    def global_rows(self, k: int) -> tuple[np.ndarray, int]:
        """(index rows of global batch k, -1 = padding; bucket id)."""
        epoch, j = self.plan.locate(k)
        rows, buckets = self._epoch_plan(epoch)
        return rows[j], int(buckets[j])

    def map(self, k: int) -> dict[str, Any]:
        # One BLAS thread while decoding: workers already run in parallel, and OpenBLAS's own
        # threads on top make the small log-mel matmul wait on busy cores (measured 4x slower per
        # utterance on a loaded 2-core machine).
        if self._blas is None:
            from threadpoolctl import ThreadpoolController  # installed with librosa

            self._blas = ThreadpoolController()
        with self._blas.limit(limits=1, user_api="blas"):
            return self._map(k)

    def __getstate__(self):
        return {**self.__dict__, "_blas": None}  # rebuilt in each worker process

    def _map(self, k: int) -> dict[str, Any]:
        rows, bucket = self.rows(k)
        frames, tokens = self.plan.shape(bucket)
        examples, lines, sources, skipped = [], [], [], []
        for r in rows:
            ex = None if r < 0 else self._example(int(r), skipped)
            examples.append(ex)
            lines.append(-1 if ex is None else int(self.index.lines[r]))
            sources.append(-1 if ex is None else int(self.index.source_ids[r]))
        batch = make_batch(
            examples,
            batch_size=self.batch_size,
            frames=frames,
            tokens=tokens,
            n_mels=self.n_mels,
            pad_id=self.layout.pad_id,
        )
        batch["line"] = np.asarray(lines, np.int32)
        batch["source"] = np.asarray(sources, np.int32)
        batch[_SKIPPED] = json.dumps(skipped)
        return batch

    def _example(self, r: int, skipped: list) -> dict | None:
        ix = self.index
        s = int(ix.source_ids[r])
        manifest = ix.manifests[s]
        if s in self.packs:
            return self._packed_example(self.packs[s], r, skipped)
        row = manifest_lib.parse_line(
            manifest_lib.read_line_at(ix.files[s], int(ix.offsets[r])),
            int(ix.lines[r]),
            storage.parent(manifest),
        )
        info = audio_lib.AudioInfo(int(ix.sample_rates[r]), 0, int(ix.num_samples[r]))
        try:
            wave = audio_lib.load_pinned(row.audio, row.offset, row.duration, info)
        except audio_lib.AudioError as e:
            skipped.append(BadRow(manifest, row.line, str(e), row.audio).to_json())
            return None
        ex = self.layout(row.text, row.response, row.instruction)
        ex["features"] = log_mel(wave, self.n_mels)
        return ex

    def _packed_example(self, pack: packed.Pack, r: int, skipped: list) -> dict | None:
        line, record = int(self.index.lines[r]), int(self.index.offsets[r])
        try:
            fields, array = pack.read(record)
            if fields.get("line") != line or fields.get("num_samples") != self.index.num_samples[r]:
                raise DataError(
                    f"{pack.path}: corrupt shard (record {record} holds manifest line "
                    f"{fields.get('line')}, {packed.ROWS} says line {line})"
                )
        except DataError as e:  # a damaged shard: each of its rows is skipped, naming it
            skipped.append(BadRow(pack.path, line, str(e)).to_json())
            return None
        ex = self.layout(fields["text"], fields.get("response"), fields.get("instruction"))
        if pack.store == "features":
            ex["features"] = np.array(array, np.float32)
        else:
            ex["features"] = log_mel(np.asarray(array, np.float32), self.n_mels)
        return ex


# ----------------------------------------------------------------------------------------------
# Iterator: grain underneath, exact state on top.


class BatchIterator(grain.DatasetIterator):
    """Yields batches (dicts of numpy arrays, docs/method.md §4 layout plus `line`, the 1-based
    manifest line of each row, and `source`, its source's number; -1 for padding).
    `get_state()`/`set_state()` round-trip through JSON (orbax's grain checkpoint handler saves
    it) and restore exactly: the state is the next batch number, independent of the worker count
    (with the counts so far: rows that failed to decode, examples drawn per source)."""

    def __init__(self, pipeline: DataPipeline):
        super().__init__()
        self._pipeline = pipeline
        self._next = 0
        self._dropped = 0
        self._drawn = np.zeros(len(pipeline.source_names), np.int64)
        self._it: grain.DatasetIterator | None = None

    def _open(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = self._pipeline._grain_iterator(self._next)
        return self._it

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= self._pipeline.num_batches:
            raise StopIteration
        batch = next(self._open())
        rows, _ = self._pipeline._loader.global_rows(self._next)
        sources = self._pipeline.index.source_ids[rows[rows >= 0]]
        self._drawn += np.bincount(sources, minlength=len(self._drawn))
        self._next += 1
        skipped = [BadRow.from_json(d) for d in json.loads(batch.pop(_SKIPPED))]
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if skipped:
            if self._pipeline.config.strict:
                raise DataError(str(skipped[0]))
            self._dropped += len(skipped)
            self._pipeline._log_skipped(skipped)
        return batch

    @property
    def dropped_at_decode(self) -> int:
        """Rows that passed the startup index but failed to decode, so far (padding rows now)."""
        return self._dropped

    @property
    def examples_per_source(self) -> dict[str, int]:
        """Examples of the global batches yielded so far, by source name (a row that failed to
        decode counts where it was drawn; `skipped.jsonl` lists it)."""
        return dict(zip(self._pipeline.source_names, self._drawn.tolist(), strict=True))

    def get_state(self) -> dict[str, Any]:
        return {
            "next_batch": self._next,
            "dropped_at_decode": self._dropped,
            "examples_per_source": self.examples_per_source,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._closed = False
        self._next = int(state["next_batch"])
        self._dropped = int(state.get("dropped_at_decode", 0))
        drawn = state.get("examples_per_source") or {}
        self._drawn = np.array([int(drawn.get(n, 0)) for n in self._pipeline.source_names])

    def start_prefetch(self) -> None:
        self._open().start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        self._closed = True


# ----------------------------------------------------------------------------------------------
# Pipeline.


class DataPipeline:
    """One manifest, or a mixture (`sources`), -> an iterable of batches for this process.

    `train=True` shuffles (if `config.shuffle`), draws a mixture's sources by weight and repeats
    forever; `train=False` makes one pass in manifest order (within each bucket; a mixture's
    sources one after another, every row once), padding the last batch of each bucket.
    `process_index`/`process_count` default to JAX's; every process must build the pipeline
    with the same config and manifest. `tokenizer` is a Hugging Face tokenizer or its directory.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        manifest: str,
        *,
        workdir: str | None = None,
        train: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        key: str = "manifest",
    ):
        config.validate()
        sources = parse_sources(manifest, key)
        if process_index is None or process_count is None:
            import jax  # only here: the workers never need it

            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if isinstance(tokenizer, str | os.PathLike):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        self.config, self.train, self.workdir = config, train, workdir
        self.process_index, self.process_count = process_index, process_count
        self.layout = ChatLayout(
            tokenizer, config.system_prompt or None, config.chat_template, config.instruction
        )
        self._logged: set | None = None
        self.source_names = [s.name for s in sources]
        parts, self.bad_rows = [], []
        for source in sources:
            index, bad = index_manifest(source.path, self.layout, config, write=process_index == 0)
            parts.append(index)
            self.bad_rows += bad
            if process_index == 0:  # all processes find the same; decode failures are per process
                self._log_skipped(bad)
            if not len(index):
                raise DataError(
                    f"{source.path}: no usable rows ({len(bad)} bad"
                    + (f"; see {self._skipped_path()}" if workdir else "")
                    + ")"
                )
            if bad:
                log.warning(
                    "%s: skipping %d of %d rows (reasons in %s)",
                    source.path,
                    len(bad),
                    len(bad) + len(index),
                    self._skipped_path() or "the pipeline's bad_rows",
                )
        self.index = parts[0] if len(parts) == 1 else Index.concat(parts)
        # Packed sources, opened once (manifests decode audio files instead).
        packs = {i: packed.Pack(s.path) for i, s in enumerate(sources) if packed.is_packed(s.path)}
        for pack in packs.values():
            if pack.store == "features" and pack.n_mels != config.n_mels:
                raise DataError(
                    f"{pack.path}: packed with {pack.n_mels}-bin log-mel features, but "
                    f"the encoder reads {config.n_mels} (data.n_mels): pack it again with "
                    f"--features {config.n_mels}, or with audio"
                )
        # No example's transcript starts before this position: the train step may let the
        # student reuse the teacher's keys and values up to here (`StepConfig.shared_prefix`).
        self.shared_prefix = int(self.index.prefixes.min())
        self.plan = make_plan(
            self.index.frames,
            self.index.lengths,
            config.frame_buckets,
            config.token_buckets,
            global_batch=config.batch_size_per_process * process_count,
            seed=config.seed,
            shuffle=train and config.shuffle,
            sources=self.index.source_ids,
            weights=[s.weight for s in sources],
            mix=train,
        )
        self.num_batches = sys.maxsize if train else self.plan.batches_per_epoch
        # One loader: grain maps batch numbers through it (a copy in each worker process) and the
        # iterator reads each batch's global rows from it for the per-source counts.
        self._loader = LoadBatch(
            self.index,
            self.plan,
            self.layout,
            config,
            process_index,
            config.batch_size_per_process,
            packs,
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(F, L) of every bucket that occurs: the shapes jit will compile."""
        return sorted({self.plan.shape(b) for b in np.unique(self.plan.buckets)})

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def _grain_iterator(self, start: int) -> grain.DatasetIterator:
        ds = grain.MapDataset.range(start, self.num_batches).map(self._loader)
        # Each element is a whole batch: no reader threads, a small buffer.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.config.worker_count > 0:
            # grain's worker start-up reads an absl flag; outside an absl app (our CLIs use
            # argparse) the flags were never parsed and that read raises. Defaults are right.
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.config.worker_count,
                    per_worker_buffer_size=self.config.worker_buffer_size,
                )
            )
            # Batches come back pickled rather than in shared memory: grain frees a shared
            # segment on a background thread that may not run before the interpreter exits,
            # which left segments behind (and a warning) after every run. A batch is a few MB.
            options = grain.experimental.DatasetOptions(min_shm_size=1 << 62)
            ds = grain.experimental.WithOptionsIterDataset(ds, options)
        return iter(ds)

    # Skipped rows -> WORKDIR/skipped.jsonl, each (manifest, line, reason) once across restarts.

    def _skipped_path(self) -> str | None:
        if not self.workdir:
            return None
        name = (
            "skipped.jsonl"
            if self.process_index == 0
            else f"skipped.process{self.process_index}.jsonl"
        )
        return os.path.join(self.workdir, name)

    def _log_skipped(self, bad: list[BadRow]) -> None:
        path = self._skipped_path()
        if not bad or path is None:
            return
        if self._logged is None:  # first call: what earlier runs already logged
            self._log, self._logged = storage.LineLog(path, upload_seconds=0), set()
            for text in self._log.read_lines():
                try:
                    d = json.loads(text)
                    self._logged.add((d["manifest"], d["line"], d["reason"]))
                except (ValueError, KeyError, TypeError):
                    continue
        for b in bad:
            if (b.manifest, b.line, b.reason) not in self._logged:
                self._log.write(json.dumps(b.to_json()))
                self._logged.add((b.manifest, b.line, b.reason))


def train_pipeline(config: DataConfig, tokenizer, workdir: str | None = None, **kw) -> DataPipeline:
    """The training pipeline over `config.train_manifest` (shuffled, repeating)."""
    return DataPipeline(
        config,
        tokenizer,
        config.train_manifest,
        workdir=workdir,
        train=True,
        key="data.train_manifest",
        **kw,
    )


def eval_pipeline(config: DataConfig, tokenizer, workdir: str | None = None, **kw) -> DataPipeline:
    """The evaluation pipeline over `config.eval_manifest` (one ordered pass)."""
    return DataPipeline(
        config,
        tokenizer,
        config.eval_manifest,
        workdir=workdir,
        train=False,
        key="data.eval_manifest",
        **kw,
    )
