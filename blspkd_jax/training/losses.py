"""The distillation losses (KL teacher || student, response cross-entropy) and the top-1 metric,
computed in row tiles from hidden states and the frozen output head so that no [M, V] logits array
is ever materialised (docs/method.md §4).

Rows M are the selected positions flattened over the batch (B*L, or only the positions a loss
uses); H is the LLM width, V the vocabulary. One tiler (`_map_device_row_tiles`) and one custom VJP
(`_tiled_weighted_means`) serve every function here. Under a mesh (`jax.set_mesh`, as the trainer
traces its step) the tiler runs per device (`jax.shard_map` over the batch axes "data" and "fsdp"):
each device tiles the rows it holds, `tile_rows` at a time, against an output head cast to the
compute dtype and gathered once before the loop, never inside it. Each tile forms the student
logits once and evaluates every requested per-row term on them (KL and cross-entropy), and one
pass yields weighted means under several weight vectors at once (input_kl and response_kl are the
same per-row KL under two row selections). The VJP computes each term's d(row)/d(hidden) inside
that forward tile pass, while the tile's logits are alive anyway, so the backward pass only
rescales [M, H] residuals and never revisits the vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from blspkd_jax.models.sharding import BATCH_AXES

# Rows per tile (on each device, under a mesh) when the caller doesn't say; a tile holds ~4
# [tile_rows, V] fp32 buffers (~6 in kd_kl_and_cross_entropy).
# CPU: 64, the fastest of 64/128/256/512 in two runs of benchmarks/kd_kl.py at Qwen2.5 shapes
# (M = 2048, H = 896, V = 151936, fp32): 162 MiB of temporaries, 2.7% of the full-logits version's
# 5.9 GiB, and 0.5-0.75x its time. Accelerators: 256 (608 MiB, 10% of naive at M = 2048), because
# every tile re-reads lm_head, so a tile's matmuls do ~tile_rows flops per byte of lm_head, and a
# GPU needs a few hundred of those to stay compute-bound. That choice is reasoned, not measured
# (no accelerator was available when it was made): rerun the benchmark there.
CPU_TILE_ROWS = 64
ACCELERATOR_TILE_ROWS = 256


def default_tile_rows(backend: str | None = None) -> int:
    """The default rows per tile on `backend` (default: JAX's default backend)."""
    cpu = (backend or jax.default_backend()) == "cpu"
    return CPU_TILE_ROWS if cpu else ACCELERATOR_TILE_ROWS


# term(z [t, V] fp32 student logits, aux [t, ...], lm_head [H, V], with_grad) -> row [t]  or
# (row [t], d row / dz [t, V] fp32). aux is whatever else the term needs per row (the teacher's
# hidden states, the labels).
Term = Callable[..., jax.Array | tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------------------------------------
# Tiling


def _tile_shape(m: int, tile_rows: int) -> tuple[int, int]:
    """(number of tiles, rows per tile) for m rows and at most `tile_rows` rows per tile.

    Tiles are balanced (ceil(m / n) rows each, so padding stays small) and then rounded up to a
    multiple of 8 where `tile_rows` allows: a tile whose rows divide evenly over a "data" axis of
    1, 2, 4 or 8 devices is split evenly instead of leaving some devices idle or duplicating work.
    """
    n_tiles = max(1, math.ceil(m / tile_rows))
    balanced = max(1, math.ceil(m / n_tiles))
    return n_tiles, min(-(-balanced // 8) * 8, tile_rows)


def _map_row_tiles(
    fn: Callable, rows: tuple[jax.Array, ...], tile_rows: int, active: jax.Array | None = None
):
    """`fn(*row_tiles)` over tiles of rows, sequentially (`lax.map`); per-row outputs re-assembled.

    `rows` share their leading dimension M; `fn` gets one [t, ...] slice of each and returns a
    pytree of arrays with leading dimension t. Rows are padded with zeros up to a whole number of
    tiles (the padded outputs are dropped).

    `active [M]` bool (the rows any output is read at) gathers those rows to the front, in their
    order, before tiling, and skips every tile past the last of them at run time (`lax.cond`):
    the vocabulary is then evaluated at ceil(count / t) tiles, not at every row (a loss reads
    about half the rows of a batch: padding, the system turn and the instruction carry none).
    Outputs at inactive rows are unspecified (callers mask them). The capacity is M itself, so
    no row is ever dropped.

    Without `active`, tile k takes rows k, k + n_tiles, k + 2 n_tiles, ...: when this runs on
    global rows sharded in contiguous blocks over a "data" axis (no mesh in context, see
    `_map_device_row_tiles`), every tile then holds an equal share of every device's rows, so all
    devices work on every tile instead of taking turns.
    """
    m = rows[0].shape[0]
    n_tiles, tile = _tile_shape(m, tile_rows)
    pad = n_tiles * tile - m

    def pad_rows(x):
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

    if active is None:

        def split(x):
            return pad_rows(x).reshape(tile, n_tiles, *x.shape[1:]).swapaxes(0, 1)

        def merge(y):
            return y.swapaxes(0, 1).reshape(n_tiles * tile, *y.shape[2:])[:m]

        out = lax.map(lambda xs: fn(*xs), tuple(split(x) for x in rows))
        return jax.tree.map(merge, out)

    order = jnp.argsort(~active, stable=True)  # active rows first, each group in row order
    count = jnp.sum(active, dtype=jnp.int32)
    tiles = tuple(pad_rows(x[order]).reshape(n_tiles, tile, *x.shape[1:]) for x in rows)
    shapes = jax.eval_shape(fn, *(x[0] for x in tiles))

    def skip(_):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def one(args):
        k, xs = args
        return lax.cond(k * tile < count, lambda xs: fn(*xs), skip, xs)

    out = lax.map(one, (jnp.arange(n_tiles), tiles))
    inverse = jnp.argsort(order)  # row i sits at position inverse[i] of the gathered order

    def merge_back(y):
        return y.reshape(n_tiles * tile, *y.shape[2:])[:m][inverse]

    return jax.tree.map(merge_back, out)


def _batch_axes() -> tuple[str, ...]:
    """The batch axes ("data", "fsdp") of the mesh in context that split rows over > 1 device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def _map_device_row_tiles(
    fn: Callable, lm_head: jax.Array, rows: tuple, tile_rows: int, dtype, active=None
):
    """`fn(head, *row_tiles)` over tiles of the rows each device holds, outputs re-assembled.

    `lm_head [H, V]` is cast to `dtype` (the hidden states' compute dtype, as the LLM's own head
    does) once, here. Under a mesh whose batch axes ("data", "fsdp") split the rows, the tile loop
    runs inside `jax.shard_map` over those axes: the head enters replicated over them (one
    all-gather of the FSDP shards, before the loop; its vocabulary stays split over "tensor",
    which is left to the compiler) and each device walks its own M / devices rows `tile_rows` at a
    time. Row i's outputs depend on row i alone, so this equals the loop over global rows. Without
    a mesh, or when the devices do not divide M, it is that global loop (`_map_row_tiles`).
    `active [M]` (optional) names the rows whose outputs are read; each device gathers and tiles
    its own, so a device's work follows the rows it holds (`_map_row_tiles`).
    """
    head = lm_head.astype(dtype)
    axes = _batch_axes()
    mesh = jax.sharding.get_abstract_mesh()
    devices = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if devices == 1 or rows[0].shape[0] % devices:
        # Gathering active rows is local only when nothing splits the rows over devices: a mesh
        # whose batch axes are 1, or one device. Without a mesh on several devices the rows may
        # still come split in blocks (jit's in_shardings): the strided tiles keep each device on
        # its own rows there, where a gather would move them.
        local = devices == 1 and (not mesh.empty or jax.device_count() == 1)
        return _map_row_tiles(lambda *r: fn(head, *r), rows, tile_rows, active if local else None)
    spec = PartitionSpec(axes)
    return jax.shard_map(
        lambda h, a, *r: _map_row_tiles(lambda *t: fn(h, *t), r, tile_rows, a),
        # None (no active rows given) is an empty pytree: its spec is never read.
        in_specs=(PartitionSpec(), spec, *(spec,) * len(rows)),
        out_specs=spec,
        axis_names=frozenset(axes),
        check_vma=False,
    )(head, active, *rows)


def _logits(x: jax.Array, lm_head: jax.Array) -> jax.Array:
    """x [t, H] @ lm_head [H, V] -> [t, V], accumulated and returned in fp32 for any input dtype."""
    return jnp.dot(x, lm_head, preferred_element_type=jnp.float32)


def _logits_vjp(dz: jax.Array, x: jax.Array, lm_head: jax.Array) -> jax.Array:
    """d(loss)/dx [t, H] from d(loss)/d(logits) dz [t, V]: dz @ lm_head^T, accumulated in fp32.

    dz is cast to the matmul's compute dtype (bf16 for a bf16 model, as ordinary autodiff would);
    the contraction names V on both sides so no transposed copy of lm_head is ever made.
    """
    dtype = jnp.promote_types(x.dtype, lm_head.dtype)
    return lax.dot_general(
        dz.astype(dtype),
        lm_head.astype(dtype),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


# ----------------------------------------------------------------------------------------------
# The one custom VJP: out_k = sum_i w_ik r_{i, c_k} / sum_i w_ik for K weight columns, where
# r_ij = terms[j](x_i W, aux_ij, W) and c_k = columns[k] names the term column k averages.


def _mean_scale(weights: jax.Array) -> jax.Array:
    """w / sum w per column of weights [M, K], with sum w == 0 taken as 1 so the mean is 0, not
    NaN."""
    total = jnp.sum(weights, axis=0)
    return weights / jnp.where(total == 0, 1.0, total)


def _masked(mask: jax.Array, x: jax.Array) -> jax.Array:
    # where, not multiply: a zero-weight row (padding) may hold inf/NaN hidden states, and 0 * NaN
    # would leak into the loss and the gradient.
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x, 0)


def _weighted_means(rows: jax.Array, weights: jax.Array, columns: tuple[int, ...]) -> jax.Array:
    """rows [M, J], weights [M, K] -> [K]: the weighted mean of term columns[k] under column k."""
    per_column = rows[:, np.asarray(columns)]  # [M, K]
    return jnp.sum(_masked(weights != 0, _mean_scale(weights) * per_column), axis=0)


def _terms_on_tile(terms: tuple[Term, ...], x, aux, lm_head, with_grad: bool):
    """One tile: the student logits once, then every term on them -> rows [t, J] (and the
    per-term gradients wrt x, [t, J, H] fp32, if asked)."""
    z = _logits(x, lm_head)
    out = [term(z, a, lm_head, with_grad) for term, a in zip(terms, aux, strict=True)]
    if not with_grad:
        return jnp.stack(out, axis=1)
    rows = jnp.stack([r for r, _ in out], axis=1)
    return rows, jnp.stack([_logits_vjp(dz, x, lm_head) for _, dz in out], axis=1)


def _active_terms(weights: jax.Array, columns: tuple[int, ...], n_terms: int) -> jax.Array:
    """[M, J] bool: row i has a non-zero weight in some column that averages term j."""
    uses = np.asarray(columns)[:, None] == np.arange(n_terms)[None, :]  # [K, J], static
    return jnp.any((weights != 0)[:, :, None] & uses[None], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _tiled_weighted_means(
    terms: tuple[Term, ...], x, aux, lm_head, weights, columns: tuple[int, ...], tile_rows: int
):
    rows = _map_device_row_tiles(
        lambda head, xt, *at: _terms_on_tile(terms, xt, at, head, False),
        lm_head,
        (x, *aux),
        tile_rows,
        x.dtype,
        active=jnp.any(weights != 0, axis=1),
    )
    return _weighted_means(rows, weights, columns)


def _tiled_weighted_means_fwd(terms, x, aux, lm_head, weights, columns, tile_rows):
    active = _active_terms(weights, columns, len(terms))

    def tile(head, xt, act, *at):
        r, dx = _terms_on_tile(terms, xt, at, head, True)
        # The cotangents of the K means are unknown until the backward pass, so keep each term's
        # gradient per row (J of them, J <= K) rather than a single pre-scaled one.
        return r, _masked(act, dx).astype(xt.dtype)

    rows, dx = _map_device_row_tiles(
        tile, lm_head, (x, active, *aux), tile_rows, x.dtype, active=jnp.any(active, axis=1)
    )
    return _weighted_means(rows, weights, columns), (dx, _mean_scale(weights))


def _tiled_weighted_means_bwd(terms, columns, tile_rows, residuals, g):
    dx, scale = residuals  # [M, J, H], [M, K]
    uses = np.asarray(columns)[:, None] == np.arange(len(terms))[None, :]  # [K, J]
    # d out_k / d x_i = scale_ik d r_{i, c_k} / d x_i; sum over k with cotangents g [K]. An
    # elementwise product and sum (J and K are tiny), so no matmul precision setting applies.
    per_term = jnp.sum((scale * g)[:, :, None] * uses[None], axis=1)  # [M, J]
    grad = jnp.sum(per_term[:, :, None] * dx.astype(jnp.float32), axis=1)
    # Gradients flow to x only (README's Python API): aux (the teacher, the labels) is under
    # stop-gradient, lm_head is frozen and the weights are a selection: symbolic zeros for those.
    return grad.astype(dx.dtype), None, None, None


_tiled_weighted_means.defvjp(_tiled_weighted_means_fwd, _tiled_weighted_means_bwd)


# ----------------------------------------------------------------------------------------------
# Per-row terms


def _kd_term(z, t, lm_head, with_grad: bool, *, temperature: float):
    """KL(softmax(t W / T) || softmax(z / T)) per row (z = s W), and its gradient wrt z if asked."""
    log_q = jax.nn.log_softmax(z / temperature)  # student
    log_p = jax.nn.log_softmax(_logits(t, lm_head) / temperature)  # teacher
    p = jnp.exp(log_p)
    kl = jnp.sum(p * (log_p - log_q), axis=-1)
    if not with_grad:
        return kl
    # d KL / d(student logits) = (q - p) / T.
    return kl, (jnp.exp(log_q) - p) / temperature


def _ce_term(z, labels, lm_head, with_grad: bool):
    """-log softmax(z)[label] per row (NaN for a label outside [0, V)), and its gradient wrt z."""
    del lm_head  # the student logits z are all cross-entropy needs
    log_q = jax.nn.log_softmax(z)
    vocab = log_q.shape[-1]
    # A one-hot reduction rather than a gather: it partitions cleanly when V is sharded.
    one_hot = labels[:, None] == jnp.arange(vocab)[None, :]
    ce = -jnp.sum(jnp.where(one_hot, log_q, 0.0), axis=-1)
    ce = jnp.where((labels >= 0) & (labels < vocab), ce, jnp.nan)
    if not with_grad:
        return ce
    return ce, jnp.exp(log_q) - one_hot


# ----------------------------------------------------------------------------------------------
# Public API


def _check_rows(fn: str, hidden: jax.Array, lm_head: jax.Array, **rows) -> None:
    """Shapes: hidden [M, H], lm_head [H, V]; each of `rows` is (array, "[M]", "[M, H]" or
    "[M] or [M, K]")."""
    if hidden.ndim != 2 or lm_head.ndim != 2 or hidden.shape[1] != lm_head.shape[0]:
        raise ValueError(
            f"{fn}: expected hidden [M, H] and lm_head [H, V] with the same H, got hidden "
            f"{tuple(hidden.shape)} and lm_head {tuple(lm_head.shape)} (flatten [B, L, H] to "
            f"[B*L, H] first)"
        )
    m = hidden.shape[0]
    for name, (x, expected) in rows.items():
        if expected == "[M] or [M, K]":
            ok = x.ndim in (1, 2) and x.shape[0] == m and (x.ndim == 1 or x.shape[1] >= 1)
            shape = f"[{m}] or [{m}, K >= 1]"
        else:
            shape = hidden.shape if expected == "[M, H]" else hidden.shape[:1]
            ok = tuple(x.shape) == tuple(shape)
        if not ok:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(x.shape)}; expected {expected} = {shape} "
                f"like the hidden states"
            )


def _check_tile_rows(fn: str, tile_rows) -> int:
    if tile_rows is None:
        return default_tile_rows()
    if not isinstance(tile_rows, int) or tile_rows < 1:
        raise ValueError(f"{fn}: tile_rows must be a positive Python int, got {tile_rows!r}")
    return tile_rows


def _check_temperature(fn: str, temperature) -> float:
    try:
        temperature = float(temperature)
    except (TypeError, jax.errors.ConcretizationTypeError):
        temperature = None  # a traced value: the tile functions need a constant
    if temperature is None or not temperature > 0:
        raise ValueError(f"{fn}: temperature must be a positive Python number, got {temperature}")
    return temperature


def _check_labels(fn: str, labels: jax.Array) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{fn}: labels must be integers, got {labels.dtype}")


def _as_columns(weights: jax.Array) -> jax.Array:
    """weights [M] or [M, K] -> [M, K] fp32."""
    weights = jnp.asarray(weights, jnp.float32)
    return weights[:, None] if weights.ndim == 1 else weights


def _unstack(means: jax.Array, weights: jax.Array) -> jax.Array:
    """[K] means back to a scalar when the caller passed one weight vector [M]."""
    return means[0] if weights.ndim == 1 else means


def kd_kl(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    lm_head: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 2.0,
    tile_rows: int | None = None,
) -> jax.Array:
    """Weighted mean KL(teacher || student) of temperature-softened next-token distributions.

    `sum_i w_i KL(softmax(t_i W / T) || softmax(s_i W / T)) / sum_i w_i`, with s = student_hidden
    [M, H], t = teacher_hidden [M, H], W = lm_head [H, V], w = weights [M] (e.g. a 0/1 mask over
    selected positions), T = temperature. The KL is summed over the vocabulary and NOT multiplied by
    T^2 (Hinton's gradient-scale correction): fold that into the loss weight if wanted.

    weights [M, K] gives K such means at once, [K] (e.g. input_kl and response_kl as two 0/1
    columns): the per-row KL is computed once, in one pass over the vocabulary, and each column
    averages it; the result equals K calls with one column each, gradients included.

    Logits are formed and reduced in fp32 whatever the input dtype, in tiles of `tile_rows` rows
    (None: `default_tile_rows()`), so memory is O(tile_rows * V) instead of O(M * V). Gradients
    flow to student_hidden only (computed during the forward tile pass): the teacher is under
    stop-gradient, lm_head is treated as frozen and the weights as constants (all three get zero
    gradient). A column with sum(w) == 0 gives 0. Rows with w_i == 0 in every column never affect
    the value or the gradient, even if they hold inf/NaN. `temperature` must be a Python number.
    """
    _check_rows(
        "kd_kl",
        student_hidden,
        lm_head,
        teacher_hidden=(teacher_hidden, "[M, H]"),
        weights=(weights, "[M] or [M, K]"),
    )
    temperature = _check_temperature("kd_kl", temperature)
    columns = _as_columns(weights)
    means = _tiled_weighted_means(
        (functools.partial(_kd_term, temperature=temperature),),
        student_hidden,
        (teacher_hidden,),
        lm_head,
        columns,
        (0,) * columns.shape[1],
        _check_tile_rows("kd_kl", tile_rows),
    )
    return _unstack(means, weights)


def tiled_cross_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    tile_rows: int | None = None,
) -> jax.Array:
    """Weighted mean cross-entropy `sum_i w_i (-log softmax(h_i W)[labels_i]) / sum_i w_i`.

    hidden [M, H], lm_head W [H, V], labels [M] ints in [0, V), weights [M] (-> scalar) or [M, K]
    (-> [K], one mean per column). Tiled and differentiated like `kd_kl`: gradients flow to hidden
    only. Labels of rows with w_i == 0 are ignored (any value, e.g. -100, is fine there); a label
    outside [0, V) on a weighted row makes the loss NaN rather than silently wrong. A column with
    sum(w) == 0 gives 0.
    """
    _check_rows(
        "tiled_cross_entropy",
        hidden,
        lm_head,
        labels=(labels, "[M]"),
        weights=(weights, "[M] or [M, K]"),
    )
    _check_labels("tiled_cross_entropy", labels)
    columns = _as_columns(weights)
    means = _tiled_weighted_means(
        (_ce_term,),
        hidden,
        (labels,),
        lm_head,
        columns,
        (0,) * columns.shape[1],
        _check_tile_rows("tiled_cross_entropy", tile_rows),
    )
    return _unstack(means, weights)


def kd_kl_and_cross_entropy(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    lm_head: jax.Array,
    kl_weights: jax.Array,
    labels: jax.Array,
    ce_weights: jax.Array,
    *,
    temperature: float = 2.0,
    tile_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`(kd_kl(s, t, W, kl_weights), tiled_cross_entropy(s, W, labels, ce_weights))` in one pass.

    Both terms are read off the same tile of student logits s W, so the vocabulary is swept once
    (the student logits matmul and the tile loop are shared) instead of once per term. Shapes,
    weights ([M] -> scalar, [M, K] -> [K], for each term separately), gradients (to
    student_hidden only) and zero-weight rules are those of the two functions, and so are the
    values up to float rounding.
    """
    _check_rows(
        "kd_kl_and_cross_entropy",
        student_hidden,
        lm_head,
        teacher_hidden=(teacher_hidden, "[M, H]"),
        kl_weights=(kl_weights, "[M] or [M, K]"),
        labels=(labels, "[M]"),
        ce_weights=(ce_weights, "[M] or [M, K]"),
    )
    _check_labels("kd_kl_and_cross_entropy", labels)
    temperature = _check_temperature("kd_kl_and_cross_entropy", temperature)
    kl_columns, ce_columns = _as_columns(kl_weights), _as_columns(ce_weights)
    k_kl, k_ce = kl_columns.shape[1], ce_columns.shape[1]
    means = _tiled_weighted_means(
        (functools.partial(_kd_term, temperature=temperature), _ce_term),
        student_hidden,
        (teacher_hidden, labels),
        lm_head,
        jnp.concatenate([kl_columns, ce_columns], axis=1),
        (0,) * k_kl + (1,) * k_ce,
        _check_tile_rows("kd_kl_and_cross_entropy", tile_rows),
    )
    return _unstack(means[:k_kl], kl_weights), _unstack(means[k_kl:], ce_weights)


def top1_predictions(
    hidden: jax.Array, lm_head: jax.Array, *, tile_rows: int | None = None
) -> jax.Array:
    """argmax_v (hidden @ lm_head)[i, v] per row -> [M] int32, in tiles (for top-1 agreement)."""
    _check_rows("top1_predictions", hidden, lm_head)
    return _map_device_row_tiles(
        lambda head, h: jnp.argmax(_logits(h, head), axis=-1).astype(jnp.int32),
        lm_head,
        (hidden,),
        _check_tile_rows("top1_predictions", tile_rows),
        hidden.dtype,
    )
