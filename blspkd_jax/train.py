"""Train BLSP-KD: `python -m blspkd_jax.train --config configs/NAME.py[:arg] --workdir DIR
[--config.key=value ...]`.

With `--compile-only TOPOLOGY` (e.g. v5p:4x4x4, or cpu:8) nothing is trained: the step the same
command would run is compiled for that slice from shapes alone, and its memory a device, FLOPs and
MFU bound are printed, ending with one JSON line; exit 0 when it fits, 1 when not
(`blspkd_jax.training.plan`).

Writes DIR/config.json (the resolved config), DIR/metrics.jsonl, TensorBoard events and
checkpoints under DIR/checkpoints; rerunning the same command resumes from the last checkpoint.
The program itself is `blspkd_jax.training.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from blspkd_jax import cli
from blspkd_jax.training import config as config_lib

log = logging.getLogger("blspkd_jax.train")


def parse_args(argv):
    rest, overrides = config_lib.split_argv(argv)
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.train", description=__doc__)
    ap.add_argument("--config", required=True, help="config file, path.py[:arg]")
    ap.add_argument("--workdir", required=True, help="checkpoints, logs and metrics go here")
    ap.add_argument(
        "--compile-only",
        metavar="TOPOLOGY",
        default="",
        help="compile the train step for a TPU topology (v5p:4x4x4, v5e:4x8, v4:2x2x2, v6e:4x4; "
        "needs libtpu: pip install 'blspkd-jax[tpu]') or cpu:N, report whether it fits and exit; "
        "reads no weights or data and writes nothing",
    )
    cli.add_verbose_flag(ap)
    args = ap.parse_args(rest)
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    return args, config


def main(argv=None) -> int:
    def body() -> int:
        args, config = parse_args(sys.argv[1:] if argv is None else argv)
        cli.setup_logging(args.verbose)
        if args.compile_only:
            return compile_only(config, args.compile_only)
        # Imported once the command line is known to be good: JAX, the data pipeline and the
        # checkpointer take seconds to import, a mistyped key is reported before any of that.
        import jax

        from blspkd_jax.training import distributed
        from blspkd_jax.training.trainer import Trainer

        d = config.distributed
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
        trainer = Trainer(config, args.workdir)
        final = trainer.run()
        if jax.process_index() == 0:
            print(json.dumps({"step": int(trainer.state.step), **final}, indent=1))
        return 0

    # Once the Trainer exists, its StopRequest answers Ctrl-C; this covers parsing and set-up.
    return cli.run(body, interrupted="interrupted before training started: nothing to save")


def compile_only(config, topology: str) -> int:
    """`--compile-only`: 0 when the step fits `topology`, 1 when not (the report says why)."""
    import jax

    from blspkd_jax.training import plan

    # Nothing runs here, so no local accelerator is claimed: JAX starts on the CPU only (a TPU
    # topology is compiled for by libtpu all the same), with N devices for cpu:N.
    jax.config.update("jax_platforms", "cpu")
    gen, _, n = topology.partition(":")
    if gen == "cpu" and n.isdigit():
        # JAX already started (called in-process): its devices as they are.
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", int(n))
    topo = plan.topology(topology, config.peak_tflops_per_device)
    result = plan.make_plan(config, topo, log=log.info)
    summary = plan.report(result, config)
    print(json.dumps(summary), flush=True)
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
