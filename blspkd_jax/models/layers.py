"""Building blocks shared by the encoder, the adapter and the LLM: the layer stack (looped or
`nn.scan`ned, with a remat policy), dense and RMSNorm layers with logical axis names, and the
parameter-tree helpers every Hugging Face name table uses.

`nn.scan` and remat are one switch each and never change outputs: tests hold looped == scanned ==
rematerialised. Scanned parameters carry a leading "layers" axis under one `layers` subtree;
looped ones live under `layers_0 ... layers_{n-1}`; `stack_layers`/`unstack_layers` convert.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(module: nn.Module, name: str, init, shape, names, dtype=jnp.float32):
    """`module.param` with logical axis names attached (one name per dimension)."""
    assert len(names) == len(shape), (name, shape, names)
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def row_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """`x [..., in] . kernel [in, out] -> [..., out]` as one product of x's rows `[n, in]`.

    The result is the same; the backward differs. With the leading axes kept, autodiff gives the
    kernel's gradient as one dot contracting two axes (batch and length), and XLA:CPU first lays
    the whole output gradient `[..., out]` out again, transposed, for it: a full-width copy per
    trained projection (BENCHMARKS.md run G). On rows it is a plain GEMM. Takes `lax.dot_general`'s
    arguments so that `nn.Dense(dot_general=...)` can call it; only the dense contraction."""
    ((lhs_c, rhs_c), batch) = dimension_numbers
    if tuple(lhs_c) != (x.ndim - 1,) or tuple(rhs_c) != (0,) or batch != ((), ()):
        raise ValueError(f"row_dot_general: a dense contraction only, got {dimension_numbers}")
    y = jax.lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        kernel,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def row_dot(x, kernel):
    """`x [..., in] @ kernel [in, out] -> [..., out]` through `row_dot_general`."""
    return row_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def dense(features, names, dtype, param_dtype, name, use_bias=True):
    """nn.Dense (LeCun-normal kernel, zero bias) with logical axis names on the kernel [in, out]
    and the bias [out]; the encoder and the CFormer build every projection with it."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=row_dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]),
        name=name,
    )


# Query rows per block on the XLA attention path: one block's float32 scores are
# [B, heads, ATTENTION_QUERY_BLOCK, S] rather than [B, heads, T, S] (Whisper-large at T=1500 and 24
# examples: 0.7 GB instead of 4.3 GB a layer). 256 was the fastest of 128/256/512 there on CPU.
ATTENTION_QUERY_BLOCK = 256
# Blocks only pay off where the scores are large: a call whose whole float32 scores [B, heads, T,
# S] (global shapes, so at least one device's share) fit in this many bytes runs in one block,
# since blocking costs the forward pass again in the backward and pads the last block (2x the
# layer's time at the 100m preset's T=400, benchmarks/step_parts.py --attention).
ATTENTION_BLOCKED_ABOVE = 64 << 20


def attention_implementation(
    q_shape, k_shape, dtype, has_mask: bool, platform: str, compute_capability: str | None = None
) -> str:
    """The attention kernel for these inputs: "cudnn" where cuDNN's flash attention takes them.

    The conditions are the ones `jax._src.cudnn.fused_attention_stablehlo` checks (jax 0.10.2):
    a CUDA GPU, fp16/bf16, head dim a multiple of 8 and at most 128 (256 from Hopper, compute
    capability 9.0), and, with a mask (cuDNN takes it as a bias), even query and key lengths.
    We pick it ourselves because `implementation=None` always means XLA in jax 0.10.2 (the
    backend choice is a TODO in `jax.nn.dot_product_attention`). TPUs get "xla" as well: the API
    accepts only "xla" and "cudnn", and the TPU kernels a pod run would want (Pallas splash or
    flash attention, `jax.experimental.pallas.ops.tpu.splash_attention`) are not reachable
    through it; the blocked XLA path below bounds the scores' memory there instead.
    """
    if platform != "cuda" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    major_minor = tuple(int(x) for x in (compute_capability or "0.0").split(".")[:2])
    head_dim, t, s = q_shape[-1], q_shape[1], k_shape[1]
    if head_dim % 8 or head_dim > (256 if major_minor >= (9, 0) else 128):
        return "xla"
    if has_mask and (t % 2 or s % 2):
        return "xla"
    return "cudnn"


def _platform() -> tuple[str, str | None]:
    """("cuda" | "rocm" | "cpu" | "tpu", compute capability or None) of the default backend."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        return ("cuda" if "cuda" in dev.client.platform_version.lower() else "rocm"), getattr(
            dev, "compute_capability", None
        )
    return dev.platform, None


# What a masked score becomes: finite, so a row with no allowed key is uniform (the mean of v),
# never NaN; jax.nn.dot_product_attention's fill too.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, mask, scale, groups):
    """Head-major attention with its VJP written out: `q [B, K, G*T, Dh]` (the G query heads of
    each key/value head stacked along rows), `k`, `v [B, K, S, Dh]`, `mask` bool `[Bm, Km, Gm, Tm,
    S]` (each of Bm, Km, Gm, Tm 1 or full) or None -> `[B, K, G*T, Dh]`.

    Why not autodiff of jax.nn.dot_product_attention: on CPU its [B, T, N, Dh] operands and the
    transposes autodiff adds around the score products made the encoder's attention the largest
    non-matmul cost of a step; here every product is a plain batched matmul over (B, K), and the
    backward is the textbook one, `dS = P * (dP - rowsum(dO * O))`, with no extra layout copies
    (benchmarks/step_parts.py --attention: forward and backward 1.7-2.4x faster, BENCHMARKS.md)."""
    return _attend_fwd(q, k, v, mask, scale, groups)[0]


def _attend_fwd(q, k, v, mask, scale, groups):
    B, K, GT, _ = q.shape
    s = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    s = s * jnp.float32(scale) if scale != 1.0 else s
    if mask is not None:  # adding 0 keeps an allowed score exact; a bias fuses better than select
        s = s.reshape(B, K, groups, GT // groups, -1) + jnp.where(mask, 0.0, _MASKED)
        s = s.reshape(B, K, GT, -1)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))
    o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    seen = None if mask is None else jnp.any(mask, axis=-1, keepdims=True)  # [Bm, Km, Gm, Tm, 1]
    return o.astype(v.dtype), (q, k, v, seen, p, o)


def _attend_bwd(scale, groups, res, do):
    q, k, v, seen, p, o = res
    dv = jnp.einsum("bkqs,bkqd->bksd", p.astype(do.dtype), do)  # sums the G heads of a key head
    dp = jnp.einsum("bkqd,bksd->bkqs", do, v, preferred_element_type=jnp.float32)
    # rowsum(P * dP) = rowsum(dO * O): a [.., Dh] sum instead of a [.., S] one (o kept in float32).
    delta = jnp.sum(do.astype(jnp.float32) * o, axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(q.dtype)

    def seen_rows(x):  # x [B, K, G*T, Dh] with the rows of queries that see no key zeroed
        B, K, GT, Dh = x.shape
        x = x.reshape(B, K, groups, GT // groups, Dh)
        return jnp.where(seen, x, jnp.zeros((), x.dtype)).reshape(B, K, GT, Dh)

    # A masked score is replaced, so it has no gradient. In a row with an allowed key P, and so
    # dS, is exactly 0 there (exp of about -2e38); a row with none (uniform P) is left out through
    # its q and dq rows: [T, Dh] selects, where one on dS [T, S] made XLA:CPU's backward 2x slower.
    if seen is not None:
        q = seen_rows(q)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, k)
    dk = jnp.einsum("bkqs,bkqd->bksd", ds, q)
    if seen is not None:
        dq = seen_rows(dq)
    # The scale goes on dq and dk, not on dS: a [T, Dh] multiply instead of a [T, S] one (with
    # one on the scores and one on dS XLA:CPU fused the products' neighbours 2x slower).
    if scale != 1.0:
        dq, dk = dq * jnp.asarray(scale, dq.dtype), dk * jnp.asarray(scale, dk.dtype)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention(q, k, v, mask=None, *, scale=None, causal=False, query_block=None):
    """`softmax(q k^T * scale, where mask) v`.

    `q [B, T, N, Dh]`, `k`, `v [B, S, K, Dh]` (N a multiple of K: grouped-query attention), all
    one dtype; `mask` bool broadcastable to `[B, 1, T, S]` or `[B, N, T, S]` (True = may attend)
    or None; `scale` default `Dh**-0.5`; `causal=True` only says the mask already holds the
    top-left causal pattern (T == S), which lets cuDNN skip the blocks above the diagonal.
    Returns `[B, T, N, Dh]`.

    Scores and softmax are float32 whatever the input dtype. A query row whose mask is all False
    gets the mean of `v` (finite, never NaN), as with a finite fill. On a CUDA GPU cuDNN's flash
    kernel runs through `jax.nn.dot_product_attention` when it takes the inputs
    (`attention_implementation`); elsewhere `_attend` (plain XLA, head-major, its VJP written out)
    runs over blocks of `query_block` query rows, each block rematerialised in the backward pass,
    so the scores held at once are one block's, not `[B, N, T, S]` (benchmarks/forward.py
    --memory). Without `query_block`: blocks of `ATTENTION_QUERY_BLOCK` where the whole scores
    would take more than `ATTENTION_BLOCKED_ABOVE` bytes, one block otherwise.
    """
    B, T, N, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = Dh**-0.5 if scale is None else scale
    if mask is not None:
        mask = jnp.asarray(mask, jnp.bool_)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    platform, capability = _platform()
    impl = attention_implementation(
        q.shape, k.shape, q.dtype, mask is not None, platform, capability
    )
    if impl == "cudnn":
        if mask is not None:  # cuDNN reads the mask as a [B, 1, T, S] bias: no broadcast dims
            mask = jnp.broadcast_to(mask, (B, 1, T, S))
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
        )
    if mask is not None:  # [Bm, Nm, Tm, S] -> [Bm, Km, Gm, Tm, S], matching q's head split
        Bm, Nm, Tm, _ = mask.shape
        mask = mask.reshape(Bm, K, G, Tm, S) if Nm == N and N > 1 else mask[:, :, None]
    kh, vh = (jnp.swapaxes(a, 1, 2) for a in (k, v))  # [B, K, S, Dh]

    def one(qb, mb):  # qb [B, t, N, Dh], mb [Bm, Km, Gm, t or 1, S] or None
        # Keeps each block split like the whole (batch over data x fsdp, heads over tensor).
        qb = nn.with_logical_constraint(qb, ("act_batch", "act_len", "act_heads", None))
        t = qb.shape[1]
        qh = qb.reshape(B, t, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * t, Dh)
        o = _attend(qh, kh, vh, mb, scale, G)
        return o.reshape(B, K, G, t, Dh).transpose(0, 3, 1, 2, 4).reshape(B, t, N, Dh)

    block = query_block or ATTENTION_QUERY_BLOCK
    if block >= T or (query_block is None and 4 * B * N * T * S <= ATTENTION_BLOCKED_ABOVE):
        return one(q, mask)
    n = -(-T // block)
    pad = n * block - T
    # Padded query rows are dropped again below; they only make the blocks equal in size.
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, block, N, Dh)
    qs = jnp.moveaxis(qs, 1, 0)  # [n, B, block, N, Dh]
    if mask is not None and mask.shape[3] == T:
        mb = jnp.pad(mask, ((0, 0),) * 3 + ((0, pad), (0, 0)), constant_values=True)
        mb = jnp.moveaxis(mb.reshape(*mask.shape[:3], n, block, S), 3, 0)
        out = jax.lax.map(jax.checkpoint(lambda a: one(*a)), (qs, mb))
    else:  # no mask, or one row for every query: shared by all blocks
        out = jax.lax.map(jax.checkpoint(lambda qb: one(qb, mask)), qs)
    return jnp.moveaxis(out, 0, 1).reshape(B, n * block, N, Dh)[:, :T]


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: statistics in float32, scale applied in the compute dtype."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(
            self, "scale", nn.initializers.ones_init(), (x.shape[-1],), ("norm",), self.param_dtype
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


class Stack(nn.Module):
    """`num_layers` copies of `block_cls(**block_kwargs)` applied in sequence.

    Each block is called as `block(x, *args) -> x`; `args` (masks, positions, ...) are shared by all
    layers. With `scan=True` the layers are one `nn.scan` (compile time independent of depth) and
    parameters gain a leading "layers" axis; `remat` picks a policy from `REMAT_POLICIES`.

    `layer_inputs` (a pytree whose leaves have a leading `num_layers` axis, or None) gives layer i
    its own slice as one more argument, `block(x, *args, inputs_i)`; a block may return
    `(x, outputs_i)`, and the Stack then returns `(x, outputs)` with each leaf stacked on a leading
    `num_layers` axis (the LLM passes and returns per-layer keys and values this way).
    """

    block_cls: Any
    block_kwargs: Mapping[str, Any]
    num_layers: int
    scan: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x, *args, layer_inputs=None):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat: unknown policy {self.remat!r}, expected {list(REMAT_POLICIES)}"
            )
        block_cls = self.block_cls
        if self.remat != "none":
            # prevent_cse only matters outside scan; inside it XLA cannot CSE across iterations.
            block_cls = nn.remat(
                block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan
            )
        kwargs = dict(self.block_kwargs)
        extra = () if layer_inputs is None else (layer_inputs,)
        if not self.scan:
            outputs = []
            for i in range(self.num_layers):
                mine = jax.tree.map(lambda a, i=i: a[i], extra)
                x = block_cls(**kwargs, name=f"layers_{i}")(x, *args, *mine)
                if isinstance(x, tuple):
                    x, out = x
                    outputs.append(out)
            return (x, jax.tree.map(lambda *a: jnp.stack(a), *outputs)) if outputs else x

        def body(block, carry, *a):
            out = block(carry, *a)
            return out if isinstance(out, tuple) else (out, None)

        scanned = nn.scan(
            body,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args) + (0,) * len(extra),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if not self.is_initializing() and self.has_variable("params", "layers"):
            depths = {leaf.shape[0] for leaf in jax.tree.leaves(self.variables["params"]["layers"])}
            if depths != {self.num_layers}:
                raise ValueError(
                    f"{self.name}: scanned parameters hold {sorted(depths)} layers, but the "
                    f"config says {self.num_layers}"
                )
        x, outputs = scanned(block_cls(**kwargs, name="layers"), x, *args, *extra)
        return x if outputs is None else (x, outputs)


def stack_layers(tree: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """{"layers_0": p0, ..., "layers_{n-1}": p} -> {"layers": stacked}, leaves stacked on axis 0."""
    per_layer = [tree[f"layers_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(tree: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Inverse of `stack_layers`."""
    out = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
    return out


# ----------------------------------------------------------------------------------------------
# Parameter trees and Hugging Face layouts. Each module keeps its own table of Hugging Face names
# beside its parameters; these helpers are what every table uses.

# How a tensor's layout changes from Hugging Face (PyTorch) to ours: a torch Linear weight is
# [out, in] where our kernel is [in, out]; a Conv1d weight [out, in, k] is ours [k, in, out]. Both
# changes are their own inverse, so one table serves both directions.
LAYOUT = {
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 1, 0),
    None: lambda a: a,
}


def tree_get(tree, path):
    """`tree[path[0]][path[1]]...` for a nested dict of parameters."""
    for k in path:
        tree = tree[k]
    return tree


def tree_set(tree, path, value):
    """Set `tree[path[0]]...[path[-1]] = value`, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
