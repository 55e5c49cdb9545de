"""blspkd_jax.losses against the explicit full-logits formulas (numpy float64 for values, plainly
written jax for gradients), optax for cross-entropy, and a single device for the sharded run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blspkd_jax import losses

H, V = 8, 37  # V prime, so no other dimension is mistaken for it in the program checks


def _inputs(m, h=H, v=V, seed=0, zero_rows=(1, 5)):
    ks, kt, kw, kx = jax.random.split(jax.random.key(seed), 4)
    s = jax.random.normal(ks, (m, h))
    t = s + jax.random.normal(kt, (m, h))
    w_head = jax.random.normal(kw, (h, v)) * 0.7
    weights = jax.random.uniform(kx, (m,), minval=0.5, maxval=2.0)
    weights = weights.at[jnp.asarray(zero_rows, jnp.int32)].set(0.0)
    return s, t, w_head, weights


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kd_kl(s, t, w_head, weights, temperature):
    """The SPEC formula in float64 numpy: sum_i w_i KL(p_i || q_i) / sum_i w_i."""
    s, t, w_head, weights = (np.asarray(x, np.float64) for x in (s, t, w_head, weights))
    p = _np_softmax(t @ w_head / temperature)
    q = _np_softmax(s @ w_head / temperature)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    return np.sum(weights * kl) / np.sum(weights)


def ref_kd_kl(s, t, w_head, weights, temperature):
    """The same formula in plain jax (full logits, softmax then log), for reference gradients."""
    p = jax.nn.softmax(jax.lax.stop_gradient(t) @ w_head / temperature)
    q = jax.nn.softmax(s @ w_head / temperature)
    kl = jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1)
    return jnp.sum(weights * kl) / jnp.sum(weights)


def _close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize(
    "temperature,tile_rows", [(0.5, 4), (1.0, 5), (2.0, 13), (4.0, 64)], ids=str
)
def test_kd_kl_matches_formula(temperature, tile_rows):
    s, t, w_head, weights = _inputs(13)  # 13 rows: not a multiple of 4 or 5; 64 > M
    fn = jax.jit(
        jax.value_and_grad(
            lambda *a: losses.kd_kl(*a, temperature=temperature, tile_rows=tile_rows),
            argnums=(0, 1, 2, 3),
        )
    )
    value, (g_s, g_t, g_head, g_w) = fn(s, t, w_head, weights)
    ref_s = jax.grad(ref_kd_kl)(s, t, w_head, weights, temperature)

    _close(value, np_kd_kl(s, t, w_head, weights, temperature), 1e-5)
    _close(g_s, ref_s, 1e-5)
    assert not np.any(np.asarray(g_s)[[1, 5]])  # zero-weight rows get no gradient
    # Gradients flow to the student only: teacher under stop-gradient, head frozen, weights fixed.
    for g, x in ((g_t, t), (g_head, w_head), (g_w, weights)):
        assert g.shape == x.shape and not np.any(np.asarray(g))

    # jax.grad alone (and without jit) gives the same gradient as value_and_grad.
    g_only = jax.grad(lambda x: losses.kd_kl(x, t, w_head, weights, temperature=temperature))(s)
    _close(g_only, g_s, 1e-6)


def test_kd_kl_is_zero_for_identical_passes_and_grows_with_distance():
    s, _, w_head, weights = _inputs(9)
    value, grad = jax.jit(jax.value_and_grad(losses.kd_kl))(s, s, w_head, weights)
    assert abs(float(value)) < 1e-6 and float(jnp.abs(grad).max()) < 1e-6
    kd = jax.jit(losses.kd_kl)
    far, farther = kd(s, s + 1.0, w_head, weights), kd(s, s + 2.0, w_head, weights)
    assert 0 < float(far) < float(farther)


def test_kd_kl_zero_total_weight_is_zero_not_nan():
    s, t, w_head, _ = _inputs(7)
    zeros = jnp.zeros(7)
    value, g_s = jax.jit(jax.value_and_grad(losses.kd_kl))(s, t, w_head, zeros)
    assert float(value) == 0.0 and np.all(np.asarray(g_s) == 0)
    assert float(jax.jit(losses.tiled_cross_entropy)(s, w_head, jnp.zeros(7, int), zeros)) == 0.0


def test_zero_weight_rows_cannot_poison_the_loss():
    # Padding positions may hold NaN/inf hidden states (e.g. fully masked attention rows).
    s, t, w_head, weights = _inputs(10, zero_rows=(3,))
    bad_s = s.at[3].set(jnp.nan)
    bad_t = t.at[3].set(jnp.inf)
    fn = jax.jit(jax.value_and_grad(lambda a, b: losses.kd_kl(a, b, w_head, weights, tile_rows=4)))
    value, grad = fn(bad_s, bad_t)
    clean_value, clean_grad = fn(s, t)
    _close(value, clean_value, 1e-6)
    _close(grad, clean_grad, 1e-6)

    labels = jnp.arange(10) % V
    ce = jax.jit(
        jax.value_and_grad(lambda a: losses.tiled_cross_entropy(a, w_head, labels, weights))
    )
    (v_bad, g_bad), (v_ok, g_ok) = ce(bad_s), ce(s)
    _close(v_bad, v_ok, 1e-6)
    _close(g_bad, g_ok, 1e-6)


def test_kd_kl_bf16_inputs_match_fp32_reference():
    s, t, w_head, weights = _inputs(24, h=32, v=301)
    s16, t16, head16 = (x.astype(jnp.bfloat16) for x in (s, t, w_head))
    value, grad = jax.jit(jax.value_and_grad(lambda *a: losses.kd_kl(*a, tile_rows=8)))(
        s16, t16, head16, weights
    )
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    # Logits are accumulated in fp32, so the value is the formula on the bf16-rounded inputs.
    _close(value, np_kd_kl(s16, t16, head16, weights, 2.0), 1e-5)
    # The gradient's final matmul runs in bf16 (like ordinary autodiff of a bf16 model).
    ref = jax.grad(ref_kd_kl)(*(x.astype(jnp.float32) for x in (s16, t16, head16)), weights, 2.0)
    _close(grad, ref, 2e-2)


def np_cross_entropy(hidden, w_head, labels, weights):
    hidden, w_head, weights = (np.asarray(x, np.float64) for x in (hidden, w_head, weights))
    q = _np_softmax(hidden @ w_head)
    labels = np.asarray(labels)
    ce = -np.log(q[np.arange(len(labels)), np.clip(labels, 0, None)])
    ce = np.where(weights != 0, ce, 0.0)
    return np.sum(weights * ce) / np.sum(weights)


def test_tiled_cross_entropy_matches_formula_and_optax():
    hidden, _, w_head, weights = _inputs(11)
    labels = jax.random.randint(jax.random.key(3), (11,), 0, V)
    labels = labels.at[5].set(-100)  # ignored: weight 0

    value, (g_h, g_head) = jax.jit(
        jax.value_and_grad(lambda *a: losses.tiled_cross_entropy(*a, tile_rows=4), argnums=(0, 1))
    )(hidden, w_head, labels, weights)

    def optax_ref(h, w):
        ce = optax.softmax_cross_entropy_with_integer_labels(h @ w_head, jnp.maximum(labels, 0))
        return jnp.sum(w * ce) / jnp.sum(w)

    _close(value, np_cross_entropy(hidden, w_head, labels, weights), 1e-5)
    _close(value, optax_ref(hidden, weights), 1e-5)
    _close(g_h, jax.grad(optax_ref)(hidden, weights), 1e-5)
    assert not np.any(np.asarray(g_head))  # frozen head

    # A weighted row with a label outside [0, V) is an error made loud, not a silent clip.
    bad = labels.at[0].set(V)
    assert np.isnan(float(losses.tiled_cross_entropy(hidden, w_head, bad, weights)))


def test_top1_predictions_match_full_argmax():
    hidden, _, w_head, _ = _inputs(23)
    top = jax.jit(lambda h: losses.top1_predictions(h, w_head, tile_rows=6))(hidden)
    expected = np.argmax(np.asarray(hidden, np.float64) @ np.asarray(w_head, np.float64), -1)
    assert top.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(top), expected)


def _all_shapes(jaxpr):
    """Every intermediate shape in a jaxpr, sub-jaxprs (scan bodies, custom rules) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _all_shapes(inner)
    return shapes


def test_no_full_logits_in_the_program():
    m, tile = 64, 8
    s, t, w_head, weights = _inputs(m)
    tiled = jax.make_jaxpr(
        jax.value_and_grad(lambda x: losses.kd_kl(x, t, w_head, weights, tile_rows=tile))
    )(s)
    naive = jax.make_jaxpr(jax.value_and_grad(lambda x: ref_kd_kl(x, t, w_head, weights, 2.0)))(s)
    vocab_sized = [sh for sh in _all_shapes(tiled.jaxpr) if V in sh]
    assert vocab_sized and max(np.prod(sh) for sh in vocab_sized) <= tile * V
    assert (m, V) in _all_shapes(naive.jaxpr)  # the check above can see full logits

    # And what XLA actually allocates: temporaries a small fraction of the full-logits version.
    m, v = 256, 2048
    s, t, w_head, weights = _inputs(m, h=16, v=v)

    def temp_bytes(f):
        compiled = jax.jit(jax.value_and_grad(f)).lower(s).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    tiled_bytes = temp_bytes(lambda x: losses.kd_kl(x, t, w_head, weights, tile_rows=16))
    naive_bytes = temp_bytes(lambda x: ref_kd_kl(x, t, w_head, weights, 2.0))
    assert naive_bytes >= m * v * 4 and tiled_bytes <= 0.15 * naive_bytes


def test_input_errors_name_the_argument():
    s, t, w_head, weights = _inputs(6)
    with pytest.raises(ValueError, match="teacher_hidden"):
        losses.kd_kl(s, t[:5], w_head, weights)
    with pytest.raises(ValueError, match="weights"):
        losses.kd_kl(s, t, w_head, weights[:, None])
    with pytest.raises(ValueError, match="lm_head"):
        losses.kd_kl(s, t, w_head.T, weights)
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_kl(s, t, w_head, weights, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        jax.jit(lambda x: losses.kd_kl(s, t, w_head, weights, temperature=x))(2.0)
    with pytest.raises(ValueError, match="tile_rows"):
        losses.top1_predictions(s, w_head, tile_rows=0)
    with pytest.raises(ValueError, match="labels"):
        losses.tiled_cross_entropy(s, w_head, weights, weights)


_SHARDED_SCRIPT = textwrap.dedent(
    r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from blspkd_jax import losses
    from blspkd_jax.sharding import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    m, h, v = 40, 24, 64  # tile_rows=16 -> 3 tiles of 16 rows, 8 of them padding
    ks, kt, kw, kl = jax.random.split(jax.random.key(0), 4)
    s = jax.random.normal(ks, (m, h))
    t = s + jax.random.normal(kt, (m, h))
    head = jax.random.normal(kw, (h, v)) * 0.5
    labels = jax.random.randint(kl, (m,), 0, v)
    weights = (jnp.arange(m) % 5 != 0).astype(jnp.float32)

    def step(s, t, head, labels, weights):
        kd = jax.value_and_grad(lambda x: losses.kd_kl(x, t, head, weights, tile_rows=16))(s)
        ce = jax.value_and_grad(
            lambda x: losses.tiled_cross_entropy(x, head, labels, weights, tile_rows=16))(s)
        return kd, ce, losses.top1_predictions(s, head, tile_rows=16)

    single = jax.jit(step)(s, t, head, labels, weights)
    mesh = make_mesh(data=4, fsdp=1, tensor=2)
    rows2, rows1 = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data"))
    cols = NamedSharding(mesh, P(None, "tensor"))
    shardings = (rows2, rows2, cols, rows1, rows1)
    args = jax.device_put((s, t, head, labels, weights), shardings)
    sharded_step = jax.jit(step, in_shardings=shardings)
    sharded = sharded_step(*args)
    # Tiles take strided rows, so every device computes logits for its own share of each tile
    # only ([4, 32] here), never a whole tile's [16, 32] nor gathered [., 64] logits.
    hlo = sharded_step.lower(*args).compile().as_text()
    for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
        dims = [int(d) for d in dims.split(",")]
        if (v in dims or v // 2 in dims) and h not in dims:  # [h, .]: lm_head, not logits
            assert np.prod(dims) // max(d for d in dims if d in (v, v // 2)) <= 4, dims
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print("sharded == single device")
    """
)


def test_sharded_run_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sharded == single device" in proc.stdout
