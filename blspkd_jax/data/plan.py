"""The epoch plan: which manifest rows make up global batch k, a pure function of (seed, k, index),
so every process of a run agrees on each batch and a resumed run continues exactly (the
pipeline's iterator state is just k).

A mixture of sources (`data.train_manifest=a.jsonl:3,b.jsonl:1`) draws each epoch's rows by
weight: epoch e takes rows [floor(e q_i), floor((e + 1) q_i)) of source i's endless stream (its
rows in a fresh seeded order each pass), where q_i = R w_i / sum(w) and R is the number of usable
rows of all sources, so an epoch still holds about R rows and source i's share of the first e
epochs is w_i / sum(w) to within one row. We plan mixtures here rather than with grain's
`MapDataset.mix`: the batch bucket must be known for all processes from k alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

# Seeds a source's pass order apart from the epoch order's [seed, epoch].
_PASS_TAG = 0x5EED


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bucketed global batches. `buckets[r]` is row r's bucket id; bucket id = f * len(token
    buckets) + t for frame bucket f and token bucket t. `sources[r]` is row r's source and
    `weights` the sources' mixture weights (one source: all rows once per epoch)."""

    buckets: np.ndarray  # int64 [R]
    frame_buckets: tuple[int, ...]
    token_buckets: tuple[int, ...]
    global_batch: int
    seed: int
    shuffle: bool
    sources: np.ndarray | None = None  # int64 [R]; None: one source
    weights: tuple[float, ...] = (1.0,)
    mix: bool = False  # draw the sources by weight (training); else every row once per epoch

    @property
    def num_buckets(self) -> int:
        return len(self.frame_buckets) * len(self.token_buckets)

    @property
    def mixed(self) -> bool:
        """Rows drawn by weight (a training mixture), not each row once per epoch."""
        return self.mix and len(self.weights) > 1

    def shape(self, bucket: int) -> tuple[int, int]:
        """(F, L) of a bucket."""
        f, t = divmod(int(bucket), len(self.token_buckets))
        return self.frame_buckets[f], self.token_buckets[t]

    @functools.cached_property
    def _members(self) -> list[np.ndarray]:
        """Each source's rows, in index order."""
        if self.sources is None:
            return [np.arange(len(self.buckets))]
        return [np.flatnonzero(self.sources == i) for i in range(len(self.weights))]

    def draw(self, epoch: int) -> np.ndarray:
        """The rows of `epoch` (int64 [~R]; a row may repeat in an upsampled source), in source
        order before shuffling."""
        if not self.mixed:
            return np.arange(len(self.buckets))
        total = len(self.buckets)
        weights = np.asarray(self.weights, np.float64)
        quota = total * weights / weights.sum()
        out = []
        for i, rows in enumerate(self._members):
            a, b = int(np.floor(epoch * quota[i])), int(np.floor((epoch + 1) * quota[i]))
            size = len(rows)
            if size == 0 or b <= a:
                continue
            passes = []
            for p in range(a // size, (b - 1) // size + 1):  # the passes over source i it spans
                rng = np.random.default_rng([self.seed, _PASS_TAG, i, p])
                passes.append(rows[rng.permutation(size)] if self.shuffle else rows)
            stream = np.concatenate(passes)
            start = a - (a // size) * size
            out.append(stream[start : start + (b - a)])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _count(self, epoch: int) -> int:
        counts = np.bincount(self.buckets[self.draw(epoch)], minlength=self.num_buckets)
        return int(sum(-(-c // self.global_batch) for c in counts))

    @functools.cached_property
    def batches_per_epoch(self) -> int:
        """Batches in an epoch (a mixture's epochs differ by a few: epoch 0's)."""
        return self._count(0)

    @functools.cached_property
    def _starts(self) -> list[int]:
        """First global batch of each epoch planned so far (a mixture's, grown on demand)."""
        return [0]

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, batch within it) of global batch k."""
        if not self.mixed:
            return divmod(int(k), self.batches_per_epoch)
        starts = self._starts
        while starts[-1] <= k:
            starts.append(starts[-1] + self._count(len(starts) - 1))
        epoch = int(np.searchsorted(starts, k, side="right")) - 1
        return epoch, int(k) - starts[epoch]

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, global_batch] with -1 for padding, bucket [n]) for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        drawn = self.draw(epoch)
        order = drawn[rng.permutation(len(drawn))] if self.shuffle else drawn
        rows, ids = [], []
        for b in range(self.num_buckets):
            members = order[self.buckets[order] == b]  # keeps the shuffled order
            for s in range(0, len(members), self.global_batch):
                chunk = members[s : s + self.global_batch]
                rows.append(np.pad(chunk, (0, self.global_batch - len(chunk)), constant_values=-1))
                ids.append(b)
        rows = np.stack(rows) if rows else np.zeros((0, self.global_batch), np.int64)
        ids = np.asarray(ids, np.int64)
        if self.shuffle:
            perm = rng.permutation(len(ids))
            rows, ids = rows[perm], ids[perm]
        return rows, ids


def make_plan(
    frames: np.ndarray,
    lengths: np.ndarray,
    frame_buckets: Sequence[int],
    token_buckets: Sequence[int],
    *,
    global_batch: int,
    seed: int,
    shuffle: bool,
    sources: np.ndarray | None = None,
    weights: Sequence[float] = (1.0,),
    mix: bool = False,
) -> Plan:
    """Each row (`frames` [R] feature frames, `lengths` [R] text tokens) in the smallest bucket
    that holds it; `sources` [R] and `weights` for a mixture, drawn by weight if `mix`."""
    f = np.searchsorted(np.asarray(frame_buckets), frames, side="left")
    t = np.searchsorted(np.asarray(token_buckets), lengths, side="left")
    return Plan(
        buckets=(f * len(token_buckets) + t).astype(np.int64),
        frame_buckets=tuple(frame_buckets),
        token_buckets=tuple(token_buckets),
        global_batch=global_batch,
        seed=seed,
        shuffle=shuffle,
        sources=None if sources is None else np.asarray(sources, np.int64),
        weights=tuple(float(w) for w in weights),
        mix=mix,
    )
