"""The LLM's configuration: sizes and switches of one Llama-family decoder (Llama 3.x, Qwen2/2.5,
Qwen3, Mistral) and its mapping to and from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Configuration.

# model_type -> the architecture name transformers' AutoModelForCausalLM instantiates.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# transformers' per-family defaults for fields a config.json may leave out.
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
    "mistral": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2},
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ROPE_TYPES = ("default", "linear", "llama3")


def _dtype(x) -> np.dtype:
    return np.dtype(jnp.dtype(x))


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Sizes and switches of one decoder LLM; also the runtime options (dtypes, scan, remat, LoRA).

    Construct from sizes for random initialisation (`LLMConfig(vocab_size=..., hidden_size=...,
    intermediate_size=..., num_layers=..., num_heads=...)`), or with `from_hf(config_json_dict)`.
    `model_type` only decides how `to_hf` writes the config (and which biases it can express).

    `sliding_window`: we always run full attention. When a checkpoint declares a sliding window,
    it is kept here and any call whose key length exceeds it raises (there the two would differ);
    at or below it the two are identical.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: num_heads (plain multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int | None = (
        None  # llama3; None: max_position_embeddings
    )
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2 (always), Llama/Qwen3 attention_bias
    o_bias: bool = False  # Llama/Qwen3 attention_bias
    mlp_bias: bool = False  # Llama mlp_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime options (not part of the checkpoint).
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"  # a key of blspkd_jax.models.layers.REMAT_POLICIES
    # PLoRA. Rank 0 means no LoRA parameters at all; `with_lora()` gives the paper's defaults.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_heads)
        set_("dtype", _dtype(self.dtype))
        set_("param_dtype", _dtype(self.param_dtype))
        set_("lora_targets", tuple(self.lora_targets))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"LLMConfig.model_type: {self.model_type!r} is not supported; "
                f"expected one of {sorted(ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads} (num_key_value_heads)"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"LLMConfig.rope_type: {self.rope_type!r} is not supported; expected one of "
                f"{ROPE_TYPES}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LLMConfig.head_dim: {self.head_dim} must be even for RoPE")
        bad = set(self.lora_targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(
                f"LLMConfig.lora_targets: unknown {sorted(bad)}; "
                f"expected a subset of {LORA_TARGETS}"
            )
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"LLMConfig: lora_rank {self.lora_rank} must be >= 0 and lora_dropout "
                f"{self.lora_dropout} in [0, 1)"
            )

    def with_lora(
        self,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.05,
        targets: tuple[str, ...] = LORA_TARGETS,
    ) -> LLMConfig:
        """This config with PLoRA on (defaults: the paper's r=16, alpha=16, dropout=0.05)."""
        return dataclasses.replace(
            self, lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, lora_targets=targets
        )

    def replace(self, **changes) -> LLMConfig:
        return dataclasses.replace(self, **changes)

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> LLMConfig:
        """An `LLMConfig` from a Hugging Face config.json dict; `overrides` replace any field.

        Accepts both RoPE spellings: transformers 5's `rope_parameters` and the older top-level
        `rope_theta` plus `rope_scaling`. Raises ValueError for an unsupported model_type, hidden
        activation, RoPE type or partial rotary factor.
        """
        mt = hf.get("model_type")
        if mt not in ARCHITECTURES:
            raise ValueError(
                f"config.json: model_type {mt!r} is not supported; expected one of "
                f"{sorted(ARCHITECTURES)} (Llama 3.x, Qwen2/2.5, Qwen3, Mistral)"
            )
        # A key absent from the file takes transformers' class default; an explicit null stays.
        get = lambda k, default=None: hf[k] if k in hf else _HF_DEFAULTS[mt].get(k, default)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported; expected 'silu'")
        num_heads = hf["num_attention_heads"]
        head_dim = get("head_dim") or hf["hidden_size"] // num_heads
        max_pos = get("max_position_embeddings") or 4096

        # RoPE: transformers 5 nests everything in `rope_parameters`; older files have rope_theta
        # at top level and an optional `rope_scaling` dict ("type" in very old files).
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"config.json: rope type {rope_type!r} (rope_parameters/rope_scaling) is not "
                f"supported; expected one of {ROPE_TYPES}"
            )
        prf = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if prf not in (None, 1.0):
            raise ValueError(f"config.json: partial_rotary_factor {prf} is not supported (use 1.0)")
        rope_fields = {"rope_theta": float(theta), "rope_type": rope_type}
        if rope_type in ("linear", "llama3"):
            rope_fields["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            rope_fields.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings")
                    or hf.get("original_max_position_embeddings")
                    or max_pos
                ),
            )

        if mt == "llama":
            bias = dict(
                qkv_bias=bool(hf.get("attention_bias", False)),
                o_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
            )
        elif mt == "qwen2":
            bias = dict(qkv_bias=True, o_bias=False, mlp_bias=False)
        elif mt == "qwen3":
            ab = bool(hf.get("attention_bias", False))
            bias = dict(qkv_bias=ab, o_bias=ab, mlp_bias=False)
        else:  # mistral
            bias = dict(qkv_bias=False, o_bias=False, mlp_bias=False)

        # Which layers would use a sliding window in transformers, and so whether one matters.
        window = hf.get("sliding_window")
        if mt in ("qwen2", "qwen3"):
            if hf.get("layer_types") is not None:
                uses = "sliding_attention" in hf["layer_types"]
            else:
                mwl = hf.get("max_window_layers", 28)
                uses = bool(hf.get("use_sliding_window", False)) and mwl < hf["num_hidden_layers"]
            window = window if uses else None
        elif mt == "llama":
            window = None

        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            model_type=mt,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **rope_fields,
            **bias,
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"LLMConfig.from_hf: unknown override(s) {sorted(unknown)}")
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' AutoConfig/AutoModelForCausalLM load.

        Writes RoPE both ways (`rope_parameters` for transformers 5, `rope_theta`/`rope_scaling`
        for 4.x). Raises ValueError when the biases cannot be expressed by `model_type`.
        """
        mt = self.model_type
        expressible = {
            "llama": self.qkv_bias == self.o_bias and not self.qk_norm,
            "qwen2": self.qkv_bias and not self.o_bias and not self.mlp_bias and not self.qk_norm,
            "qwen3": self.qkv_bias == self.o_bias and not self.mlp_bias and self.qk_norm,
            "mistral": not (self.qkv_bias or self.o_bias or self.mlp_bias or self.qk_norm),
        }[mt]
        if not expressible:
            raise ValueError(
                f"LLMConfig.to_hf: model_type {mt!r} cannot express qkv_bias={self.qkv_bias}, "
                f"o_bias={self.o_bias}, mlp_bias={self.mlp_bias}, qk_norm={self.qk_norm}"
            )
        rope: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings
                or self.max_position_embeddings,
            )
        out: dict[str, Any] = {
            "model_type": mt,
            "architectures": [ARCHITECTURES[mt]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": str(self.param_dtype),
            "rope_theta": self.rope_theta,
            "rope_scaling": rope if self.rope_type != "default" else None,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
        }
        if mt == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if mt == "qwen3":
            out.update(attention_bias=self.qkv_bias)
        if mt in ("qwen2", "qwen3"):
            sliding = self.sliding_window is not None
            out.update(
                use_sliding_window=sliding,
                sliding_window=self.sliding_window,
                max_window_layers=0 if sliding else self.num_layers,
                layer_types=[("sliding_attention" if sliding else "full_attention")]
                * self.num_layers,
            )
        if mt == "mistral":
            out.update(sliding_window=self.sliding_window)
        return out
