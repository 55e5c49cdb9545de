"""Checkpoint tensors that read only the slice asked for, so a model loads straight into its mesh.

`jax.make_array_from_callback` asks each process for the slices its own devices hold. Handing it
one of these (a tensor of a safetensors file, seen through the same transposes and layer stacking
the Hugging Face name maps apply) means no process ever holds a whole checkpoint, nor even a whole
model parameter: a device's shard of `blocks/mlp/up_proj/kernel [layers, H, F]` is read from the
rows of each layer's `mlp.up_proj.weight [F, H]` that it needs.

Every lazy tensor has `shape`, `dtype`, `ndim`, `.T`, `.transpose(*axes)`, `[index]` (basic
slicing: integers and slices, returning a numpy array) and `np.asarray(t)`; a numpy array has the
same interface, so the name maps treat both alike.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy, which safetensors' numpy view needs)
import numpy as np
from safetensors import safe_open


def _full_index(index, shape: tuple[int, ...]) -> tuple[slice | int, ...]:
    """A basic index -> one entry per dimension: a slice with non-negative bounds, or an int in
    range; rejects what we can't map (arrays, None)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    if len(index) > len(shape):
        raise IndexError(f"too many indices ({len(index)}) for a tensor of shape {shape}")
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for i, n in zip(index, shape, strict=True):
        if isinstance(i, slice):
            out.append(slice(*i.indices(n)))
        elif isinstance(i, (int, np.integer)) and -n <= i < n:
            out.append(int(i) % n)
        elif isinstance(i, (int, np.integer)):
            raise IndexError(f"index {i} is out of bounds for a dimension of size {n}")
        else:
            raise TypeError(f"lazy tensors take integers and slices, not {type(i).__name__}")
    return tuple(out)


def _result_shape(index: tuple[slice | int, ...]) -> list[int]:
    """The shape `array[index]` has, for a normalised index (`_full_index`)."""
    return [len(range(i.start, i.stop, i.step)) for i in index if isinstance(i, slice)]


class LazyTensor(abc.ABC):
    """Base of the lazy tensors: shape, dtype, and the numpy-like interface built on `_read`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def T(self) -> LazyTensor:  # noqa: N802  (numpy's name)
        return self.transpose(*reversed(range(self.ndim)))

    def transpose(self, *axes) -> LazyTensor:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return Transposed(self, tuple(axes) or tuple(reversed(range(self.ndim))))

    def __getitem__(self, index) -> np.ndarray:
        return self._read(_full_index(index, self.shape))

    def __array__(self, dtype=None, copy=None):
        a = self._read(_full_index((), self.shape))
        return a if dtype is None else a.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    @abc.abstractmethod
    def _read(self, index: tuple[slice | int, ...]) -> np.ndarray:
        """The numpy array at `index` (one normalised entry per dimension, `_full_index`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class FileTensor(LazyTensor):
    """One tensor of a .safetensors file; each read opens the file and copies only the slice.

    (safetensors memory-maps the file for the read; it is unmapped again at once, so the pages
    read do not stay counted against the process.)
    """

    def __init__(self, path: str | os.PathLike, name: str, shape, dtype):
        self.path, self.name = os.fspath(path), name
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)

    def _read(self, index):
        if not self.shape:  # safetensors' slices need at least one dimension
            with safe_open(self.path, framework="np") as f:
                return np.asarray(f.get_tensor(self.name))
        ints = [k for k, i in enumerate(index) if not isinstance(i, slice)]
        if 0 in _result_shape(index):  # safetensors refuses empty slices that start at the end
            return np.empty(_result_shape(index), self.dtype)
        as_slices = tuple(slice(i, i + 1) if k in ints else i for k, i in enumerate(index))
        with safe_open(self.path, framework="np") as f:
            a = f.get_slice(self.name)[as_slices]
        return np.asarray(a).reshape([n for k, n in enumerate(np.shape(a)) if k not in ints])


class Transposed(LazyTensor):
    """`base.transpose(axes)`, reading only the base's slice that the index covers."""

    def __init__(self, base, axes: Sequence[int]):
        if sorted(axes) != list(range(len(base.shape))):
            raise ValueError(f"axes {axes} are not a permutation for shape {base.shape}")
        self.base, self.axes = base, tuple(axes)
        self.shape = tuple(base.shape[a] for a in axes)
        self.dtype = np.dtype(base.dtype)

    def _read(self, index):
        base_index = [slice(None)] * len(self.axes)
        for ours, theirs in enumerate(self.axes):
            base_index[theirs] = index[ours]
        part = np.asarray(self.base[tuple(base_index)])
        # Integer indices dropped their axes; transpose what is left in the same relative order.
        kept = [a for k, a in enumerate(self.axes) if isinstance(index[k], slice)]
        order = sorted(kept)
        return part.transpose([order.index(a) for a in kept])


class Stacked(LazyTensor):
    """`np.stack(parts)` (the scanned layer axis), reading each part only for the rows asked."""

    def __init__(self, parts: Sequence):
        shapes = {tuple(p.shape) for p in parts}
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(f"stacked parts differ: shapes {shapes}, dtypes {dtypes}")
        self.parts = list(parts)
        self.shape = (len(self.parts), *shapes.pop())
        self.dtype = dtypes.pop()

    def _read(self, index):
        first, rest = index[0], index[1:]
        if not isinstance(first, slice):
            return np.asarray(self.parts[first][rest])
        if 0 in _result_shape(index):
            return np.empty(_result_shape(index), self.dtype)
        return np.stack([np.asarray(self.parts[i][rest]) for i in range(*first.indices(len(self)))])


def stack(parts: Sequence) -> LazyTensor:
    """Lazy `np.stack(parts)`: parts may be lazy tensors or numpy arrays."""
    return Stacked(parts)


def stack_layers(tree: dict, num_layers: int) -> dict:
    """Lazy `layers.stack_layers`: {"layers_0": p0, ...} -> {"layers": stacked}, nothing read."""
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    per_layer = [tree[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = _map(lambda *xs: stack(xs), *per_layer)
    return out


def _map(fn, *trees):
    """A tree map over nested dicts whose leaves may be lazy (not JAX pytrees)."""
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)
