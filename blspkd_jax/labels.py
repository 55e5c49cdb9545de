"""Continuation labels (BLSP's recipe): `python -m blspkd_jax.labels --llm HF_DIR --manifest
IN.jsonl --out OUT.jsonl [--instruction TEXT] [--system TEXT] [--batch-size N]
[--max-new-tokens N] [--dtype auto|float32|bfloat16]` adds to every row the frozen LLM's
continuation of its transcript as "response". Rerunning resumes an unfinished OUT. Runs on every
device (several hosts: start it on each, as training is started); the LLM is loaded sharded.
The code is `blspkd_jax.inference.labels`.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
from transformers import AutoTokenizer

from blspkd_jax import cli
from blspkd_jax.data.layout import CHATML_TEMPLATE, DEFAULT_SYSTEM
from blspkd_jax.inference import multihost
from blspkd_jax.inference.labels import DEFAULT_INSTRUCTION, label_manifest
from blspkd_jax.models import hf, sharding


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.labels",
        description="Add a 'response' to every manifest row: the LLM's continuation of the "
        "transcript under an instruction (greedy by default). Rerunning resumes an unfinished OUT.",
    )
    ap.add_argument("--llm", required=True, help="Hugging Face LLM directory (with tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --llm)")
    ap.add_argument("--manifest", required=True, help="input JSON Lines manifest")
    ap.add_argument("--out", required=True, help="output manifest (resumed if it exists)")
    ap.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help="text put before the transcript in the user turn (default: BLSP's continuation "
        "instruction followed by a blank line)",
    )
    ap.add_argument(
        "--system", default=DEFAULT_SYSTEM, help="system prompt ('' for no system turn)"
    )
    ap.add_argument(
        "--chat-template",
        default=None,
        help="'chatml' or a Jinja file, for tokenizers without a chat template",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="parameter and compute dtype of the LLM (auto: the checkpoint's torch_dtype, as "
        "stored; float32 when it names none)",
    )
    ap.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        help="devices that split each layer's heads and MLP (mesh.tensor); the others split "
        "the parameters FSDP-style and the batch (default 1)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_verbose_flag(ap)
    args = ap.parse_args(argv)

    cli.setup_logging(args.verbose)

    def body() -> int:
        template = args.chat_template
        if template == "chatml":
            template = CHATML_TEMPLATE
        elif template:
            with open(template, encoding="utf-8") as f:
                template = f.read()
        # Every process of a multi-host job runs this; the LLM is read straight into the mesh of
        # all their devices (no device holds it whole), each process feeds its rows.
        multihost.initialize()
        mesh = sharding.make_mesh(1, -1, args.tensor_parallel)
        dtype = _dtype(args.llm) if args.dtype == "auto" else jnp.dtype(args.dtype)
        module, params = hf.load_llm(args.llm, dtype=dtype, mesh=mesh)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.llm)
        kept, made = label_manifest(
            args.manifest,
            args.out,
            module,
            params,
            tokenizer,
            instruction=args.instruction,
            system=args.system or None,
            chat_template=template,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            rng=jax.random.key(args.seed) if args.temperature > 0 else None,
            progress=not args.no_progress,
        )
        print(
            f"{args.out}: {kept} rows kept from an earlier run, {made} generated", file=sys.stderr
        )
        return 0

    return cli.run(body, interrupted="interrupted: rerun the same command to finish OUT")


def _dtype(llm_dir) -> jnp.dtype:
    """The dtype a Hugging Face config.json stores its weights in (`torch_dtype`, or `dtype` in
    newer transformers); float32 when it names none we compute in."""
    cfg = hf.read_config(llm_dir)
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
    return jnp.dtype(name) if name in ("float32", "bfloat16", "float16") else jnp.dtype("float32")


if __name__ == "__main__":
    sys.exit(main())
