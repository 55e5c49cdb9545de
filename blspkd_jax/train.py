"""Train BLSP-KD: `python -m blspkd_jax.train --config configs/NAME.py[:arg] --workdir DIR
[--config.key=value ...]`.

Writes DIR/config.json (the resolved config), DIR/metrics.jsonl, TensorBoard events and
checkpoints under DIR/checkpoints; rerunning the same command resumes from the last checkpoint.
The program itself is `blspkd_jax.training.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from blspkd_jax import cli
from blspkd_jax.training import config as config_lib
from blspkd_jax.training import distributed
from blspkd_jax.training.trainer import Trainer


def parse_args(argv):
    rest, overrides = config_lib.split_argv(argv)
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.train", description=__doc__)
    ap.add_argument("--config", required=True, help="config file, path.py[:arg]")
    ap.add_argument("--workdir", required=True, help="checkpoints, logs and metrics go here")
    cli.add_verbose_flag(ap)
    args = ap.parse_args(rest)
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    return args, config


def main(argv=None) -> int:
    def body() -> int:
        args, config = parse_args(sys.argv[1:] if argv is None else argv)
        cli.setup_logging(args.verbose)
        d = config.distributed
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
        trainer = Trainer(config, args.workdir)
        final = trainer.run()
        if jax.process_index() == 0:
            print(json.dumps({"step": int(trainer.state.step), **final}, indent=1))
        return 0

    # Once the Trainer exists, its StopRequest answers Ctrl-C; this covers parsing and set-up.
    return cli.run(body, interrupted="interrupted before training started: nothing to save")


if __name__ == "__main__":
    sys.exit(main())
