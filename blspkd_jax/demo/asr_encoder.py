"""The embedded default's speech encoder (docs/method.md §6): with no pretrained Whisper offline, a
small Whisper encoder is pretrained as a CTC recogniser on the corpus's training transcripts and
saved as a Hugging Face Whisper directory, which stage 1 then loads like a real checkpoint.

    python -m blspkd_jax.asr_encoder --manifest TRAIN.jsonl --out DIR [--eval-manifest EVAL.jsonl]
        [--tokenizer DIR] [--steps N] [--seed S]

It plays the part Whisper's 680k hours of ASR play in the paper: the encoder arrives knowing the
sounds of the language, so BLSP-KD's stage 1 only has to learn the CFormer (the paper freezes
Whisper there too). Learning recognition from the KD signal alone, through the frozen LLM, is far
slower: on the demo corpus a random encoder trained with the CFormer for 600 steps repeats held-out
sentences with 97% WER. CTC targets are characters by default (29 symbols seen thousands of times,
so they generalise to unseen words), or the LLM's tokens with `--tokenizer`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import jiwer
import numpy as np
import optax
from tqdm import tqdm

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import features
from blspkd_jax.data.manifest import read_manifest
from blspkd_jax.models import hf
from blspkd_jax.models.encoder import WhisperEncoder, WhisperEncoderConfig, encoder_frame_mask
from blspkd_jax.training import optim

log = logging.getLogger("blspkd_jax.asr_encoder")
SUMMARY_FILE = "asr_encoder_summary.json"
CHARS = " abcdefghijklmnopqrstuvwxyz'"  # CTC symbols 1..len(CHARS); 0 is the blank


@dataclasses.dataclass(frozen=True)
class AsrEncoderConfig:
    """Encoder sizes (the demo's `configs/tiny.py` encoder) and CTC training settings. Defaults:
    0.38M parameters, about 0.1 CPU-seconds a step at batch 16 on 2-4 s utterances."""

    n_mels: int = 40
    d_model: int = 128
    encoder_layers: int = 2
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 256
    max_source_positions: int = 400  # 8 s of speech
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    frame_buckets: tuple[int, ...] = (300, 500, 800)  # mel frames; few jit shapes
    eval_rows: int = 160
    seed: int = 0

    def encoder_config(self) -> WhisperEncoderConfig:
        return WhisperEncoderConfig(
            num_mel_bins=self.n_mels,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            encoder_attention_heads=self.encoder_attention_heads,
            encoder_ffn_dim=self.encoder_ffn_dim,
            max_source_positions=self.max_source_positions,
            pad_to_30s=False,
        )


# ----------------------------------------------------------------------------------------------
# Targets.


class Labels:
    """Text <-> CTC symbols 1..size-1 (0 is the blank): characters, or a tokenizer's ids."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.size = 1 + (len(tokenizer) if tokenizer is not None else len(CHARS))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return [i + 1 for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        # Lower-cased; punctuation and other symbols are not spoken, so they are dropped.
        return [CHARS.index(c) + 1 for c in " ".join(text.lower().split()) if c in CHARS]

    def decode(self, symbols: Sequence[int]) -> str:
        ids = [int(s) - 1 for s in symbols]
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return "".join(CHARS[i] for i in ids)


def greedy_ctc(frame_ids: Sequence[int]) -> list[int]:
    """Best-path CTC decoding of per-frame argmax symbols: merge repeats, then drop blanks (0)."""
    out, prev = [], 0
    for s in frame_ids:
        s = int(s)
        if s != prev and s != 0:
            out.append(s)
        prev = s
    return out


# ----------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class Utterance:
    mel: np.ndarray  # [n_mels, F] log-mel
    text: str
    labels: tuple[int, ...]


def load_utterances(
    manifest: str | Path, labels: Labels, cfg: AsrEncoderConfig, max_rows: int = 0
) -> tuple[list[Utterance], list[str]]:
    """Decode and featurise a manifest's rows -> (utterances, skipped reasons as
    `MANIFEST:LINE: reason`). A bad row (malformed, unreadable audio, longer than the last frame
    bucket, more CTC symbols than encoder frames) is skipped and reported, never fatal."""
    rows, bad = read_manifest(manifest)
    skipped = [str(b) for b in bad]
    if max_rows:
        rows = rows[:max_rows]

    def featurise(row):
        where = f"{manifest}:{row.line}"
        try:
            audio = audio_lib.load(row.audio, row.offset, row.duration)
        except Exception as e:  # noqa: BLE001 — any decode failure is this row's problem
            return f"{where}: audio {row.audio}: {str(e).splitlines()[0]}"
        mel = features.log_mel(audio, n_mels=cfg.n_mels)
        symbols = labels.encode(row.text)
        frames = (mel.shape[1] + 1) // 2
        if mel.shape[1] > cfg.frame_buckets[-1]:
            largest = cfg.frame_buckets[-1]
            return f"{where}: {mel.shape[1]} mel frames, more than the largest bucket {largest}"
        if not symbols or len(symbols) > frames:
            return f"{where}: {len(symbols)} CTC symbols for {frames} encoder frames"
        return Utterance(mel, row.text, tuple(symbols))

    out = []
    # Decoding and the FFTs release the GIL, so threads use every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        done = pool.map(featurise, rows)
        for item in tqdm(
            done, total=len(rows), desc=f"features {Path(manifest).name}", unit="utt", leave=False
        ):
            (out if isinstance(item, Utterance) else skipped).append(item)
    for reason in skipped:
        log.warning("skipped %s", reason)
    return out, skipped


def make_batch(items: Sequence[Utterance], cfg: AsrEncoderConfig, batch_size: int) -> dict:
    """Pad `items` to their frame bucket and `batch_size` rows (empty rows count for nothing):
    mel [B, n_mels, F], feature_mask [B, F], labels [B, S] int32, label_mask [B, S]."""
    frames = max(u.mel.shape[1] for u in items)
    frames = min(b for b in cfg.frame_buckets if b >= frames)
    # Symbols fit in the encoder frames (load_utterances checks), so F/2 bounds every label row.
    width = frames // 2
    mels, mask = features.pad_features([u.mel for u in items], frames)
    pad = batch_size - len(items)
    mel = np.concatenate([mels, np.zeros((pad, *mels.shape[1:]), np.float32)])
    feature_mask = np.concatenate([mask, np.zeros((pad, frames), bool)])
    labels = np.zeros((batch_size, width), np.int32)
    label_mask = np.zeros((batch_size, width), bool)
    for i, u in enumerate(items):
        labels[i, : len(u.labels)] = u.labels
        label_mask[i, : len(u.labels)] = True
    return dict(mel=mel, feature_mask=feature_mask, labels=labels, label_mask=label_mask)


def epoch_batches(items: Sequence[Utterance], cfg: AsrEncoderConfig, rng: np.random.Generator):
    """One shuffled epoch, each batch drawn from one frame bucket (so padding stays small)."""
    by_bucket: dict[int, list[int]] = {}
    for i, u in enumerate(items):
        b = min(b for b in cfg.frame_buckets if b >= u.mel.shape[1])
        by_bucket.setdefault(b, []).append(i)
    chunks = []
    for members in by_bucket.values():
        members = [members[k] for k in rng.permutation(len(members))]
        chunks += [members[k : k + cfg.batch_size] for k in range(0, len(members), cfg.batch_size)]
    for k in rng.permutation(len(chunks)):
        yield make_batch([items[i] for i in chunks[k]], cfg, cfg.batch_size)


# ----------------------------------------------------------------------------------------------
# Model and loss.


class CTCEncoder(nn.Module):
    """The Whisper encoder plus a linear CTC head: mel [B, n_mels, F] -> logits [B, F/2, K]."""

    config: WhisperEncoderConfig
    num_symbols: int

    @nn.compact
    def __call__(self, mel, feature_mask):
        h = WhisperEncoder(self.config, name="encoder")(mel, feature_mask)
        return nn.Dense(self.num_symbols, name="ctc_head")(h)


def ctc_loss(logits, frame_mask, labels, label_mask):
    """Mean CTC negative log-likelihood per target symbol over the real rows (blank = 0).

    logits [B, T, K], frame_mask [B, T], labels [B, S], label_mask [B, S] -> scalar.
    """
    per_row = optax.ctc_loss(
        logits,
        1.0 - frame_mask.astype(jnp.float32),
        labels,
        1.0 - label_mask.astype(jnp.float32),
        blank_id=0,
    )
    real = label_mask.any(axis=1)
    return jnp.sum(jnp.where(real, per_row, 0.0)) / jnp.maximum(label_mask.sum(), 1)


def _loss_fn(module: CTCEncoder, params, batch):
    logits = module.apply({"params": params}, batch["mel"], batch["feature_mask"])
    frame_mask = encoder_frame_mask(batch["feature_mask"])
    return ctc_loss(logits, frame_mask, batch["labels"], batch["label_mask"])


def optimizer(cfg: AsrEncoderConfig):
    return optim.make_optimizer(
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps,
        weight_decay=cfg.weight_decay,
    )


def train(
    module: CTCEncoder,
    items: Sequence[Utterance],
    cfg: AsrEncoderConfig,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """AdamW on the CTC loss for `cfg.steps` steps -> (params, history of logged losses)."""
    if not items:
        raise ValueError("asr_encoder: no usable training utterances (see the skipped rows)")
    rng = np.random.default_rng(cfg.seed)
    first = make_batch(items[:1], cfg, 1)
    params = jax.jit(module.init)(jax.random.key(cfg.seed), first["mel"], first["feature_mask"])
    params = optim.flatten(nn.unbox(params["params"]))
    tx, schedule = optimizer(cfg)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: _loss_fn(module, optim.unflatten(p), batch))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    history: list[dict] = []
    bar = tqdm(total=cfg.steps, desc="speech encoder (CTC)", unit="step", disable=not progress)
    batches, seconds, t0 = iter(()), 0.0, time.perf_counter()
    for i in range(cfg.steps):
        batch = next(batches, None)
        if batch is None:
            batches = epoch_batches(items, cfg, rng)
            batch = next(batches)
        params, opt_state, loss = step(params, opt_state, batch)
        seconds += batch["feature_mask"].sum() / 100.0
        if i % 25 == 0 or i == cfg.steps - 1:
            loss = float(loss)
            history.append({"step": i, "loss": loss, "lr": float(schedule(i))})
            rate = seconds / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", audio_s_per_s=f"{rate:,.0f}")
        bar.update(1)
    bar.close()
    return optim.unflatten(jax.device_get(params)), history


def transcribe(module: CTCEncoder, params, items: Sequence[Utterance], labels: Labels, cfg):
    """Greedy CTC transcripts of `items`, in order."""
    apply = jax.jit(lambda p, mel, mask: jnp.argmax(module.apply({"params": p}, mel, mask), -1))
    out = []
    for k in range(0, len(items), cfg.batch_size):
        chunk = items[k : k + cfg.batch_size]
        batch = make_batch(chunk, cfg, cfg.batch_size)
        ids = np.asarray(apply(params, batch["mel"], batch["feature_mask"]))
        for row, u in zip(ids, chunk, strict=False):
            out.append(labels.decode(greedy_ctc(row[: (u.mel.shape[1] + 1) // 2])))
    return out


def recognition_metrics(module, params, items, labels: Labels, cfg) -> dict:
    """CER and WER of greedy CTC transcripts against the normalised references."""
    refs = [labels.decode(u.labels) for u in items]
    hyps = transcribe(module, params, items, labels, cfg)
    return {
        "cer": float(jiwer.cer(refs, hyps)),
        "wer": float(jiwer.wer(refs, hyps)),
        "rows": len(items),
        "examples": [
            {"reference": r, "hypothesis": h} for r, h in zip(refs[:3], hyps[:3], strict=True)
        ],
    }


# ----------------------------------------------------------------------------------------------
# Entry points.


def pretrain_encoder(
    train_manifest: str | Path,
    out: str | Path,
    *,
    eval_manifest: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    cfg: AsrEncoderConfig = AsrEncoderConfig(),
    progress: bool = True,
) -> dict:
    """Train, evaluate and save the encoder to `out` (a Hugging Face Whisper directory, without
    the CTC head) with a summary JSON. Resumable: an `out` that holds a summary is left as is."""
    out = Path(out)
    summary_file = out / SUMMARY_FILE
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists, not empty, and not an asr_encoder output")
    tokenizer = None
    if tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    labels = Labels(tokenizer)
    t0 = time.perf_counter()
    items, skipped = load_utterances(train_manifest, labels, cfg)
    held, held_skipped = ([], [])
    if eval_manifest:
        held, held_skipped = load_utterances(eval_manifest, labels, cfg, max_rows=cfg.eval_rows)
    features_s = time.perf_counter() - t0
    enc_cfg = cfg.encoder_config()
    module = CTCEncoder(enc_cfg, labels.size)
    t0 = time.perf_counter()
    params, history = train(module, items, cfg, progress)
    train_s = time.perf_counter() - t0
    summary = {
        "config": dataclasses.asdict(cfg),
        "targets": "tokens" if tokenizer is not None else "characters",
        "train_utterances": len(items),
        "skipped": skipped + held_skipped,
        "features_seconds": features_s,
        "train_seconds": train_s,
        "final_loss": history[-1]["loss"],
        "history": history,
    }
    if held:
        summary["eval"] = recognition_metrics(module, params, held, labels, cfg)
    # Only the encoder is saved: the CTC head was a means of training it, not part of BLSP-KD.
    # Written to a temporary folder and renamed, so an interrupted run leaves no half directory.
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    hf.save_whisper_encoder(tmp, enc_cfg, params["encoder"])
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.asr_encoder", description=__doc__)
    ap.add_argument("--manifest", required=True, help="training manifest (JSON Lines)")
    ap.add_argument("--out", required=True, help="output Hugging Face Whisper directory")
    ap.add_argument("--eval-manifest", default=None, help="held-out manifest for CER/WER")
    ap.add_argument("--tokenizer", default=None, help="CTC over this tokenizer's ids, not chars")
    ap.add_argument("--steps", type=int, default=AsrEncoderConfig.steps)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg = AsrEncoderConfig(steps=args.steps, seed=args.seed)
    summary = pretrain_encoder(
        args.manifest,
        args.out,
        eval_manifest=args.eval_manifest,
        tokenizer_path=args.tokenizer,
        cfg=cfg,
    )
    print(json.dumps({k: summary.get(k) for k in ("final_loss", "eval", "train_utterances")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
