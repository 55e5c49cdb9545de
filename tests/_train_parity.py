"""Runs a few train steps of the tiny model on given meshes and saves losses and parameters.

Run as a subprocess (XLA_FLAGS must be set before JAX starts):
  python tests/_train_parity.py --out R.npz --devices 8 --meshes 1,1,1 1,8,1 2,2,2
(Several processes are tested through the training command: tests/test_train.py.)
"""

from __future__ import annotations

import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--meshes", nargs="+", default=["1,1,1"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accum", type=int, default=1)
    args = ap.parse_args()

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(__file__))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from tiny import random_batch, tiny_config

    from blspkd_jax.models import sharding
    from blspkd_jax.models.blspkd import BLSPKD
    from blspkd_jax.training import optim, train_state, weights
    from blspkd_jax.training.objective import LossConfig

    model = BLSPKD(tiny_config())
    batches = [random_batch(100 + i) for i in range(args.steps)]
    step_cfg = train_state.StepConfig(
        trainable=("^adapter/", "lora_"),
        loss=LossConfig(response_ce=0.5),
        grad_accum_steps=args.accum,
        # As the trainer runs: the student starts from the teacher's prompt prefix.
        shared_prefix=min(int(np.argmax(b["speech_mask"], 1).min()) for b in batches),
    )
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
    results = {}
    for spec in args.meshes:
        sizes = [int(s) for s in spec.split(",")]
        n = int(np.prod(sizes))
        mesh = sharding.make_mesh(*sizes, devices=jax.devices()[:n])
        tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=args.steps)
        params = weights.random_params(model, mesh, jax.random.key(0))
        state, shardings = train_state.create_state(params, mesh, step_cfg, tx)
        step = train_state.make_train_step(model, step_cfg, tx)
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        compiled, _ = train_state.compile_train_step(
            step, shardings, mesh, abstract_state, abstract_batch, log=lambda *a: None
        )
        losses = []
        for batch in batches:
            state, metrics = compiled(
                state, sharding.global_batch(mesh, batch), jax.random.PRNGKey(1)
            )
            losses.append({k: float(v) for k, v in metrics.items()})
        results[spec] = (losses, {k: np.asarray(v) for k, v in state.trainable.items()})

    flat = {}
    for spec, (losses, params) in results.items():
        for i, m in enumerate(losses):
            for k, v in m.items():
                flat[f"{spec}|loss|{i}|{k}"] = np.float64(v)
        for k, v in params.items():
            flat[f"{spec}|param|{k}"] = v
    np.savez(args.out, **flat)


if __name__ == "__main__":
    main()
