"""The Whisper speech encoder (log-mel -> [B, T/2, D]) in Flax, and its mapping to and from
Hugging Face Whisper checkpoints. `WhisperLayer` is also the CFormer adapter's building block."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax.models import lazy
from blspkd_jax.models.layers import (
    LAYOUT,
    Stack,
    attention,
    dense,
    tree_get,
    tree_set,
    unstack_layers,
)

# Whisper's LayerNorms are torch.nn.LayerNorm with its default eps.
LN_EPS = 1e-5


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


def _layer_norm(dtype, param_dtype, name):
    # use_fast_variance=False: E[(x - mean)^2] as torch computes it, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_init(nn.initializers.ones_init(), ("norm",)),
        bias_init=_init(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


@jax.custom_jvp
def gelu(x):
    """Whisper's exact GELU, `x * Phi(x)` with `Phi(x) = (1 + erf(x / sqrt 2)) / 2` (torch's
    formula), evaluated in float32 whatever x's dtype.

    Why not jax.nn.gelu(approximate=False): it goes through erfc, which XLA:CPU evaluates about
    twice as slowly as erf, and its autodiff derivative recomputes the erf's pieces; this one's
    derivative is written out, `Phi(x) + x * phi(x)` (`phi` the standard normal density)."""
    x32 = x.astype(jnp.float32)
    return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _normal_cdf(x):
    return 0.5 + 0.5 * jax.lax.erf(x * np.float32(math.sqrt(0.5)))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    x32 = x.astype(jnp.float32)
    cdf = _normal_cdf(x32)
    slope = cdf + x32 * np.float32(1 / math.sqrt(2 * math.pi)) * jnp.exp(-0.5 * x32 * x32)
    return (x32 * cdf).astype(x.dtype), (slope * dx.astype(jnp.float32)).astype(dx.dtype)


def attention_mask(mask):
    """A mask as `attention` takes it: `[B, S]` key validity -> `[B, 1, 1, S]`; `[B, T, S]`
    (query may see key) -> `[B, 1, T, S]`; None stays None."""
    if mask is None:
        return None
    mask = jnp.asarray(mask).astype(bool)
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


def chunk_causal(length: int, chunk_frames: int) -> jax.Array:
    """`[length, length]` bool: frame i may see frame j when j's chunk of `chunk_frames` frames
    is not later than i's (full attention inside a chunk and to every earlier chunk)."""
    chunk = jnp.arange(length) // chunk_frames
    return chunk[None, :] <= chunk[:, None]


class WhisperAttention(nn.Module):
    """Multi-head self-attention: `mask` `[B, T]` (True = valid key) or `[B, T, S]` (query may
    see key; chunk-causal encoders), or None.

    With `past = (keys, values, valid)` (`[B, S, heads, Dh]` twice and `[B, S]`: earlier frames'
    keys and values, as a stream carries them) the T new frames also attend to those S; `mask`
    then covers the new frames only, and the new keys and values are returned as well:
    `(out, (k [B, T, heads, Dh], v))`.
    """

    d_model: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, past=None):
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads} "
                "(encoder_attention_heads)"
            )
        B, T, _ = x.shape
        hd = self.d_model // self.num_heads
        proj = lambda name, bias=True: dense(
            self.d_model, ("embed", "heads"), self.dtype, self.param_dtype, name, bias
        )
        # Whisper scales q once, before the product (and the key projection has no bias).
        q = proj("q_proj")(x) * jnp.asarray(hd**-0.5, self.dtype)
        k = proj("k_proj", bias=False)(x)
        v = proj("v_proj")(x)
        q, k, v = (a.reshape(B, T, self.num_heads, hd) for a in (q, k, v))
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
        k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_heads", None))
        v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_heads", None))
        # Scores and softmax in float32 whatever the compute dtype; q is already scaled. A row
        # with no valid key (a fully padded example) gets a finite mean of v, never NaN.
        key_mask = attention_mask(mask)
        keys, values = k, v
        if past is not None:
            pk, pv, valid = past
            keys = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
            own = jnp.ones((B, 1, T, T), bool) if key_mask is None else key_mask
            seen = jnp.broadcast_to(attention_mask(valid), (B, 1, T, valid.shape[1]))
            key_mask = jnp.concatenate([seen, jnp.broadcast_to(own, (B, 1, T, T))], axis=-1)
        o = attention(q, keys, values, key_mask, scale=1.0).reshape(B, T, self.d_model)
        o = dense(self.d_model, ("heads", "embed"), self.dtype, self.param_dtype, "out_proj")(o)
        return o if past is None else (o, (k, v))


class WhisperLayer(nn.Module):
    """One Whisper encoder layer: pre-LN self-attention, then pre-LN GELU MLP, both residual.

    `x [B, T, D]`, `mask` `[B, T]` (True = valid) or `[B, T, S]` or None -> `[B, T, D]`. Padded
    rows are computed (finite) but meaningless; callers mask them downstream. With `past` (see
    `WhisperAttention`) it returns `(x, (k, v))`, this layer's new keys and values.
    """

    d_model: int
    num_heads: int
    ffn_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, past=None):
        dt, pdt = self.dtype, self.param_dtype
        h = _layer_norm(dt, pdt, "self_attn_layer_norm")(x)
        h = WhisperAttention(self.d_model, self.num_heads, dt, pdt, name="self_attn")(h, mask, past)
        h, kv = h if past is not None else (h, None)
        x = x + h
        h = _layer_norm(dt, pdt, "final_layer_norm")(x)
        h = gelu(dense(self.ffn_dim, ("embed", "mlp"), dt, pdt, "fc1")(h))
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        h = dense(self.d_model, ("mlp", "embed"), dt, pdt, "fc2")(h)
        x = x + h
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        return x if kv is None else (x, kv)


# ----------------------------------------------------------------------------------------------
# The encoder.


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """Sizes and switches of a Whisper encoder (field names follow Hugging Face's WhisperConfig).

    `pad_to_30s=True` is the checkpoint-faithful mode: the input must be exactly
    `2 * max_source_positions` mel frames (what WhisperFeatureExtractor returns) and every frame is
    attended. `pad_to_30s=False` accepts any length up to that, slices the position table to the
    input and masks padding frames given by `feature_mask`.
    """

    num_mel_bins: int = 80
    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    max_source_positions: int = 1500
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    pad_to_30s: bool = True
    chunk_frames: int = 0

    def __post_init__(self):
        # Accept "bfloat16" etc. from config files; store a hashable numpy dtype.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.chunk_frames < 0:
            raise ValueError(
                f"model.encoder.chunk_frames must be >= 0 (0 = full attention), got "
                f"{self.chunk_frames}"
            )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides) -> WhisperEncoderConfig:
        """From a Hugging Face Whisper config.json dict; `overrides` set any field."""
        if hf_config.get("model_type", "whisper") != "whisper":
            raise ValueError(
                f"config.json: model_type is {hf_config.get('model_type')!r}, expected 'whisper'"
            )
        act = hf_config.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(
                f"config.json: activation_function {act!r} unsupported, expected 'gelu'"
            )
        kw = {}
        for f in HF_CONFIG_KEYS:
            if f in overrides:
                continue
            if f not in hf_config:
                raise ValueError(f"config.json: missing key {f!r} (needed for the Whisper encoder)")
            kw[f] = int(hf_config[f])
        return cls(**kw, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' `WhisperEncoder.from_pretrained` accepts."""
        out = {f: getattr(self, f) for f in HF_CONFIG_KEYS}
        out.update(
            model_type="whisper",
            architectures=["WhisperEncoder"],
            activation_function="gelu",
            dtype=str(self.param_dtype),
            # WhisperConfig shares d_model with the decoder; give it sizes that divide evenly so
            # that any Whisper class can at least be instantiated from this config.
            decoder_attention_heads=self.encoder_attention_heads,
            decoder_ffn_dim=self.encoder_ffn_dim,
        )
        return out


HF_CONFIG_KEYS = (
    "num_mel_bins",
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "max_source_positions",
)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed position table [length, channels]: sines then cosines, geometric periods."""
    if channels % 2:
        raise ValueError(f"d_model {channels} must be even for Whisper's sinusoidal positions")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _sinusoid_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(sinusoids(*shape), dtype)


def encoder_frame_mask(feature_mask):
    """Mel-frame mask `[B, T]` -> encoder-frame mask `[B, ceil(T/2)]` (True = valid).

    Encoder frame j is conv2's output centred on mel frame 2j (stride 2), so it is valid exactly
    when mel frame 2j is; for right-padded masks this gives `ceil(n / 2)` valid frames, as
    Hugging Face's `_get_feat_extract_output_lengths` does.
    """
    return jnp.asarray(feature_mask).astype(bool)[:, ::2]


def encoder_lengths(num_frames):
    """Valid mel-frame counts -> valid encoder-frame counts, `ceil(n / 2)`."""
    return (num_frames + 1) // 2


class WhisperEncoder(nn.Module):
    """log-mel `[B, n_mels, T]` -> `[B, T/2, D]` (T/2 rounded up).

    `feature_mask [B, T]` (True = valid mel frame, None = all valid) is used only when
    `config.pad_to_30s` is False: padding frames are zeroed before each convolution and hidden as
    attention keys, so each example of a padded batch equals that example run alone. Encoder frames
    outside `encoder_frame_mask(feature_mask)` hold finite, meaningless values.
    In `pad_to_30s` mode the encoder attends over every frame, as the checkpoint was trained.

    `chunk_frames > 0` makes self-attention chunk-causal: encoder frame i sees frame j only when
    `j // chunk_frames <= i // chunk_frames` (each chunk attends inside itself and to earlier
    chunks), so a chunk's states never change once its audio (and two mel frames of the next
    chunk, the convolutions' reach) has arrived: what streaming needs (`WhisperEncoderChunk`).
    0 (the default) is Whisper's full attention.
    """

    config: WhisperEncoderConfig

    @nn.compact
    def __call__(self, input_features, feature_mask=None):
        c = self.config
        dt, pdt = c.dtype, c.param_dtype
        batch, n_mels, frames = input_features.shape
        if n_mels != c.num_mel_bins:
            raise ValueError(
                f"input_features has {n_mels} mel bins but num_mel_bins is {c.num_mel_bins} "
                f"(input_features must be [B, n_mels, T])"
            )
        full = 2 * c.max_source_positions
        if c.pad_to_30s and frames != full:
            raise ValueError(
                f"pad_to_30s: input_features must have exactly {full} frames "
                f"(2 * max_source_positions, as WhisperFeatureExtractor pads), got {frames}; "
                "pad the features or set pad_to_30s=False for variable length"
            )
        if frames > full:
            raise ValueError(
                f"input_features has {frames} frames, more than the {full} that "
                f"max_source_positions = {c.max_source_positions} allows"
            )
        fm = None
        if feature_mask is not None and not c.pad_to_30s:
            if feature_mask.shape != (batch, frames):
                raise ValueError(
                    f"feature_mask shape {feature_mask.shape} must be [B, T] = {(batch, frames)}"
                )
            fm = jnp.asarray(feature_mask).astype(bool)[:, :, None]

        x = jnp.swapaxes(input_features.astype(dt), 1, 2)  # [B, T, n_mels]
        if fm is not None:
            x = jnp.where(fm, x, 0)  # the value padding=1 would read alone
        x = gelu(_conv(c, 1, ((1, 1),), "conv1")(x))
        if fm is not None:
            x = jnp.where(fm, x, 0)
        x = gelu(_conv(c, 2, ((1, 1),), "conv2")(x))  # [B, ceil(T/2), D]
        pos = _positions(self, c)
        x = x + pos[: x.shape[1]].astype(dt)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        mask = None if fm is None else encoder_frame_mask(fm[..., 0])
        if c.chunk_frames:
            causal = chunk_causal(x.shape[1], c.chunk_frames)[None]
            mask = causal if mask is None else causal & mask[:, None, :]
        x = _layer_stack(c, c.remat)(x, mask)
        return _layer_norm(dt, pdt, "layer_norm")(x)


def _conv(c: WhisperEncoderConfig, stride: int, padding, name: str) -> nn.Conv:
    return nn.Conv(
        c.d_model,
        kernel_size=(3,),
        strides=(stride,),
        padding=padding,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        kernel_init=_init(nn.initializers.lecun_normal(), ("conv_kernel", "conv_in", "embed")),
        bias_init=_init(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _positions(module: nn.Module, c: WhisperEncoderConfig):
    return module.param(
        "embed_positions",
        nn.with_logical_partitioning(_sinusoid_init, ("pos", "embed")),
        (c.max_source_positions, c.d_model),
        c.param_dtype,
    )


def _layer_stack(c: WhisperEncoderConfig, remat: str) -> Stack:
    layer = dict(
        d_model=c.d_model,
        num_heads=c.encoder_attention_heads,
        ffn_dim=c.encoder_ffn_dim,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    return Stack(WhisperLayer, layer, c.encoder_layers, scan=c.scan_layers, remat=remat,
                 name="layers")  # fmt: skip


def chunk_mel_frames(chunk_frames: int) -> int:
    """Mel frames a chunk of K encoder frames s .. s+K-1 reads: 2s-2 .. 2s+2K (conv2's stride-2
    window over conv1's outputs, each of which reads one mel frame either side)."""
    return 2 * chunk_frames + 3


class WhisperEncoderChunk(nn.Module):
    """K = `chunk_frames` encoder frames of a chunk-causal `WhisperEncoder`, from its parameters
    (the same tree), for streaming: equal to those frames of the whole encoder's output.

    `mel [B, n_mels, 2K + 3]`: mel frames 2s-2 .. 2s+2K (`chunk_mel_frames`), `mel_valid
    [B, 2K + 3]` (False before the audio and past its end: read as zeros, as the convolutions'
    padding and the variable-length encoder's masking do), `start` = s (int32, a multiple of K),
    `past = (keys, values)` `[layers, B, S, heads, Dh]` of the frames before s and `past_valid
    [B, S]` -> `(h [B, K, D], (keys, values) [layers, B, K, heads, Dh])` of these K frames.
    """

    config: WhisperEncoderConfig

    @nn.compact
    def __call__(self, mel, mel_valid, start, past, past_valid):
        c = self.config
        K = c.chunk_frames
        x = jnp.swapaxes(mel.astype(c.dtype), 1, 2)  # [B, 2K + 3, n_mels]
        x = jnp.where(mel_valid[..., None], x, 0)
        x = gelu(_conv(c, 1, "VALID", "conv1")(x))  # mel frames 2s-1 .. 2s+2K-1
        x = jnp.where(mel_valid[:, 1:-1, None], x, 0)
        x = gelu(_conv(c, 2, "VALID", "conv2")(x))  # [B, K, D]: encoder frames s .. s+K-1
        # Padded by K rows: the last chunk may reach past the table (its frames past the end
        # are masked), and dynamic_slice would otherwise clamp its start.
        table = jnp.pad(_positions(self, c), ((0, K), (0, 0)))
        x = x + jax.lax.dynamic_slice_in_dim(table, start, K).astype(c.dtype)
        valid = mel_valid[:, 2:-1:2]  # encoder frame j is valid when mel frame 2j is
        depth = c.encoder_layers
        layer_past = (*past, jnp.broadcast_to(past_valid, (depth, *past_valid.shape)))
        x, kv = _layer_stack(c, "none")(x, valid, layer_inputs=layer_past)
        return _layer_norm(c.dtype, c.param_dtype, "layer_norm")(x), kv


# ----------------------------------------------------------------------------------------------
# Hugging Face names. Each row: (HF name, our path, layout change). "linear": torch [out, in] ->
# kernel [in, out]; "conv": torch [out, in, k] -> kernel [k, in, out]; None: as is.

HF_TOP: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("conv1.weight", ("conv1", "kernel"), "conv"),
    ("conv1.bias", ("conv1", "bias"), None),
    ("conv2.weight", ("conv2", "kernel"), "conv"),
    ("conv2.bias", ("conv2", "bias"), None),
    ("embed_positions.weight", ("embed_positions",), None),
    ("layer_norm.weight", ("layer_norm", "scale"), None),
    ("layer_norm.bias", ("layer_norm", "bias"), None),
)

# Per layer, under "layers.{i}." in HF and ("layers", "layers_{i}") here.
HF_LAYER: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("self_attn_layer_norm.weight", ("self_attn_layer_norm", "scale"), None),
    ("self_attn_layer_norm.bias", ("self_attn_layer_norm", "bias"), None),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "linear"),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), None),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "linear"),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "linear"),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), None),
    ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), "linear"),
    ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), None),
    ("final_layer_norm.weight", ("final_layer_norm", "scale"), None),
    ("final_layer_norm.bias", ("final_layer_norm", "bias"), None),
    ("fc1.weight", ("fc1", "kernel"), "linear"),
    ("fc1.bias", ("fc1", "bias"), None),
    ("fc2.weight", ("fc2", "kernel"), "linear"),
    ("fc2.bias", ("fc2", "bias"), None),
)

# Where the encoder sits in each Hugging Face class's state dict. A bare `WhisperEncoder` saves
# its own names without a prefix; `WhisperModel` (and WhisperForAudioClassification) under
# "encoder."; `WhisperForConditionalGeneration` under "model.encoder.".
HF_PREFIXES = ("model.encoder.", "encoder.", "")

# First components of the encoder's own HF names (to spot tensors the config does not describe).
_OWN = {"conv1", "conv2", "embed_positions", "layers", "layer_norm"}


def _hf_rows(config: WhisperEncoderConfig):
    """(HF name without prefix, our looped path, layout) for every tensor of the encoder."""
    rows = list(HF_TOP)
    for i in range(config.encoder_layers):
        rows += [(f"layers.{i}.{h}", ("layers", f"layers_{i}", *p), t) for h, p, t in HF_LAYER]
    return rows


def _expected_shapes(config: WhisperEncoderConfig):
    looped = dataclasses.replace(config, scan_layers=False, pad_to_30s=False)
    x = jax.ShapeDtypeStruct((1, config.num_mel_bins, 2), jnp.float32)
    shapes = jax.eval_shape(WhisperEncoder(looped).init, jax.random.key(0), x)
    return nn.unbox(shapes["params"])


def params_from_hf(config: WhisperEncoderConfig, state_dict: Mapping[str, Any]) -> dict:
    """Our params from a Hugging Face state dict of WhisperEncoder, WhisperModel or
    WhisperForConditionalGeneration (numpy or torch-converted arrays; other keys are ignored), in
    `config.param_dtype`, whole on the default device (`hf.load_whisper_encoder(..., mesh=)` loads
    straight into a mesh instead)."""
    host = host_params_from_hf(config, state_dict)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), config.param_dtype), host)


def host_params_from_hf(config: WhisperEncoderConfig, state_dict: Mapping[str, Any]) -> dict:
    """`params_from_hf` without reading anything: each leaf the checkpoint's tensor seen through
    our layout and layer stacking (`lazy.py`), in the checkpoint's dtype."""
    prefix = next((p for p in HF_PREFIXES if p + "conv1.weight" in state_dict), None)
    if prefix is None:
        sample = sorted(state_dict)[:5]
        raise KeyError(
            "no Whisper encoder weights in the checkpoint: expected 'conv1.weight' under one of "
            f"the prefixes {list(HF_PREFIXES)}, found keys like {sample}"
        )
    expected = _expected_shapes(config)
    rows = _hf_rows(config)
    missing = [prefix + h for h, _, _ in rows if prefix + h not in state_dict]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} encoder tensors, e.g. {missing[:5]}")
    used = {prefix + h for h, _, _ in rows}
    extra = [
        k
        for k in state_dict
        if k.startswith(prefix) and k not in used and k[len(prefix) :].split(".")[0] in _OWN
    ]
    if extra:
        raise ValueError(
            f"checkpoint has encoder tensors the config does not describe, e.g. "
            f"{sorted(extra)[:5]} (config: encoder_layers={config.encoder_layers}); "
            "check config.json"
        )
    params: dict = {}
    for h, path, layout in rows:
        a = LAYOUT[layout](state_dict[prefix + h])
        want = tree_get(expected, path).shape
        if tuple(a.shape) != want:
            raise ValueError(
                f"checkpoint tensor {prefix + h!r} has shape {a.shape} after conversion but the "
                f"config expects {want}; check config.json"
            )
        tree_set(params, path, a)
    if config.scan_layers:
        params["layers"] = lazy.stack_layers(params["layers"], config.encoder_layers)
    return params


def params_to_hf(config: WhisperEncoderConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (bare WhisperEncoder names, as `WhisperEncoder.save_pretrained`
    writes them) from our params, scanned or looped, boxed or not; dtypes are kept."""
    params = nn.unbox(params)
    params = dict(params)
    if "layers" in params["layers"]:  # scanned: a leading "layers" axis
        params["layers"] = unstack_layers(params["layers"], config.encoder_layers)
    out = {}
    for h, path, layout in _hf_rows(config):
        out[h] = np.ascontiguousarray(LAYOUT[layout](np.asarray(tree_get(params, path))))
    return out
