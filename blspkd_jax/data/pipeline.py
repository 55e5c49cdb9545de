"""The grain input pipeline: manifest -> bucketed, padded batches in the docs/method.md §4 layout.

Startup indexes the manifest (JSON, keys, transcript tokens, audio headers: cheap, no decoding),
so every usable row's bucket is known before any audio is read. From that index a pure function
of (seed, epoch) plans the epoch: rows are shuffled, grouped by bucket, cut into *global* batches,
and the batch order shuffled. Batch k is therefore a pure function of k, which gives three things:

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

import dataclasses
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grain
import numpy as np

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data import storage
from blspkd_jax.data.features import log_mel
from blspkd_jax.data.layout import DEFAULT_SYSTEM, ChatLayout, make_batch
from blspkd_jax.data.manifest import BadRow, DataError
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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data options; the names match the `data.*` keys of the training config."""

    train_manifest: str = ""
    eval_manifest: str = ""
    batch_size_per_process: int = 8
    frame_buckets: tuple[int, ...] = (1000, 2000, 3000)  # mel frames, 100 per second; even
    token_buckets: tuple[int, ...] = (64, 128, 256)  # teacher sequence length L
    min_seconds: float = manifest_lib.MIN_SECONDS
    max_seconds: float = manifest_lib.MAX_SECONDS
    max_text_tokens: int = manifest_lib.MAX_TEXT_TOKENS  # transcript tokens N (CIF target length)
    n_mels: int = 80
    worker_count: int = 2  # decoding processes; 0 decodes in the calling thread
    worker_buffer_size: int = 2  # batches each worker keeps ready
    probe_threads: int = 8  # threads reading audio headers at startup
    seed: int = 0
    shuffle: bool = True  # training order; eval never shuffles
    strict: bool = False  # raise at the first bad row instead of skipping it
    instruction: str = ""  # used where a row has no "instruction"
    system_prompt: str = DEFAULT_SYSTEM  # "" sends no system turn (the template's default applies)
    chat_template: str = ""  # overrides the tokenizer's own template when set

    @classmethod
    def from_config(cls, config, process_count: int) -> DataConfig:
        """This process's data options from a run's config (`data.*`, the global `batch_size`
        split over `process_count` processes, `seed`)."""
        if config.batch_size <= 0 or config.batch_size % process_count:
            raise ValueError(
                f"batch_size={config.batch_size}: expected a positive multiple of the "
                f"{process_count} processes (it is the global batch)"
            )
        d = config.data
        return cls(
            train_manifest=d.train_manifest,
            eval_manifest=d.eval_manifest,
            batch_size_per_process=config.batch_size // process_count,
            frame_buckets=tuple(d.frame_buckets),
            token_buckets=tuple(d.token_buckets),
            min_seconds=d.min_seconds,
            max_seconds=d.max_seconds,
            max_text_tokens=d.max_text_tokens,
            n_mels=d.n_mels,
            worker_count=d.worker_count,
            worker_buffer_size=d.worker_buffer_size,
            seed=config.seed,
            shuffle=d.shuffle,
            strict=d.strict,
            instruction=d.instruction,
            system_prompt=d.system_prompt,
            chat_template=d.chat_template,
        )

    def validate(self) -> None:
        """Raise ValueError naming the `data.*` key that is out of range."""
        fb, tb = self.frame_buckets, self.token_buckets
        if not fb or any(f <= 0 or f % 2 for f in fb) or list(fb) != sorted(set(fb)):
            raise ValueError(
                f"data.frame_buckets must be increasing positive even frame counts (the encoder "
                f"halves them), got {fb}"
            )
        if not tb or any(t <= 0 for t in tb) or list(tb) != sorted(set(tb)):
            raise ValueError(f"data.token_buckets must be increasing positive lengths, got {tb}")
        if self.batch_size_per_process <= 0:
            raise ValueError(
                f"data.batch_size_per_process must be positive, got {self.batch_size_per_process}"
            )
        # log_mel needs more than half an STFT window (200 samples) of audio.
        if not 0.02 <= self.min_seconds < self.max_seconds:
            raise ValueError(
                f"data.min_seconds ({self.min_seconds}) must be >= 0.02 and below "
                f"data.max_seconds ({self.max_seconds})"
            )
        if audio_lib.num_frames(int(self.max_seconds * audio_lib.SAMPLE_RATE)) > fb[-1]:
            raise ValueError(
                f"data.max_seconds={self.max_seconds} gives up to "
                f"{int(self.max_seconds * audio_lib.FRAMES_PER_SECOND)} mel frames, more than the "
                f"largest of data.frame_buckets={fb}"
            )
        if self.max_text_tokens <= 0:
            raise ValueError(f"data.max_text_tokens must be positive, got {self.max_text_tokens}")
        if self.worker_count < 0 or self.worker_buffer_size <= 0 or self.probe_threads <= 0:
            raise ValueError(
                "data.worker_count must be >= 0 and data.worker_buffer_size, data.probe_threads > 0"
            )


# ----------------------------------------------------------------------------------------------
# Index: one pass over the manifest at startup.


@dataclasses.dataclass(frozen=True)
class Index:
    """Usable rows of one manifest or of several (a mixture), as flat arrays (cheap to pickle
    into every worker)."""

    manifests: tuple[str, ...]  # per source
    files: tuple[str, ...]  # per source, the file workers re-read lines from (a URL's local copy)
    source_ids: np.ndarray  # int64 [R]: the row's source
    lines: np.ndarray  # int64 [R]: 1-based manifest line
    offsets: np.ndarray  # int64 [R]: byte offset of the line, for workers to re-read it
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


def build_index(
    manifest: str, layout: ChatLayout, config: DataConfig
) -> tuple[Index, list[BadRow]]:
    """Validate every row without decoding audio; returns the usable rows and the bad ones.

    Checks: JSON and keys, transcript non-empty and within `max_text_tokens`, the whole sequence
    within the largest token bucket, the file present with a readable header, segment inside the
    file, length within [min_seconds, max_seconds]. In strict mode raises DataError for the first
    bad row (by line).
    """
    manifest = os.fspath(manifest)
    if not storage.isfile(manifest):
        raise FileNotFoundError(f"data manifest not found: {manifest}")
    base = storage.parent(manifest)
    source = storage.local_copy(manifest)  # workers re-read single lines: one download, not many
    rows, offsets, bad = [], [], []
    for number, offset, text in manifest_lib.iter_lines(source):
        try:
            row = manifest_lib.parse_line(text, number, base)
            manifest_lib.check_text(row, None, None)
        except ValueError as e:
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
            info = audio_lib.probe(row.audio, row.offset, row.duration)
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
    ):
        self.index, self.plan, self.layout = index, plan, layout
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
        row = manifest_lib.parse_line(
            manifest_lib.read_line_at(ix.files[s], int(ix.offsets[r])),
            int(ix.lines[r]),
            storage.parent(manifest),
        )
        info = audio_lib.AudioInfo(int(ix.sample_rates[r]), 0, int(ix.num_samples[r]))
        try:
            wave = audio_lib.load(row.audio, row.offset, row.duration, info)
        except audio_lib.AudioError as e:
            skipped.append(BadRow(manifest, row.line, str(e), row.audio).to_json())
            return None
        # The index chose the bucket from this length; the resampler already pads/trims to it,
        # and pinning it here means no decode path can ever overflow the bucket.
        n = info.num_samples_16k
        wave = np.pad(wave[:n], (0, max(0, n - len(wave))))
        ex = self.layout(row.text, row.response, row.instruction)
        ex["features"] = log_mel(wave, self.n_mels)
        return ex


# ----------------------------------------------------------------------------------------------
# Iterator: grain underneath, exact state on top.


class BatchIterator(grain.DatasetIterator):
    """Yields batches (dicts of numpy arrays, docs/method.md §4 layout plus `line`, the 1-based
    manifest line of each row, -1 for padding). `get_state()`/`set_state()` round-trip through
    JSON (orbax's grain checkpoint handler saves it) and restore exactly: the state is the next
    batch number, independent of the worker count."""

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
        rows, _ = self._pipeline._planner.global_rows(self._next)
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
            index, bad = build_index(source.path, self.layout, config)
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
        )
        self.num_batches = sys.maxsize if train else self.plan.batches_per_epoch
        self._planner = self._load_batch()  # this process's copy, for the iterator's counts

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(F, L) of every bucket that occurs: the shapes jit will compile."""
        return sorted({self.plan.shape(b) for b in np.unique(self.plan.buckets)})

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def _load_batch(self) -> LoadBatch:
        return LoadBatch(
            self.index,
            self.plan,
            self.layout,
            self.config,
            self.process_index,
            self.config.batch_size_per_process,
        )

    def _grain_iterator(self, start: int) -> grain.DatasetIterator:
        ds = grain.MapDataset.range(start, self.num_batches).map(self._load_batch())
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
