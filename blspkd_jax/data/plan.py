"""The epoch plan: which manifest rows make up global batch k, a pure function of (seed, epoch,
index), so every process of a run agrees on each batch and a resumed run continues exactly (the
pipeline's iterator state is just k)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bucketed global batches. `buckets[r]` is row r's bucket id; bucket id = f * len(token
    buckets) + t for frame bucket f and token bucket t."""

    buckets: np.ndarray  # int64 [R]
    frame_buckets: tuple[int, ...]
    token_buckets: tuple[int, ...]
    global_batch: int
    seed: int
    shuffle: bool

    @functools.cached_property
    def batches_per_epoch(self) -> int:
        counts = np.bincount(self.buckets, minlength=self.num_buckets)
        return int(sum(-(-c // self.global_batch) for c in counts))

    @property
    def num_buckets(self) -> int:
        return len(self.frame_buckets) * len(self.token_buckets)

    def shape(self, bucket: int) -> tuple[int, int]:
        """(F, L) of a bucket."""
        f, t = divmod(int(bucket), len(self.token_buckets))
        return self.frame_buckets[f], self.token_buckets[t]

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, global_batch] with -1 for padding, bucket [n]) for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.buckets)) if self.shuffle else np.arange(len(self.buckets))
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
) -> Plan:
    """Each row (`frames` [R] feature frames, `lengths` [R] text tokens) in the smallest bucket
    that holds it."""
    f = np.searchsorted(np.asarray(frame_buckets), frames, side="left")
    t = np.searchsorted(np.asarray(token_buckets), lengths, side="left")
    return Plan(
        buckets=(f * len(token_buckets) + t).astype(np.int64),
        frame_buckets=tuple(frame_buckets),
        token_buckets=tuple(token_buckets),
        global_batch=global_batch,
        seed=seed,
        shuffle=shuffle,
    )
