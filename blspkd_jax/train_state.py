"""The sharded train state and the jitted train step (MaxText's recipe).

`jax.eval_shape(init)` gives the parameter shapes and their logical names; `sharding.RULES` turns
them into shardings; `jax.jit(init, out_shardings=...)` materialises every array directly in its
shards, so no full copy ever sits on one device. The step is `jax.jit` with explicit in/out
shardings and the state donated; it is compiled ahead of time so its memory and FLOPs are known
before the first batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blspkd_jax import optim, sharding
from blspkd_jax.model import BLSPKD, LossConfig, compute_losses

BATCH_AXES = ("data", "fsdp")


@struct.dataclass
class TrainState:
    """step, the trained parameters with their optimizer state, and the frozen rest.

    Parameters are flat dicts keyed by "/"-joined paths (`optim.flatten`); frozen ones get no
    gradient and no optimizer state.
    """

    step: jax.Array
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any

    def params(self) -> dict:
        return optim.unflatten({**self.trainable, **self.frozen})


@dataclasses.dataclass
class StepConfig:
    trainable: Sequence[str]  # regexes over parameter paths
    loss: LossConfig
    grad_accum_steps: int = 1


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


def param_shardings(mesh: Mesh, init_fn: Callable, *args) -> tuple[Any, Any]:
    """(abstract unboxed params, their NamedShardings) for `init_fn(*args)` (boxed params)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = sharding.logical_shardings(mesh, abstract)
    return nn.unbox(abstract), shardings


def shard_host_array(x, target: NamedSharding) -> jax.Array:
    """Place a host (numpy or memmap) array into `target` shards, each process reading only its
    own slices (works for multi-host: no process needs the whole array on device)."""
    x = np.asarray(x) if not hasattr(x, "__getitem__") else x
    return jax.make_array_from_callback(x.shape, target, lambda idx: np.asarray(x[idx]))


def create_state(
    model: BLSPKD,
    mesh: Mesh,
    rng: jax.Array,
    example_batch: Mapping[str, jax.ShapeDtypeStruct],
    step_cfg: StepConfig,
    tx: optax.GradientTransformation,
    pretrained: Mapping[str, np.ndarray] | None = None,
) -> tuple[TrainState, TrainState]:
    """(state, state shardings). `pretrained` maps flat paths to host arrays that replace the
    random initialisation (loaded Whisper/LLM weights); everything is created in its shards."""

    def init(rng):
        dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(example_batch))
        return model.init({"params": rng, "dropout": rng}, dummy)["params"]

    abstract, shardings = param_shardings(mesh, init, rng)
    flat_abstract = optim.flatten(abstract)
    flat_shard = optim.flatten(shardings)
    pretrained = dict(pretrained or {})
    unknown = sorted(set(pretrained) - set(flat_abstract))
    if unknown:
        raise ValueError(f"pretrained weights for unknown parameters: {unknown[:5]}")
    for k, v in pretrained.items():
        if tuple(v.shape) != tuple(flat_abstract[k].shape):
            raise ValueError(
                f"pretrained {k}: shape {tuple(v.shape)} != model's {tuple(flat_abstract[k].shape)}"
            )

    with sharding.activate(mesh):
        params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    flat = optim.flatten(params)
    for k, v in pretrained.items():
        flat[k] = shard_host_array(
            np.asarray(v, dtype=flat_abstract[k].dtype) if v.dtype != flat_abstract[k].dtype else v,
            flat_shard[k],
        )
    trainable, frozen = optim.split_trainable(flat, step_cfg.trainable)
    if not trainable:
        raise ValueError(
            f"train.trainable {list(step_cfg.trainable)} matches no parameter; paths look like "
            f"{sorted(flat)[:3]}"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sharding = {k: v.sharding for k, v in trainable.items()}
    opt_shardings = jax.tree_util.tree_map_with_path(
        lambda path, _: _opt_leaf_sharding(path, param_sharding, replicated),
        jax.eval_shape(tx.init, trainable),
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = TrainState(step, trainable, frozen, opt_state)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, state_shardings


def _opt_leaf_sharding(path, param_sharding, replicated):
    """Optimizer moments shard like the parameter they track (same flat key); counters and
    other scalars are replicated."""
    last = path[-1] if path else None
    key = getattr(last, "key", None)
    return param_sharding.get(key, replicated) if isinstance(key, str) else replicated


# Metrics that count things add up over micro-batches; the others (losses) are averaged.
SUMMED_METRICS = ("num_examples", "num_tokens", "cif_overflow")


def _microbatches(batch, n: int):
    """[B, ...] -> [n, B / n, ...]."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(model: BLSPKD, step_cfg: StepConfig, tx: optax.GradientTransformation):
    """train_step(state, batch, rng) -> (state, metrics). Gradient accumulation over
    `grad_accum_steps` micro-batches (mean of their gradients); a non-finite loss or gradient
    leaves the state unchanged and reports `skipped = 1`."""

    def loss_fn(trainable, frozen, batch, rng):
        params = optim.unflatten({**trainable, **frozen})
        return compute_losses(model, params, batch, step_cfg.loss, rng=rng, deterministic=False)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        n = step_cfg.grad_accum_steps
        micro = _microbatches(batch, n)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, metrics), grads = grad_fn(state.trainable, state.frozen, first, rng)
        if n > 1:

            def body(acc, xs):
                mb, i = xs
                (_, m), g = grad_fn(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, (g, m)), None

            rest = jax.tree.map(lambda x: x[1:], micro)
            (grads, metrics), _ = jax.lax.scan(body, (grads, metrics), (rest, jnp.arange(1, n)))
            grads = jax.tree.map(lambda g: g / n, grads)
            metrics = {k: v if k in SUMMED_METRICS else v / n for k, v in metrics.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        # A skipped update still advances the step so the data and schedule move on.
        keep = lambda a, b: jnp.where(finite, a, b)  # noqa: E731
        new = new.replace(
            trainable=jax.tree.map(keep, new.trainable, state.trainable),
            opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
        )
        metrics = {**metrics, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32)}
        return new, metrics

    return train_step


def compile_train_step(
    train_step, state_shardings, mesh: Mesh, abstract_state, abstract_batch, log=print
):
    """jit with explicit shardings and donated state, compiled ahead of time.

    Returns (compiled step, stats) with stats = {"flops", "temp_bytes", "argument_bytes", ...}
    read from XLA's cost and memory analysis (-1 where the backend does not report them).
    """
    b_shard = {k: batch_sharding(mesh, len(v.shape)) for k, v in abstract_batch.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, b_shard, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with sharding.activate(mesh):
        compiled = jitted.lower(abstract_state, abstract_batch, rng).compile()
    stats = compiled_stats(compiled)
    log(
        "train step compiled: "
        f"{stats['flops'] / 1e9:.2f} GFLOPs/step (per device), "
        f"temp {stats['temp_bytes'] / 2**20:.1f} MiB, "
        f"args {stats['argument_bytes'] / 2**20:.1f} MiB, "
        f"outputs {stats['output_bytes'] / 2**20:.1f} MiB (per device)"
    )
    return compiled, stats


def compiled_stats(compiled) -> dict[str, float]:
    stats = {"flops": -1.0, "temp_bytes": -1, "argument_bytes": -1, "output_bytes": -1}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        stats["flops"] = float(cost.get("flops", -1.0))
    except Exception:  # not every backend reports costs
        pass
    try:
        mem = compiled.memory_analysis()
        stats["temp_bytes"] = int(mem.temp_size_in_bytes)
        stats["argument_bytes"] = int(mem.argument_size_in_bytes)
        stats["output_bytes"] = int(mem.output_size_in_bytes)
    except Exception:
        pass
    return stats
