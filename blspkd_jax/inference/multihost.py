"""What inference needs to run on a multi-process mesh (one JAX process per host, parameters
sharded over every host's devices): host data in and out of global arrays, one writer, barriers.

Every process runs the same program on the same global arrays; only process 0 writes files.
The helpers are no-ops in a single process, so one code path serves both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blspkd_jax.models import sharding
from blspkd_jax.training import distributed


def initialize() -> None:
    """Join the job's processes (`training.distributed.initialize`: the BLSPKD_* variables,
    SLURM or a TPU pod), once per process: the CLIs call it, and may be called in turn."""
    if not jax.distributed.is_initialized():
        distributed.initialize()


def is_writer() -> bool:
    """Whether this process writes the outputs (process 0); the others only compute."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
    """The whole of a (possibly sharded over several processes) array as numpy, on every process.

    A global array that no process holds whole is gathered once (`process_allgather`); use this
    for small results (tokens, counts, one parameter at a time), never for a whole model.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def allmax(value: int) -> int:
    """The largest of one int per process (every process gets it)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def broadcast_json(obj):
    """Process 0's JSON-serialisable `obj`, on every process (e.g. what process 0 read from a
    file only it should read)."""
    if jax.process_count() == 1:
        return obj
    data = (
        np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
    )
    n = int(multihost_utils.broadcast_one_to_all(np.asarray([data.size], np.int64))[0])
    buf = np.zeros(n, np.uint8)
    buf[: data.size] = data
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())


def batch_spec(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Batch-leading `shape` split over data x fsdp, or replicated where the batch does not
    divide (a 3-row test batch on 8 devices)."""
    spec = PartitionSpec(sharding.BATCH_AXES, *([None] * (len(shape) - 1)))
    return NamedSharding(mesh, sharding.divisible_spec(mesh, spec, shape))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways a batch is split: the data x fsdp devices."""
    return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


def global_from_host(x: np.ndarray, target: NamedSharding) -> jax.Array:
    """A host array every process holds whole -> a global array in `target`; each process
    copies only the slices its own devices hold."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda idx: x[idx])


def local_rows(target: NamedSharding, shape: Sequence[int]) -> list[int]:
    """The rows (first axis) of a global `shape` in `target` that this process's devices hold."""
    rows: set[int] = set()
    for idx in target.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*idx[0].indices(shape[0])))
    return sorted(rows)


def global_from_rows(
    shape: Sequence[int], dtype, target: NamedSharding, row: Callable[[int], np.ndarray]
) -> jax.Array:
    """A global batch-leading array whose row b is `row(b)`, asked only for the rows this
    process's devices hold (`row` is called once per row, e.g. to decode one utterance)."""
    shape = tuple(shape)
    cache = {b: np.asarray(row(b), dtype) for b in local_rows(target, shape)}

    def piece(idx):
        rows = range(*idx[0].indices(shape[0]))
        return np.stack([cache[b] for b in rows])[(slice(None), *idx[1:])]

    return jax.make_array_from_callback(shape, target, piece)
