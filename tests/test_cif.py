"""CIF (blspkd_jax/cif.py) against a plain float64 frame loop written from docs/method.md §3: every
method, both modes, the edge cases, gradients between methods and against finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blspkd_jax.models.cif import (
    METHODS,
    MIN_TOTAL,
    PARALLEL,
    _Chunks,
    _frame_plan,
    _scaled_alphas,
    cif,
    quantity_loss,
    split_cumsum,
    token_lengths,
)

TOL = 1e-5
# "parallel" is an alias of one of these (PARALLEL); testing each implementation once keeps the
# number of compilations down, and test_parallel_is_the_default_alias ties the alias to it.
IMPLS = tuple(m for m in METHODS if m != "parallel")


def reference_cif(values, alphas, frame_mask, max_tokens, target_lengths=None):
    """Walk the frames one by one in float64: each frame pours its weight into the current token
    until that token holds 1, then spills into the next; the last token (n-1) takes everything
    left. Returns (tokens [B, N, C], mask [B, N], overflow count)."""
    values = np.asarray(values, np.float64)
    alphas = np.asarray(alphas, np.float64)
    B, T, C = values.shape
    tokens = np.zeros((B, max_tokens, C))
    mask = np.zeros((B, max_tokens), bool)
    overflow = 0
    for b in range(B):
        a = np.where(np.asarray(frame_mask[b]), alphas[b], 0.0)
        a = np.maximum(a, 0.0)
        total = a.sum()
        # Training: the transcript length; inference: max(1, round(sum(alpha))).
        n = max(1, round(total)) if target_lengths is None else max(int(target_lengths[b]), 0)
        a = a * (n / total) if total > MIN_TOTAL else np.zeros_like(a)
        out = np.zeros((max(n, 1), C))
        k, fill = 0, 0.0
        for t in range(T):
            w = a[t]
            while True:
                if k >= n - 1:
                    out[k] += w * values[b, t]
                    break
                room = 1.0 - fill
                if w < room:
                    out[k] += w * values[b, t]
                    fill += w
                    break
                out[k] += room * values[b, t]
                w -= room
                k += 1
                fill = 0.0
        m = min(n, max_tokens)
        tokens[b, :m] = out[:m]
        mask[b, :m] = True
        overflow += n > max_tokens
    return tokens, mask, overflow


@functools.partial(jax.jit, static_argnames=("method", "max_tokens"))
def _run(values, alphas, mask, target, probe, *, method, max_tokens):
    """Tokens, mask, overflow count and the gradients of sum(tokens * probe) in one compiled call
    (one compile per shape, method and mode keeps the suite fast)."""

    def loss(v, a):
        t, m, over = cif(
            v,
            a,
            mask,
            max_tokens=max_tokens,
            target_lengths=target,
            method=method,
            return_overflow=True,
        )
        return jnp.sum(t * probe), (t, m, over)

    (_, (tok, tmask, over)), (gv, ga) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        values, alphas
    )
    return tok, tmask, over, gv, ga


def _check(values, alphas, mask, max_tokens, target, method, probe_seed=5):
    """Compare one method with the frame loop; return (tokens, mask, overflow, grad_v, grad_a)."""
    B, _, C = values.shape
    probe = np.random.default_rng(probe_seed).normal(size=(B, max_tokens, C)).astype(np.float32)
    tgt = None if target is None else jnp.asarray(target, jnp.int32)
    out = _run(values, alphas, mask, tgt, probe, method=method, max_tokens=max_tokens)
    tok, tmask, over, gv, ga = (np.asarray(x) for x in out)
    ref_tok, ref_mask, ref_over = reference_cif(values, alphas, mask, max_tokens, target)
    assert tok.shape == ref_tok.shape and tok.dtype == np.float32
    assert np.all(np.isfinite(tok)) and np.all(np.isfinite(gv)) and np.all(np.isfinite(ga))
    np.testing.assert_array_equal(tmask, ref_mask)
    np.testing.assert_allclose(tok, ref_tok, atol=TOL, rtol=0)
    assert int(over) == ref_over
    return tok, tmask, over, gv, ga


def _random_case(seed, B=3, T=20, C=4, lengths=(20, 13, 7), low=0.1, high=0.9):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(B, T, C)).astype(np.float32)
    alphas = rng.uniform(low, high, size=(B, T)).astype(np.float32)
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    # Garbage in the padding must not matter.
    alphas = np.where(mask, alphas, 5.0).astype(np.float32)
    return values, alphas, mask


RANDOM_TARGETS = [9, 6, 4]
RANDOM_MAX = 16


@pytest.mark.parametrize("method", IMPLS)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_random_inputs_match_frame_loop(method, mode):
    for seed in range(3):
        values, alphas, mask = _random_case(seed)
        target = RANDOM_TARGETS if mode == "train" else None
        _check(values, alphas, mask, RANDOM_MAX, target, method)


EDGE_MAX = 8


def _edge_cases():
    T, C = 10, 3
    rng = np.random.default_rng(7)
    values = rng.normal(size=(4, T, C)).astype(np.float32)
    full = np.ones((4, T), bool)
    base = rng.uniform(0.1, 0.9, size=(4, T)).astype(np.float32)
    big = base.copy()
    big[:, 3] = 3.7  # one frame completes several tokens
    big[1, 0] = 2.0
    # Dyadic weights summing to 8: every cumulative weight is exact and lands on token boundaries.
    dyadic = np.array([0.5, 0.5, 0.25, 0.75, 1.0, 2.0, 0.5, 2.5, 0.0, 0.0], np.float32)
    return {
        # name: (values, alphas, mask, target lengths for training mode)
        "all_zero_alphas": (values, np.zeros((4, T), np.float32), full, [3, 0, 1, 5]),
        "all_padding": (values, base, np.zeros((4, T), bool), [3, 0, 1, 5]),
        "one_example_padded": (values, base, full & (np.arange(4) != 2)[:, None], [3, 4, 2, 1]),
        "alpha_above_one": (values, big, full, [8, 6, 3, 1]),
        "target_zero": (values, base, full, [0, 0, 2, 0]),
        "overflow": (values, big * 2, full, [12, 8, 9, 2]),
        "exact_token_boundaries": (values, np.tile(dyadic, (4, 1)), full, [8, 8, 4, 8]),
        "negative_alphas": (values, base - 0.5, full, [2, 3, 1, 4]),
    }


@pytest.mark.parametrize("method", IMPLS)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_edge_cases_match_frame_loop(mode, method):
    for case, (values, alphas, mask, target) in _edge_cases().items():
        tok, tmask, over, _, _ = _check(
            values, alphas, mask, EDGE_MAX, target if mode == "train" else None, method
        )
        if case == "overflow" and mode == "train":
            # Targets [12, 8, 9, 2] into 8 slots: two overflow, keep their first 8 tokens.
            assert int(over) == 2 and bool(tmask[:3].all())
        if case == "overflow" and mode == "infer":
            assert int(over) == 4  # sums of about 16: every example overflows
        if case in ("all_zero_alphas", "all_padding"):
            assert not np.any(tok)  # nothing to integrate: zero tokens, no NaN
            if mode == "infer":
                np.testing.assert_array_equal(tmask.sum(1), 1)  # max(1, round(0))


@pytest.mark.parametrize("method", [PARALLEL, "scan"])
def test_long_sequence_precision(method):
    # 30 s of Whisper frames into ~128 tokens: cumulative weights reach 128, where a plain float32
    # cumsum and a float32 scale factor would be off by ~1e-5 (eps * 128) and move every token
    # boundary; the split cumsum and the two-float scale keep the tokens within TOL.
    rng = np.random.default_rng(3)
    T = 1500
    values = rng.normal(size=(2, T, 2)).astype(np.float32)
    alphas = rng.uniform(0, 0.17, size=(2, T)).astype(np.float32)
    mask = np.ones((2, T), bool)
    fn = jax.jit(cif, static_argnames=("max_tokens", "method"))
    for target in ([128, 100], None):
        tgt = None if target is None else jnp.asarray(target)
        tok, tmask = fn(values, alphas, mask, max_tokens=130, target_lengths=tgt, method=method)
        ref_tok, ref_mask, _ = reference_cif(values, alphas, mask, 130, target)
        np.testing.assert_array_equal(np.asarray(tmask), ref_mask)
        np.testing.assert_allclose(np.asarray(tok), ref_tok, atol=TOL, rtol=0)


def _chunk_cases():
    """T = 3 chunks of the segment method: a token lasting several chunks (silence), and a frame
    so heavy that its chunk spans more tokens than a window holds (dense fallback)."""
    from blspkd_jax.models.cif import CHUNK_FRAMES, CHUNK_TOKENS

    T = 3 * CHUNK_FRAMES
    rng = np.random.default_rng(12)
    values = rng.normal(size=(2, T, 3)).astype(np.float32)
    speech = rng.uniform(0.1, 0.9, size=(2, T)).astype(np.float32)
    silence = speech.copy()
    silence[0, 10 : T - 10] = 1e-4  # one token spans frames 10..T-10: all three chunks
    silence[1, 2 * T // 5 :] = 1e-4
    peaky = speech.copy()
    # One frame completes more tokens than a window holds. (Not much heavier: a weight w in float32
    # is only known to w * 6e-8, and that error shifts every later token boundary.)
    peaky[0, T // 2 - 5] = CHUNK_TOKENS + 8.0
    mask = np.ones((2, T), bool)
    mask[1, 4 * T // 5 :] = False
    # Same shapes and max_tokens for both: one compilation per method and mode serves both cases.
    return {
        "silence": (values, silence, mask, 110, [12, 9]),
        "peaky": (values, peaky, mask, 110, [2 * T // 3, 4 * T // 15]),
    }


@pytest.mark.parametrize("case", ["silence", "peaky"])
def test_segment_chunks_and_dense_fallback(case):
    values, alphas, mask, max_tokens, target = _chunk_cases()[case]

    # The case takes the path it is meant to test.
    @jax.jit
    def plan(alphas, mask, target):  # (fits, base [B, J])
        n = token_lengths(alphas, mask, target)
        first_tok, _, end_tok, _ = _frame_plan(_scaled_alphas(alphas, mask, n), n)
        chunks = _Chunks(first_tok, end_tok, max_tokens)
        return chunks.fits, chunks.base

    fits, base = plan(alphas, mask, jnp.asarray(target))
    assert base.shape[1] == 3 and bool(fits) == (case == "silence")
    if case == "silence":  # one token starts two chunks (it lasts from chunk 0 into chunk 2)
        base = np.asarray(base)[0]
        assert base[1] == base[2] > base[0]
    for tgt in (target, None):
        *_, gv_ref, ga_ref = _check(values, alphas, mask, max_tokens, tgt, "scan")
        for method in ("segment", "dense"):
            *_, gv, ga = _check(values, alphas, mask, max_tokens, tgt, method)
            np.testing.assert_allclose(gv, gv_ref, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(ga, ga_ref, atol=1e-5, rtol=1e-5)


def test_split_cumsum_exact_and_differentiable():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2.5, size=(2, 3000)).astype(np.float32)
    whole, frac = jax.jit(split_cumsum)(jnp.asarray(a))
    exact = np.cumsum(a.astype(np.float64), axis=-1)
    np.testing.assert_array_equal(np.asarray(whole), np.floor(exact).astype(np.int32))
    np.testing.assert_allclose(np.asarray(frac), exact - np.floor(exact), atol=2e-6, rtol=0)
    assert np.all((np.asarray(frac) >= 0) & (np.asarray(frac) < 1))
    w = jnp.arange(3000.0)
    g = jax.jit(jax.grad(lambda x: jnp.sum(split_cumsum(x)[1] * w)))(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(g[0]), np.cumsum(np.arange(3000.0)[::-1])[::-1], 1e-6)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_gradients_equal_between_methods(mode):
    cases = [(*_random_case(1, low=0.05, high=1.6), RANDOM_MAX, [12, 8, 5])]
    edges = _edge_cases()
    for name in ("exact_token_boundaries", "overflow", "alpha_above_one"):  # kinks hit exactly
        cases.append((*edges[name][:3], EDGE_MAX, edges[name][3]))
    for values, alphas, mask, max_tokens, target in cases:
        target = target if mode == "train" else None
        *_, gv_ref, ga_ref = _check(values, alphas, mask, max_tokens, target, "scan")
        assert np.abs(ga_ref).max() > 0.1
        for method in ("segment", "dense"):
            *_, gv, ga = _check(values, alphas, mask, max_tokens, target, method)
            np.testing.assert_allclose(gv, gv_ref, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(ga, ga_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", IMPLS)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_gradients_match_finite_differences(method, mode):
    # Random alphas keep every cumulative weight away from a token boundary (the kinks), so the
    # float64 central differences of the frame loop are the derivative.
    values, alphas, mask = _random_case(11)
    target = RANDOM_TARGETS if mode == "train" else None
    *_, gv, ga = _check(values, alphas, mask, RANDOM_MAX, target, method)
    probe = np.random.default_rng(5).normal(size=(3, RANDOM_MAX, 4)).astype(np.float32)

    def f(v, a):
        return np.sum(reference_cif(v, a, mask, RANDOM_MAX, target)[0] * probe)

    eps = 1e-6
    v64, a64 = values.astype(np.float64), alphas.astype(np.float64)
    num = []
    for x in (v64, a64):
        g = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            d = np.zeros_like(x)
            d[idx] = eps
            up = (v64 + d, a64) if x is v64 else (v64, a64 + d)
            down = (v64 - d, a64) if x is v64 else (v64, a64 - d)
            g[idx] = (f(*up) - f(*down)) / (2 * eps)
        num.append(g)
    np.testing.assert_allclose(gv, num[0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(ga, num[1], atol=2e-5, rtol=1e-4)
    assert np.abs(ga).max() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("method", IMPLS)
def test_jit_vmap_and_batch_independence(method):
    values, alphas, mask = _random_case(4)
    target = jnp.asarray(RANDOM_TARGETS)
    fn = jax.jit(
        lambda v, a, m, t: cif(v, a, m, max_tokens=RANDOM_MAX, target_lengths=t, method=method)
    )
    tok, tmask = fn(values, alphas, mask, target)
    # vmap over an extra leading axis = one call per slice.
    stacked = [jnp.stack([x, x[::-1]]) for x in (values, alphas, mask, target)]
    vt, vm = jax.vmap(fn)(*stacked)
    np.testing.assert_allclose(np.asarray(vt[0]), np.asarray(tok), atol=1e-6)
    rt, _ = fn(values[::-1], alphas[::-1], mask[::-1], target[::-1])
    np.testing.assert_allclose(np.asarray(vt[1]), np.asarray(rt), atol=1e-6)
    # Example 0 does not see example 1's length, padding or weights.
    mask2 = mask.copy()
    mask2[1, :] = True
    alphas2 = alphas.copy()
    alphas2[1] = 0.3
    t2, m2 = fn(values, alphas2, mask2, target.at[1].set(2))
    np.testing.assert_array_equal(np.asarray(t2[0]), np.asarray(tok[0]))
    np.testing.assert_array_equal(np.asarray(m2[0]), np.asarray(tmask[0]))


def test_parallel_is_the_default_alias():
    assert PARALLEL in IMPLS and PARALLEL != "scan"  # the default needs no sequential scan
    values, alphas, mask = _random_case(2)
    # The same program whichever way the default is named (traced, not compiled: cheap).
    jaxprs = [
        str(
            jax.make_jaxpr(lambda v, a, m, kw=kw: cif(v, a, m, max_tokens=RANDOM_MAX, **kw))(
                values, alphas, mask
            )
        )
        for kw in ({}, {"method": "parallel"}, {"method": PARALLEL})
    ]
    assert jaxprs[0] == jaxprs[1] == jaxprs[2]
    other = "dense" if PARALLEL != "dense" else "segment"
    assert jaxprs[0] != str(
        jax.make_jaxpr(lambda v, a, m: cif(v, a, m, max_tokens=RANDOM_MAX, method=other))(
            values, alphas, mask
        )
    )


def test_dtype_and_errors():
    values, alphas, mask = _random_case(0)
    tok, _ = jax.jit(cif, static_argnames="max_tokens")(
        values.astype(jnp.bfloat16), alphas, mask, max_tokens=8
    )
    assert tok.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="method"):
        cif(values, alphas, mask, max_tokens=8, method="fast")
    with pytest.raises(ValueError, match="max_tokens"):
        cif(values, alphas, mask, max_tokens=0)
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        cif(values[0], alphas, mask, max_tokens=8)
    with pytest.raises(ValueError, match="target_lengths"):
        cif(values, alphas, mask, max_tokens=8, target_lengths=jnp.ones(5))


def test_quantity_loss_formula():
    _, alphas, mask = _random_case(9)
    n = np.array([9, 0, 4])
    sums = np.where(mask, alphas.astype(np.float64), 0).sum(1)
    expected = np.mean(np.abs(sums - n) / np.maximum(n, 1))
    got = quantity_loss(alphas, mask, jnp.asarray(n))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # Batch filler rows (example_mask False) count for nothing, whatever their alphas.
    real = np.array([True, False, True])
    got = quantity_loss(alphas, mask, jnp.asarray(n), jnp.asarray(real))
    errors = np.abs(sums - n) / np.maximum(n, 1)
    np.testing.assert_allclose(float(got), errors[real].mean(), rtol=1e-6)
