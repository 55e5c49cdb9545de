"""Continuous integrate-and-fire (CIF, docs/method.md §3): speech frames `[B, T, C]` cut into
exactly one vector per transcript token `[B, N, C]`, and the quantity loss that teaches the firing
weights.

Three implementations compute the same tokens (tests hold them equal to a float64 frame loop,
gradients included): "segment" (each frame feeds only the few tokens it touches: one small matmul
per half-second chunk of frames, about 8*T*C work, no sequential scan), "dense" (the closed form
`W @ x`: N*T*C work) and "scan" (a `lax.scan` walk over the frames, the readable reference).
"parallel", the default, names the fastest of them without a sequential scan: "segment", as
measured by `benchmarks/cif.py`.

All methods share one convention at the kinks: a point of the cumulative weight `c` belongs to token
`floor(c)`, so a token fires when its accumulated weight reaches the threshold (`>= 1`), and the
derivative there is the one-sided limit from above. Gradients therefore agree between methods even
where a frame ends exactly on a token boundary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METHODS = ("parallel", "segment", "dense", "scan")
# Inference's rules for how many tokens to emit and with what weights (training always rescales
# to the transcript's length). "rescale": the paper's, `round(sum(alpha))` tokens from alphas
# scaled to sum to that; it needs the whole utterance. "threshold": the stream's, the unscaled
# alphas integrated with threshold 1, each token final when it fires; at the end the partial
# token is kept if it holds at least half a token's weight (or if nothing fired).
FIRING = ("rescale", "threshold")
TAIL_THRESHOLD = 0.5
# "parallel" names the fastest method that needs no sequential scan (benchmarks/cif.py: on CPU at
# B=8, T=1500, N=128, C=1279, forward+backward, segment ~1.8x faster than dense and than a
# scatter-add segment sum, ~2x the memory floor).
PARALLEL = "segment"
# Below this total weight an example has nothing to integrate: its tokens are zero vectors. The
# guard keeps `alpha * n / sum(alpha)` and its gradient finite for (near-)zero alphas.
MIN_TOTAL = 1e-6


# ----------------------------------------------------------------------------------------------
# Lengths and rescaling (shared by every method).


def token_lengths(alphas, frame_mask, target_lengths=None):
    """Number of tokens `n [B]` int32: the target lengths in training (negatives read as 0), else
    `max(1, round(sum(alpha)))` over valid frames (inference)."""
    a = _valid_alphas(alphas, frame_mask)
    if target_lengths is None:
        return jnp.maximum(1, jnp.round(a.sum(-1))).astype(jnp.int32)
    return jnp.maximum(jnp.asarray(target_lengths), 0).astype(jnp.int32)


def _valid_alphas(alphas, frame_mask):
    a = jnp.asarray(alphas, jnp.float32)
    if frame_mask is not None:
        a = jnp.where(frame_mask, a, 0.0)
    # Negative weights have no meaning in CIF; read them as 0. `a < 0` (not `a > 0`) keeps the
    # derivative 1 at a == 0, the one-sided limit from above.
    return jnp.where(a < 0, 0.0, a)


def _scaled_alphas(alphas, frame_mask, n):
    """`alpha_b * n_b / sum(alpha_b)` [B, T] float32 (zero where the sum is below MIN_TOTAL).

    One float32 scale factor would be off by up to 6e-8 relative, and that error is systematic: it
    moves the cumulative weight near token 128 by ~1e-5. So the sum is taken with the split cumsum
    and the scale carried as two floats (hi + lo); each scaled alpha is then rounded on its own, and
    those roundings average out along the cumsum. The derivative is that of the plain formula.
    """
    a = _valid_alphas(alphas, frame_mask)
    nf = n[:, None].astype(jnp.float32)
    total = a.sum(-1, keepdims=True)
    ok = total > MIN_TOTAL
    # a / total <= 1 first, then * n: no overflow whatever the scale of the alphas.
    plain = jnp.where(ok, a / jnp.where(ok, total, 1.0), 0.0) * nf
    ac = lax.stop_gradient(a)
    whole, frac = split_cumsum(ac)
    t_hi, t_lo = _two_sum(whole[:, -1:].astype(jnp.float32), frac[:, -1:])  # exact total
    t_hi = jnp.where(ok, t_hi, 1.0)
    s_hi = nf / t_hi
    p, e = _two_prod(s_hi, t_hi)
    s_lo = (((nf - p) - e) - s_hi * t_lo) / t_hi  # n / total = s_hi + s_lo to ~1e-14
    precise = jnp.where(ok, ac * s_hi + ac * s_lo, 0.0)
    return plain + lax.stop_gradient(precise - plain)


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a, b):
    """a * b = p + e exactly (Dekker, float32 split at 12 bits)."""
    p = a * b

    def split(x):
        c = 4097.0 * x
        hi = c - (c - x)
        return hi, x - hi

    ah, al = split(a)
    bh, bl = split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


@jax.custom_jvp
def split_cumsum(a):
    """Cumulative sum `c_t = sum_{s<=t} a_s` along the last axis, as `(whole int32, frac float32)`
    with `c = whole + frac`, `frac` in [0, 1). For a >= 0.

    A plain float32 cumsum carries an absolute error of about `eps * c` (1e-5 at c = 128 tokens),
    and the token weights are differences of `c`. Adding (integer, fraction) pairs in a parallel
    prefix keeps every rounding at the scale of the fraction: about 1e-7 per level, log2(T) levels.
    The derivative is that of the plain cumsum, flowing through `frac`.
    """
    whole = jnp.floor(a)
    frac = a - whole  # exact

    def add(x, y):
        s = x[1] + y[1]  # < 2 - 2**-23, so floor(s) is 0 or 1 and s - floor(s) is exact
        carry = jnp.floor(s)
        return x[0] + y[0] + carry, s - carry

    whole, frac = lax.associative_scan(add, (whole, frac), axis=a.ndim - 1)
    return whole.astype(jnp.int32), frac


@split_cumsum.defjvp
def _split_cumsum_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    whole, frac = split_cumsum(a)
    zero = np.zeros(whole.shape, jax.dtypes.float0)
    return (whole, frac), (zero, jnp.cumsum(da, axis=-1))


# ----------------------------------------------------------------------------------------------
# Per-frame bookkeeping for the parallel methods.


def _frame_plan(a, n):
    """Where each frame pours its weight. `a [B, T]` scaled alphas, `n [B]` token counts ->

    first_tok [B, T]: the token the frame starts in; first_w: its weight there,
    end_tok [B, T]: the last token it touches; end_w: its weight there (0 if it stays in one),
    and every token strictly between gets weight 1 (a frame with weight above 1).
    Tokens past n-1 are folded into token n-1, which takes all weight beyond n-1.
    """
    whole, frac = split_cumsum(a)
    prev_whole = jnp.pad(whole[:, :-1], ((0, 0), (1, 0)))
    prev_frac = jnp.pad(frac[:, :-1], ((0, 0), (1, 0)))
    last = (n - 1)[:, None]
    first_tok = jnp.minimum(prev_whole, last)
    end_tok = jnp.minimum(whole, last)
    same = first_tok == end_tok
    first_w = jnp.where(same, a, 1.0 - prev_frac)
    end_w = jnp.where(same, 0.0, (whole - end_tok).astype(jnp.float32) + frac)
    return first_tok, first_w, end_tok, end_w


def _dense_weights(first_tok, first_w, end_tok, end_w, tok):
    """Weight of each frame on token(s) `tok` (broadcastable), from the plan. `where`, not min/max:
    the branch taken decides the derivative, so it matches the walk's at the kinks."""
    return jnp.where(
        tok == first_tok,
        first_w,
        jnp.where(tok == end_tok, end_w, jnp.where((tok > first_tok) & (tok < end_tok), 1.0, 0.0)),
    )


def _pour_dense(x, first_tok, first_w, end_tok, end_w, max_tokens):
    """tokens [B, N, C] = W [B, N, T] @ x [B, T, C]: N*T*C work."""
    k = jnp.arange(max_tokens, dtype=jnp.int32)[None, :, None]
    w = _dense_weights(
        first_tok[:, None, :], first_w[:, None, :], end_tok[:, None, :], end_w[:, None, :], k
    )
    return jnp.einsum("bnt,btc->bnc", w, x, precision=lax.Precision.HIGHEST)


# The segment method cuts the frames into chunks of about CHUNK_FRAMES (25 frames = 0.5 s of
# Whisper output) and integrates each chunk into a window of CHUNK_TOKENS tokens with one small
# matmul: CHUNK_TOKENS*T*C work instead of N*T*C, and no scatter (slow on CPU). 8 tokens touched
# in half a second (14 tokens/s) is far faster than speech (3-5 LLM tokens/s); a batch where some
# chunk spans more (peaky alphas) takes the dense form instead, with the same result. Both
# directions are written out (a custom VJP): autodiff through `lax.cond` would make each branch
# return the other's residuals (a zero-filled [B, T, C] and a copy of the values).
# 25 x 8 rather than 50 x 16: half the matmul work at the same tokens per second, 1.3x faster
# forward+backward at B=8, T=1500, N=128, C=1279 on a 2-core CPU (benchmarks/cif.py).
CHUNK_FRAMES = 25
CHUNK_TOKENS = 8


def _chunk_frames(T: int) -> int:
    """Frames per chunk for T frames: the divisor of T nearest CHUNK_FRAMES within a factor 1.3
    (no padded copy of the values), else CHUNK_FRAMES (the values get padded)."""
    for d in range(0, CHUNK_FRAMES // 4 + 1):
        for L in (CHUNK_FRAMES - d, CHUNK_FRAMES + d):
            if T % L == 0:
                return L
    return CHUNK_FRAMES


class _Chunks:
    """The plan cut into chunks of L frames: chunk j covers tokens base_j..top_j, top_j =
    base_{j+1}; its window holds tokens base_j + m, m < CHUNK_TOKENS."""

    def __init__(self, first_tok, end_tok, max_tokens):
        B, T = first_tok.shape
        self.T, self.N, self.M = T, max_tokens, CHUNK_TOKENS
        self.L = _chunk_frames(T)
        self.J = -(-T // self.L)
        self.pad = self.J * self.L - T
        # Padding frames carry no weight and sit on the final token (keeps tokens non-decreasing).
        edge = jnp.broadcast_to(end_tok[:, -1:], (B, self.pad))
        self.ft = jnp.concatenate([first_tok, edge], 1).reshape(B, self.J, self.L)
        self.et = jnp.concatenate([end_tok, edge], 1).reshape(B, self.J, self.L)
        self.base, top = self.ft[:, :, 0], self.et[:, :, -1]  # [B, J]
        self.tok = self.base[..., None] + jnp.arange(self.M, dtype=jnp.int32)  # [B, J, M]
        self.fits = jnp.all(
            (jnp.minimum(top, self.N - 1) - self.base < self.M) | (self.base >= self.N)
        )

    def frames(self, v):  # [B, T, ...] -> [B, J, L, ...], zero padded
        B = v.shape[0]
        if self.pad:
            v = jnp.pad(v, ((0, 0), (0, self.pad)) + ((0, 0),) * (v.ndim - 2))
        return v.reshape(B, self.J, self.L, *v.shape[2:])

    def unframes(self, v):  # [B, J, L, ...] -> [B, T, ...]
        v = v.reshape(v.shape[0], self.J * self.L, *v.shape[3:])
        return v[:, : self.T] if self.pad else v

    def weights(self, first_w, end_w):  # [B, J, M, L]: frame l's weight on window token m
        tok = self.tok[..., None]
        fw, ew = self.frames(first_w)[:, :, None], self.frames(end_w)[:, :, None]
        w = _dense_weights(self.ft[:, :, None], fw, self.et[:, :, None], ew, tok)
        return jnp.where((tok >= 0) & (tok < self.N), w, 0.0)

    def place(self, local):
        """Overlap-add windows `local [B, J, M, C]` into `tokens [B, N, C]`: token k is row
        k - base_j > 0 of the one chunk whose range holds it, plus row 0 of every chunk that starts
        at it (several when one token lasts several chunks)."""
        B, J, M, C = local.shape
        k = jnp.arange(self.N, dtype=jnp.int32)
        # The chunk holding k past its start: the last chunk with base_j < k.
        j_in = jax.vmap(lambda b: jnp.searchsorted(b, k, side="left"))(self.base) - 1  # [B, N]
        row = k - jnp.take_along_axis(self.base, jnp.maximum(j_in, 0), axis=1)
        inside = (j_in >= 0) & (row < M)  # row > 0 by construction
        flat = jnp.where(inside, j_in * M + row, 0) + J * M * jnp.arange(B)[:, None]
        part_in = jnp.take(local.reshape(B * J * M, C), flat.reshape(-1), axis=0)
        part_in = jnp.where(inside[..., None], part_in.reshape(B, self.N, C), 0.0)
        starts = (self.base[:, None, :] == k[None, :, None]).astype(local.dtype)  # [B, N, J]
        hi = lax.Precision.HIGHEST
        return part_in + jnp.einsum("bnj,bjc->bnc", starts, local[:, :, 0], precision=hi)

    def windows(self, g):
        """The transpose of `place`: window row m of chunk j reads token base_j + m of `g`."""
        B, N, C = g.shape
        ok = (self.tok >= 0) & (self.tok < N)
        flat = jnp.where(ok, self.tok, 0) + N * jnp.arange(B)[:, None, None]
        rows = jnp.take(g.reshape(B * N, C), flat.reshape(-1), axis=0).reshape(*ok.shape, C)
        return jnp.where(ok[..., None], rows, 0.0)


_HI = lax.Precision.HIGHEST


def _pour_fwd_impl(x, first_tok, first_w, end_tok, end_w, max_tokens):
    ch = _Chunks(first_tok, end_tok, max_tokens)

    def chunked(x, first_w, end_w):
        local = jnp.einsum(
            "bjml,bjlc->bjmc", ch.weights(first_w, end_w), ch.frames(x), precision=_HI
        )
        return ch.place(local)

    def dense(x, first_w, end_w):
        return _pour_dense(x, first_tok, first_w, end_tok, end_w, max_tokens)

    return lax.cond(ch.fits, chunked, dense, x, first_w, end_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pour(x, first_tok, first_w, end_tok, end_w, max_tokens):
    """tokens [B, N, C] from values x [B, T, C] and the plan: chunked when every chunk fits its
    window (decided at run time; under vmap both branches run), else dense."""
    return _pour_fwd_impl(x, first_tok, first_w, end_tok, end_w, max_tokens)


def _pour_fwd(x, first_tok, first_w, end_tok, end_w, max_tokens):
    out = _pour_fwd_impl(x, first_tok, first_w, end_tok, end_w, max_tokens)
    return out, (x, first_tok, first_w, end_tok, end_w)


def _pour_bwd(max_tokens, res, g):
    x, first_tok, first_w, end_tok, end_w = res
    g = g.astype(x.dtype)
    ch = _Chunks(first_tok, end_tok, max_tokens)

    def weight_grads(p, tok, ft, et):
        # d tokens / d first_w and d end_w: the matmul's weight gradient `p` at the entries where
        # `_dense_weights` picked first_w (tok == ft) or end_w (tok == et != ft); summed over tok.
        d_first = jnp.sum(jnp.where(tok == ft, p, 0.0), axis=-1)
        d_end = jnp.sum(jnp.where((tok == et) & (tok != ft), p, 0.0), axis=-1)
        return d_first, d_end

    def rows_dx(first_w, end_w, g, d_local):
        # Every frame touches at most two tokens: dx is two row reads of g per frame, one pass
        # that only writes dx (the matmul below costs ~2x that on CPU).
        B, N, C = g.shape
        g_pad = jnp.pad(g, ((0, 0), (0, 1), (0, 0))).reshape(B * (N + 1), C)  # row N: zero
        offset = (N + 1) * jnp.arange(B)[:, None]

        def rows(tok):
            idx = jnp.where((tok >= 0) & (tok < N), tok, N) + offset
            return jnp.take(g_pad, idx.reshape(-1), axis=0).reshape(*tok.shape, C)

        end = jnp.where(end_tok > first_tok, end_tok, N)
        return first_w[..., None] * rows(first_tok) + end_w[..., None] * rows(end)

    def matmul_dx(first_w, end_w, g, d_local):  # frames that complete whole tokens (weight > 1)
        w = ch.weights(first_w, end_w)
        return ch.unframes(jnp.einsum("bjml,bjmc->bjlc", w, d_local, precision=_HI))

    def chunked(x, first_w, end_w, g):
        d_local = ch.windows(g)  # [B, J, M, C]
        middle = jnp.any(end_tok > first_tok + 1)
        dx = lax.cond(middle, matmul_dx, rows_dx, first_w, end_w, g, d_local)
        p = jnp.einsum("bjlc,bjmc->bjlm", ch.frames(x), d_local, precision=_HI)  # [B, J, L, M]
        d_first, d_end = weight_grads(p, ch.tok[:, :, None, :], ch.ft[..., None], ch.et[..., None])
        return dx, ch.unframes(d_first), ch.unframes(d_end)

    def dense(x, first_w, end_w, g):
        k = jnp.arange(max_tokens, dtype=jnp.int32)
        w = _dense_weights(
            first_tok[:, None, :],
            first_w[:, None, :],
            end_tok[:, None, :],
            end_w[:, None, :],
            k[None, :, None],
        )  # [B, N, T]
        dx = jnp.einsum("bnt,bnc->btc", w, g, precision=_HI)
        p = jnp.einsum("btc,bnc->btn", x, g, precision=_HI)
        return (dx, *weight_grads(p, k, first_tok[..., None], end_tok[..., None]))

    dx, d_first, d_end = lax.cond(ch.fits, chunked, dense, x, first_w, end_w, g)
    return dx, None, d_first, None, d_end


_pour.defvjp(_pour_fwd, _pour_bwd)


def _cif_segment(x, a, n, max_tokens):
    """Each frame feeds only the few tokens it touches (chunked; see CHUNK_FRAMES)."""
    return _pour(x, *_frame_plan(a, n), max_tokens)


def _cif_dense(x, a, n, max_tokens):
    """The closed form `tokens = W @ x` with `W [B, N, T]` from the plan (N*T*C work)."""
    return _pour_dense(x, *_frame_plan(a, n), max_tokens)


def _cif_scan(x, a, n, max_tokens):
    """The walk: frame by frame, pour the frame's weight into the current token; when the token's
    fill reaches 1 it fires and the rest spills into the next ones (several if the weight is above
    1). The last token (n-1) never fires: it takes everything left."""
    B, T, C = x.shape
    N = max_tokens
    rows = jnp.arange(B)
    last = n - 1
    j = jnp.arange(N, dtype=jnp.int32)

    def step(carry, frame):
        k, fill, tokens = carry  # current token [B], its fill in [0, 1) [B], tokens [B, N, C]
        a_t, x_t = frame  # [B], [B, C]
        # fill + a_t, kept as whole tokens + a fraction: the fraction never carries the rounding
        # of a large sum (a frame with weight 64 would otherwise cost it 4e-6).
        whole = jnp.floor(a_t)
        filled = fill + (a_t - whole)  # in [0, 2)
        crossed = (whole + jnp.floor(filled)).astype(jnp.int32)  # thresholds crossed
        rest = filled - jnp.floor(filled)
        fires = (k < last) & (crossed >= 1)
        k_new = k + crossed
        k_end = jnp.minimum(k_new, last)  # spill past the last token stays in the last token
        w_here = jnp.where(fires, 1.0 - fill, a_t)
        w_end = jnp.where(fires, (k_new - k_end).astype(jnp.float32) + rest, 0.0)
        tokens = tokens.at[rows, k].add(w_here[:, None] * x_t, mode="drop")
        # Index N (out of range, dropped) when nothing spills: k_end may be -1 when n = 0.
        end_row = jnp.where(fires, k_end, N)
        tokens = tokens.at[rows, end_row].add(w_end[:, None] * x_t, mode="drop")

        def fill_whole(tok):  # tokens completed entirely by this frame: weight 1 each
            inside = fires[:, None] & (j > k[:, None]) & (j < k_end[:, None])
            return jnp.where(inside[..., None], x_t[:, None, :], tok)

        tokens = lax.cond(jnp.any(fires & (k_end > k + 1)), fill_whole, lambda t: t, tokens)
        k = jnp.where(fires, k_end, k)
        fill = jnp.where(fires, rest, fill + a_t)  # (past the last token the fill is unused)
        return (k, fill, tokens), None

    init = (jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.float32), jnp.zeros((B, N, C), x.dtype))
    (_, _, tokens), _ = lax.scan(step, init, (a.T, jnp.swapaxes(x, 0, 1)))
    return tokens


_IMPLS = {"segment": _cif_segment, "dense": _cif_dense, "scan": _cif_scan}


# ----------------------------------------------------------------------------------------------
# Public API.


def cif(
    values,
    alphas,
    frame_mask,
    *,
    max_tokens: int,
    target_lengths=None,
    method: str = "parallel",
    firing: str = "rescale",
    return_overflow: bool = False,
):
    """Continuous integrate-and-fire with threshold 1.

    Args:
      values: `[B, T, C]` what gets integrated.
      alphas: `[B, T]` firing weights, >= 0 (negatives read as 0); zeroed outside `frame_mask`.
      frame_mask: `[B, T]` bool, True = valid frame (None = all valid).
      max_tokens: static output length N (jit needs static shapes); ask for enough.
      target_lengths: `[B]` transcript lengths n (training: alphas are rescaled to sum to n);
        None = inference, `n = max(1, round(sum(alpha)))`, then the same rescaling.
      method: "parallel" (default, = "segment"), "segment", "dense" or "scan" (all equal, in
        value and gradient; "segment" has a hand-written VJP, so forward-mode `jax.jvp` needs
        "dense" or "scan").
      firing: inference's rule when `target_lengths` is None (`FIRING`): "rescale" as above, or
        "threshold": no rescaling; `floor(sum(alpha))` tokens fire at threshold 1 and the rest
        is one more token when it weighs at least `TAIL_THRESHOLD` (or when none fired), as
        `StreamingCIF` computes them frame by frame.
      return_overflow: also return the number of examples (int32 scalar) whose n exceeds
        `max_tokens`; those keep their first `max_tokens` tokens and an all-True mask.

    Returns:
      `(tokens [B, N, C], token_mask [B, N])` (+ `overflow` if asked). Token k is the weighted sum
      of the frame weight poured into it (no renormalisation); masked tokens are zero. Computed in
      float32, returned in `values.dtype`.
    """
    values = jnp.asarray(values)
    alphas = jnp.asarray(alphas)
    if values.ndim != 3 or alphas.shape != values.shape[:2]:
        raise ValueError(
            f"cif: values must be [B, T, C] and alphas [B, T]; "
            f"got {values.shape} and {alphas.shape}"
        )
    if frame_mask is not None and jnp.shape(frame_mask) != alphas.shape:
        raise ValueError(f"cif: frame_mask shape {jnp.shape(frame_mask)} != alphas {alphas.shape}")
    if target_lengths is not None and jnp.shape(target_lengths) != alphas.shape[:1]:
        raise ValueError(
            f"cif: target_lengths must be [B] = {alphas.shape[:1]}, got {jnp.shape(target_lengths)}"
        )
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"cif: max_tokens must be a positive Python int, got {max_tokens!r}")
    if method not in METHODS:
        raise ValueError(f"cif: method {method!r} unknown, expected one of {METHODS}")
    if firing not in FIRING:
        raise ValueError(f"cif: firing {firing!r} unknown, expected one of {FIRING}")
    impl = _IMPLS[PARALLEL if method == "parallel" else method]

    if target_lengths is None and firing == "threshold":
        a = _valid_alphas(alphas, frame_mask)
        whole, frac = split_cumsum(a)
        fired, tail = whole[:, -1], frac[:, -1]
        # Token `fired` takes the tail (nothing lies beyond it); it is kept or masked below.
        tokens = impl(values.astype(jnp.float32), a, fired + 1, int(max_tokens))
        n = jnp.where((tail >= TAIL_THRESHOLD) | (fired == 0), fired + 1, fired)
    else:
        n = token_lengths(alphas, frame_mask, target_lengths)
        a = _scaled_alphas(alphas, frame_mask, n)
        tokens = impl(values.astype(jnp.float32), a, n, int(max_tokens))
    token_mask = jnp.arange(max_tokens, dtype=jnp.int32)[None, :] < n[:, None]
    tokens = jnp.where(token_mask[..., None], tokens, 0.0).astype(values.dtype)
    if return_overflow:
        return tokens, token_mask, jnp.sum(n > max_tokens).astype(jnp.int32)
    return tokens, token_mask


def quantity_loss(alphas, frame_mask, target_lengths, example_mask=None):
    """`|sum_t alpha_bt - n_b| / n_b` of the unscaled alphas over valid frames (docs/method.md §3),
    averaged over the real examples (`example_mask [B]`, None = all); an example with n = 0
    divides by 1 instead. Batch filler rows (example_mask False) count for nothing."""
    a = jnp.asarray(alphas, jnp.float32)
    if frame_mask is not None:
        a = jnp.where(frame_mask, a, 0.0)
    n = jnp.asarray(target_lengths).astype(jnp.float32)
    err = jnp.abs(a.sum(-1) - n) / jnp.maximum(n, 1.0)
    if example_mask is None:
        return jnp.mean(err)
    ex = jnp.asarray(example_mask).astype(jnp.float32)
    return jnp.sum(err * ex) / jnp.maximum(ex.sum(), 1.0)


class StreamingCIF:
    """CIF's "threshold" rule frame by frame (host numpy, float32), for streaming: `push(values
    [K, C], alphas [K])` returns the tokens `[m, C]` that fired in these frames, final at once;
    `finish()` the tail token `[0 or 1, C]`. Together they are what `cif(..., firing="threshold")`
    returns for the whole utterance: the cumulative weight is carried as (whole tokens, fraction)
    as `split_cumsum` adds it, so the same frames fire with the same weights (the weighted sums
    differ by float rounding only).
    """

    def __init__(self, channels: int):
        self.fired = 0  # whole tokens of cumulative weight: the tokens fired so far
        self.fill = np.float32(0)  # the fraction: the current token's weight, in [0, 1)
        self.partial = np.zeros(channels, np.float32)  # its weighted sum of values
        self.frames = 0  # frames pushed so far
        self.fire_frames: list[int] = []  # the frame where each token fired

    def push(self, values, alphas) -> np.ndarray:
        values = np.asarray(values, np.float32)
        out = []
        for a, x in zip(np.maximum(np.asarray(alphas, np.float32), 0), values, strict=True):
            whole = np.floor(a)
            s = self.fill + (a - whole)  # < 2: its floor is the carry, as in split_cumsum
            carry = np.floor(s)
            fired = self.fired + int(whole + carry)
            frac = np.float32(s - carry)
            if fired == self.fired:
                self.partial = self.partial + a * x
            else:  # as `_frame_plan`: 1 - fill to the token that fires, 1 to any completed in
                # between, the new fraction to the next one
                out.append(self.partial + (np.float32(1) - self.fill) * x)
                out += [x] * (fired - self.fired - 1)
                self.partial = frac * x
                self.fire_frames += [self.frames] * (fired - self.fired)
            self.fired, self.fill = fired, frac
            self.frames += 1
        return np.stack(out) if out else np.zeros((0, values.shape[-1]), np.float32)

    def finish(self) -> np.ndarray:
        keep = self.fill >= TAIL_THRESHOLD or self.fired == 0
        return self.partial[None] if keep else np.zeros((0, self.partial.size), np.float32)
