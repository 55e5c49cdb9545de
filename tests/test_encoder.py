"""The Whisper encoder against transformers' WhisperEncoder, and its checkpoint round trip."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper import modeling_whisper

from blspkd_jax.models import encoder, hf, layers
from blspkd_jax.models.layers import Stack, unstack_layers

HFEncoder = modeling_whisper.WhisperEncoder
POSITIONS = 32  # tiny max_source_positions: 64 mel frames in 30 s mode


def _hf_config(n_mels, positions=POSITIONS):
    return WhisperConfig(
        num_mel_bins=n_mels,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        max_source_positions=positions,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        vocab_size=64,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


def _randomise(model, seed):
    # Perturb every tensor (LayerNorm scales, biases, positions) so a swapped or dropped one shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _saved(tmp_path_factory, n_mels):
    model = _randomise(HFEncoder(_hf_config(n_mels)), seed=n_mels)
    path = tmp_path_factory.mktemp(f"whisper{n_mels}")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def hf80(tmp_path_factory):
    """(directory of a saved random 80-mel HF WhisperEncoder, the torch model)."""
    return _saved(tmp_path_factory, 80)


@pytest.fixture(scope="module", params=[80, 128])
def hf_dir(request, hf80, tmp_path_factory):
    """The 80-mel encoder and a 128-mel one (large-v3's input), for the parity tests."""
    return hf80 if request.param == 80 else _saved(tmp_path_factory, 128)


def _torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x))).last_hidden_state.numpy()


def _mels(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_pad_to_30s_matches_transformers(hf_dir):
    path, model = hf_dir
    module, params = hf.load_whisper_encoder(path)
    assert module.config.pad_to_30s and module.config.max_source_positions == POSITIONS
    x = _mels((2, model.config.num_mel_bins, 2 * POSITIONS))
    ours = np.asarray(module.apply({"params": params}, x))
    ref = _torch(model, x)
    assert ours.shape == ref.shape == (2, POSITIONS, 32)
    assert np.abs(ours - ref).max() <= 1e-4
    # The faithful mode attends over everything, as Whisper does: a feature mask changes nothing.
    mask = np.arange(2 * POSITIONS)[None, :] < np.array([[2 * POSITIONS], [20]])
    masked = np.asarray(module.apply({"params": params}, x, feature_mask=mask))
    np.testing.assert_array_equal(masked, ours)
    with pytest.raises(ValueError, match=f"exactly {2 * POSITIONS} frames"):
        module.apply({"params": params}, x[:, :, :40])


def test_variable_length_matches_transformers_on_short_input(hf_dir):
    # transformers' encoder only takes 2 * max_source_positions frames; a copy with a shorter
    # position table (the first rows of ours) is the reference for an unpadded short input.
    path, model = hf_dir
    short = 9
    ref_model = HFEncoder(_hf_config(model.config.num_mel_bins, positions=short)).eval()
    sd = dict(model.state_dict())
    sd["embed_positions.weight"] = sd["embed_positions.weight"][:short]
    ref_model.load_state_dict(sd)
    module, params = hf.load_whisper_encoder(path, pad_to_30s=False)
    x = _mels((2, model.config.num_mel_bins, 2 * short), seed=1)
    ours = np.asarray(module.apply({"params": params}, x))
    assert ours.shape == (2, short, 32)
    assert np.abs(ours - _torch(ref_model, x)).max() <= 1e-4


def test_padded_batch_equals_each_example_alone(hf80):
    path, model = hf80
    module, params = hf.load_whisper_encoder(path, pad_to_30s=False)
    n_mels, frames = model.config.num_mel_bins, 50
    lengths = [50, 37, 1, 0]  # 0: a batch-filler row with no audio at all
    x = _mels((len(lengths), n_mels, frames), seed=2)
    mask = np.arange(frames)[None, :] < np.asarray(lengths)[:, None]
    # Garbage in the padding must not leak into valid frames.
    x = np.where(mask[:, None, :], x, 1e3 * _mels(x.shape, seed=3))
    apply = jax.jit(module.apply)
    out = np.asarray(apply({"params": params}, x, feature_mask=mask))
    assert np.isfinite(out).all()
    enc_mask = np.asarray(encoder.encoder_frame_mask(mask))
    np.testing.assert_array_equal(enc_mask.sum(1), [(n + 1) // 2 for n in lengths])
    np.testing.assert_array_equal(enc_mask.sum(1), encoder.encoder_lengths(np.asarray(lengths)))
    for i, n in enumerate(lengths[:-1]):
        alone = np.asarray(apply({"params": params}, x[i : i + 1, :, :n]))
        assert alone.shape == (1, (n + 1) // 2, 32)
        assert np.abs(out[i, : alone.shape[1]] - alone[0]).max() <= 1e-5, n


def test_scan_and_remat_change_nothing(hf80):
    path, model = hf80
    x = _mels((1, model.config.num_mel_bins, 2 * POSITIONS), seed=4)
    ref_module, ref_params = hf.load_whisper_encoder(path)
    ref_loss = lambda p, x: jnp.sum(ref_module.apply({"params": p}, x) ** 2)
    ref_val, ref_grad = jax.jit(jax.value_and_grad(ref_loss))(ref_params, x)
    for scan, remat in [(True, "full"), (False, "dots")]:
        module, params = hf.load_whisper_encoder(path, scan_layers=scan, remat=remat)
        assert ("layers" in params["layers"]) == scan
        loss = lambda p, x, m=module: jnp.sum(m.apply({"params": p}, x) ** 2)
        val, grad = jax.jit(jax.value_and_grad(loss))(params, x)
        np.testing.assert_allclose(val, ref_val, rtol=1e-6)
        if scan:
            grad = dict(grad, layers=unstack_layers(grad["layers"], 2))
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grad, ref_grad
        )


def test_bf16_close_to_fp32(hf80):
    path, model = hf80
    x = _mels((2, model.config.num_mel_bins, 2 * POSITIONS), seed=5)
    m32, p32 = hf.load_whisper_encoder(path)
    m16, p16 = hf.load_whisper_encoder(path, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(p16))
    out16 = m16.apply({"params": p16}, x)
    assert out16.dtype == jnp.bfloat16
    ref = np.asarray(m32.apply({"params": p32}, x))
    err = np.abs(np.asarray(out16, np.float32) - ref)
    # Measured here: max 0.036, mean 0.005 on outputs of scale ~1 (after the final LayerNorm);
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.004). Bounds leave a ~3x margin.
    assert err.max() <= 0.1 and err.mean() <= 0.015, (err.max(), err.mean())


@pytest.mark.parametrize("scan", [False, True])
def test_save_round_trip_loads_in_transformers(hf80, tmp_path, scan):
    path, model = hf80
    module, params = hf.load_whisper_encoder(path, scan_layers=scan)
    hf.save_whisper_encoder(tmp_path, module.config, params)
    back, info = HFEncoder.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    x = _mels((1, model.config.num_mel_bins, 2 * POSITIONS), seed=6)
    np.testing.assert_allclose(_torch(back.eval(), x), _torch(model, x), rtol=0, atol=1e-6)
    module2, params2 = hf.load_whisper_encoder(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params2, hf.load_whisper_encoder(path)[1])


def test_bf16_round_trip_keeps_dtype(hf80, tmp_path):
    path, model = hf80
    module, params = hf.load_whisper_encoder(path, dtype=jnp.bfloat16)
    hf.save_whisper_encoder(tmp_path, module.config, params)
    back = HFEncoder.from_pretrained(tmp_path)
    assert back.conv1.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        back.conv1.weight, model.conv1.weight.to(torch.bfloat16), rtol=0, atol=0
    )


@pytest.mark.parametrize("cls", [WhisperModel, WhisperForConditionalGeneration])
def test_loads_full_whisper_checkpoints(hf80, tmp_path, cls):
    path, model = hf80
    full = cls(model.config)
    full_encoder = full.encoder if cls is WhisperModel else full.model.encoder
    full_encoder.load_state_dict(model.state_dict())
    full.save_pretrained(tmp_path)
    _, params = hf.load_whisper_encoder(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, hf.load_whisper_encoder(path)[1])


def test_checkpoint_errors(hf80):
    path, model = hf80
    config = encoder.WhisperEncoderConfig.from_hf(hf.read_config(path))
    sd = hf.read_state_dict(path)
    with pytest.raises(KeyError, match="no Whisper encoder weights"):
        encoder.params_from_hf(config, {"decoder.x": sd["conv1.bias"]})
    with pytest.raises(KeyError, match=r"layers\.1\.fc1\.weight"):
        encoder.params_from_hf(config, {k: v for k, v in sd.items() if k != "layers.1.fc1.weight"})
    with pytest.raises(ValueError, match="encoder_layers=1"):
        encoder.params_from_hf(dataclasses.replace(config, encoder_layers=1), sd)
    with pytest.raises(ValueError, match=r"fc1\.weight' has shape.*check config.json"):
        encoder.params_from_hf(dataclasses.replace(config, encoder_ffn_dim=48), sd)
    with pytest.raises(ValueError, match="activation_function"):
        encoder.WhisperEncoderConfig.from_hf(
            {**model.config.to_dict(), "activation_function": "relu"}
        )
    with pytest.raises(ValueError, match="missing key 'd_model'"):
        encoder.WhisperEncoderConfig.from_hf({"model_type": "whisper", "num_mel_bins": 80})


def test_config_round_trip_and_dtype_strings():
    c = encoder.WhisperEncoderConfig(num_mel_bins=128, d_model=64, dtype="bfloat16")
    assert c.dtype == jnp.bfloat16 and hash(c)
    back = encoder.WhisperEncoderConfig.from_hf(c.to_hf(), dtype="bfloat16")
    assert back == c
    hf_cfg = WhisperConfig(**c.to_hf())
    assert hf_cfg.num_mel_bins == 128 and hf_cfg.d_model == 64


def test_random_init_positions_and_logical_names():
    config = encoder.WhisperEncoderConfig(
        num_mel_bins=80, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        encoder_ffn_dim=32, max_source_positions=8, scan_layers=True,
    )  # fmt: skip
    init = jax.jit(encoder.WhisperEncoder(config).init)
    variables = init(jax.random.key(0), jnp.zeros((1, 80, 16)))
    boxed = variables["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    for v in leaves:
        assert len(v.names) == v.value.ndim, v.names
    pos = nn.unbox(boxed)["embed_positions"]
    np.testing.assert_allclose(pos, modeling_whisper.sinusoids(8, 16).numpy(), atol=1e-6)
    assert boxed["layers"]["layers"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")


def test_whisper_layer_masked_rows_stay_finite():
    # The adapter's contract: Stack(WhisperLayer, ...)(x, mask), an all-padding row gives no NaN.
    stack = Stack(encoder.WhisperLayer, dict(d_model=16, num_heads=4, ffn_dim=32), 2, scan=True)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    mask = jnp.array([[True, True, True, False, False], [False] * 5])
    params = jax.jit(stack.init)(jax.random.key(1), x, mask)
    apply = jax.jit(stack.apply)
    out = apply(params, x, mask)
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())
    # Valid rows ignore padded keys: changing the padding leaves them unchanged.
    out2 = apply(params, x.at[0, 3:].set(100.0), mask)
    np.testing.assert_allclose(out2[0, :3], out[0, :3], atol=1e-6)


def test_blocked_attention_matches_transformers(hf80, monkeypatch):
    # Queries in blocks of 7 over 32 frames (the last block padded), with and without a mask.
    path, model = hf80
    monkeypatch.setattr(layers, "ATTENTION_QUERY_BLOCK", 7)
    monkeypatch.setattr(layers, "ATTENTION_BLOCKED_ABOVE", 0)
    module, params = hf.load_whisper_encoder(path, pad_to_30s=False)
    x = _mels((2, 80, 2 * POSITIONS), seed=5)
    apply = jax.jit(module.apply)
    ours = np.asarray(apply({"params": params}, x))
    assert np.abs(ours - _torch(model, x)).max() <= 1e-4
    mask = np.arange(2 * POSITIONS)[None, :] < np.array([[2 * POSITIONS], [40]])
    padded = np.asarray(apply({"params": params}, x, feature_mask=mask))
    np.testing.assert_allclose(padded[0], ours[0], atol=1e-5)
    alone = np.asarray(apply({"params": params}, x[1:, :, :40]))
    np.testing.assert_allclose(padded[1, :20], alone[0], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_and_its_derivative_match_float64(dtype):
    # The exact GELU x * Phi(x) and its written-out derivative Phi(x) + x * phi(x), against the
    # formulas in float64 (math.erf), over the range where erf saturates and where it does not.
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30]])
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)  # representable
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
    value, slope = x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    xj = jnp.asarray(x, dtype)
    y, dy = jax.jvp(encoder.gelu, (xj,), (jnp.ones_like(xj),))
    grad = jax.vmap(jax.grad(lambda a: encoder.gelu(a).astype(jnp.float32)))(xj)
    assert y.dtype == dy.dtype == grad.dtype == jnp.dtype(dtype)
    tol = 1e-6 if dtype == "float32" else 8e-3  # bf16: the result rounded once
    for ours, ref in ((y, value), (dy, slope), (grad, slope)):
        err = np.abs(np.asarray(ours.astype(jnp.float32), np.float64) - ref)
        assert (err <= tol * np.maximum(1.0, np.abs(ref))).all(), err.max()
    # torch's exact GELU (what the exported model runs) agrees to float32 rounding.
    tx = torch.tensor(x, dtype=torch.float32)
    if dtype == "float32":
        np.testing.assert_allclose(y, torch.nn.functional.gelu(tx).numpy(), rtol=1e-6, atol=1e-6)
