"""Tiny BLSP-KD models, LLM configs and hand-built batches shared by the tests (importable from
subprocesses: tests/ is put on sys.path by them)."""

from __future__ import annotations

import numpy as np

from blspkd_jax.adapter import CFormerConfig
from blspkd_jax.encoder import WhisperEncoderConfig
from blspkd_jax.llm import LLMConfig
from blspkd_jax.model import BLSPKDConfig

N_MELS = 16
VOCAB = 97
MAX_TOKENS = 16


def tiny_llm_config(vocab_size: int, **overrides) -> LLMConfig:
    """The tests' tiny Llama (width 32, 2 layers, 4 heads, 2 KV heads) for a vocabulary (a tiny
    tokenizer's `len(tok)`); `overrides` set or replace any other LLMConfig field (eos, tying,
    layers, LoRA, scan)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    return LLMConfig(**{**fields, **overrides})


def tiny_config(lora_rank: int = 4, scan_layers: bool = False) -> BLSPKDConfig:
    enc = WhisperEncoderConfig(
        num_mel_bins=N_MELS,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        max_source_positions=64,
        pad_to_30s=False,
        scan_layers=scan_layers,
    )
    llm = tiny_llm_config(VOCAB, scan_layers=scan_layers, lora_rank=lora_rank, lora_dropout=0.0)
    adapter = CFormerConfig(
        d_model=32,
        num_heads=4,
        ffn_dim=64,
        n_pre=1,
        n_post=1,
        llm_hidden=32,
        max_tokens=MAX_TOKENS,
        scan_layers=scan_layers,
    )
    return BLSPKDConfig(encoder=enc, adapter=adapter, llm=llm)


def random_batch(seed: int, batch: int = 8, frames: int = 64, length: int = 32) -> dict:
    """A layout-valid batch: [prefix 3][transcript n][middle 2][response r][eot 1][pad].

    Example lengths vary so that padding differs across the batch; the last example is padding
    (example_mask False) to exercise that path too.
    """
    rs = np.random.RandomState(seed)
    out = {
        "features": rs.randn(batch, N_MELS, frames).astype(np.float32),
        "feature_mask": np.zeros((batch, frames), bool),
        "input_ids": np.zeros((batch, length), np.int32),
        "attention_mask": np.zeros((batch, length), bool),
        "speech_mask": np.zeros((batch, length), bool),
        "response_mask": np.zeros((batch, length), bool),
        "text_lengths": np.zeros((batch,), np.int32),
        "example_mask": np.ones((batch,), bool),
    }
    for b in range(batch):
        n = rs.randint(3, 9)
        r = rs.randint(2, 8)
        total = 3 + n + 2 + r + 1
        out["input_ids"][b, :total] = rs.randint(1, VOCAB, total)
        out["attention_mask"][b, :total] = True
        out["speech_mask"][b, 3 : 3 + n] = True
        out["response_mask"][b, 5 + n : total] = True
        out["text_lengths"][b] = n
        out["feature_mask"][b, : rs.randint(frames // 2, frames + 1)] = True
    out["example_mask"][-1] = False
    out["features"] *= out["feature_mask"][:, None, :]
    return out
