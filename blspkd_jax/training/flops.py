"""Matmul FLOPs of a step, counted from its jaxpr: the numerator of MFU (and the device's measured
matmul peak, its denominator, `measure_matmul_peak`).

XLA's cost analysis counts a loop's body once (a scanned 28-layer LLM reports one layer's FLOPs,
the per-device loss tiles one tile), so the FLOPs are counted here instead, each loop body times
its trip count: the matmul and convolution FLOPs of every dot_general and convolution.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from blspkd_jax.models import sharding


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars)
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs.shape) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / out_features


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general and convolution in a (closed) jaxpr: a scan's body `length`
    times, a shard_map's once per device it runs on, the larger branch of a cond, other
    sub-jaxprs (jit, remat, custom_vjp) once. A while loop's trip count is unknown: its body counts
    once (the step has none)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(matmul_flops(b) for b in eqn.params["branches"])
        else:
            subs = [matmul_flops(p) for p in eqn.params.values() if _is_jaxpr(p)]
            total += _repeats(eqn) * sum(subs)
    return total


def _repeats(eqn) -> int:
    """How many times a sub-jaxpr runs: a scan's length; a shard_map's body once per device of
    its manual axes (its shapes are one device's shard); anything else once."""
    p = eqn.params
    if eqn.primitive.name == "scan":
        return p["length"]
    if eqn.primitive.name == "shard_map":
        axes = p.get("newly_manual_axes", p.get("manual_axes", p["mesh"].axis_names))
        return math.prod(p["mesh"].shape[a] for a in axes)
    return 1


def _is_jaxpr(x) -> bool:
    return isinstance(x, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr)


def step_flops(step_fn, state, batch, mesh) -> float:
    """Global matmul FLOPs of one call of `step_fn(state, batch, rng)` (all devices together)."""
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with sharding.activate(mesh):
        return matmul_flops(jax.make_jaxpr(step_fn)(state, batch, rng))


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """This device's dense matmul FLOP/s in `dtype` (best of `repeats`), measured: the denominator
    of MFU when no nominal peak is configured."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
