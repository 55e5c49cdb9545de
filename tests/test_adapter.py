"""The CFormer (blspkd_jax/adapter.py) against an explicit composition of its parts: Whisper layers
applied one by one, the float64 CIF frame loop of test_cif, and NumPy projections and RMSNorm."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cif import reference_cif

from blspkd_jax.models.adapter import CFormer, CFormerConfig
from blspkd_jax.models.cif import quantity_loss
from blspkd_jax.models.encoder import WhisperLayer
from blspkd_jax.models.layers import stack_layers
from blspkd_jax.models.sharding import logical_to_spec

B, T, D, N, H = 3, 12, 16, 8, 24
TARGET = np.array([5, 3, 0], np.int32)


def _config(**kw):
    base = dict(d_model=D, num_heads=2, ffn_dim=32, n_pre=2, n_post=2, llm_hidden=H, max_tokens=N)
    return CFormerConfig(**{**base, **kw})


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    mask = np.arange(T)[None, :] < np.array([12, 7, 9])[:, None]
    return h, mask


@functools.cache
def _compiled(config):
    """Jitted init and apply, one pair per config (compiling once keeps the tests fast)."""
    model = CFormer(config)
    init = jax.jit(lambda h, m, t: model.init(jax.random.key(0), h, m, t)["params"])
    return init, jax.jit(lambda p, h, m, t: model.apply({"params": p}, h, m, t))


def _init(config, h, mask, target=TARGET):
    return _compiled(config)[0](h, mask, jnp.asarray(target))


def _apply(config, params, h, mask, target):
    tgt = None if target is None else jnp.asarray(target)
    return _compiled(config)[1](params, h, mask, tgt)


@functools.cache
def _layer_fn(config):
    layer = WhisperLayer(config.d_model, config.num_heads, config.ffn_dim)
    return jax.jit(lambda lp, x, m: layer.apply({"params": lp}, x, m))


def reference_cformer(config, params, h, mask, target):
    p = nn.unbox(params)
    run = _layer_fn(config)
    x = jnp.asarray(h)
    for i in range(config.n_pre):
        x = run(p["pre_layers"][f"layers_{i}"], x, mask)
    x = np.asarray(x, np.float64)
    alphas = np.where(mask, 1.0 / (1.0 + np.exp(-x[..., -1])), 0.0)
    tokens, token_mask, _ = reference_cif(x[..., :-1], alphas, mask, config.max_tokens, target)
    y = tokens @ np.asarray(p["cif_proj"]["kernel"], np.float64) + np.asarray(p["cif_proj"]["bias"])
    y = jnp.asarray(y, jnp.float32)
    for i in range(config.n_post):
        y = run(p["post_layers"][f"layers_{i}"], y, token_mask)
    y = np.asarray(y, np.float64)
    if config.out_norm:
        rms = np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + config.out_norm_eps)
        y = y / rms * np.asarray(p["out_norm"]["scale"])
    y = y @ np.asarray(p["out_proj"]["kernel"], np.float64) + np.asarray(p["out_proj"]["bias"])
    y = np.where(token_mask[..., None], y, 0.0)
    return y, token_mask, alphas


@pytest.mark.parametrize(("mode", "out_norm"), [("train", True), ("infer", False)])
def test_matches_composed_reference(mode, out_norm):
    config = _config(out_norm=out_norm, n_pre=2, n_post=2)
    h, mask = _inputs()
    params = _init(config, h, mask)
    target = TARGET if mode == "train" else None
    tokens, token_mask, aux = _apply(config, params, h, mask, target)
    ref, ref_mask, ref_alphas = reference_cformer(config, params, h, mask, target)
    assert tokens.shape == (B, N, H) and tokens.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(token_mask), ref_mask)
    np.testing.assert_allclose(np.asarray(tokens), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["alphas"]), ref_alphas, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["alpha_sum"]), ref_alphas.sum(-1), rtol=1e-5)
    assert int(aux["overflow"]) == 0
    if mode == "train":
        np.testing.assert_array_equal(np.asarray(token_mask).sum(1), TARGET)
    assert np.abs(np.asarray(tokens)).max() > 0.1


def test_examples_independent_of_each_others_length():
    config = _config(out_norm=True)
    h, mask = _inputs()
    params = _init(config, h, mask)
    tokens, token_mask, aux = _apply(config, params, h, mask, TARGET)
    # Example 1 gets longer, new values and a new target; example 0 must not notice.
    h2, mask2 = h.copy(), mask.copy()
    h2[1] = np.random.default_rng(9).normal(size=(T, D))
    mask2[1, :] = True
    tokens2, _, aux2 = _apply(config, params, h2, mask2, TARGET + np.array([0, 4, 1]))
    np.testing.assert_allclose(np.asarray(tokens2[0]), np.asarray(tokens[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux2["alphas"][0]), np.asarray(aux["alphas"][0]), 1e-6)
    # Example 2 alone, its padding cut off, equals its row of the batch (garbage padding ignored).
    h3 = h.copy()
    h3[2, 9:] = 1e3
    full, _, _ = _apply(config, params, h3, mask, TARGET)
    alone, alone_mask, _ = _apply(config, params, h[2:3, :9], mask[2:3, :9], TARGET[2:3] + 3)
    ref, _, _ = _apply(config, params, h3, mask, TARGET + np.array([0, 0, 3]))
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(ref[2]), atol=1e-5)
    assert int(alone_mask.sum()) == 3 and not np.any(np.asarray(full[2]))  # target 0: no tokens


def test_every_parameter_has_logical_names():
    h, mask = _inputs()
    for scan in (False, True):
        params = _init(_config(out_norm=True, scan_layers=scan), h, mask)
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
            assert len(leaf.names) == leaf.value.ndim
            spec = [a for a in logical_to_spec(leaf.names) if a is not None]
            assert len(spec) == len(set(spec)), leaf.names  # no mesh axis used twice
        if scan:
            assert params["pre_layers"]["layers"]["fc1"]["kernel"].names[0] == "layers"


def test_scan_and_remat_equal_looped():
    h, mask = _inputs(1)
    looped = _config(out_norm=True, n_pre=2, n_post=2)
    params = nn.unbox(_init(looped, h, mask))
    scanned = dict(params)
    for name in ("pre_layers", "post_layers"):
        scanned[name] = stack_layers(params[name], 2)
    out = _apply(looped, params, h, mask, TARGET)[0]
    scan = _config(out_norm=True, n_pre=2, n_post=2, scan_layers=True, remat="full")
    out_scan = _apply(scan, scanned, h, mask, TARGET)
    np.testing.assert_allclose(np.asarray(out_scan[0]), np.asarray(out), atol=1e-5)


def test_gradients_finite_and_reach_the_firing_channel():
    config = _config(n_pre=2)
    h, mask = _inputs(2)
    mask[2] = False  # an example with no frames at all
    params = nn.unbox(_init(config, h, mask))

    def loss(p, target):
        tokens, _, aux = CFormer(config).apply({"params": p}, h, mask, target)
        return jnp.sum(tokens**2) + quantity_loss(aux["alphas"], mask, target)

    grads = jax.jit(jax.grad(loss))(params, jnp.asarray([5, 3, 2]))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    # The firing logit is the last output channel of the pre-CIF layers.
    g_alpha = np.asarray(grads["pre_layers"]["layers_1"]["fc2"]["kernel"])[:, -1]
    assert np.abs(g_alpha).max() > 0


def test_bfloat16_compute():
    h, mask = _inputs()
    params = _init(_config(), h, mask)  # float32 parameters either way
    config = _config(dtype="bfloat16")
    tokens, token_mask, aux = _apply(config, params, h, mask, TARGET)
    assert tokens.dtype == jnp.bfloat16 and aux["alphas"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(tokens, np.float32)))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="num_heads"):
        _config(num_heads=3)
    with pytest.raises(ValueError, match="cif_method"):
        _config(cif_method="fast")
    with pytest.raises(ValueError, match="remat"):
        _config(remat="sometimes")
    h, mask = _inputs()
    with pytest.raises(ValueError, match="d_model"):
        CFormer(_config()).init(jax.random.key(0), h[..., :8], mask)
