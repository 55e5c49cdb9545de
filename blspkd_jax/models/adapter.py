"""The CFormer adapter (docs/method.md §2): Whisper encoder output `[B, T, D]` -> speech tokens
`[B, N, H]` in the LLM's embedding width, exactly one per transcript token, cut by CIF."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blspkd_jax.models.cif import FIRING, METHODS, cif
from blspkd_jax.models.encoder import WhisperLayer, chunk_causal
from blspkd_jax.models.layers import REMAT_POLICIES, RMSNorm, Stack, dense


@dataclasses.dataclass(frozen=True)
class CFormerConfig:
    """Sizes and switches of the CFormer (defaults: a Whisper-large encoder, Qwen2.5-7B width).

    `d_model` is the encoder width D (the CFormer keeps it); `llm_hidden` is H; `max_tokens` is
    the static number N of token slots CIF fills (ask for at least the longest transcript).
    `firing` is CIF's rule at inference (`cif.FIRING`; training always has the target lengths).
    `chunk_frames > 0` (set with the encoder's, `model.encoder.chunk_frames`) makes the pre-CIF
    layers chunk-causal over the frames and the post-CIF layers causal over the tokens: a token,
    once fired, never changes (streaming, `CFormerStream`).
    """

    d_model: int = 1280
    num_heads: int = 20
    ffn_dim: int = 5120
    n_pre: int = 4
    n_post: int = 4
    llm_hidden: int = 3584
    max_tokens: int = 256
    out_norm: bool = False  # Ultravox's RMSNorm before out_proj
    out_norm_eps: float = 1e-6
    cif_method: str = "parallel"
    firing: str = "rescale"
    chunk_frames: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        # Accept "bfloat16" etc. from config files; store a hashable numpy dtype.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        where = "CFormerConfig (model.adapter)"
        if self.d_model < 2:
            raise ValueError(f"{where}: d_model {self.d_model} must be >= 2 (D-1 values + 1 alpha)")
        if self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(
                f"{where}: d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )
        if self.n_pre < 0 or self.n_post < 0:
            raise ValueError(f"{where}: n_pre {self.n_pre} and n_post {self.n_post} must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens {self.max_tokens} must be >= 1")
        if self.cif_method not in METHODS:
            raise ValueError(f"{where}: cif_method {self.cif_method!r} not one of {METHODS}")
        if self.firing not in FIRING:
            raise ValueError(f"{where}: firing {self.firing!r} not one of {FIRING}")
        if self.chunk_frames < 0:
            raise ValueError(f"{where}: chunk_frames {self.chunk_frames} must be >= 0")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"{where}: remat {self.remat!r} not one of {list(REMAT_POLICIES)}")


class CFormer(nn.Module):
    """`h [B, T, D]`, `frame_mask [B, T]` (True = valid; None = all), `target_lengths [B]`
    (training; None = inference) -> `(tokens [B, N, H], token_mask [B, N], aux)`.

    1. `n_pre` Whisper layers over the frames, padding masked (the authors attend over it);
    2. `alpha = sigmoid(h[..., -1]) * frame_mask`; CIF integrates the other D-1 channels into
       `[B, N, D-1]` (N = max_tokens; training: exactly `target_lengths` valid tokens);
    3. `cif_proj` Linear(D-1 -> D); 4. `n_post` Whisper layers over the tokens, padding masked;
    5. optional RMSNorm; `out_proj` Linear(D -> H). Padded token slots are zero.

    aux: "alphas" [B, T] (unscaled, 0 on padding; the quantity loss reads them), "alpha_sum" [B]
    (the predicted length), "overflow" (int32 scalar: examples with more tokens than N, clipped to
    N). The CFormer has no dropout; `deterministic` is accepted so
    that every module of the model takes the same call.
    """

    config: CFormerConfig

    @nn.compact
    def __call__(self, h, frame_mask=None, target_lengths=None, deterministic: bool = True):
        del deterministic
        c = self.config
        dt, pdt = c.dtype, c.param_dtype
        batch, frames, width = h.shape
        if width != c.d_model:
            raise ValueError(
                f"CFormer: encoder output width {width} != model.adapter d_model {c.d_model} "
                "(the adapter must match the encoder's d_model)"
            )
        if frame_mask is None:
            frame_mask = jnp.ones((batch, frames), bool)
        frame_mask = jnp.asarray(frame_mask).astype(bool)
        layer = dict(
            d_model=width, num_heads=c.num_heads, ffn_dim=c.ffn_dim, dtype=dt, param_dtype=pdt
        )

        def stack(n, name):
            return Stack(WhisperLayer, layer, n, scan=c.scan_layers, remat=c.remat, name=name)

        x = nn.with_logical_constraint(h.astype(dt), ("act_batch", "act_len", "act_embed"))
        pre_mask = frame_mask
        if c.chunk_frames:
            pre_mask = chunk_causal(frames, c.chunk_frames)[None] & frame_mask[:, None, :]
        if c.n_pre:
            x = stack(c.n_pre, "pre_layers")(x, pre_mask)
        # The last channel is the firing logit; the sigmoid in float32 keeps small alphas exact.
        alphas = jnp.where(frame_mask, jax.nn.sigmoid(x[..., -1].astype(jnp.float32)), 0.0)
        tokens, token_mask, overflow = cif(
            x[..., :-1],
            alphas,
            frame_mask,
            max_tokens=c.max_tokens,
            target_lengths=target_lengths,
            method=c.cif_method,
            firing=c.firing,
            return_overflow=True,
        )
        post_mask = token_mask
        if c.chunk_frames:  # causal over the tokens: token k sees tokens 0..k
            causal = jnp.tril(jnp.ones((c.max_tokens, c.max_tokens), bool))
            post_mask = causal[None] & token_mask[:, None, :]
        # The CIF input has D-1 channels (odd for every Whisper size): not split over devices.
        y = dense(width, (None, "embed"), dt, pdt, "cif_proj")(tokens)
        y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_embed"))
        if c.n_post:
            y = stack(c.n_post, "post_layers")(y, post_mask)
        if c.out_norm:
            y = RMSNorm(c.out_norm_eps, dt, pdt, name="out_norm")(y)
        y = dense(c.llm_hidden, ("mlp", "embed"), dt, pdt, "out_proj")(y)
        y = jnp.where(token_mask[..., None], y, 0).astype(dt)
        y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_embed"))
        aux = {"alphas": alphas, "alpha_sum": alphas.sum(-1), "overflow": overflow}
        return y, token_mask, aux


class CFormerStream(nn.Module):
    """The chunk-causal CFormer (`chunk_frames > 0`) piece by piece, from its parameters (the same
    tree), for streaming; CIF itself runs between the two parts (`cif.StreamingCIF`).

    `part="frames"`: a chunk of encoder frames `h [B, K, D]`, `valid [B, K]`, `past` per pre-CIF
    layer `(keys, values)` `[n_pre, B, S, heads, Dh]`, `past_valid [B, S]` ->
    `(values [B, K, D-1], alphas [B, K] float32 (0 where not valid), new (keys, values))`.
    `part="tokens"`: fired CIF vectors `[B, M, D-1]` (each sees the earlier ones and itself),
    `past` per post-CIF layer over the earlier tokens -> `(speech tokens [B, M, H], new kv)`.
    With no layers in a part, its kv is None.
    """

    config: CFormerConfig

    @nn.compact
    def __call__(self, part: str, x, valid, past, past_valid):
        c = self.config
        dt, pdt = c.dtype, c.param_dtype
        layer = dict(
            d_model=c.d_model, num_heads=c.num_heads, ffn_dim=c.ffn_dim, dtype=dt, param_dtype=pdt
        )

        def stack(n, name, x, mask):
            if not n:
                return x, None
            inputs = (*past, jnp.broadcast_to(past_valid, (n, *past_valid.shape)))
            return Stack(WhisperLayer, layer, n, scan=c.scan_layers, name=name)(
                x, mask, layer_inputs=inputs
            )

        x = x.astype(dt)
        if part == "frames":
            x, kv = stack(c.n_pre, "pre_layers", x, valid)
            alphas = jnp.where(valid, jax.nn.sigmoid(x[..., -1].astype(jnp.float32)), 0.0)
            return x[..., :-1], alphas, kv
        M = x.shape[1]
        y = dense(c.d_model, (None, "embed"), dt, pdt, "cif_proj")(x)
        y, kv = stack(c.n_post, "post_layers", y, jnp.tril(jnp.ones((1, M, M), bool)))
        if c.out_norm:
            y = RMSNorm(c.out_norm_eps, dt, pdt, name="out_norm")(y)
        return dense(c.llm_hidden, ("mlp", "embed"), dt, pdt, "out_proj")(y), kv
