"""blspkd_jax.losses (and model.compute_losses' use of them) against the explicit full-logits
formulas (numpy float64 for values, plainly written jax for gradients), optax for cross-entropy,
one call per term for the one-pass multi-term versions, and a single device for the sharded run."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import VOCAB, random_batch, run_on_cpu_devices, tiny_config

from blspkd_jax.training import losses
from blspkd_jax.training.objective import LOSS_NAMES, LossConfig, compute_losses, loss_rows

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
    """The formula of docs/method.md §4 in float64 numpy: sum_i w_i KL(p_i || q_i) / sum_i w_i."""
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

    # jax.grad alone (the custom VJP without value_and_grad) gives the formula's gradient too.
    g_only = jax.grad(lambda x: losses.kd_kl(x, t, w_head, weights, temperature=temperature))(s)
    _close(g_only, ref_s, 1e-5)


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


def _weight_columns(m, seed=4):
    """[M, 3]: random weights with zero rows, a 0/1 selection, and a column of all zeros; rows 1
    and 4 are zero in every column."""
    _, _, _, random_w = _inputs(m, seed=seed, zero_rows=(1, 4))
    mask = (jnp.arange(m) % 3 != 1).astype(jnp.float32)
    return jnp.stack([random_w, mask, jnp.zeros(m)], axis=-1)


def _np_means(per_row, weights):
    """sum_i w_ik r_i / sum_i w_ik per column of weights [M, K], 0 for an all-zero column."""
    per_row, weights = np.asarray(per_row, np.float64), np.asarray(weights, np.float64)
    total = weights.sum(0)
    return (weights * per_row[:, None]).sum(0) / np.where(total == 0, 1.0, total)


def np_kl_rows(s, t, w_head, temperature):
    s, t, w_head = (np.asarray(x, np.float64) for x in (s, t, w_head))
    p = _np_softmax(t @ w_head / temperature)
    q = _np_softmax(s @ w_head / temperature)
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def np_ce_rows(s, w_head, labels):
    q = _np_softmax(np.asarray(s, np.float64) @ np.asarray(w_head, np.float64))
    return -np.log(q[np.arange(len(labels)), np.asarray(labels)])


@pytest.mark.parametrize("temperature,tile_rows", [(2.0, 4), (0.5, 16)], ids=str)
def test_kd_kl_weight_columns_equal_separate_calls_and_formula(temperature, tile_rows):
    s, t, w_head, _ = _inputs(14)
    weights = _weight_columns(14)  # [M, 3]
    cot = jnp.asarray([0.7, -1.3, 2.0])  # arbitrary cotangents for the three means
    kw = {"temperature": temperature, "tile_rows": tile_rows}

    @jax.jit  # one compilation for all three computations
    def run(s, t, w_head):
        value, vjp = jax.vjp(lambda *a: losses.kd_kl(*a, weights, **kw), s, t, w_head)
        # K separate single-column calls, and autodiff of the full-logits formula (the all-zero
        # column has no gradient there, as in a single call).
        separate = [jax.value_and_grad(losses.kd_kl)(s, t, w_head, w, **kw) for w in weights.T]
        ref = [jax.grad(ref_kd_kl)(s, t, w_head, weights[:, k], temperature) for k in (0, 1)]
        return value, vjp(cot), separate, cot[0] * ref[0] + cot[1] * ref[1]

    value, (g_s, g_t, g_head), separate, ref = run(s, t, w_head)
    assert value.shape == (3,)
    _close(value, jnp.stack([v for v, _ in separate]), 1e-6)
    _close(g_s, sum(c * g for c, (_, g) in zip(cot, separate, strict=True)), 1e-6)
    _close(value, _np_means(np_kl_rows(s, t, w_head, temperature), weights), 1e-5)
    assert float(value[2]) == 0.0
    _close(g_s, ref, 1e-5)
    for g, x in ((g_t, t), (g_head, w_head)):  # teacher under stop-gradient, head frozen
        assert g.shape == x.shape and not np.any(np.asarray(g))
    # Rows unweighted in every column get no gradient and cannot poison the others with NaN.
    assert not np.any(np.asarray(g_s)[[1, 4]])
    bad_value, (bad_g_s, _, _), _, _ = run(s.at[1].set(jnp.nan), t.at[4].set(jnp.inf), w_head)
    _close(bad_value, value, 1e-6)
    _close(bad_g_s, g_s, 1e-6)


def test_kd_kl_and_cross_entropy_in_one_pass_equal_separate_calls_and_formula():
    m = 13
    s, t, w_head, _ = _inputs(m)
    kl_w = _weight_columns(m)[:, :2]
    ce_w = _weight_columns(m, seed=5)[:, 1]
    labels = jax.random.randint(jax.random.key(7), (m,), 0, V)
    labels = jnp.where(ce_w != 0, labels, -100)  # ignored where unweighted
    cot_kl, cot_ce = jnp.asarray([1.5, -0.5]), 0.8

    def combined(s_, t_, h_):
        kl, ce = losses.kd_kl_and_cross_entropy(
            s_, t_, h_, kl_w, labels, ce_w, temperature=2.0, tile_rows=5
        )
        return jnp.sum(cot_kl * kl) + cot_ce * ce, (kl, ce)

    def separate(s_):
        kl = losses.kd_kl(s_, t, w_head, kl_w, tile_rows=5)
        ce = losses.tiled_cross_entropy(s_, w_head, labels, ce_w, tile_rows=5)
        return jnp.sum(cot_kl * kl) + cot_ce * ce, (kl, ce)

    def ref(s_):
        kl = jnp.stack([ref_kd_kl(s_, t, w_head, kl_w[:, k], 2.0) for k in range(2)])
        ce = optax.softmax_cross_entropy_with_integer_labels(s_ @ w_head, jnp.maximum(labels, 0))
        return jnp.sum(cot_kl * kl) + cot_ce * jnp.sum(ce_w * ce) / jnp.sum(ce_w)

    @jax.jit
    def run(s, t, w_head):
        both = jax.value_and_grad(combined, argnums=(0, 1, 2), has_aux=True)(s, t, w_head)
        return both, jax.value_and_grad(separate, has_aux=True)(s), jax.grad(ref)(s)

    ((_, (kl, ce)), (g_s, g_t, g_head)), ((_, (kl_sep, ce_sep)), g_sep), g_ref = run(s, t, w_head)
    assert kl.shape == (2,) and ce.shape == ()
    _close(kl, kl_sep, 1e-6)
    _close(ce, ce_sep, 1e-6)
    _close(g_s, g_sep, 1e-6)
    _close(kl, _np_means(np_kl_rows(s, t, w_head, 2.0), kl_w), 1e-5)
    ce_rows = np.where(ce_w != 0, np_ce_rows(s, w_head, jnp.maximum(labels, 0)), 0.0)
    _close(ce, _np_means(ce_rows, ce_w[:, None])[0], 1e-5)
    _close(g_s, g_ref, 1e-5)
    for g, x in ((g_t, t), (g_head, w_head)):
        assert g.shape == x.shape and not np.any(np.asarray(g))


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


def _vocab_matmuls(jaxpr, vocab=V):
    """How many matmuls in a jaxpr (sub-jaxprs included) take a vocab-sized operand."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += any(vocab in v.aval.shape for v in eqn.invars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _vocab_matmuls(inner, vocab)
    return n


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


class _GivenPasses:
    """Stands in for BLSPKD in compute_losses: `apply` returns the student and teacher hidden
    states [B, L, H] found in params (and fixed adapter aux), so the loss code can be run and
    differentiated wrt those states for several configs without building the model."""

    def __init__(self, aux):
        self.config = tiny_config()
        self.aux = aux

    def apply(self, variables, batch, **_):
        return variables["params"]["student"], variables["params"]["teacher"], self.aux


@pytest.fixture(scope="module")
def given_passes():
    """(model stand-in, params {"student", "teacher", "llm"}, batch) on the tiny batch layout."""
    batch = {k: jnp.asarray(v) for k, v in random_batch(0).items()}
    B, L = batch["input_ids"].shape
    h = tiny_config().llm.hidden_size
    ks, kt, kh, ka = jax.random.split(jax.random.key(11), 4)
    student = jax.random.normal(ks, (B, L, h))
    teacher = student + jax.random.normal(kt, (B, L, h))
    # Example B-1 is padding (example_mask False): NaN there must not reach any term.
    student = student.at[B - 1].set(jnp.nan)
    head = jax.random.normal(kh, (h, VOCAB)) * 0.4
    alphas = jax.nn.sigmoid(jax.random.normal(ka, (B, 20)))
    aux = {"alphas": alphas, "alpha_sum": alphas.sum(-1)}
    params = {"student": student, "teacher": teacher, "llm": {"lm_head": {"kernel": head}}}
    return _GivenPasses(aux), params, batch


def _full_logits_terms(params, batch, cfg: LossConfig, numpy=True):
    """compute_losses' KL and CE terms by the explicit formulas on full [B*L, V] logits, as plain
    jax (differentiable) and, if `numpy`, float64 numpy (values)."""
    B, L, H = params["student"].shape
    real = batch["example_mask"]  # the padding example's NaN would poison a full-logits formula
    s = jnp.where(real[:, None, None], params["student"], 0).reshape(B * L, H)
    t = params["teacher"].reshape(B * L, H)
    head = params["llm"]["lm_head"]["kernel"]
    rows = {k: v.reshape(-1).astype(jnp.float32) for k, v in loss_rows(batch).items()}
    labels = jnp.pad(batch["input_ids"][:, 1:], ((0, 0), (0, 1))).reshape(-1)
    w_resp = rows["response"]
    terms, np_terms = {}, {}
    for name, w in (("input_kl", rows["input"]), ("response_kl", w_resp)):
        if cfg.weight(name):
            terms[name] = ref_kd_kl(s, t, head, w, cfg.temperature)
            if numpy:
                np_terms[name] = _np_means(np_kl_rows(s, t, head, cfg.temperature), w[:, None])[0]
    if cfg.response_ce:
        ce = optax.softmax_cross_entropy_with_integer_labels(s @ head, labels)
        terms["response_ce"] = jnp.sum(w_resp * ce) / jnp.sum(w_resp)
        if numpy:
            ce_rows = np.where(w_resp != 0, np_ce_rows(s, head, labels), 0.0)
            np_terms["response_ce"] = _np_means(ce_rows, w_resp[:, None])[0]
    return terms, np_terms


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(input_kl=1.0, response_kl=0.7, response_ce=0.3, tile_rows=48),  # padded tiles
        LossConfig(),  # the defaults: both KL terms in one pass, no CE
        LossConfig(input_kl=0.0, response_ce=1.0, tile_rows=100),
        LossConfig(input_kl=0.0, response_kl=0.0, response_ce=1.0, temperature=1.0),
        LossConfig(response_kl=0.0, temperature=0.5, tile_rows=256),
    ],
    ids=["kl2+ce", "kl2", "kl1+ce", "ce", "kl1"],
)
def test_compute_losses_match_full_logits_formula_and_separate_calls(given_passes, cfg):
    passes, params, batch = given_passes
    B, L, H = params["student"].shape
    rows = {k: v.reshape(-1) for k, v in loss_rows(batch).items()}
    labels = jnp.pad(batch["input_ids"][:, 1:], ((0, 0), (0, 1))).reshape(-1)
    kw = {"tile_rows": cfg.tile_rows or None}
    enabled = {k for k in LOSS_NAMES if cfg.weight(k)}

    def ref_loss(p):
        terms, _ = _full_logits_terms(p, batch, cfg, numpy=False)
        return sum(cfg.weight(k) * v for k, v in terms.items())

    def previous(p):
        """The previous implementation: one kd_kl call per KL term, one tiled_cross_entropy."""
        s, t = p["student"].reshape(B * L, H), p["teacher"].reshape(B * L, H)
        head = p["llm"]["lm_head"]["kernel"]
        out = {}
        for name in enabled - {"cif", "response_ce"}:
            w = rows[name.removesuffix("_kl")]
            out[name] = losses.kd_kl(s, t, head, w, temperature=cfg.temperature, **kw)
        if cfg.response_ce:
            out["response_ce"] = losses.tiled_cross_entropy(s, head, labels, rows["response"], **kw)
        return out

    @jax.jit
    def run(p):
        ours = jax.value_and_grad(lambda p: compute_losses(passes, p, batch, cfg), has_aux=True)
        return ours(p), previous(p), jax.grad(ref_loss)(p)["student"]

    ((loss, metrics), grad), old, ref_grad = run(params)
    terms, np_terms = _full_logits_terms(params, batch, cfg)
    assert set(terms) | {"cif"} == enabled == {k for k in metrics if k in LOSS_NAMES}
    for name, value in np_terms.items():
        _close(metrics[name], value, 1e-5)
    for name, value in old.items():
        _close(metrics[name], value, 1e-6)
    _close(loss, sum(cfg.weight(k) * float(metrics[k]) for k in enabled), 1e-6)

    _close(grad["student"], ref_grad, 1e-5)
    assert np.any(np.asarray(grad["student"]))
    # One pass over the vocabulary for all terms: the student logits, the teacher logits if a KL
    # term is on, and one d/dx matmul per kind of term (KL, CE).
    loss_and_grad = jax.value_and_grad(lambda p: compute_losses(passes, p, batch, cfg)[0])
    any_kl = bool(cfg.input_kl or cfg.response_kl)
    expected = 1 + 2 * any_kl + bool(cfg.response_ce)
    assert _vocab_matmuls(jax.make_jaxpr(loss_and_grad)(params).jaxpr, VOCAB) == expected
    # The teacher under stop-gradient and the head frozen: zero, as with kd_kl itself.
    assert not np.any(np.asarray(grad["teacher"]))
    assert not np.any(np.asarray(grad["llm"]["lm_head"]["kernel"]))


def test_compute_losses_with_no_weighted_rows_are_zero(given_passes):
    # Every example padding: each term is 0, exactly what kd_kl and tiled_cross_entropy give for
    # zero total weight (not NaN), and so is the gradient.
    passes, params, batch = given_passes
    empty = {**batch, "example_mask": jnp.zeros_like(batch["example_mask"])}
    cfg = LossConfig(response_ce=1.0)
    (_, metrics), grad = jax.jit(
        jax.value_and_grad(lambda p: compute_losses(passes, p, empty, cfg), has_aux=True)
    )(params)
    for name in ("input_kl", "response_kl", "response_ce"):
        assert float(metrics[name]) == 0.0, name
    assert not np.any(np.asarray(grad["student"]))


def test_several_terms_take_one_vocabulary_pass():
    s, t, w_head, _ = _inputs(32)
    weights = _weight_columns(32)[:, :2]
    labels = jnp.arange(32) % V

    def count(f):
        return _vocab_matmuls(jax.make_jaxpr(jax.value_and_grad(f))(s).jaxpr)

    def kl(x, w):
        return losses.kd_kl(x, t, w_head, w, tile_rows=8)

    def ce(x):
        return losses.tiled_cross_entropy(x, w_head, labels, weights[:, 1], tile_rows=8)

    def both(x):
        kl, ce = losses.kd_kl_and_cross_entropy(
            x, t, w_head, weights, labels, weights[:, 1], tile_rows=8
        )
        return jnp.sum(kl) + ce

    # Per pass: student logits, teacher logits, and one d/dx matmul per term.
    assert count(lambda x: kl(x, weights[:, 0])) == 3
    assert count(lambda x: kl(x, weights[:, 0]) + kl(x, weights[:, 1])) == 6
    assert count(lambda x: jnp.sum(kl(x, weights))) == 3
    assert count(lambda x: kl(x, weights[:, 0]) + kl(x, weights[:, 1]) + ce(x)) == 8
    assert count(both) == 4
    # And still no more than one tile's logits at a time.
    shapes = _all_shapes(jax.make_jaxpr(jax.value_and_grad(both))(s).jaxpr)
    assert max(np.prod(sh) for sh in shapes if V in sh) <= 8 * V


def test_input_errors_name_the_argument():
    s, t, w_head, weights = _inputs(6)
    with pytest.raises(ValueError, match="teacher_hidden"):
        losses.kd_kl(s, t[:5], w_head, weights)
    with pytest.raises(ValueError, match="weights"):
        losses.kd_kl(s, t, w_head, weights[:5])
    with pytest.raises(ValueError, match="weights"):
        losses.kd_kl(s, t, w_head, weights[:, None, None])
    with pytest.raises(ValueError, match="weights"):
        losses.kd_kl(s, t, w_head, jnp.zeros((6, 0)))  # K = 0 columns
    with pytest.raises(ValueError, match="ce_weights"):
        losses.kd_kl_and_cross_entropy(s, t, w_head, weights, weights.astype(int), weights[:5])
    with pytest.raises(ValueError, match="labels"):
        losses.kd_kl_and_cross_entropy(s, t, w_head, weights, weights, weights)
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
    from blspkd_jax.training import losses
    from blspkd_jax.models.sharding import make_mesh

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
        # Two KL columns and the cross-entropy in one pass.
        columns = jnp.stack([weights, jnp.arange(m) % 3 == 0], axis=-1)
        both = jax.value_and_grad(lambda x: jnp.sum(jnp.concatenate(
            [k.reshape(-1) for k in losses.kd_kl_and_cross_entropy(
                x, t, head, columns, labels, weights, tile_rows=16)])))(s)
        return kd, ce, both, losses.top1_predictions(s, head, tile_rows=16)

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
    assert "sharded == single device" in run_on_cpu_devices(_SHARDED_SCRIPT)


_PER_DEVICE_SCRIPT = textwrap.dedent(
    r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from blspkd_jax.training import losses
    from blspkd_jax.models.sharding import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    m, h, v, tile = 40, 36, 64, 4  # 4 batch devices: 10 rows each, 3 tiles of 4 (2 padding)
    ks, kt, kw, kl = jax.random.split(jax.random.key(0), 4)
    s = jax.random.normal(ks, (m, h))
    t = s + jax.random.normal(kt, (m, h))
    head = jax.random.normal(kw, (h, v)) * 0.5
    labels = jax.random.randint(kl, (m,), 0, v)
    kl_w = jnp.stack([jnp.arange(m) % 5 != 0, jnp.arange(m) % 3 == 0], -1).astype(jnp.float32)
    ce_w = (jnp.arange(m) % 4 != 1).astype(jnp.float32)

    def step(s, t, head, labels, kl_w, ce_w):
        def total(x):
            kl, ce = losses.kd_kl_and_cross_entropy(
                x, t, head, kl_w, labels, ce_w, temperature=2.0, tile_rows=tile)
            return kl[0] + 0.5 * kl[1] + 0.25 * ce, (kl, ce)
        (_, terms), grad = jax.value_and_grad(total, has_aux=True)(s)
        # bf16 hidden states with the fp32 head: the head is cast once, before the loop.
        kd16 = jax.value_and_grad(lambda x: losses.kd_kl(
            x, t.astype(jnp.bfloat16), head, ce_w, tile_rows=tile))(s.astype(jnp.bfloat16))
        return terms, grad, kd16, losses.top1_predictions(s, head, tile_rows=tile)

    single = jax.jit(step)(s, t, head, labels, kl_w, ce_w)  # one device, no mesh

    # The explicit formula: full logits in float64 numpy for the values, plain jax for the grad.
    f64 = lambda x: np.asarray(x, np.float64)
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lq, lp = log_softmax(f64(s) @ f64(head) / 2), log_softmax(f64(t) @ f64(head) / 2)
    kl_rows = (np.exp(lp) * (lp - lq)).sum(-1)
    ce_rows = -log_softmax(f64(s) @ f64(head))[np.arange(m), np.asarray(labels)]
    w, c = f64(kl_w), f64(ce_w)
    want_kl = (w * kl_rows[:, None]).sum(0) / w.sum(0)
    want_ce = (c * ce_rows).sum() / c.sum()

    def plain_total(x):
        lq = jax.nn.log_softmax(x @ head / 2)
        p = jax.nn.softmax(t @ head / 2)
        kl = jnp.sum(p * (jnp.log(p) - lq), -1)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(x @ head), labels[:, None], 1)[:, 0]
        kls = (kl_w * kl[:, None]).sum(0) / kl_w.sum(0)
        return kls[0] + 0.5 * kls[1] + 0.25 * (ce_w * ce).sum() / ce_w.sum()

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rows = P(("data", "fsdp"))
    shardings = tuple(NamedSharding(mesh, p) for p in (
        P(("data", "fsdp"), None), P(("data", "fsdp"), None), P("fsdp", "tensor"),
        rows, P(("data", "fsdp"), None), rows))  # the head split like an FSDP lm_head
    args = jax.device_put((s, t, head, labels, kl_w, ce_w), shardings)
    sharded_step = jax.jit(step, in_shardings=shardings)
    with jax.set_mesh(mesh):
        sharded = sharded_step(*args)
        hlo = sharded_step.lower(*args).compile().as_text()

    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-5, atol=1e-6)
    (kl, ce), grad = sharded[0], sharded[1]
    np.testing.assert_allclose(f64(kl), want_kl, rtol=1e-5)
    np.testing.assert_allclose(float(ce), want_ce, rtol=1e-5)
    np.testing.assert_allclose(f64(grad), f64(jax.grad(plain_total)(s)), rtol=1e-4, atol=1e-6)
    assert np.abs(f64(grad)).max() > 1e-3

    # Each device tiles its own 10 rows: logits [tile, V / tensor] = [4, 32], nothing larger.
    for dims in re.findall(r"(?:f32|bf16)\[([\d,]+)\]", hlo):
        dims = [int(d) for d in dims.split(",")]
        head_like = h in dims or h // 2 in dims  # lm_head or its FSDP shard, not logits
        if (v in dims or v // 2 in dims) and not head_like:
            assert np.prod(dims) // max(d for d in dims if d in (v, v // 2)) <= tile, dims
    # The head is gathered (over fsdp) and cast outside every tile loop, never inside one.
    blocks = {}
    for block in re.split(r"\n\n+", hlo):
        name = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s", block)
        if name:
            blocks[name.group(1)] = block
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    assert len(bodies) >= 3, bodies
    # 3 tiles of 4 local rows per loop (global tiles would make 10 of 1 row per device), and
    # the tile's logits [4, 32] are formed inside the loops.
    assert set(re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)) == {"3"}, hlo[:2000]
    assert any(f"[{tile},{v // 2}]" in blocks[b] for b in bodies)
    head_shape = re.compile(rf"(?:f32|bf16)\[{h},{v // 2}\]")
    for body in bodies:
        for line in blocks[body].splitlines():
            if "all-gather(" in line or "convert(" in line:
                assert not head_shape.search(line.split("=", 1)[1].split("(")[0]), line
    gathers = [l for l in hlo.splitlines() if "all-gather(" in l and head_shape.search(l)]
    assert gathers, "no all-gather of the head found"
    print("per-device tiles == single device == formula")
    """
)


def test_per_device_tiles_under_a_mesh_match_single_device_and_formula():
    # Under jax.set_mesh (as the trainer traces its step) each device tiles the rows it holds.
    assert "per-device tiles == single device == formula" in run_on_cpu_devices(_PER_DEVICE_SCRIPT)


def test_only_tiles_holding_weighted_rows_touch_the_vocabulary():
    """Weighted rows are gathered to the front before tiling and the tiles past them are skipped
    at run time: 5 weighted rows of 40 in tiles of 8 run one tile, not five; outputs return to
    their rows, and the loss equals the formula."""
    calls = []

    def fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x * 2.0

    x = jnp.arange(40.0)[:, None] + jnp.zeros((40, 3))
    active = jnp.zeros(40, bool).at[jnp.asarray([3, 9, 17, 30, 39])].set(True)
    out = jax.jit(lambda x, a: losses._map_row_tiles(fn, (x,), 8, a))(x, active)
    jax.effects_barrier()
    assert len(calls) == 1
    rows = np.asarray(active)
    np.testing.assert_array_equal(np.asarray(out)[rows], 2 * np.asarray(x)[rows])

    calls.clear()  # every row weighted: every tile runs
    jax.jit(lambda x, a: losses._map_row_tiles(fn, (x,), 8, a))(x, jnp.ones(40, bool))
    jax.effects_barrier()
    assert len(calls) == 5

    # Weighted rows scattered over the batch, tiles of 4: value and gradient as the formula's.
    s, t, w_head, weights = _inputs(40, zero_rows=tuple(i for i in range(40) if i % 7))
    value, g_s = jax.jit(
        jax.value_and_grad(lambda a: losses.kd_kl(a, t, w_head, weights, tile_rows=4))
    )(s)
    _close(value, np_kd_kl(s, t, w_head, weights, 2.0), 1e-5)
    _close(g_s, jax.grad(ref_kd_kl)(s, t, w_head, weights, 2.0), 1e-5)
