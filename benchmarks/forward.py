"""Forward time of our Whisper encoder and LLM against transformers' PyTorch models on this CPU.

Random weights are built in torch, saved with `save_pretrained` and loaded through `blspkd_jax.hf`,
so both sides run the very same checkpoint; the table also reports the largest output difference.
Times are the median of several runs after warmup, JAX and torch runs interleaved so that machine
noise hits both alike; JAX's jit compile time is reported separately. fp32, batch 1.

    .venv/bin/python benchmarks/forward.py [--quick] [--repeats N] [--threads N]

`--threads N` pins the process to N cores (XLA sizes its thread pool from the affinity mask) and
gives torch N threads; by default both use every core. On a machine shared with other jobs, torch's
OpenMP threads can stall badly when oversubscribed: use `--threads 1` there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few runs (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 7, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="cores for both (default: all)")
    ap.add_argument("--only", choices=["encoder", "llm"], default=None)
    return ap.parse_args()


# Parsed before jax is imported: the core pinning must precede XLA's thread-pool creation.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

from blspkd_jax.models import hf  # noqa: E402

ENCODER = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048)
ENCODER_QUICK = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
LLM = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    intermediate_size=2048,
    vocab_size=32000,
)
LLM_QUICK = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench(jax_fn, torch_fn, repeats: int, warmup: int = 2):
    """Median seconds of `jax_fn` and `torch_fn` (each returns its output), interleaved."""
    for _ in range(warmup):
        jax.block_until_ready(jax_fn())
        torch_fn()
    tj, tt = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jax_fn())
        tj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_fn()
        tt.append(time.perf_counter() - t0)
    return statistics.median(tj), statistics.median(tt)


def compiled(module, params, *args):
    """(AOT-compiled apply, seconds spent in tracing + compilation)."""
    t0 = time.perf_counter()
    fn = jax.jit(module.apply).lower({"params": params}, *args).compile()
    return fn, time.perf_counter() - t0


def encoder_row(quick: bool, repeats: int, tmp: str) -> dict:
    sizes = ENCODER_QUICK if quick else ENCODER
    positions = 100 if quick else 1500  # 2 * positions mel frames: 30 s at full size
    cfg = WhisperConfig(num_mel_bins=80, max_source_positions=positions, **sizes)
    torch.manual_seed(0)
    model = WhisperEncoder(cfg).eval()
    path = os.path.join(tmp, "whisper")
    model.save_pretrained(path)
    module, params = hf.load_whisper_encoder(path)
    x = np.random.RandomState(0).randn(1, 80, 2 * positions).astype(np.float32)
    xt = torch.from_numpy(x)
    fn, compile_s = compiled(module, params, x)

    def run_torch():
        with torch.inference_mode():
            return model(xt).last_hidden_state

    ours, ref = np.asarray(fn({"params": params}, x)), run_torch().numpy()
    tj, tt = bench(lambda: fn({"params": params}, x), run_torch, repeats)
    return dict(
        model=f"Whisper encoder d={sizes['d_model']} L={sizes['encoder_layers']}",
        params=sum(p.numel() for p in model.parameters()),
        input=f"[1, 80, {2 * positions}] mel",
        jax=tj,
        torch=tt,
        compile=compile_s,
        diff=float(np.abs(ours - ref).max()),
    )


def llm_row(quick: bool, repeats: int, tmp: str) -> dict:
    sizes = LLM_QUICK if quick else LLM
    length = 64 if quick else 512
    cfg = LlamaConfig(max_position_embeddings=2 * length, tie_word_embeddings=False, **sizes)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = os.path.join(tmp, "llm")
    model.save_pretrained(path)
    module, params = hf.load_llm(path)
    ids = np.random.RandomState(0).randint(0, sizes["vocab_size"], (1, length)).astype(np.int32)
    ids_t = torch.from_numpy(ids).long()
    fn, compile_s = compiled(module, params, ids)

    def run_torch():
        with torch.inference_mode():
            return model(ids_t, use_cache=False).logits

    ours, ref = np.asarray(fn({"params": params}, ids)), run_torch().numpy()
    tj, tt = bench(lambda: fn({"params": params}, ids), run_torch, repeats)
    return dict(
        model=f"Llama-style LLM H={sizes['hidden_size']} L={sizes['num_hidden_layers']}",
        params=sum(p.numel() for p in model.parameters()),
        input=f"[1, {length}] tokens",
        jax=tj,
        torch=tt,
        compile=compile_s,
        diff=float(np.abs(ours - ref).max()),
    )


def main(args):
    repeats = args.repeats or (2 if args.quick else 7)
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "encoder"):
            rows.append(encoder_row(args.quick, repeats, tmp))
        if args.only in (None, "llm"):
            rows.append(llm_row(args.quick, repeats, tmp))

    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} "
        f"used); torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}). fp32, batch 1, median of "
        f"{repeats} runs after 2 warmups.\n"
    )
    print(
        "| model | params | input | ours (ms) | transformers (ms) | ours / transformers "
        "| jit compile (s) | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['input']} | {r['jax'] * 1e3:.1f} "
            f"| {r['torch'] * 1e3:.1f} | {r['jax'] / r['torch']:.2f} | {r['compile']:.1f} "
            f"| {r['diff']:.1e} |"
        )


if __name__ == "__main__":
    main(ARGS)
