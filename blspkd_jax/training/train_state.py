"""The sharded train state and the jitted train step (MaxText's recipe).

The state is built from parameters that already sit in their shardings (`weights.py`), so no
full copy ever sits on one device. The step is `jax.jit` with explicit in/out shardings and the
state donated; it is compiled ahead of time so its memory and FLOPs are known before the first
batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.training import flops, optim
from blspkd_jax.training.config import ConfigError
from blspkd_jax.training.objective import LossConfig, compute_losses


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
    # Positions before every example's first speech position (the data's shortest prompt
    # prefix): the student reuses the teacher's keys and values there. 0: compute everything.
    shared_prefix: int = 0


def split_trainable(params: Mapping[str, Any], patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) flat parameters by `train.trainable`'s patterns; a ConfigError naming
    the key when they match nothing (a run that would train nothing)."""
    trainable, frozen = optim.split_trainable(dict(params), patterns)
    if not trainable:
        raise ConfigError(
            f"train.trainable {list(patterns)} matches no parameter; paths look like "
            f"{sorted(params)[:3]}"
        )
    return trainable, frozen


def create_state(
    params: Mapping[str, jax.Array],
    mesh: Mesh,
    step_cfg: StepConfig,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, TrainState]:
    """(state at step 0, state shardings) from a run's flat parameters (`weights.assemble_params`:
    already in their shardings), split by `step_cfg.trainable`; the optimizer state is created
    directly in the shardings of the parameters it tracks."""
    shardings = {k: v.sharding for k, v in params.items()}
    # abstract_state's split holds these very arrays; only the step and the optimizer state
    # remain to be made, in the shardings it planned.
    planned, state_shardings = abstract_state(params, shardings, mesh, step_cfg, tx)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(planned.trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step)
    return planned.replace(step=step, opt_state=opt_state), state_shardings


def abstract_state(
    params: Mapping[str, jax.ShapeDtypeStruct],
    shardings: Mapping[str, NamedSharding],
    mesh: Mesh,
    step_cfg: StepConfig,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, TrainState]:
    """(abstract state, state shardings): what `create_state` builds from parameters of these
    shapes and shardings (flat, e.g. `weights.param_layout`), as ShapeDtypeStructs; nothing is
    initialised or compiled, so a step can be planned and compiled from shapes alone."""
    trainable, frozen = split_trainable(params, step_cfg.trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, trainable)
    trained_shardings = {k: shardings[k] for k in trainable}
    opt_shardings = jax.tree_util.tree_map_with_path(
        lambda path, _: _opt_leaf_sharding(path, trained_shardings, replicated), opt_abstract
    )
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, frozen, opt_abstract)
    state_shardings = TrainState(
        replicated, trained_shardings, {k: shardings[k] for k in frozen}, opt_shardings
    )
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


def make_grad_fn(model: BLSPKD, step_cfg: StepConfig):
    """grad_fn(trainable, frozen, batch, rng) -> (grads, metrics): the gradients of the loss with
    respect to the trainable parameters, averaged over `grad_accum_steps` micro-batches (the batch
    split in order along its first axis; micro-batch i draws dropout from `fold_in(rng, i)`, the
    first from `rng`). Losses in `metrics` are averaged the same way, counts summed."""

    def loss_fn(trainable, frozen, batch, rng):
        params = optim.unflatten({**trainable, **frozen})
        return compute_losses(
            model,
            params,
            batch,
            step_cfg.loss,
            rng=rng,
            deterministic=False,
            shared_prefix=step_cfg.shared_prefix,
        )

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(trainable, frozen, batch, rng):
        n = step_cfg.grad_accum_steps
        micro = _microbatches(batch, n)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, metrics), grads = value_and_grad(trainable, frozen, first, rng)
        if n > 1:

            def body(acc, xs):
                mb, i = xs
                (_, m), g = value_and_grad(trainable, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, (g, m)), None

            rest = jax.tree.map(lambda x: x[1:], micro)
            (grads, metrics), _ = jax.lax.scan(body, (grads, metrics), (rest, jnp.arange(1, n)))
            grads = jax.tree.map(lambda g: g / n, grads)
            metrics = {k: v if k in SUMMED_METRICS else v / n for k, v in metrics.items()}
        return grads, metrics

    return grad_fn


def make_train_step(model: BLSPKD, step_cfg: StepConfig, tx: optax.GradientTransformation):
    """train_step(state, batch, rng) -> (state, metrics): `make_grad_fn`'s gradients, then one
    optimizer update; a non-finite loss or gradient leaves the state unchanged and reports
    `skipped = 1`."""
    grad_fn = make_grad_fn(model, step_cfg)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        grads, metrics = grad_fn(state.trainable, state.frozen, batch, rng)
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

    Returns (compiled step, stats) with stats = {"flops", "xla_flops", "temp_bytes",
    "argument_bytes", ...}: "flops" the matmul FLOPs a device executes, counted from the traced
    step (`flops.py`: every loop body times its trip count, the numerator of MFU); the others from
    XLA's cost and memory analysis (-1 where the backend does not report them; XLA counts a
    scanned layer stack's body once, so "xla_flops" undercounts scanned models).
    """
    b_shard = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in abstract_batch.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, b_shard, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with sharding.activate(mesh):
        traced = jitted.trace(abstract_state, abstract_batch, rng)
        compiled = traced.lower().compile()
    stats = compiled_stats(compiled)
    stats["flops"] = flops.matmul_flops(traced.jaxpr) / mesh.size
    log(
        "train step compiled: "
        f"{stats['flops'] / 1e9:.2f} GFLOPs/step (per device), "
        f"temp {stats['temp_bytes'] / 2**20:.1f} MiB, "
        f"args {stats['argument_bytes'] / 2**20:.1f} MiB, "
        f"outputs {stats['output_bytes'] / 2**20:.1f} MiB (per device)"
    )
    return compiled, stats


def compiled_stats(compiled) -> dict[str, float]:
    stats = {"xla_flops": -1.0, "temp_bytes": -1, "argument_bytes": -1, "output_bytes": -1}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        stats["xla_flops"] = float(cost.get("flops", -1.0))
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
