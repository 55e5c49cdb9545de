"""Export a trained run to Hugging Face: `python -m blspkd_jax.export --workdir DIR --out OUT
[--step N] [--verify-manifest M]` writes a directory that
`transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True)` loads offline in PyTorch.

Also the stable name of `load_exported(OUT)` (back to JAX, exactly). The code is
`blspkd_jax.inference.export` (the directory) and `blspkd_jax.models.blspkd_hf` (its format).
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax import cli
from blspkd_jax.data import storage
from blspkd_jax.data.manifest import read_rows
from blspkd_jax.inference import multihost
from blspkd_jax.inference.export import (
    DEFAULT_SHARD_BYTES,
    LLM_SUBDIR,
    check_out_agreed,
    export_run,
    save_exported,
    verify_export,
)
from blspkd_jax.inference.workdir import load_run
from blspkd_jax.models.blspkd_hf import ExportError, load_exported

__all__ = ["export_run", "load_exported", "main", "save_exported"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workdir", required=True, help="a training run's workdir")
    ap.add_argument(
        "--out", required=True, help="the Hugging Face directory to write (local, or gs://...)"
    )
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
    ap.add_argument(
        "--force",
        action="store_true",
        help="replace OUT even if it holds files that are not an earlier export",
    )
    cli.add_verbose_flag(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        if args.verify_manifest and storage.is_url(args.out):
            raise ExportError(
                f"--verify-manifest: transformers loads local folders only; export to a local "
                f"--out to verify, or drop --verify-manifest for {args.out}"
            )
        multihost.initialize()  # several hosts: every process runs this command alike
        check_out_agreed(args.out, args.force)  # before the minutes of loading the run
        run = load_run(args.workdir, args.step)
        out = export_run(
            args.workdir,
            args.out,
            max_shard_bytes=args.max_shard_size,
            llm_dir=not args.no_llm_dir,
            run=run,
            force=args.force,
        )
        if multihost.is_writer():
            print(f"exported {args.workdir} step {run.step} to {out}", file=sys.stderr)
        if args.verify_manifest:
            rows = read_rows(args.verify_manifest)[: args.verify_rows]
            pairs = verify_export(out, run, rows)  # JAX on every process, PyTorch on process 0
            if not multihost.is_writer():
                return 0
            for r, (jax_text, torch_text) in zip(rows, pairs, strict=True):
                mark = "==" if jax_text == torch_text else "!="
                print(f"{r.id}: JAX {jax_text!r} {mark} PyTorch {torch_text!r}")
            same = sum(a == b for a, b in pairs)
            print(f"PyTorch greedy text equals JAX's on {same}/{len(pairs)} utterances")
        return 0

    return cli.run(
        body, interrupted="interrupted: OUT was left as it was (exports are moved in whole)"
    )


if __name__ == "__main__":
    sys.exit(main())
