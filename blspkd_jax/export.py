"""Export a trained run to Hugging Face: `python -m blspkd_jax.export --workdir DIR --out OUT
[--step N] [--verify-manifest M]` writes a directory that
`transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True)` loads offline in PyTorch.

Also the stable name of `load_exported(OUT)` (back to JAX, exactly). The code is
`blspkd_jax.inference.export` (the directory) and `blspkd_jax.models.blspkd_hf` (its format).
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax.data.manifest import DataError, read_rows
from blspkd_jax.inference.export import (
    DEFAULT_SHARD_BYTES,
    LLM_SUBDIR,
    export_run,
    save_exported,
    verify_export,
)
from blspkd_jax.inference.workdir import RunError, load_run
from blspkd_jax.models.blspkd_hf import ExportError, load_exported

__all__ = ["export_run", "load_exported", "main", "save_exported"]


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
