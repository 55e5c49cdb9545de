"""Tiny BLSP-KD models, LLM configs, tokenizers, hand-built batches and a tiny trained run shared by
the tests (importable from subprocesses: tests/ is put on sys.path by them)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import soundfile as sf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from blspkd_jax.data.layout import CHATML_TEMPLATE
from blspkd_jax.models import hf
from blspkd_jax.models.adapter import CFormerConfig
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.models.encoder import WhisperEncoderConfig
from blspkd_jax.models.llm import LLM, LLMConfig
from blspkd_jax.training import config as config_lib
from blspkd_jax.training import optim

REPO = Path(__file__).parent.parent

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


# ----------------------------------------------------------------------------------------------
# Tokenizers.

SENTENCES = [
    "the cat sat on the mat",
    "hello world how are you today",
    "a quick brown fox jumps over the lazy dog",
    "repeat after me please",
    "you are a helpful assistant",
]
SPECIALS = [
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def tiny_chat_tokenizer(path, chat_template=CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained on a few sentences, ChatML specials, saved and reloaded
    with AutoTokenizer as a real checkpoint's would be. Shared by the data tests."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIALS[2:],
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------
# A tiny trained run (the `tiny_run` fixture of conftest.py builds it once per session).

OVERRIDES = [
    "--config.total_steps=2",
    "--config.batch_size=4",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1",
    "--config.peak_tflops_per_device=1.0",
    "--config.data.worker_count=0",
    "--config.data.frame_buckets=(160,)",
    "--config.data.token_buckets=(48,)",
    "--config.data.max_seconds=1.5",
    "--config.data.max_text_tokens=24",
    "--config.model.encoder.d_model=32",
    "--config.model.encoder.encoder_layers=1",
    "--config.model.encoder.encoder_attention_heads=2",
    "--config.model.encoder.encoder_ffn_dim=64",
    "--config.model.encoder.max_source_positions=80",
    "--config.model.adapter.n_pre=1",
    "--config.model.adapter.n_post=1",
    "--config.model.adapter.max_tokens=24",
    "--config.model.llm.lora_rank=4",
    "--config.optim.warmup_steps=1",
    # The encoder stays frozen: its weights come back from the seed alone, which load_run must
    # reproduce; the adapter and PLoRA train.
    "--config.train.trainable=('^adapter/', 'lora_')",
]


def _write_audio(path, seconds, rate, rs):
    """Noise with a slow envelope (not silence, so the log-mel has structure); some rows at 8 kHz
    stereo, which the loader resamples and averages."""
    n = int(seconds * rate)
    env = 0.2 + 0.8 * np.abs(np.sin(np.linspace(0, 6, n)))
    x = (0.1 * rs.randn(n) * env).astype(np.float32)
    sf.write(path, np.stack([x, -x], 1) if rate != 16000 else x, rate)


def build_tiny_run(root: Path, overrides: tuple[str, ...] = ()):
    """(workdir, assets dir, the trainer's final params): a 2-step run with PLoRA in `root`, a
    random tiny LLM saved as an HF directory with a ChatML tokenizer, and noise audio with real
    transcripts; `overrides` (`--config.KEY=VALUE`) come last."""
    from blspkd_jax.training.trainer import Trainer

    tok = tiny_chat_tokenizer(root / "llm")
    cfg = tiny_llm_config(len(tok), num_layers=1, tie_word_embeddings=True)
    params = LLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    # O(1) logits with clear margins (not init's near-uniform ones), so that greedy responses
    # are words that depend on the prompt, not a tie broken by rounding.
    rs = np.random.RandomState(1)
    params = {
        k: (1 + 0.2 * rs.randn(*v.shape))
        if k.endswith("scale")
        else (rs.randn(*v.shape) if "embed" in k else 0.3 * rs.randn(*v.shape))
        for k, v in optim.flatten(nn.unbox(params)).items()
    }
    hf.save_llm(
        root / "llm", cfg, optim.unflatten({k: v.astype(np.float32) for k, v in params.items()})
    )

    rs = np.random.RandomState(0)
    (root / "audio").mkdir()
    rows = []
    for i in range(8):
        rate = 8000 if i % 3 == 2 else 16000
        _write_audio(root / "audio" / f"u{i}.wav", 0.5 + 0.12 * i, rate, rs)
        row = {"audio": f"audio/u{i}.wav", "text": SENTENCES[i % len(SENTENCES)], "id": f"u{i}"}
        if i % 2:
            row["response"] = SENTENCES[(i + 1) % len(SENTENCES)]
        row["reference"] = SENTENCES[(i + 2) % len(SENTENCES)]
        rows.append(row)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))

    config = config_lib.load_config(str(REPO / "configs/tiny.py"))
    config_lib.apply_overrides(
        config,
        [
            *OVERRIDES,
            f"--config.data.train_manifest={root / 'train.jsonl'}",
            f"--config.model.llm.hf_path={root / 'llm'}",
            *overrides,
        ],
    )
    trainer = Trainer(config, root / "workdir")
    trainer.run()
    final = jax.tree.map(np.asarray, trainer.state.params())
    return root / "workdir", root, final


def run_on_cpu_devices(script: str, *args: str, devices: int = 8, timeout: int = 300) -> str:
    """Run `python -c script *args` in a fresh process that sees `devices` virtual CPU devices
    (XLA reads the flag only at start-up), from the repository root; returns its stdout and
    fails the test with its stderr when it exits non-zero."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (registered in sys.modules as `bench_NAME`: dataclasses
    resolve string annotations through it); the script puts benchmarks/ on sys.path itself."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", REPO / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
