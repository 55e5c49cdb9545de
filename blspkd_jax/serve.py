"""The web demo: `python -m blspkd_jax.serve --workdir DIR [--port 7860] [--host 127.0.0.1]
[--step N] [--instruction TEXT ...] [--max-new-tokens N]`.

Opens a page where you record or upload speech, pick or type an instruction and watch the run's
answer stream in, next to how CIF cut the speech into tokens and how long the answer took
(`blspkd_jax.inference.web`). A chunk-causal run answers through the streaming path; any other
run offline. Everything is compiled before the page opens.
"""

from __future__ import annotations

import argparse
import sys

from blspkd_jax import cli
from blspkd_jax.inference.web import INSTRUCTIONS, Answerer, build_app, offered_instructions
from blspkd_jax.inference.workdir import load_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.serve", description=__doc__)
    ap.add_argument("--workdir", required=True, help="a training run's workdir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    ap.add_argument(
        "--instruction",
        action="append",
        default=None,
        help="an instruction to offer besides the run's own (repeatable; default: the demo's "
        "repeat and continue instructions)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    cli.add_verbose_flag(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        run = load_run(args.workdir, args.step)
        answerer = Answerer(run, max_new_tokens=args.max_new_tokens)
        instructions = tuple(args.instruction or INSTRUCTIONS)
        print(f"compiling ({answerer.mode}) ...", file=sys.stderr)
        answerer.warmup([None, *offered_instructions(run, instructions)])
        app = build_app(answerer, instructions)
        app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)
        return 0

    return cli.run(body, interrupted="stopped")


if __name__ == "__main__":
    sys.exit(main())
