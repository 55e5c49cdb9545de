"""The decoder-only LLM (Llama 3.x, Qwen2/2.5, Qwen3, Mistral) with PLoRA and a KV cache, in Flax
(its config lives in `llm_config.py`, its Hugging Face checkpoint names in `llm_hf.py`).

One module serves every family through config switches: grouped-query attention, QKV/output/MLP
biases, per-head q/k RMSNorm, tied embeddings, RoPE theta and "linear"/"llama3" RoPE scaling. PLoRA
(docs/method.md §2) adds `m * (B A dropout(x)) * alpha / r` to targeted projections, with `m` a
per-position mask; a zero or absent mask leaves the base model's output bit for bit unchanged."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blspkd_jax.models.layers import RMSNorm, Stack, attention, param, row_dot
from blspkd_jax.models.llm_config import LLMConfig

# PEFT's LoRA init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0.
LORA_A_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


# ----------------------------------------------------------------------------------------------
# Building blocks.


def _mix32(h: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons' integer hash search): a bijection of uint32 with full avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def dropout(x: jax.Array, rate: float, rng: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """`x` [..., D] with each element zeroed with probability `rate` (rounded to 1/65536) and the
    others divided by the keep probability, so that the expectation is `x`.

    Own code rather than `nn.Dropout` for speed: on CPU jax lowers threefry as a rolled loop of
    small sequential ops, once per mask, and PLoRA draws one mask per projection and layer (most
    of the step's dropout cost, BENCHMARKS.md run E). Here each element's 16 bits are a counter
    hash, `mix(mix(i ^ k0) + k1)` of its flat index `i = row * D + column` under the key's two
    words: elementwise, so it fuses into one loop, and the mask depends only on the global index:
    the same under any sharding.

    `rows` (`x.shape[:-1]`, integer) numbers each row of `x` in a larger array it was gathered
    from (PLoRA's speech rows, `LoraRows`), so that the gathered rows get that array's mask; by
    default each row's row-major number in `x` itself. The caller keeps `rows * D` below 2**32.
    """
    cut = round(rate * 65536)  # drop where the 16 bits are below `cut`
    if cut == 0:
        return x
    if rows is None:
        if x.size >= 2**32:
            raise ValueError(f"dropout: {x.size} elements; the flat index is 32 bits")
        rows, stride = jnp.zeros(x.shape[:-1], jnp.uint32), 1
        for axis in reversed(range(x.ndim - 1)):  # the row-major row number
            rows = rows + jax.lax.broadcasted_iota(jnp.uint32, rows.shape, axis) * stride
            stride *= x.shape[axis]
    k = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
    column = jax.lax.broadcasted_iota(jnp.uint32, x.shape, x.ndim - 1)
    index = rows.astype(jnp.uint32)[..., None] * jnp.uint32(x.shape[-1]) + column
    keep = (_mix32(_mix32(index ^ k[0]) + k[-1]) >> 16) >= jnp.uint32(cut)
    return jnp.where(keep, x / jnp.asarray(1.0 - cut / 65536, x.dtype), jnp.zeros((), x.dtype))


class LoraRows(NamedTuple):
    """The rows PLoRA's branch runs on, per sequence (`lora_rows` builds it from a mask).

    `index [B, N]` int32: the positions whose mask is non-zero, in order, then L (out of range:
    unused slots, dropped when the branch is added back); `scale [B, N]`: the mask there (0 in
    unused slots). N is a static capacity: BLSP-KD's student has at most the CIF's `max_tokens`
    speech positions in a sequence of L, so its branch costs N rows, not L."""

    index: jax.Array
    scale: jax.Array


def lora_rows(lora_mask: jax.Array, capacity: int | None = None) -> LoraRows:
    """`LoraRows` of `lora_mask [B, L]` with room for `capacity` (default L) non-zero positions
    per sequence. Positions past the capacity-th would get no PLoRA: the bound is the caller's
    promise (the student's: the number of speech vectors CIF emits)."""
    L = lora_mask.shape[1]
    n = min(L, capacity or L)
    index = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=L)[0])(lora_mask != 0)
    index = index.astype(jnp.int32)
    scale = jnp.take_along_axis(lora_mask, index, axis=1, mode="fill", fill_value=0)
    return LoraRows(index, scale)


def rope_inv_freq(config: LLMConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2] in float32, as transformers computes them."""
    f32 = np.float32
    dim = config.head_dim
    inv = f32(1.0) / (f32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    if config.rope_type == "linear":
        inv = inv / f32(config.rope_factor)
    elif config.rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        factor = f32(config.rope_factor)
        lo, hi = f32(config.rope_low_freq_factor), f32(config.rope_high_freq_factor)
        old = f32(config.rope_original_max_position_embeddings or config.max_position_embeddings)
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(f32)


def apply_rope(x, positions, inv_freq):
    """Rotate `x [B, L, heads, Dh]` by `positions [B, L]` (rotate-half layout), in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class Linear(nn.Module):
    """`y = x W + b`, plus PLoRA `m * (dropout(x) A B) * alpha / r` when `lora_rank > 0`.

    Kernel [in, out] with logical names `axes`; LoRA A [in, r] and B [r, out]. LoRA parameters exist
    whenever `lora_rank > 0`; the LoRA branch is computed only when `lora` (`LoraRows`, built
    from a mask `m [B, L]` by `lora_rows`) is given. The branch runs on those rows only
    (gathered, then added back to theirs), and every other position gets exactly `x W + b`.
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    init_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, lora=None, deterministic=True):
        d_in = x.shape[-1]
        kernel = param(
            self,
            "kernel",
            nn.initializers.normal(self.init_range),
            (d_in, self.features),
            self.axes,
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = row_dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            zeros = nn.initializers.zeros_init()
            b = param(self, "bias", zeros, (self.features,), self.axes[1:], self.param_dtype)
            y = y + b.astype(self.dtype)
        if self.lora_rank:
            r, (ax_in, ax_out) = self.lora_rank, self.axes
            a = param(
                self, "lora_a", LORA_A_INIT, (d_in, r), (ax_in, "lora_rank"), self.param_dtype
            )
            zeros = nn.initializers.zeros_init()
            b = param(
                self, "lora_b", zeros, (r, self.features), ("lora_rank", ax_out), self.param_dtype
            )
            if lora is not None:
                gather = jax.vmap(lambda v, i: v.at[i].get(mode="fill", fill_value=0))
                h = gather(x, lora.index)  # [B, N, in]: the rows the branch runs on
                if not deterministic and self.lora_dropout:
                    B, L = x.shape[:2]
                    if B * L * d_in >= 2**32:
                        raise ValueError(f"dropout: {B * L * d_in} elements; the index is 32 bits")
                    # The row numbers of x [B, L]: h gets the mask x itself would get.
                    flat_rows = jnp.arange(B, dtype=jnp.int32)[:, None] * L + lora.index
                    h = dropout(h, self.lora_dropout, self.make_rng("dropout"), flat_rows)
                delta = row_dot(row_dot(h, a.astype(self.dtype)), b.astype(self.dtype))
                m = lora.scale.astype(self.dtype)[..., None] * (self.lora_alpha / self.lora_rank)
                # Unused slots index past the end and are dropped: positions off the mask keep
                # x W + b exactly, even if the branch held an inf there.
                add = jax.vmap(lambda v, i, u: v.at[i].add(u, mode="drop"))
                y = add(y, lora.index, delta * m)
        return y


def _linear(config: LLMConfig, features, axes, target, use_bias, name):
    lora = target in config.lora_targets
    return Linear(
        features,
        axes,
        use_bias=use_bias,
        lora_rank=config.lora_rank if lora else 0,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_range=config.initializer_range,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, optional q/k norm, and a KV cache.

    `x [B, L, H]`, `positions [B, L]`, `mask [B, L, S]` bool (query may see key), `cache_index`
    int32 scalar (first cache slot written by this call; used only when decoding), `lora`
    (`LoraRows`) or None. With `decode=True` the "cache" collection holds keys and values
    `[B, S, K, Dh]`; S is fixed when the cache is created (see `init_cache`).

    `prefix_kv` {"k", "v": [B, P, K, Dh]} (keys after RoPE) are P earlier positions' keys and
    values, attended before this call's own (`mask` is then [B, L, P + L]); `keep_kv = P > 0`
    returns `(output, {"k", "v"})` with this call's first P keys and values, in that form.
    """

    config: LLMConfig
    decode: bool = False
    deterministic: bool = True
    keep_kv: int = 0

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, lora, prefix_kv=None):
        c = self.config
        B, L, _ = x.shape
        N, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        lin = functools.partial(_linear, c)
        call = lambda mod, h: mod(h, lora, self.deterministic)
        q = call(lin(N * Dh, ("embed", "heads"), "q", c.qkv_bias, "q_proj"), x)
        k = call(lin(K * Dh, ("embed", "kv_heads"), "k", c.qkv_bias, "k_proj"), x)
        v = call(lin(K * Dh, ("embed", "kv_heads"), "v", c.qkv_bias, "v_proj"), x)
        q, k, v = q.reshape(B, L, N, Dh), k.reshape(B, L, K, Dh), v.reshape(B, L, K, Dh)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="k_norm")(k)
        inv_freq = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
        k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_kv_heads", None))
        v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_kv_heads", None))

        if self.decode:
            ready = self.has_variable("cache", "cached_key")
            ck = self.variable("cache", "cached_key", jnp.zeros, (B, L, K, Dh), c.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, (B, L, K, Dh), c.dtype)
            if ready:  # otherwise this is the call that creates the cache: plain attention
                start = (0, cache_index, 0, 0)
                ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(c.dtype), start)
                cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(c.dtype), start)
                k, v = ck.value, cv.value

        # Each group of N / K query heads shares one key/value head (jax's GQA layout). A fully
        # masked row (a left-pad query) gets a finite mean of v, never NaN. Outside decoding and
        # without a prefix the mask holds the causal pattern from slot 0, which cuDNN may exploit.
        q, k, v = q.astype(c.dtype), k.astype(c.dtype), v.astype(c.dtype)
        kept = {"k": k[:, : self.keep_kv], "v": v[:, : self.keep_kv]} if self.keep_kv else None
        if prefix_kv is not None:
            k = jnp.concatenate([prefix_kv["k"].astype(c.dtype), k], axis=1)
            v = jnp.concatenate([prefix_kv["v"].astype(c.dtype), v], axis=1)
        causal = not self.decode and prefix_kv is None
        o = attention(q, k, v, mask[:, None], causal=causal)
        o = o.reshape(B, L, N * Dh)
        o = nn.with_logical_constraint(o, ("act_batch", "act_len", "act_heads"))
        o = call(lin(c.hidden_size, ("heads", "embed"), "o", c.o_bias, "o_proj"), o)
        return o if kept is None else (o, kept)


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, `[B, L, H] -> [B, L, H]`."""

    config: LLMConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, lora):
        c = self.config
        lin = functools.partial(_linear, c)
        call = lambda mod, h: mod(h, lora, self.deterministic)
        g = call(lin(c.intermediate_size, ("embed", "mlp"), "gate", c.mlp_bias, "gate_proj"), x)
        u = call(lin(c.intermediate_size, ("embed", "mlp"), "up", c.mlp_bias, "up_proj"), x)
        h = nn.with_logical_constraint(jax.nn.silu(g) * u, ("act_batch", "act_len", "act_mlp"))
        return call(lin(c.hidden_size, ("mlp", "embed"), "down", c.mlp_bias, "down_proj"), h)


class DecoderBlock(nn.Module):
    """Pre-norm attention then pre-norm MLP, both residual. `[B, L, H] -> [B, L, H]` (and the
    attention's kept keys/values with `keep_kv`; `prefix_kv` as in `Attention`)."""

    config: LLMConfig
    decode: bool = False
    deterministic: bool = True
    keep_kv: int = 0

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, lora, prefix_kv=None):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="input_norm")(x)
        h = Attention(c, self.decode, self.deterministic, self.keep_kv, name="attn")(
            h, positions, mask, cache_index, lora, prefix_kv
        )
        h, kept = h if self.keep_kv else (h, None)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="post_attn_norm")(x)
        x = x + MLP(c, self.deterministic, name="mlp")(h, lora)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        return x if kept is None else (x, kept)


class Embedder(nn.Module):
    """Token embedding table [V, H]; `attend` is the tied output head."""

    config: LLMConfig

    def setup(self):
        c = self.config
        self.embedding = param(
            self,
            "embedding",
            nn.initializers.normal(c.initializer_range),
            (c.vocab_size, c.hidden_size),
            ("vocab", "embed"),
            c.param_dtype,
        )

    def __call__(self, input_ids):
        x = jnp.take(self.embedding, input_ids, axis=0).astype(self.config.dtype)
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    def attend(self, x):
        e = self.embedding.astype(self.config.dtype)
        return jnp.einsum("blh,vh->blv", x, e, preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """Untied output head: kernel [H, V]."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        kernel = param(
            self,
            "kernel",
            nn.initializers.normal(c.initializer_range),
            (c.hidden_size, c.vocab_size),
            ("embed", "vocab"),
            c.param_dtype,
        )
        return jnp.einsum(
            "blh,hv->blv", x, kernel.astype(c.dtype), preferred_element_type=jnp.float32
        )


def default_positions(attention_mask, offset=None):
    """`cumsum(mask) - 1` clipped at 0 (transformers' rule for left padding), plus `offset [B]`."""
    pos = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    return pos if offset is None else pos + offset[:, None]


class LLM(nn.Module):
    """The decoder LLM. `apply({"params": p}, input_ids [B, L])` -> logits `[B, L, V]` (float32).

    Call: `(input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
    lora_mask=None, lora_capacity=None, return_hidden=False, deterministic=True, decode=False)`.
    - `attention_mask [B, L]` (1 = token, 0 = padding; left padding for generation).
    - `positions [B, L]` default `cumsum(attention_mask) - 1` clipped at 0 (arange without a mask),
      counted on from the tokens already in the cache when decoding.
    - `lora_mask [B, L]`: PLoRA's per-position switch; None (or zeros) gives the base LLM exactly.
    - `lora_capacity=N`: at most N positions of a sequence have a non-zero `lora_mask` (default
      L). PLoRA's branch runs on N gathered rows per sequence rather than on all L (`LoraRows`);
      a position past the N-th would get none, so N must bound every sequence's count.
    - `return_hidden=True`: the final-norm hidden states `[B, L, H]` instead of logits.
    - `deterministic=False` turns on LoRA dropout (needs the "dropout" rng).
    - `decode=True` with a "cache" collection (`init_cache`, `mutable=["cache"]`): appends this
      call's keys/values at the cache's write index and attends over everything cached so far;
      use it for a (left-padded) prefill and then one token per call.
    - `keep_kv=P`: also return every layer's keys and values of the first P positions,
      `(out, {"k", "v": [layers, B, P, K, Dh]})`.
    - `prefix_kv` (such a dict) with `prefix_mask [B, P]`: this call's tokens follow those P
      positions: they attend to them, and positions count on from `prefix_mask.sum(-1)`. The
      outputs equal the tail of one call over prefix + tokens (BLSP-KD's student reuses the
      teacher's prompt prefix this way: both passes read the same tokens there).
    """

    config: LLMConfig

    def setup(self):
        c = self.config
        self.embed_tokens = Embedder(c)
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c)

    def embed(self, input_ids):
        """Token embeddings `[B, L, H]` in the compute dtype (the teacher's text input)."""
        return self.embed_tokens(input_ids)

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        *,
        inputs_embeds=None,
        attention_mask=None,
        positions=None,
        lora_mask=None,
        lora_capacity=None,
        return_hidden=False,
        deterministic=True,
        decode=False,
        keep_kv=0,
        prefix_kv=None,
        prefix_mask=None,
    ):
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "LLM: pass exactly one of input_ids [B, L] and inputs_embeds [B, L, H]"
            )
        if input_ids is not None:
            x = self.embed_tokens(input_ids)
        else:
            x = nn.with_logical_constraint(
                inputs_embeds.astype(c.dtype), ("act_batch", "act_len", "act_embed")
            )
        B, L, _ = x.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, L), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)

        offset = None
        q_slot = jnp.arange(L)
        cache_index = jnp.zeros((), jnp.int32)
        key_mask = attention_mask
        if decode:
            ready = self.has_variable("cache", "cache_index")
            c_mask = self.variable("cache", "cache_mask", jnp.zeros, (B, L), jnp.bool_)
            c_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if ready:
                cache_index = c_index.value
                offset = jnp.sum(c_mask.value, axis=-1, dtype=jnp.int32)  # tokens already seen
                key_mask = jax.lax.dynamic_update_slice(
                    c_mask.value, attention_mask, (0, cache_index)
                )
                q_slot = cache_index + q_slot
                c_mask.value = key_mask
                c_index.value = cache_index + L
        if prefix_kv is not None:
            if decode or keep_kv:
                raise ValueError("LLM: prefix_kv is for a plain forward (no decode, no keep_kv)")
            prefix_mask = prefix_mask.astype(jnp.bool_)
            offset = jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32)
            q_slot = prefix_mask.shape[1] + q_slot
            key_mask = jnp.concatenate([prefix_mask, key_mask], axis=1)
        S = key_mask.shape[1]
        if c.sliding_window is not None and c.sliding_window < S:
            raise ValueError(
                f"LLM: {S} keys exceed the checkpoint's sliding_window {c.sliding_window}; this "
                "implementation runs full attention, which differs from a sliding window there. "
                "Use shorter sequences (or a cache of at most sliding_window slots)."
            )
        if positions is None:
            positions = default_positions(attention_mask, offset)
        mask = key_mask[:, None, :] & (jnp.arange(S)[None, None, :] <= q_slot[None, :, None])
        lora = None if lora_mask is None else lora_rows(lora_mask, lora_capacity)

        x = Stack(
            DecoderBlock,
            {"config": c, "decode": decode, "deterministic": deterministic, "keep_kv": keep_kv},
            c.num_layers,
            scan=c.scan_layers,
            remat=c.remat,
            name="blocks",
        )(x, positions, mask, cache_index, lora, layer_inputs=prefix_kv)
        x, kept = x if keep_kv else (x, None)
        x = self.norm(x)
        if not return_hidden:
            x = self.embed_tokens.attend(x) if c.tie_word_embeddings else self.lm_head(x)
            x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_vocab"))
        return x if kept is None else (x, kept)


def lm_head_kernel(config: LLMConfig, params) -> jax.Array:
    """The output head `[H, V]` (the embedding transposed when tied), in the parameter dtype."""
    if config.tie_word_embeddings:
        return jnp.asarray(params["embed_tokens"]["embedding"]).T
    return jnp.asarray(params["lm_head"]["kernel"])


def init_cache(config: LLMConfig, batch_size: int, max_length: int):
    """An empty "cache" collection for `batch_size` sequences of up to `max_length` tokens.

    Writing past `max_length` is not detected inside jit (the write index clamps): size it for
    the prompt plus every token to generate.
    """
    model = LLM(config)
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ----------------------------------------------------------------------------------------------
# PLoRA parameter helpers.


def is_lora_path(path: tuple[str, ...] | str) -> bool:
    """Whether a parameter path (tuple of keys, or "a/b/c") is a PLoRA weight."""
    parts = path.split("/") if isinstance(path, str) else path
    return any("lora" in str(p) for p in parts)


def split_lora(params) -> tuple[dict, dict]:
    """(base, lora): the params tree split by `is_lora_path`; `merge_params` puts them back."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    base = {k: v for k, v in flat.items() if not is_lora_path(k)}
    lora = {k: v for k, v in flat.items() if is_lora_path(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(lora)


def merge_params(*trees) -> dict:
    """Deep merge of disjoint parameter trees (e.g. loaded base weights and `init_lora_params`)."""
    flat: dict = {}
    for t in trees:
        for k, v in traverse_util.flatten_dict(t).items():
            if k in flat:
                raise ValueError(f"merge_params: {'/'.join(k)} is in more than one tree")
            flat[k] = v
    return traverse_util.unflatten_dict(flat)


def init_lora_params(config: LLMConfig, rng) -> dict:
    """Fresh PLoRA weights (A random, B zero) for `config` (lora_rank > 0), as a plain tree to
    merge into loaded base weights with `merge_params`.

    Only the model's structure is traced (`jax.eval_shape`), so no random base LLM is ever built.
    A is drawn with the same initialiser as `Linear` (scanned A's [layers, in, r] keep fan_in = in).
    """
    if not config.lora_rank:
        raise ValueError("init_lora_params: config.lora_rank is 0; use config.with_lora() first")
    abstract = jax.eval_shape(
        lambda: LLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    flat = traverse_util.flatten_dict(nn.unbox(abstract))
    lora = sorted(k for k in flat if is_lora_path(k))

    @jax.jit
    def init(rng):
        keys = jax.random.split(rng, len(lora))
        return {
            k: LORA_A_INIT(key, flat[k].shape, flat[k].dtype)
            if k[-1] == "lora_a"
            else jnp.zeros(flat[k].shape, flat[k].dtype)
            for k, key in zip(lora, keys, strict=True)
        }

    return traverse_util.unflatten_dict(init(rng))
