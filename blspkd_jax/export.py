"""Hugging Face export of a trained run, loadable offline in PyTorch, and import back into JAX:

    python -m blspkd_jax.export --workdir DIR --out OUT [--step N] [--verify-manifest M]

OUT: config.json (`auto_map` to our PyTorch modeling files, copied in), safetensors `encoder.*`,
`adapter.*`, `llm.*`, `llm_lora.*` (PLoRA, never merged; sharded when large), the feature
extractor, tokenizer, generation config, a model card, and OUT/llm: the LLM alone for transformers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blspkd_jax import encoder as encoder_lib
from blspkd_jax import hf
from blspkd_jax import llm as llm_lib
from blspkd_jax.adapter import CFormerConfig
from blspkd_jax.encoder import WhisperEncoderConfig
from blspkd_jax.layers import stack_layers, unstack_layers
from blspkd_jax.llm import LLMConfig
from blspkd_jax.model import BLSPKDConfig

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_blspkd.py", "modeling_blspkd.py")
AUTO_MAP = {
    "AutoConfig": "configuration_blspkd.BLSPKDConfig",
    "AutoModel": "modeling_blspkd.BLSPKDModel",
}
MODEL_TYPE = "blspkd"
LLM_SUBDIR = "llm"
DEFAULT_SHARD_BYTES = 5 << 30
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


class ExportError(ValueError):
    """An export directory is missing, malformed or incompatible; the message names it."""


# ----------------------------------------------------------------------------------------------
# Parameter names: our tree <-> the PyTorch model's state dict.


def _looped(model_cfg: BLSPKDConfig, params) -> dict:
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
    from blspkd_jax.adapter import CFormer

    looped = dataclasses.replace(cfg, scan_layers=False)
    h = jax.ShapeDtypeStruct((1, 2, cfg.d_model), jnp.float32)
    shapes = jax.eval_shape(CFormer(looped).init, jax.random.key(0), h)
    return nn.unbox(shapes["params"])


def params_to_hf(model_cfg: BLSPKDConfig, params) -> dict[str, np.ndarray]:
    """The exported state dict (`encoder.*`, `adapter.*`, `llm.*`, `llm_lora.*`) from our params
    (scanned or looped, boxed or not); dtypes are kept, layouts converted exactly."""
    p = _looped(model_cfg, params)
    out = {
        f"encoder.{k}": v
        for k, v in encoder_lib.params_to_hf(model_cfg.encoder, p["encoder"]).items()
    }
    for name, path, layout in _adapter_rows(model_cfg.adapter):
        a = hf.LAYOUT[layout](np.asarray(hf.tree_get(p["adapter"], path)))
        out[f"adapter.{name}"] = np.ascontiguousarray(a)
    base_cfg = dataclasses.replace(model_cfg.llm, scan_layers=False)
    out.update({f"llm.{k}": v for k, v in llm_lib.params_to_hf(base_cfg, p["llm"]).items()})
    flat_llm = traverse_util.flatten_dict(p["llm"], sep="/")
    for name, path in _lora_rows(model_cfg.llm):
        out[f"llm_lora.{name}"] = np.ascontiguousarray(np.asarray(flat_llm[path]).T)
    return out


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
            "llm": llm_lib.params_from_hf(llm_cfg, parts["llm."]),
        }
    except (KeyError, ValueError) as e:
        raise ExportError(f"weights: {e}") from None

    adapter: dict = {}
    used = set()
    shapes = _adapter_shapes(model_cfg.adapter)
    for name, path, layout in _adapter_rows(model_cfg.adapter):
        if name not in parts["adapter."]:
            raise ExportError(f"weights: tensor 'adapter.{name}' is missing")
        a = hf.LAYOUT[layout](np.asarray(parts["adapter."][name]))
        if a.shape != hf.tree_get(shapes, path).shape:
            raise ExportError(
                f"weights: 'adapter.{name}' has shape {np.shape(parts['adapter.'][name])}, which "
                f"does not fit the config's CFormer (d_model {model_cfg.adapter.d_model}, "
                f"ffn_dim {model_cfg.adapter.ffn_dim}, llm_hidden {model_cfg.adapter.llm_hidden})"
            )
        hf.tree_set(adapter, path, jnp.asarray(a, model_cfg.adapter.param_dtype))
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
            lora_targets=tuple(lora.get("targets") or llm_lib.LORA_TARGETS),
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


# ----------------------------------------------------------------------------------------------
# Writing.


def _generation_config(llm_cfg: LLMConfig, stop_ids, pad_id: int | None, max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        bos_token_id=llm_cfg.bos_token_id,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
    )


def read_metrics(workdir: str | os.PathLike) -> tuple[dict, dict]:
    """(last logged training metrics, last evaluation metrics) from `workdir/metrics.jsonl`;
    empty dicts when absent."""
    path = Path(workdir) / "metrics.jsonl"
    train, evaluation = {}, {}
    if not path.is_file():
        return train, evaluation
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        ev = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        if ev:
            evaluation = {"step": row.get("step"), **ev}
        if "loss" in row:
            train = row
    return train, evaluation


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def model_card(
    model_cfg: BLSPKDConfig, *, step: int | None, train: dict, evaluation: dict, source: str
) -> str:
    """README.md of the export: what it is, how to load it, and the run's final metrics."""
    enc, ad, llm = model_cfg.encoder, model_cfg.adapter, model_cfg.llm
    lines = [
        "---",
        "library_name: transformers",
        "tags: [speech, blsp-kd, audio-text-to-text]",
        "---",
        "",
        "# BLSP-KD speech-language model",
        "",
        "A Whisper encoder and a CFormer adapter (CIF: one speech vector per text token) feeding a "
        "frozen LLM with partial LoRA (PLoRA, on at speech positions only), trained by knowledge "
        "distillation (BLSP-KD, arXiv 2405.19041) with blspkd-jax"
        + (f" from `{source}`" if source else "")
        + (f", step {step}." if step is not None else "."),
        "",
        f"- Encoder: Whisper, d_model {enc.d_model}, {enc.encoder_layers} layers, "
        f"{enc.num_mel_bins} mels, {'30 s padded' if enc.pad_to_30s else 'variable-length'} input",
        f"- CFormer: {ad.n_pre} + {ad.n_post} layers, up to {ad.max_tokens} speech tokens",
        f"- LLM: {llm.model_type}, hidden {llm.hidden_size}, {llm.num_layers} layers, vocab "
        f"{llm.vocab_size}; also loadable alone from `{LLM_SUBDIR}/`",
        f"- PLoRA: rank {llm.lora_rank}, alpha {llm.lora_alpha}, targets "
        f"{', '.join(llm.lora_targets)}"
        if llm.lora_rank
        else "- PLoRA: none",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained(PATH, trust_remote_code=True)",
        'text = model.generate_from_audio(audio_16k, instruction="", max_new_tokens=64)',
        "```",
        "",
        "`audio_16k` is a 1-D float array of 16 kHz mono samples. Features are Whisper log-mels "
        'at the audio\'s own length (`WhisperFeatureExtractor` with `padding="longest"`), '
        "padded in 30 s mode to the encoder's window with the utterance's silence level, as in "
        "training. Training can start from this directory (`--config.train.init_from=PATH`), and "
        "`blspkd_jax.export.load_exported(PATH)` reads it back into JAX exactly.",
        "",
        "## Metrics",
        "",
    ]
    if not train and not evaluation:
        lines.append("No metrics were recorded for this run.")
    for title, rows in (("Training (last logged step)", train), ("Evaluation", evaluation)):
        if not rows:
            continue
        lines += [f"**{title}**", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def save_exported(
    out: str | os.PathLike,
    model_cfg: BLSPKDConfig,
    params,
    tokenizer,
    *,
    system_prompt: str | None = None,
    instruction: str = "",
    chat_template: str | None = None,
    step: int | None = None,
    metrics: tuple[dict, dict] = ({}, {}),
    source: str = "",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    llm_dir: bool = True,
    max_new_tokens: int = 128,
) -> Path:
    """Write the Hugging Face directory `out` for a model config, its params and tokenizer.

    `system_prompt`/`instruction`/`chat_template` are the run's chat settings (`data.*`);
    `chat_template` None keeps the tokenizer's. `llm_dir=False` skips OUT/llm (a second copy of
    the LLM weights).
    """
    from transformers import WhisperFeatureExtractor

    from blspkd_jax.data.layout import ChatLayout
    from blspkd_jax.labels import stop_token_ids

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = copy.deepcopy(tokenizer)
    if chat_template:
        tokenizer.chat_template = chat_template  # the template the run trained with travels along
    layout = ChatLayout(tokenizer, system_prompt, chat_template, instruction)
    stops = stop_token_ids(model_cfg.llm, tokenizer, layout, instruction)
    gen_cfg = _generation_config(model_cfg.llm, stops, layout.pad_id, max_new_tokens)

    hf.write_config(
        out,
        hf_config(
            model_cfg,
            system_prompt=system_prompt,
            instruction=instruction,
            chat_template=chat_template,
        ),
    )
    hf.write_state_dict(out, params_to_hf(model_cfg, params), max_shard_bytes=max_shard_bytes)
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, out / name)
    # Whisper's extractor pads to chunk_length seconds: the encoder's window (30 s for every
    # Whisper size). The model itself extracts at the audio's own length and pads as training did.
    window_samples = 2 * model_cfg.encoder.max_source_positions * 160
    chunk = window_samples // 16000 if window_samples % 16000 == 0 else 30
    WhisperFeatureExtractor(
        feature_size=model_cfg.encoder.num_mel_bins, sampling_rate=16000, chunk_length=chunk
    ).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    gen_cfg.save_pretrained(str(out))
    if llm_dir:
        base = dataclasses.replace(model_cfg.llm, lora_rank=0, scan_layers=False)
        llm_params = _looped(model_cfg, params)["llm"]
        hf.write_config(out / LLM_SUBDIR, base.to_hf())
        hf.write_state_dict(
            out / LLM_SUBDIR,
            llm_lib.params_to_hf(base, llm_params),
            max_shard_bytes=max_shard_bytes,
        )
        tokenizer.save_pretrained(str(out / LLM_SUBDIR))
        gen_cfg.save_pretrained(str(out / LLM_SUBDIR))
    train, evaluation = metrics
    (out / "README.md").write_text(
        model_card(model_cfg, step=step, train=train, evaluation=evaluation, source=source)
    )
    return out


def export_run(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    llm_dir: bool = True,
    run=None,
) -> Path:
    """Export the run in `workdir` at checkpoint `step` (None: the latest) to `out`.
    `run`: the already loaded `workdir.Run`, to skip loading it again."""
    if run is None:
        from blspkd_jax.workdir import load_run

        run = load_run(workdir, step)
    d = run.config.data
    params = jax.tree.map(np.asarray, run.params)  # gather shards to the host once
    return save_exported(
        out,
        run.model.config,
        params,
        run.tokenizer,
        system_prompt=d.system_prompt or None,
        instruction=d.instruction,
        chat_template=d.chat_template or None,
        step=run.step,
        metrics=read_metrics(workdir),
        source=str(workdir),
        max_shard_bytes=max_shard_bytes,
        llm_dir=llm_dir,
    )


def verify_export(out: str | os.PathLike, run, rows, *, max_new_tokens: int = 32):
    """(JAX text, PyTorch text) per manifest row: `generate.speech_responses` of the run against
    the export reloaded offline with `AutoModel.from_pretrained(out, trust_remote_code=True)` and
    its `generate_from_audio` on the same 16 kHz samples (the rows' own instructions on both)."""
    from transformers import AutoModel

    from blspkd_jax import generate
    from blspkd_jax.data import audio as audio_lib

    rows = list(rows)
    want = generate.speech_responses(
        run,
        rows,
        max_new_tokens=max_new_tokens,
        batch_size=max(1, min(8, len(rows))),
        progress=False,
    )
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True, local_files_only=True)
    model.eval()
    got = [
        model.generate_from_audio(
            audio_lib.load(r.audio, r.offset, r.duration),
            instruction=r.instruction,
            max_new_tokens=max_new_tokens,
        )
        for r in rows
    ]
    return list(zip(want, got, strict=True))


# ----------------------------------------------------------------------------------------------
# Import back.


def is_exported(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory this module wrote (config.json with model_type blspkd)."""
    cfg = Path(path) / "config.json"
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


def init_from_export(path: str | os.PathLike, model_cfg: BLSPKDConfig, shardings) -> dict:
    """Every parameter of the exported model at `path` that the run's model has, as flat
    {"a/b/c": array} placed with the run's shardings (a TrainState of shardings, as
    `checkpoint.restore_trainable` takes) in the run's parameter dtypes and layer layout.

    PLoRA weights move only when both have them (a stage-2 run from a stage-1 export keeps its
    fresh PLoRA). Raises ExportError naming the config key whose size differs.
    """
    from blspkd_jax import optim, train_state

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
    if (
        exp_cfg.llm.lora_rank
        and model_cfg.llm.lora_rank
        and (exp_cfg.llm.lora_rank != model_cfg.llm.lora_rank)
    ):
        raise ExportError(
            f"train.init_from={path}: the export's PLoRA rank is {exp_cfg.llm.lora_rank}, this "
            f"run's model.llm.lora_rank is {model_cfg.llm.lora_rank}"
        )
    target = dataclasses.replace(
        model_cfg,
        llm=dataclasses.replace(
            model_cfg.llm, lora_rank=exp_cfg.llm.lora_rank, lora_targets=exp_cfg.llm.lora_targets
        ),
    )
    flat = optim.flatten(_to_layout(target, params))
    place = {**shardings.trainable, **shardings.frozen}
    dtypes = {
        "encoder": model_cfg.encoder.param_dtype,
        "adapter": model_cfg.adapter.param_dtype,
        "llm": model_cfg.llm.param_dtype,
    }
    out = {}
    for k, v in flat.items():
        if k not in place:
            continue
        out[k] = train_state.shard_host_array(
            np.asarray(v, dtype=dtypes[k.split("/", 1)[0]]), place[k]
        )
    return out


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workdir", required=True, help="a training run's workdir")
    ap.add_argument("--out", required=True, help="the Hugging Face directory to write")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument(
        "--max-shard-size",
        type=int,
        default=DEFAULT_SHARD_BYTES,
        help="bytes per safetensors shard (default 5 GiB)",
    )
    ap.add_argument(
        "--no-llm-dir",
        action="store_true",
        help=f"skip OUT/{LLM_SUBDIR} (the LLM alone as a plain transformers directory)",
    )
    ap.add_argument(
        "--verify-manifest",
        default=None,
        help="reload OUT in PyTorch and compare its greedy text with JAX's on this manifest's "
        "audio (the first --verify-rows rows)",
    )
    ap.add_argument("--verify-rows", type=int, default=4)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from blspkd_jax.data.manifest import DataError
    from blspkd_jax.generate import read_rows
    from blspkd_jax.workdir import RunError, load_run

    try:
        run = load_run(args.workdir, args.step)
        out = export_run(
            args.workdir,
            args.out,
            max_shard_bytes=args.max_shard_size,
            llm_dir=not args.no_llm_dir,
            run=run,
        )
        print(f"exported {args.workdir} step {run.step} to {out}", file=sys.stderr)
        if args.verify_manifest:
            rows = read_rows(args.verify_manifest)[: args.verify_rows]
            pairs = verify_export(out, run, rows)
            for r, (jax_text, torch_text) in zip(rows, pairs, strict=True):
                mark = "==" if jax_text == torch_text else "!="
                print(f"{r.id}: JAX {jax_text!r} {mark} PyTorch {torch_text!r}")
            same = sum(a == b for a, b in pairs)
            print(f"PyTorch greedy text equals JAX's on {same}/{len(pairs)} utterances")
    except (RunError, ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
