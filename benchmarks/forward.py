"""Forward time of our Whisper encoder and LLM against transformers' PyTorch models on this CPU.

Random weights are built in torch, saved with `save_pretrained` and loaded through `blspkd_jax.hf`,
so both sides run the very same checkpoint; the table also reports the largest output difference.
Times are the median of several runs after warmup, JAX and torch runs interleaved so that machine
noise hits both alike; JAX's jit compile time is reported separately. fp32, batch 1.

    .venv/bin/python benchmarks/forward.py [--quick] [--repeats N] [--threads N]
    .venv/bin/python benchmarks/forward.py --memory [--quick]

`--memory` instead compiles (without running) the forward of a Whisper-large encoder and the
forward and backward of a Qwen2.5-0.5B-shaped LLM in bf16, with the attention as it was before
`jax.nn.dot_product_attention` (float32 scores `[B, heads, T, S]` materialised, written out
below), with autodiff of `jax.nn.dot_product_attention`'s XLA path in one block, with ours
(`layers.attention`) in one block, and with ours in blocks of `layers.ATTENTION_QUERY_BLOCK`
queries, and prints XLA's temporary bytes (`compiled.memory_analysis()`).

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
    ap.add_argument("--memory", action="store_true", help="compiled temporary memory, no timing")
    return ap.parse_args()


# Parsed before jax is imported: the core pinning must precede XLA's thread-pool creation.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

from blspkd_jax.models import encoder, hf, layers, llm  # noqa: E402

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
    """The CPU's name and its widest vector ISA: VMs of one name differ in it, and the GEMMs of
    XLA and MKL with it (BENCHMARKS.md, run H)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = next((n for f, n in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if f in flags), None)
    return f"{name} ({isa})" if isa else name


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


# --memory: paper-scale shapes, compiled for this machine's backend, never run.
MEM_ENCODER = dict(
    d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120
)
MEM_LLM = dict(  # Qwen2.5-0.5B: at 7B the weights' own temporaries hide the attention's
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    qkv_bias=True,
    rope_theta=1e6,
    tie_word_embeddings=True,
)
MEM_QUICK_LLM = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
)


def dense_attention(q, k, v, mask=None, *, scale=None, causal=False, query_block=None):
    """The attention before `jax.nn.dot_product_attention`: float32 scores [B, K, G, T, S] in one
    piece, a finite fill for masked keys, softmax, then the weighted sum (same signature as
    `layers.attention`, so it can stand in for it)."""
    del causal, query_block
    B, T, N, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, Dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * (Dh**-0.5 if scale is None else scale)
    if mask is not None:  # [B, 1, T or 1, S]
        s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, N, Dh)


def jax_nn_attention(q, k, v, mask=None, *, scale=None, causal=False, query_block=None):
    """Autodiff of `jax.nn.dot_product_attention`'s XLA path, in one block: the project's
    attention before `layers._attend` (issue 16)."""
    del causal, query_block
    mask = None if mask is None else jnp.asarray(mask, bool)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def temp_mib(fn, *args) -> float:
    # A fresh function each time: jit caches traces by function, and the attention swap below
    # happens at trace time.
    mem = jax.jit(lambda *a: fn(*a)).lower(*args).compile().memory_analysis()
    return mem.temp_size_in_bytes / 2**20


def memory_rows(quick: bool) -> list[dict]:
    """Temporary memory of each compiled program with the old attention and with ours."""
    bf16 = jnp.bfloat16
    sizes = ENCODER_QUICK if quick else MEM_ENCODER
    positions, batch = (100, 2) if quick else (1500, 24)
    enc_cfg = encoder.WhisperEncoderConfig(
        max_source_positions=positions, dtype=bf16, param_dtype=bf16, scan_layers=True, **sizes
    )
    enc = encoder.WhisperEncoder(enc_cfg)
    mels = jax.ShapeDtypeStruct((batch, 80, 2 * positions), jnp.float32)
    enc_params = jax.eval_shape(lambda x: enc.init(jax.random.key(0), x)["params"], mels)
    enc_fwd = lambda p, x: enc.apply({"params": p}, x)  # noqa: E731

    length, lbatch = (128, 2) if quick else (2048, 4)
    llm_cfg = llm.LLMConfig(
        **(MEM_QUICK_LLM if quick else MEM_LLM),
        dtype=bf16,
        param_dtype=bf16,
        scan_layers=True,
        remat="full",
    )
    lm = llm.LLM(llm_cfg)
    embeds = jax.ShapeDtypeStruct((lbatch, length, llm_cfg.hidden_size), bf16)
    mask = jax.ShapeDtypeStruct((lbatch, length), jnp.bool_)
    lm_params = jax.eval_shape(
        lambda: lm.init(jax.random.key(0), inputs_embeds=jnp.zeros(embeds.shape, bf16))["params"]
    )

    def lm_hidden(p, x, m):
        return lm.apply({"params": p}, inputs_embeds=x, attention_mask=m, return_hidden=True)

    def lm_grad(p, x, m):  # backward through every layer to the input (the student's path)
        return jax.grad(lambda x: jnp.sum(lm_hidden(p, x, m).astype(jnp.float32) ** 2))(x)

    programs = [
        (
            f"Whisper encoder d={sizes['d_model']} L={sizes['encoder_layers']}, forward",
            f"[{batch}, 80, {2 * positions}] mel",
            batch * sizes["encoder_attention_heads"] * positions**2 * 4,
            enc_fwd,
            (enc_params, mels),
        ),
        (
            f"LLM H={llm_cfg.hidden_size} L={llm_cfg.num_layers} (GQA {llm_cfg.num_heads}/"
            f"{llm_cfg.num_kv_heads}), forward",
            f"[{lbatch}, {length}] embeddings",
            lbatch * llm_cfg.num_heads * length**2 * 4,
            lm_hidden,
            (lm_params, embeds, mask),
        ),
        (
            f"same LLM, forward + backward (remat {llm_cfg.remat})",
            f"[{lbatch}, {length}] embeddings",
            lbatch * llm_cfg.num_heads * length**2 * 4,
            lm_grad,
            (lm_params, embeds, mask),
        ),
    ]
    rows = []
    for name, shape, scores, fn, args in programs:
        ours = temp_mib(fn, *args)
        block = layers.ATTENTION_QUERY_BLOCK
        encoder.attention, llm.attention = dense_attention, dense_attention
        try:
            before = temp_mib(fn, *args)
            encoder.attention = llm.attention = jax_nn_attention
            jax_nn = temp_mib(fn, *args)
            encoder.attention = llm.attention = layers.attention
            layers.ATTENTION_QUERY_BLOCK = 1 << 30  # one block
            unblocked = temp_mib(fn, *args)
        finally:
            encoder.attention = llm.attention = layers.attention
            layers.ATTENTION_QUERY_BLOCK = block
        rows.append(
            dict(
                model=name,
                input=shape,
                scores=scores / 2**20,
                before=before,
                jax_nn=jax_nn,
                unblocked=unblocked,
                ours=ours,
            )
        )
        print(rows[-1], flush=True)
    return rows


def memory_main(args):
    rows = memory_rows(args.quick)
    print(
        f"\njax {jax.__version__} ({jax.devices()[0].platform}), bf16 weights and compute; XLA's "
        f"temporary bytes of the compiled program (query block {layers.ATTENTION_QUERY_BLOCK}).\n"
    )
    print(
        "| program | input | fp32 scores of one layer (MiB) | before (MiB) "
        "| jax.nn.dot_product_attention, one block (MiB) | ours, one block (MiB) | ours (MiB) "
        "| ours / before |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['input']} | {r['scores']:.0f} | {r['before']:.0f} "
            f"| {r['jax_nn']:.0f} | {r['unblocked']:.0f} | {r['ours']:.0f} "
            f"| {r['ours'] / r['before']:.2f} |"
        )


def main(args):
    if args.memory:
        return memory_main(args)
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
