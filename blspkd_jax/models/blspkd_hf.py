"""The composed model's Hugging Face form: the state dict (`encoder.*`, `adapter.*`, `llm.*`,
`llm_lora.*`) and config.json that `python -m blspkd_jax.export` writes and the PyTorch modeling
files read, and their inverses, exact. Writing a whole export directory (tokenizer, feature
extractor, model card) is `blspkd_jax.inference.export`; this file is the format both directions
share, so training can start from an export without the inference layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from blspkd_jax.errors import UserError
from blspkd_jax.models import encoder as encoder_lib
from blspkd_jax.models import hf, llm_hf
from blspkd_jax.models.adapter import CFormer, CFormerConfig
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.models.encoder import WhisperEncoderConfig
from blspkd_jax.models.layers import LAYOUT, stack_layers, tree_get, tree_set, unstack_layers
from blspkd_jax.models.llm_config import LORA_TARGETS, LLMConfig

AUTO_MAP = {
    "AutoConfig": "configuration_blspkd.BLSPKDConfig",
    "AutoModel": "modeling_blspkd.BLSPKDModel",
}
MODEL_TYPE = "blspkd"
# PLoRA targets: our path inside a decoder block -> the transformers module path.
LORA_SITES = {
    "q": ("attn/q_proj", "self_attn.q_proj"),
    "k": ("attn/k_proj", "self_attn.k_proj"),
    "v": ("attn/v_proj", "self_attn.v_proj"),
    "o": ("attn/o_proj", "self_attn.o_proj"),
    "gate": ("mlp/gate_proj", "mlp.gate_proj"),
    "up": ("mlp/up_proj", "mlp.up_proj"),
    "down": ("mlp/down_proj", "mlp.down_proj"),
}
# Stacks whose looped layers are "layers_{i}" under these paths (scanned: one "layers" subtree).
_STACKS = (("encoder", "layers"), ("adapter", "pre_layers"), ("adapter", "post_layers"))


class ExportError(UserError):
    """An export directory is missing, malformed or incompatible; the message names it."""


# ----------------------------------------------------------------------------------------------
# Parameter names: our tree <-> the PyTorch model's state dict.


def looped_params(model_cfg: BLSPKDConfig, params) -> dict:
    """Params with every stack looped (`layers_{i}`), unboxed, as numpy-convertible leaves."""
    params = copy.copy(dict(nn.unbox(params)))
    for part, name in _STACKS:
        sub = dict(params[part])
        stack = sub.get(name)
        if stack is not None and "layers" in stack:
            sub[name] = unstack_layers(stack, _num_layers(model_cfg, part, name))
        params[part] = sub
    if model_cfg.llm.scan_layers:
        params["llm"] = {
            **params["llm"],
            "blocks": unstack_layers(params["llm"]["blocks"], model_cfg.llm.num_layers),
        }
    return params


def _num_layers(model_cfg: BLSPKDConfig, part: str, name: str) -> int:
    if part == "encoder":
        return model_cfg.encoder.encoder_layers
    return model_cfg.adapter.n_pre if name == "pre_layers" else model_cfg.adapter.n_post


def _to_layout(model_cfg: BLSPKDConfig, params: dict) -> dict:
    """Looped params -> the layout `model_cfg` asks for (scanned stacks where `scan_layers`)."""
    params = {k: dict(v) for k, v in params.items()}
    scan = {"encoder": model_cfg.encoder.scan_layers, "adapter": model_cfg.adapter.scan_layers}
    for part, name in _STACKS:
        n = _num_layers(model_cfg, part, name)
        if scan[part] and n and name in params[part]:
            params[part][name] = stack_layers(params[part][name], n)
    if model_cfg.llm.scan_layers:
        params["llm"]["blocks"] = stack_layers(params["llm"]["blocks"], model_cfg.llm.num_layers)
    return params


def _adapter_rows(cfg: CFormerConfig):
    """(torch name under "adapter.", our path, layout) for every CFormer tensor."""
    rows = []
    for name, n in (("pre_layers", cfg.n_pre), ("post_layers", cfg.n_post)):
        for i in range(n):
            rows += [
                (f"{name}.{i}.{h}", (name, f"layers_{i}", *p), t)
                for h, p, t in encoder_lib.HF_LAYER
            ]
    rows += [
        ("cif_proj.weight", ("cif_proj", "kernel"), "linear"),
        ("cif_proj.bias", ("cif_proj", "bias"), None),
        ("out_proj.weight", ("out_proj", "kernel"), "linear"),
        ("out_proj.bias", ("out_proj", "bias"), None),
    ]
    if cfg.out_norm:
        rows.append(("out_norm.weight", ("out_norm", "scale"), None))
    return rows


def _lora_rows(cfg: LLMConfig):
    """(torch name under "llm_lora.", our path under "llm") for every PLoRA tensor; the torch
    weights are ours transposed (lora_A [r, in], lora_B [out, r], as PEFT stores them)."""
    if not cfg.lora_rank:
        return []
    rows = []
    for i in range(cfg.num_layers):
        for target in cfg.lora_targets:
            ours, theirs = LORA_SITES[target]
            base = f"layers.{i}.{theirs}"
            rows.append((f"{base}.lora_A.weight", f"blocks/layers_{i}/{ours}/lora_a"))
            rows.append((f"{base}.lora_B.weight", f"blocks/layers_{i}/{ours}/lora_b"))
    return rows


def _adapter_shapes(cfg: CFormerConfig) -> dict:
    """Parameter shapes of the looped CFormer, from its structure alone (nothing computed)."""
    looped = dataclasses.replace(cfg, scan_layers=False)
    h = jax.ShapeDtypeStruct((1, 2, cfg.d_model), jnp.float32)
    shapes = jax.eval_shape(CFormer(looped).init, jax.random.key(0), h)
    return nn.unbox(shapes["params"])


def params_to_hf(model_cfg: BLSPKDConfig, params) -> dict[str, np.ndarray]:
    """The exported state dict (`encoder.*`, `adapter.*`, `llm.*`, `llm_lora.*`) from our params
    (scanned or looped, boxed or not); dtypes are kept, layouts converted exactly."""
    p = looped_params(model_cfg, params)
    out = {
        f"encoder.{k}": v
        for k, v in encoder_lib.params_to_hf(model_cfg.encoder, p["encoder"]).items()
    }
    for name, path, layout in _adapter_rows(model_cfg.adapter):
        a = LAYOUT[layout](np.asarray(tree_get(p["adapter"], path)))
        out[f"adapter.{name}"] = np.ascontiguousarray(a)
    base_cfg = dataclasses.replace(model_cfg.llm, scan_layers=False)
    out.update({f"llm.{k}": v for k, v in llm_hf.params_to_hf(base_cfg, p["llm"]).items()})
    flat_llm = traverse_util.flatten_dict(p["llm"], sep="/")
    for name, path in _lora_rows(model_cfg.llm):
        out[f"llm_lora.{name}"] = np.ascontiguousarray(np.asarray(flat_llm[path]).T)
    return out


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One tensor of the exported state dict and where it lives in our flat params."""

    name: str  # exported name, e.g. "llm.model.layers.0.self_attn.q_proj.weight"
    path: str  # our flat parameter path, e.g. "llm/blocks/layers/attn/q_proj/kernel"
    layer: int | None  # its index on a scanned stack's leading layer axis; None when looped
    layout: str | None  # a key of `layers.LAYOUT`: how ours becomes PyTorch's (a transpose)


def export_tensors(model_cfg: BLSPKDConfig, paths: Collection[str]) -> list[ExportTensor]:
    """Every tensor `params_to_hf` writes, in name order, each located in a flat parameter tree
    with keys `paths` ("a/b/c"; stacks scanned or looped alike). Nothing is read, so an export
    can fetch one tensor at a time from parameters sharded over many hosts.

    Raises ExportError naming a parameter the config needs that `paths` lacks.
    """
    base = dataclasses.replace(model_cfg.llm, scan_layers=False)
    rows = [  # (exported name, our looped path, layout, required)
        *(
            (f"encoder.{h}", "encoder/" + "/".join(p), t, True)
            for h, p, t in encoder_lib._hf_rows(model_cfg.encoder)
        ),
        *(
            (f"adapter.{n}", "adapter/" + "/".join(p), t, True)
            for n, p, t in _adapter_rows(model_cfg.adapter)
        ),
        # llm_hf.params_to_hf writes the rows the params have (no lm_head when it is tied).
        *(
            (f"llm.{h}", f"llm/{ours}", "linear" if t else None, False)
            for h, ours, t in llm_hf.hf_rows(base)
        ),
        *((f"llm_lora.{n}", f"llm/{p}", "linear", True) for n, p in _lora_rows(model_cfg.llm)),
    ]
    paths = set(paths)
    out = []
    for name, looped, layout, required in rows:
        if looped in paths:
            out.append(ExportTensor(name, looped, None, layout))
            continue
        m = _LAYER_KEY.search(looped)
        scanned = m and f"{looped[: m.start()]}/layers/{looped[m.end() :]}"
        if scanned in paths:
            out.append(ExportTensor(name, scanned, int(m.group(1)), layout))
        elif required:
            raise ExportError(f"params: {looped} (exported as {name}) is missing")
    return sorted(out, key=lambda t: t.name)


_LAYER_KEY = re.compile(r"/layers_(\d+)/")


def params_from_hf(model_cfg: BLSPKDConfig, state_dict: Mapping[str, Any]) -> dict:
    """Inverse of `params_to_hf`: our params (in `model_cfg`'s layout and parameter dtypes).

    Raises ExportError naming a missing tensor, one of the wrong shape, or tensors the config
    has no place for.
    """
    parts = {"encoder.": {}, "adapter.": {}, "llm.": {}, "llm_lora.": {}}
    for k, v in state_dict.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix is None:
            raise ExportError(f"weights: tensor {k!r} belongs to no part (encoder/adapter/llm)")
        parts[prefix][k[len(prefix) :]] = v
    enc_cfg = dataclasses.replace(model_cfg.encoder, scan_layers=False)
    llm_cfg = dataclasses.replace(model_cfg.llm, scan_layers=False, lora_rank=0)
    try:
        params = {
            "encoder": encoder_lib.params_from_hf(enc_cfg, parts["encoder."]),
            "llm": llm_hf.params_from_hf(llm_cfg, parts["llm."]),
        }
    except (KeyError, ValueError) as e:
        raise ExportError(f"weights: {e}") from None

    adapter: dict = {}
    used = set()
    shapes = _adapter_shapes(model_cfg.adapter)
    for name, path, layout in _adapter_rows(model_cfg.adapter):
        if name not in parts["adapter."]:
            raise ExportError(f"weights: tensor 'adapter.{name}' is missing")
        a = LAYOUT[layout](np.asarray(parts["adapter."][name]))
        if a.shape != tree_get(shapes, path).shape:
            raise ExportError(
                f"weights: 'adapter.{name}' has shape {np.shape(parts['adapter.'][name])}, which "
                f"does not fit the config's CFormer (d_model {model_cfg.adapter.d_model}, "
                f"ffn_dim {model_cfg.adapter.ffn_dim}, llm_hidden {model_cfg.adapter.llm_hidden})"
            )
        tree_set(adapter, path, jnp.asarray(a, model_cfg.adapter.param_dtype))
        used.add(name)
    extra = sorted(set(parts["adapter."]) - used)
    if extra:
        raise ExportError(
            f"weights: adapter tensors {extra[:3]} have no place in the config's CFormer "
            f"(n_pre={model_cfg.adapter.n_pre}, n_post={model_cfg.adapter.n_post}, "
            f"out_norm={model_cfg.adapter.out_norm})"
        )
    params["adapter"] = adapter

    lora_rows = _lora_rows(model_cfg.llm)
    names = {name for name, _ in lora_rows}
    if set(parts["llm_lora."]) != names:
        missing = sorted(names - set(parts["llm_lora."]))
        extra = sorted(set(parts["llm_lora."]) - names)
        raise ExportError(
            f"weights: PLoRA tensors do not match lora rank {model_cfg.llm.lora_rank} and targets "
            f"{model_cfg.llm.lora_targets}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    flat = traverse_util.flatten_dict(params["llm"], sep="/")
    r = model_cfg.llm.lora_rank
    for name, path in lora_rows:
        a = np.asarray(parts["llm_lora."][name]).T
        d_in, d_out = flat[path.rsplit("/", 1)[0] + "/kernel"].shape
        want = (d_in, r) if path.endswith("lora_a") else (r, d_out)
        if a.shape != want:
            raise ExportError(
                f"weights: 'llm_lora.{name}' has shape {a.T.shape}, expected {want[::-1]} "
                f"(lora rank {r})"
            )
        flat[path] = jnp.asarray(a, model_cfg.llm.param_dtype)
    params["llm"] = traverse_util.unflatten_dict(flat, sep="/")
    return _to_layout(model_cfg, params)


# ----------------------------------------------------------------------------------------------
# config.json.


def hf_config(
    model_cfg: BLSPKDConfig,
    *,
    system_prompt: str | None = None,
    instruction: str = "",
    chat_template: str | None = None,
) -> dict:
    """The exported config.json: nested Whisper and LLM configs, the CFormer, PLoRA and the chat
    prompt the run trained with."""
    import transformers

    enc, ad, llm = model_cfg.encoder, model_cfg.adapter, model_cfg.llm
    # The PyTorch modeling file implements Whisper's full attention and the paper's rescaled CIF.
    if enc.chunk_frames:
        raise ExportError(
            f"model.encoder.chunk_frames={enc.chunk_frames}: chunk-causal runs cannot be exported "
            "to Hugging Face yet (the PyTorch modeling file attends over whole utterances)"
        )
    if ad.firing != "rescale":
        raise ExportError(
            f"model.adapter.firing={ad.firing!r}: the export's PyTorch CIF rescales (the paper's "
            "rule); export with the default firing"
        )
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["BLSPKDModel"],
        "auto_map": dict(AUTO_MAP),
        "encoder_config": enc.to_hf(),
        "llm_config": dataclasses.replace(llm, lora_rank=0).to_hf(),
        "adapter": {
            "num_heads": ad.num_heads,
            "ffn_dim": ad.ffn_dim,
            "n_pre": ad.n_pre,
            "n_post": ad.n_post,
            "max_tokens": ad.max_tokens,
            "out_norm": ad.out_norm,
            "out_norm_eps": ad.out_norm_eps,
        },
        "lora": {
            "rank": llm.lora_rank,
            "alpha": llm.lora_alpha,
            "dropout": llm.lora_dropout,
            "targets": list(llm.lora_targets) if llm.lora_rank else [],
        },
        "pad_to_30s": enc.pad_to_30s,
        "sampling_rate": 16000,
        "system_prompt": system_prompt,
        "default_instruction": instruction,
        "chat_template": chat_template or None,
        # Parameter dtypes of each part, so that import back restores them exactly.
        "param_dtypes": {
            "encoder": str(enc.param_dtype),
            "adapter": str(ad.param_dtype),
            "llm": str(llm.param_dtype),
        },
        "dtype": str(llm.param_dtype),
        "transformers_version": transformers.__version__,
    }


def config_from_hf(cfg: Mapping[str, Any], **runtime) -> BLSPKDConfig:
    """Our model config from an exported config.json dict.

    `runtime` sets switches that are not part of the checkpoint, for every part that has them:
    `dtype`, `scan_layers`, `remat` (and `param_dtype`, default: the dtypes the export stored).
    """
    if cfg.get("model_type") != MODEL_TYPE:
        raise ExportError(
            f"config.json: model_type is {cfg.get('model_type')!r}, expected {MODEL_TYPE!r} "
            "(a directory written by python -m blspkd_jax.export)"
        )
    unknown = set(runtime) - {"dtype", "param_dtype", "scan_layers", "remat"}
    if unknown:
        raise TypeError(f"config_from_hf: unknown runtime option(s) {sorted(unknown)}")
    dtypes = cfg.get("param_dtypes") or {}

    def switches(part):
        out = {"param_dtype": dtypes.get(part, "float32"), **runtime}
        out.setdefault("dtype", "float32")
        return out

    try:
        enc = WhisperEncoderConfig.from_hf(
            cfg["encoder_config"],
            pad_to_30s=bool(cfg.get("pad_to_30s", False)),
            **switches("encoder"),
        )
        lora = cfg.get("lora") or {}
        llm = LLMConfig.from_hf(
            cfg["llm_config"],
            lora_rank=int(lora.get("rank", 0)),
            lora_alpha=float(lora.get("alpha", 16.0)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            lora_targets=tuple(lora.get("targets") or LORA_TARGETS),
            **switches("llm"),
        )
        a = cfg["adapter"]
        adapter = CFormerConfig(
            d_model=enc.d_model,
            num_heads=a.get("num_heads") or enc.encoder_attention_heads,
            ffn_dim=a.get("ffn_dim") or enc.encoder_ffn_dim,
            n_pre=int(a["n_pre"]),
            n_post=int(a["n_post"]),
            llm_hidden=llm.hidden_size,
            max_tokens=int(a["max_tokens"]),
            out_norm=bool(a.get("out_norm", False)),
            out_norm_eps=float(a.get("out_norm_eps", 1e-6)),
            **switches("adapter"),
        )
    except KeyError as e:
        raise ExportError(f"config.json: missing key {e}") from None
    return BLSPKDConfig(encoder=enc, adapter=adapter, llm=llm)


def is_exported(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory this module wrote (config.json with model_type blspkd)."""
    cfg = epath.Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def load_exported(path: str | os.PathLike, **runtime) -> tuple[BLSPKDConfig, dict]:
    """(model config, params) of an exported directory: the inverse of the export, exact.

    `runtime` as in `config_from_hf` (e.g. `scan_layers=True`, `dtype="bfloat16"`); parameters
    keep the dtypes they were exported with unless `param_dtype` is given.
    """
    path = Path(path)
    try:
        cfg = hf.read_config(path)
        state = hf.read_state_dict(path)
    except hf.CheckpointError as e:
        raise ExportError(str(e)) from None
    model_cfg = config_from_hf(cfg, **runtime)
    return model_cfg, params_from_hf(model_cfg, state)


_SIZE_FIELDS = {
    "encoder": [f.name for f in dataclasses.fields(WhisperEncoderConfig)],
    "adapter": ["d_model", "num_heads", "ffn_dim", "n_pre", "n_post", "llm_hidden", "out_norm"],
    "llm": [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "qkv_bias",
        "o_bias",
        "mlp_bias",
        "qk_norm",
        "tie_word_embeddings",
    ],
}
_RUNTIME = {"dtype", "param_dtype", "scan_layers", "remat", "pad_to_30s"}


def exported_params(path: str | os.PathLike, model_cfg: BLSPKDConfig) -> dict[str, np.ndarray]:
    """Every parameter of the export at `path`, flat {"a/b/c": host array} in `model_cfg`'s layer
    layout and parameter dtypes, after checking that the two models have the same sizes.

    PLoRA weights come along only when the export has them; a caller keeps the ones its model has
    (a stage-2 run from a stage-1 export keeps its fresh PLoRA). Raises ExportError naming the
    config key whose size differs.
    """
    exp_cfg, params = load_exported(path)
    for part, fields in _SIZE_FIELDS.items():
        for f in fields:
            if f in _RUNTIME:
                continue
            theirs, ours = getattr(getattr(exp_cfg, part), f), getattr(getattr(model_cfg, part), f)
            if theirs != ours:
                raise ExportError(
                    f"train.init_from={path}: the export's {part}.{f} is {theirs!r} but this run's "
                    f"config gives {ours!r} (model.{part} sizes must match the export)"
                )
    ranks = (exp_cfg.llm.lora_rank, model_cfg.llm.lora_rank)
    if all(ranks) and ranks[0] != ranks[1]:
        raise ExportError(
            f"train.init_from={path}: the export's PLoRA rank is {ranks[0]}, this "
            f"run's model.llm.lora_rank is {ranks[1]}"
        )
    target = dataclasses.replace(
        model_cfg,
        llm=dataclasses.replace(
            model_cfg.llm, lora_rank=exp_cfg.llm.lora_rank, lora_targets=exp_cfg.llm.lora_targets
        ),
    )
    dtypes = {
        "encoder": model_cfg.encoder.param_dtype,
        "adapter": model_cfg.adapter.param_dtype,
        "llm": model_cfg.llm.param_dtype,
    }
    flat = traverse_util.flatten_dict(_to_layout(target, params), sep="/")
    return {k: np.asarray(v, dtype=dtypes[k.split("/", 1)[0]]) for k, v in flat.items()}
