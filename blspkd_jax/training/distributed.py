"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

SIGTERM on any process (a pod's preemption notice, or the trainer forwarding a Ctrl-C) goes to
JAX's preemption service, which every process polls each step (`reached_preemption`): all of them
save the same step and exit, instead of one leaving while the others wait in a collective.

Three ways in, in this order: explicit `coordinator_address`/`num_processes`/`process_id` (config
keys `distributed.*`, or the BLSPKD_COORDINATOR / BLSPKD_NUM_PROCESSES / BLSPKD_PROCESS_ID
variables the local launcher sets); SLURM (`SLURM_*` variables, auto-detected by JAX); TPU pods
(auto-detected by JAX). A single process with none of these skips initialisation.
"""

from __future__ import annotations

import os

import jax

_ENV = {
    "coordinator_address": "BLSPKD_COORDINATOR",
    "num_processes": "BLSPKD_NUM_PROCESSES",
    "process_id": "BLSPKD_PROCESS_ID",
    "local_device_count": "BLSPKD_LOCAL_DEVICES",
}


def _on_tpu_pod() -> bool:
    return "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def _on_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    cpu_collectives: str = "gloo",
) -> bool:
    """Join the job's processes; returns True when running multi-process.

    Arguments left at their defaults are read from the BLSPKD_* environment variables. On CPU the
    cross-process collectives use `cpu_collectives` (gloo), which is what the tests run on.
    """
    coordinator_address = coordinator_address or os.environ.get(_ENV["coordinator_address"], "")
    num_processes = num_processes or int(os.environ.get(_ENV["num_processes"], "0"))
    if process_id < 0:
        process_id = int(os.environ.get(_ENV["process_id"], "-1"))
    # Only the CPU backend reads this; GPU and TPU use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    # The trainer stops every process at one agreed step through JAX's preemption service (its
    # notifier takes SIGTERM); on by default, and required here, so a stray
    # JAX_ENABLE_PREEMPTION_SERVICE=false cannot bring back the hang it prevents.
    jax.config.update("jax_enable_preemption_service", True)
    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise ValueError(
                "distributed: coordinator_address is set, so distributed.num_processes and "
                f"distributed.process_id must be too (got {num_processes}, {process_id})"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if _on_slurm() or _on_tpu_pod():
        jax.distributed.initialize()
        return True
    return False
