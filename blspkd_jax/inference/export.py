"""Writing a trained run as a Hugging Face directory that transformers loads offline in PyTorch
(`python -m blspkd_jax.export`), and checking that PyTorch answers as JAX does.

OUT: config.json (`auto_map` to our PyTorch modeling files, copied in from `hf_modeling/`),
safetensors `encoder.*`, `adapter.*`, `llm.*`, `llm_lora.*` (PLoRA, never merged; sharded when
large), the feature extractor, tokenizer, generation config, a model card, and OUT/llm: the LLM
alone for transformers. The tensor names and config.json are `blspkd_jax.models.blspkd_hf`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import flax.linen as nn
import fsspec
import jax
import numpy as np
from etils import epath
from flax import traverse_util
from transformers import AutoModel, GenerationConfig, WhisperFeatureExtractor

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import storage
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.inference import multihost
from blspkd_jax.inference.generate import stop_token_ids
from blspkd_jax.inference.respond import speech_responses
from blspkd_jax.inference.workdir import load_run
from blspkd_jax.models import hf
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.models.blspkd_hf import ExportError, export_tensors, hf_config, is_exported
from blspkd_jax.models.layers import LAYOUT
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
    path = epath.Path(workdir) / "metrics.jsonl"
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
    `out` that is not an earlier export is refused unless `force`. `out` may be a URL
    (`gs://bucket/...`): the weights stream straight into the bucket, the small files are
    uploaded after them, and the objects are moved into place when all are written.
    """
    final = storage.as_path(out) if storage.is_url(out) else Path(out)
    check_out_agreed(final, force)
    writer = multihost.is_writer()
    # Process 0 writes; the others take part in gathering each tensor (`_write_weights`).
    folders = _export_folders(final) if writer else contextlib.nullcontext((None, None))
    with folders as (tmp, weights):
        _write_export(
            tmp,
            weights,
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
    multihost.barrier("export written")
    return final


@contextlib.contextmanager
def _export_folders(final):
    """(folder for the small files, folder for the weights) to write an export into, moved into
    place at `final` when the block ends without an error (else deleted).

    Locally both are one folder beside `final` (`hf.atomic_directory`). For a URL the small files
    go to a local scratch folder (tokenizers and feature extractors save to local paths only) and
    the weights to `.NAME.partial-PID` beside `final` in the bucket; at the end the small files
    are uploaded there and the objects moved to `final` (an object store has no atomic rename:
    `final` is missing, not half-written, for the moments of the move).
    """
    if not storage.is_url(final):
        with hf.atomic_directory(final) as tmp:
            yield tmp, tmp
        return
    fs, _ = fsspec.core.url_to_fs(os.fspath(final))
    url = os.fspath(final).rstrip("/")
    head, name = url.rsplit("/", 1)
    partial = f"{head}/.{name}.partial-{os.getpid()}"
    try:
        with tempfile.TemporaryDirectory(prefix="blspkd-export-") as local:
            yield Path(local), storage.as_path(partial)
            for f in sorted(Path(local).rglob("*")):
                if f.is_file():
                    fs.put_file(str(f), f"{partial}/{f.relative_to(local).as_posix()}")
        if fs.exists(url):
            fs.rm(url, recursive=True)
        fs.mv(partial, url, recursive=True)
    finally:
        if fs.exists(partial):
            fs.rm(partial, recursive=True)


def check_out_agreed(out: str | os.PathLike, force: bool) -> None:
    """`check_out` on process 0 (the one that writes), its ExportError raised on every process
    (so that none goes on into collectives the others will never join)."""
    error = None
    if multihost.is_writer():
        try:
            check_out(out, force)
        except ExportError as e:
            error = str(e)
    error = multihost.broadcast_json(error)
    if error is not None:
        raise ExportError(error)


def check_out(out: str | os.PathLike, force: bool) -> None:
    """`out` must be free, empty, an earlier export, or replaced on purpose (`force`)."""
    out = epath.Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; expected a directory to write the export into")
    if out.is_dir() and any(out.iterdir()) and not is_exported(out) and not force:
        raise ExportError(
            f"--out {out}: the folder holds other files and is not an earlier export; choose an "
            "empty or new folder, or pass --force to replace it"
        )


def _write_export(
    out: Path | None,
    weights_out,
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
    """Everything but the weights into `out` on process 0 (None elsewhere); the weights into
    `weights_out` (a local folder or a URL) on every process together (`_write_weights`)."""
    if out is not None:
        tokenizer = copy.deepcopy(tokenizer)
        if chat_template:
            tokenizer.chat_template = chat_template  # the run's template travels along
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
        for name in MODELING_FILES:
            shutil.copyfile(MODELING_DIR / name, out / name)
        # Whisper's extractor pads to chunk_length seconds: the encoder's window (30 s for every
        # Whisper size). The model itself extracts at the audio's own length and pads as
        # training did.
        window_samples = 2 * model_cfg.encoder.max_source_positions * 160
        chunk = window_samples // 16000 if window_samples % 16000 == 0 else 30
        WhisperFeatureExtractor(
            feature_size=model_cfg.encoder.num_mel_bins, sampling_rate=16000, chunk_length=chunk
        ).save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        gen_cfg.save_pretrained(str(out))
        if llm_dir:
            base = dataclasses.replace(model_cfg.llm, lora_rank=0, scan_layers=False)
            hf.write_config(out / LLM_SUBDIR, base.to_hf())
            tokenizer.save_pretrained(str(out / LLM_SUBDIR))
            gen_cfg.save_pretrained(str(out / LLM_SUBDIR))
        train, evaluation = metrics
        (out / "README.md").write_text(
            model_card(model_cfg, step=step, train=train, evaluation=evaluation, source=source)
        )
    _write_weights(weights_out, model_cfg, params, max_shard_bytes=max_shard_bytes, llm_dir=llm_dir)


@jax.jit
def _layer(x, i):
    """Layer `i` of a stacked (scanned) parameter `[layers, ...]`, in a sharding derived from
    the stack's: one compiled program per stack shape, whatever the layer."""
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _write_weights(
    out, model_cfg: BLSPKDConfig, params, *, max_shard_bytes: int, llm_dir: bool
) -> None:
    """The exported state dict (and OUT/llm's), one tensor at a time: every process joins in
    gathering it (one layer of a scanned stack at a time), process 0 converts it to PyTorch's
    layout and appends it to its safetensors shard. No process ever holds more than one tensor,
    and the files are byte for byte those `hf.write_state_dict(out, params_to_hf(...))` writes.
    """
    flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    tensors = export_tensors(model_cfg, flat)
    specs = {}
    for t in tensors:
        x = flat[t.path]
        shape = tuple(x.shape[1:] if t.layer is not None else x.shape)
        # A zero-strided view: the layout's transpose gives the exported shape, nothing allocated.
        view = np.broadcast_to(np.zeros((), np.dtype(x.dtype)), shape)
        specs[t.name] = (LAYOUT[t.layout](view).shape, np.dtype(x.dtype))
    main = llm = None
    if out is not None:
        main = StreamedStateDict(out, specs, max_shard_bytes)
        if llm_dir:
            only = {k[len("llm.") :]: v for k, v in specs.items() if k.startswith("llm.")}
            llm = StreamedStateDict(out / LLM_SUBDIR, only, max_shard_bytes)
    for t in tensors:  # name order: the order of the files' payloads
        x = flat[t.path]
        a = multihost.to_host(x if t.layer is None else _layer(x, t.layer))
        if main is None:
            continue
        a = np.ascontiguousarray(LAYOUT[t.layout](a))
        main.write(t.name, a)
        if llm is not None and t.name.startswith("llm."):
            llm.write(t.name[len("llm.") :], a)  # the same order: "llm." is a common prefix
    for w in (main, llm):
        if w is not None:
            w.close()


class StreamedStateDict:
    """The files `hf.write_state_dict(path, tensors, max_shard_bytes)` writes (model.safetensors,
    or model-XXXXX-of-YYYYY.safetensors shards and their index), byte for byte, written from
    tensors handed over one at a time in name order. Only their shapes and dtypes (`specs`:
    name -> (shape, dtype)) are needed up front, to lay out the headers.

    (safetensors' own writer takes every tensor at once, which is the whole model.)
    """

    def __init__(self, path, specs: dict, max_shard_bytes: int):
        self.path = path if isinstance(path, epath.Path) else Path(path)  # local, or a URL
        storage.makedirs(self.path)
        self.names = sorted(specs)
        self.specs = specs
        # The shard split of hf.write_state_dict: in name order, a new shard when one would
        # exceed max_shard_bytes.
        shards: list[list[str]] = [[]]
        size = 0
        for name in self.names:
            nbytes = _nbytes(*specs[name])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        self.shards = shards
        if len(shards) == 1:
            self.files = [hf.SAFE_NAME]
        else:
            n = len(shards)
            self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into self.names
        self._shard = -1  # the shard being written
        self._shard_names: set[str] = set()
        self._file = None

    def _header(self, names: list[str]) -> bytes:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            shape, dtype = self.specs[name]
            nbytes = _nbytes(shape, dtype)
            header[name] = {
                "dtype": hf._ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the payload 8-byte aligned
        return struct.pack("<Q", len(blob)) + blob

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor (names must come in sorted order, each once)."""
        if self._next >= len(self.names) or name != self.names[self._next]:
            want = self.names[self._next] if self._next < len(self.names) else "nothing"
            raise ValueError(f"StreamedStateDict: got tensor {name!r}, expected {want!r}")
        shape, dtype = self.specs[name]
        if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
            raise ValueError(
                f"StreamedStateDict: {name} is {array.dtype}{list(array.shape)}, its header "
                f"says {dtype}{list(shape)}"
            )
        self._open_for(name)
        self._file.write(np.ascontiguousarray(array).tobytes())
        self._next += 1

    def _open_for(self, name: str) -> None:
        if name in self._shard_names:
            return
        if self._file is not None:
            self._file.close()
        self._shard += 1
        self._shard_names = set(self.shards[self._shard])
        self._file = (self.path / self.files[self._shard]).open("wb")  # streamed to a bucket
        self._file.write(self._header(self.shards[self._shard]))

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded)."""
        if self._next != len(self.names):
            raise ValueError(
                f"StreamedStateDict: closed after {self._next} of {len(self.names)} tensors"
            )
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.names:  # hf.write_state_dict writes an empty model.safetensors
            (self.path / hf.SAFE_NAME).write_bytes(self._header([]))
        if len(self.shards) > 1:
            weight_map = {n: self.files[i] for i, names in enumerate(self.shards) for n in names}
            total = sum(_nbytes(*self.specs[n]) for n in self.names)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.path / hf.SAFE_INDEX).write_text(json.dumps(index, indent=2))


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


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
    return save_exported(
        out,
        run.model.config,
        run.params,  # sharded as loaded: the export gathers one tensor at a time
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
    its `generate_from_audio` on the same 16 kHz samples (the rows' own instructions on both).
    On several processes every process generates its share of JAX's text; PyTorch runs on
    process 0, which alone gets the pairs (the others get [])."""
    rows = list(rows)
    want = speech_responses(
        run,
        rows,
        max_new_tokens=max_new_tokens,
        batch_size=max(1, min(8, len(rows))),
        progress=False,
    )
    if not multihost.is_writer():
        return []
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
