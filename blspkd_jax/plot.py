"""Draw a run as PNG files:

    python -m blspkd_jax.plot curves --workdir DIR [--out DIR/plots/curves.png]
    python -m blspkd_jax.plot cif --workdir DIR --manifest M [--row N] [--out DIR/plots/cif.png]

`curves`: every logged loss (and evaluation metric) against the step, from DIR/metrics.jsonl.
`cif`: for the manifest's N-th row (1-based, default 1), the log-mel, the CFormer's firing
weights and the frames where CIF fires each token, labelled with the transcript's tokens. The
code is `blspkd_jax.inference.plots`.
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax import cli
from blspkd_jax.data import storage
from blspkd_jax.data.manifest import DataError, read_rows
from blspkd_jax.inference.plots import plot_cif, plot_curves
from blspkd_jax.inference.workdir import load_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", help="loss curves from metrics.jsonl")
    cif = sub.add_parser("cif", help="CIF's fire points on one utterance")
    for p in (curves, cif):
        p.add_argument("--workdir", required=True, help="a training run's workdir")
        p.add_argument("--out", default=None, help="PNG file (default: WORKDIR/plots/NAME.png)")
        cli.add_verbose_flag(p)
    cif.add_argument("--manifest", required=True, help="JSON Lines with 'audio' and 'text'")
    cif.add_argument("--row", type=int, default=1, help="which row (1-based)")
    cif.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        out = args.out or storage.join(args.workdir, f"plots/{args.command}.png")
        if args.command == "curves":
            print(plot_curves(args.workdir, out))
            return 0
        rows = read_rows(args.manifest)
        if not 1 <= args.row <= len(rows):
            raise DataError(f"{args.manifest}: --row {args.row} not in 1..{len(rows)}")
        print(plot_cif(load_run(args.workdir, args.step), rows[args.row - 1], out))
        return 0

    return cli.run(body, interrupted="interrupted: nothing drawn")


if __name__ == "__main__":
    sys.exit(main())
