"""Greedy decode speed: `blspkd_jax.generate.greedy` against transformers' PyTorch `generate`, same
random Llama weights, same CPU, float32, a 32-token prompt and no eos (every run decodes all
`--new-tokens`). Tokens/s counts generated tokens (batch x new tokens) over the whole call, prefill
included; our compile time (first call minus a steady call) is reported apart.

    .venv/bin/python benchmarks/decode.py            # tiny and ~100M Llama, batch 1 and 8
    .venv/bin/python benchmarks/decode.py --quick    # tiny only, seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from blspkd_jax.inference.generate import greedy
from blspkd_jax.models import hf

GOAL = 2.0  # ours / transformers tokens/s (issue 6)
SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv heads)
    "tiny": (1024, 64, 128, 2, 4, 2),
    "~100M": (32000, 768, 2048, 12, 12, 12),
}


def build(size: str, path: str):
    """A random transformers Llama saved to `path`, and ours loaded from it."""
    vocab, hidden, inter, layers, heads, kv = SIZES[size]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # decode every requested token
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    module, params = hf.load_llm(path)
    n = sum(p.numel() for p in model.parameters())
    return model, module, params, n


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_ours(module, params, ids, mask, new_tokens):
    out = greedy(
        module, params, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=()
    )
    return np.asarray(jax.block_until_ready(out))


def run_theirs(model, ids, mask, new_tokens):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
        )
    return out.numpy()


def bench(size, batches, prompt_len, new_tokens, repeats):
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model, module, params, n = build(size, d)
    vocab = SIZES[size][0]
    for batch in batches:
        ids = np.random.RandomState(batch).randint(3, vocab, (batch, prompt_len)).astype(np.int32)
        mask = np.ones_like(ids)
        ours = functools.partial(
            run_ours, module, params, jnp.asarray(ids), jnp.asarray(mask), new_tokens
        )
        theirs = functools.partial(
            run_theirs, model, torch.tensor(ids).long(), torch.tensor(mask).long(), new_tokens
        )
        start = time.perf_counter()
        first = ours()  # compiles
        first_s = time.perf_counter() - start
        ours_s = timed(ours, repeats)
        ref = theirs()  # warm-up
        theirs_s = timed(theirs, repeats)
        same = float(np.mean(ref == first)) if ref.shape == first.shape else 0.0
        tokens = batch * new_tokens
        rows.append(
            (size, n, batch, tokens / ours_s, tokens / theirs_s, max(first_s - ours_s, 0.0), same)
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 32 new tokens")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), help="model sizes")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, help="default 128 (32 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    args = parser.parse_args()
    sizes = args.sizes or (["tiny"] if args.quick else list(SIZES))
    new_tokens = args.new_tokens or (32 if args.quick else 128)

    print(
        f"greedy decode, float32, prompt {args.prompt}, {new_tokens} new tokens, "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cores (torch {torch.get_num_threads()} "
        f"threads), median of {args.repeats} runs\n"
    )
    print(
        "| model | params | batch | ours tok/s | transformers tok/s | ratio | ours compile s "
        "| same ids |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for name, n, b, ours, theirs, compile_s, same in bench(
            size, args.batches, args.prompt, new_tokens, args.repeats
        ):
            ratio = ours / theirs
            flag = "" if ratio >= GOAL else " (below goal)"
            print(
                f"| {name} | {n / 1e6:.1f}M | {b} | {ours:.0f} | {theirs:.0f} | "
                f"{ratio:.2f}x{flag} | {compile_s:.1f} | {same:.3f} |"
            )
    print(f"\nGoal: ratio >= {GOAL}x. 'same ids': fraction of output ids equal to transformers'.")


if __name__ == "__main__":
    main()
