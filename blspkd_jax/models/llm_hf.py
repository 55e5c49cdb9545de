"""The LLM's parameters to and from Hugging Face checkpoints (transformers' Llama/Qwen/Mistral
state-dict names): a table of names, read lazily (no copy before the mesh places each shard) and
written back for export."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blspkd_jax.models import lazy
from blspkd_jax.models.layers import unstack_layers
from blspkd_jax.models.llm import LLM
from blspkd_jax.models.llm_config import LLMConfig

# Rows: (HF name, our path, transpose). HF Linear weights are [out, in] and
# our kernels [in, out]. A row applies when the module actually has that parameter for a config
# (a bias, q/k norms, an untied head), so the model's own structure decides which rows are used.

HF_TOP = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)
HF_LAYER = (  # under "model.layers.{i}." and our "blocks/layers_{i}/"
    ("input_layernorm.weight", "input_norm/scale", False),
    ("post_attention_layernorm.weight", "post_attn_norm/scale", False),
    ("self_attn.q_proj.weight", "attn/q_proj/kernel", True),
    ("self_attn.k_proj.weight", "attn/k_proj/kernel", True),
    ("self_attn.v_proj.weight", "attn/v_proj/kernel", True),
    ("self_attn.o_proj.weight", "attn/o_proj/kernel", True),
    ("self_attn.q_proj.bias", "attn/q_proj/bias", False),
    ("self_attn.k_proj.bias", "attn/k_proj/bias", False),
    ("self_attn.v_proj.bias", "attn/v_proj/bias", False),
    ("self_attn.o_proj.bias", "attn/o_proj/bias", False),
    ("self_attn.q_norm.weight", "attn/q_norm/scale", False),
    ("self_attn.k_norm.weight", "attn/k_norm/scale", False),
    ("mlp.gate_proj.weight", "mlp/gate_proj/kernel", True),
    ("mlp.up_proj.weight", "mlp/up_proj/kernel", True),
    ("mlp.down_proj.weight", "mlp/down_proj/kernel", True),
    ("mlp.gate_proj.bias", "mlp/gate_proj/bias", False),
    ("mlp.up_proj.bias", "mlp/up_proj/bias", False),
    ("mlp.down_proj.bias", "mlp/down_proj/bias", False),
)
# Checkpoint tensors that carry no weights we need (old Llama files saved RoPE tables).
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _base_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """ "a/b/c" -> shape of every base (non-LoRA) parameter of the looped model."""
    cfg = dataclasses.replace(config, scan_layers=False, remat="none", lora_rank=0)
    abstract = jax.eval_shape(
        lambda: LLM(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    flat = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def hf_rows(config: LLMConfig):
    """(HF name, our path, transpose) for every parameter, layers expanded."""
    for hf, ours, t in HF_TOP:
        yield hf, ours, t
    for i in range(config.num_layers):
        for hf, ours, t in HF_LAYER:
            yield f"model.layers.{i}.{hf}", f"blocks/layers_{i}/{ours}", t


def params_from_hf(config: LLMConfig, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Our params tree (base weights, `config.param_dtype`, scanned if `config.scan_layers`) from
    a Hugging Face state dict, whole on the default device (`hf.load_llm(..., mesh=)` loads
    straight into a mesh instead). Errors as `host_params_from_hf`.
    """
    host = host_params_from_hf(config, state_dict)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), config.param_dtype), host)


def host_params_from_hf(config: LLMConfig, state_dict: Mapping[str, np.ndarray]) -> dict:
    """`params_from_hf` without reading anything: the same tree, each leaf the checkpoint's tensor
    seen through our transpose and layer stacking (`lazy.py`; numpy views for numpy inputs), in
    the checkpoint's dtype.

    Raises KeyError naming a missing tensor, ValueError naming a tensor of the wrong shape or a
    `model.*` tensor this config has no place for (a feature we do not support, e.g. a bias the
    config does not declare). Other extras (a tied `lm_head.weight`, RoPE tables) are ignored.
    """
    shapes = _base_shapes(config)
    flat, used = {}, set()
    for hf, ours, transpose in hf_rows(config):
        if ours not in shapes:
            continue
        if hf not in state_dict:
            raise KeyError(f"checkpoint: tensor {hf!r} is missing (needed for {ours})")
        a = state_dict[hf]
        a = a.T if transpose else a
        if tuple(a.shape) != shapes[ours]:
            raise ValueError(
                f"checkpoint: tensor {hf!r} has shape {tuple(state_dict[hf].shape)}, expected "
                f"{shapes[ours][::-1] if transpose else shapes[ours]} from config.json"
            )
        flat[ours] = a
        used.add(hf)
    extra = sorted(
        k
        for k in state_dict
        if k not in used and k.startswith("model.") and not HF_IGNORED.search(k)
    )
    if extra:
        raise ValueError(
            f"checkpoint: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} have no place in "
            f"this {config.model_type} config (qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, "
            f"mlp_bias={config.mlp_bias}, qk_norm={config.qk_norm}): unsupported feature"
        )
    params = traverse_util.unflatten_dict(flat, sep="/")
    if config.scan_layers:
        params["blocks"] = lazy.stack_layers(params["blocks"], config.num_layers)
    return params


def params_to_hf(config: LLMConfig, params) -> dict[str, np.ndarray]:
    """Hugging Face state dict of the base weights (inverse of `params_from_hf`).

    PLoRA weights are not part of a plain LLM checkpoint and are never merged into W (that would
    change text behaviour); they are left out here (take them with `split_lora`). A tied head
    writes no `lm_head.weight`.
    """
    params = nn.unbox(params)
    if config.scan_layers:
        params = {**params, "blocks": unstack_layers(params["blocks"], config.num_layers)}
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for hf, ours, transpose in hf_rows(config):
        if ours in flat:
            a = np.asarray(flat[ours])
            out[hf] = np.ascontiguousarray(a.T if transpose else a)
    return out
