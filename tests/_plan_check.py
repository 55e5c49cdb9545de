"""Checks of `python -m blspkd_jax.train ... --compile-only cpu:4` (run as a subprocess by
test_compile_only.py: the command sets JAX's CPU device count, which must happen before JAX
starts). Runs the command's `main` on configs/tiny.py with the given overrides, then prints one
JSON line: its exit code and summary, and

1. whether the plan's abstract state is the state the trainer builds (`weights.assemble_params` +
   `train_state.create_state`): same leaves, shapes, dtypes and shardings;
2. the argument bytes a device the compiled step must hold by an explicit sum: each state and
   batch leaf's shard (its shape from its sharding) plus the rng key.
"""

import contextlib
import io
import json
import math
import sys

import jax
import numpy as np

from blspkd_jax import train
from blspkd_jax.models import sharding
from blspkd_jax.training import config as config_lib
from blspkd_jax.training import plan, train_state, weights


def shard_bytes(x, s) -> int:
    return math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def main(overrides):
    stdout = io.StringIO()
    args = ["--config", "configs/tiny.py", "--workdir", "unused", "--compile-only", "cpu:4"]
    with contextlib.redirect_stdout(stdout):
        code = train.main(args + overrides)
    summary = json.loads(stdout.getvalue().splitlines()[-1])
    config = config_lib.load_config("configs/tiny.py")
    config_lib.apply_overrides(config, overrides)
    topo = plan.topology("cpu:4")
    step = plan.prepare(config, topo)
    params = weights.assemble_params(step.config, step.model, step.mesh)
    real, real_shardings = train_state.create_state(params, step.mesh, step.step_cfg, step.tx)
    same_tree = jax.tree.structure(real) == jax.tree.structure(step.state)
    mismatch = [
        f"{path}: {r.shape}/{r.dtype}/{rs.spec} vs {a.shape}/{a.dtype}/{s.spec}"
        for (path, r), rs, a, s in zip(
            jax.tree_util.tree_leaves_with_path(real),
            jax.tree.leaves(real_shardings),
            jax.tree.leaves(step.state),
            jax.tree.leaves(step.state_shardings),
            strict=True,
        )
        if (r.shape, r.dtype) != (a.shape, a.dtype) or not rs.is_equivalent_to(s, len(r.shape))
    ]
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(real.frozen)})
    state_args = sum(
        shard_bytes(x, s)
        for x, s in zip(
            jax.tree.leaves(step.state), jax.tree.leaves(step.state_shardings), strict=True
        )
    )
    batch_args = sum(
        shard_bytes(x, sharding.batch_sharding(step.mesh, len(x.shape)))
        for x in step.batch.values()
    )
    rng_bytes = 2 * 4
    print(
        json.dumps(
            {
                "exit_code": code,
                "devices": len(jax.devices()),
                "same_tree": same_tree,
                "mismatch": mismatch[:3],
                "frozen_dtypes": dtypes,
                "expected_argument_bytes": state_args + batch_args + rng_bytes,
                "summary": summary,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
