"""Writing a trained run as a Hugging Face directory that transformers loads offline in PyTorch
(`python -m blspkd_jax.export`), and checking that PyTorch answers as JAX does.

OUT: config.json (`auto_map` to our PyTorch modeling files, copied in from `hf_modeling/`),
safetensors `encoder.*`, `adapter.*`, `llm.*`, `llm_lora.*` (PLoRA, never merged; sharded when
large), the feature extractor, tokenizer, generation config, a model card, and OUT/llm: the LLM
alone for transformers. The tensor names and config.json are `blspkd_jax.models.blspkd_hf`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from transformers import AutoModel, GenerationConfig, WhisperFeatureExtractor

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.inference.generate import stop_token_ids
from blspkd_jax.inference.respond import speech_responses
from blspkd_jax.inference.workdir import load_run
from blspkd_jax.models import hf
from blspkd_jax.models import llm as llm_lib
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.models.blspkd_hf import (
    ExportError,
    hf_config,
    is_exported,
    looped_params,
    params_to_hf,
)
from blspkd_jax.models.llm_config import LLMConfig

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_blspkd.py", "modeling_blspkd.py")
LLM_SUBDIR = "llm"
DEFAULT_SHARD_BYTES = 5 << 30

# ----------------------------------------------------------------------------------------------
# Writing.


def _generation_config(llm_cfg: LLMConfig, stop_ids, pad_id: int | None, max_new_tokens: int):
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
    force: bool = False,
) -> Path:
    """Write the Hugging Face directory `out` for a model config, its params and tokenizer.

    `system_prompt`/`instruction`/`chat_template` are the run's chat settings (`data.*`);
    `chat_template` None keeps the tokenizer's. `llm_dir=False` skips OUT/llm (a second copy of
    the LLM weights). The directory is written beside `out` and moved into place whole, so
    nothing half-written is ever left at `out`, nor anything of an earlier export; an existing
    `out` that is not an earlier export is refused unless `force`.
    """
    final = Path(out)
    check_out(final, force)
    with hf.atomic_directory(final) as tmp:
        _write_export(
            tmp,
            model_cfg,
            params,
            tokenizer,
            system_prompt=system_prompt,
            instruction=instruction,
            chat_template=chat_template,
            step=step,
            metrics=metrics,
            source=source,
            max_shard_bytes=max_shard_bytes,
            llm_dir=llm_dir,
            max_new_tokens=max_new_tokens,
        )
    return final


def check_out(out: Path, force: bool) -> None:
    """`out` must be free, empty, an earlier export, or replaced on purpose (`force`)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; expected a directory to write the export into")
    if out.is_dir() and any(out.iterdir()) and not is_exported(out) and not force:
        raise ExportError(
            f"--out {out}: the folder holds other files and is not an earlier export; choose an "
            "empty or new folder, or pass --force to replace it"
        )


def _write_export(
    out: Path,
    model_cfg: BLSPKDConfig,
    params,
    tokenizer,
    *,
    system_prompt,
    instruction,
    chat_template,
    step,
    metrics,
    source,
    max_shard_bytes,
    llm_dir,
    max_new_tokens,
) -> None:
    tokenizer = copy.deepcopy(tokenizer)
    if chat_template:
        tokenizer.chat_template = chat_template  # the template the run trained with travels along
    layout = ChatLayout(tokenizer, system_prompt, chat_template, instruction)
    stops = stop_token_ids(model_cfg.llm.eos_token_id, tokenizer, layout, instruction)
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
        llm_params = looped_params(model_cfg, params)["llm"]
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


def export_run(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    llm_dir: bool = True,
    run=None,
    force: bool = False,
) -> Path:
    """Export the run in `workdir` at checkpoint `step` (None: the latest) to `out` (see
    `save_exported` for `force`). `run`: the already loaded `workdir.Run`, to skip loading it
    again."""
    if run is None:
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
        force=force,
    )


def verify_export(out: str | os.PathLike, run, rows, *, max_new_tokens: int = 32):
    """(JAX text, PyTorch text) per manifest row: `generate.speech_responses` of the run against
    the export reloaded offline with `AutoModel.from_pretrained(out, trust_remote_code=True)` and
    its `generate_from_audio` on the same 16 kHz samples (the rows' own instructions on both)."""
    rows = list(rows)
    want = speech_responses(
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
