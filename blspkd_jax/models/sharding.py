"""Logical axis names and the one rules table that maps them onto the (data, fsdp, tensor) mesh.

Every parameter is created with logical names (`nn.with_logical_partitioning`) and every large
activation is pinned with `nn.with_logical_constraint`; nothing else in the package names a mesh
axis. Changing how the model is sharded means changing `RULES`, nothing more.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch is split over these; every device of a tensor group sees it

# Logical name -> mesh axis (or axes, or None for replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Parameters.
    ("embed", "fsdp"),  # model width: H for the LLM, D for the encoder and adapter
    ("heads", "tensor"),  # query heads x head_dim, flattened
    ("kv_heads", "tensor"),  # key/value heads x head_dim, flattened
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("lora_rank", None),
    ("layers", None),  # the stacked axis of nn.scan
    ("norm", None),  # norm scales and biases: small, replicated
    ("conv_in", None),  # conv input channels (mels, or D for the second conv)
    ("conv_kernel", None),  # conv taps
    ("pos", None),  # position tables
)


def logical_to_spec(names: Sequence[str | None] | None, rules=RULES) -> PartitionSpec:
    """Logical names of one array -> its PartitionSpec under `rules`."""
    return nn.logical_to_mesh_axes(names, rules)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1 (the rest).

    Raises ValueError naming the config keys `mesh.data`, `mesh.fsdp`, `mesh.tensor` when the sizes
    don't multiply to the device count.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh: {len(devices)} devices are not divisible by mesh sizes {sizes} (-1 = rest)"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: mesh.data*mesh.fsdp*mesh.tensor = {math.prod(sizes)} but there are "
            f"{len(devices)} devices (sizes {dict(zip(MESH_AXES, sizes, strict=True))})"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(mesh: Mesh, abstract_tree, rules=RULES):
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) values from eval_shape.

    A dimension that its mesh axes do not divide (a 97-token test vocabulary over tensor=2) is
    replicated instead, so any model runs on any mesh; real model sizes divide and are sharded.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
    shapes = nn.unbox(abstract_tree)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, divisible_spec(mesh, spec, x.shape)),
        specs,
        shapes,
        is_leaf=is_spec,
    )


def divisible_spec(mesh: Mesh, spec: PartitionSpec, shape) -> PartitionSpec:
    """`spec` with every entry that does not divide its dimension replaced by None."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and shape[i] % size == 0 else None)
    return PartitionSpec(*out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """Trace under `mesh` with `rules`, so `nn.with_logical_constraint` pins activations.

    (Both are needed: without the rules the logical names map to nothing, and the legacy
    `with mesh:` context does not reach Flax's constraints.)
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-leading arrays split over data x fsdp, replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays sharded over data x fsdp.

    Each process passes only its own slice (rows in process order); the global batch is the
    concatenation over processes, assembled without any process holding all of it.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }


def shard_host_array(x, target: NamedSharding, dtype=None) -> jax.Array:
    """Place a host array (numpy, memmap, or a lazy checkpoint tensor, `lazy.py`) into `target`
    shards, each process reading only the slices its own devices hold, cast to `dtype` slice by
    slice (default: `x`'s own). No process needs the whole array, on host or device."""
    x = np.asarray(x) if not hasattr(x, "__getitem__") else x
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    return jax.make_array_from_callback(
        tuple(x.shape), target, lambda idx: np.asarray(x[idx]).astype(dtype, copy=False)
    )


def place_host_tree(mesh: Mesh, host: Mapping, abstract, dtype=None, rules=RULES) -> dict:
    """A nested dict of host arrays -> the same tree of global arrays sharded on `mesh` by the
    logical names in `abstract` (a boxed `jax.eval_shape` of the module's init; it may hold more
    parameters than `host`, e.g. LoRA), each leaf cast to `dtype` as it is read."""
    shardings = flatten_dict(logical_shardings(mesh, abstract, rules))
    flat = flatten_dict(host)
    return unflatten_dict({k: shard_host_array(v, shardings[k], dtype) for k, v in flat.items()})
