"""Checkpoints: orbax, asynchronous, two items per step — the trained part of the train state and
the data iterator's state — so a resumed run continues on exactly the batch it would have seen.

Only what training changes is saved (step, trainable parameters, optimizer state). The frozen
Whisper and LLM weights are rebuilt from the config (`hf_path`, or the seed for random init), so a
checkpoint of a 7B-LLM run holds megabytes of adapter and PLoRA, not the LLM. orbax writes each
step into a temporary folder and renames it when complete, so a process killed mid-save leaves the
previous checkpoint intact and loadable (on an object store, where nothing renames, a step counts
once its commit marker is written).

The workdir may be a URL (`gs://bucket/run`): orbax takes epath paths and writes arrays through
tensorstore's own GCS driver, so every process writes its shards to the same place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from blspkd_jax.data import storage


def manager(workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    """CheckpointManager over `workdir/checkpoints` keeping the last `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    path = storage.as_path(workdir) / "checkpoints"
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def saved(state) -> dict[str, Any]:
    """The part of a TrainState that a checkpoint holds."""
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def save(mngr, state, data_state: dict | None, *, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    return mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(saved(state)),
            data=ocp.args.JsonSave(data_state or {}),
        ),
        force=force,
    )


def restore(mngr, state, step: int | None = None):
    """(state with the checkpoint's step/trainable/opt_state, data iterator state) or None.

    `state` is a freshly created TrainState: its arrays give the shapes, dtypes and shardings
    the checkpoint is restored into (each process reads only its own shards).
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved(state))
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    got = out["state"]
    state = state.replace(step=got["step"], trainable=got["trainable"], opt_state=got["opt_state"])
    return state, dict(out["data"] or {})


def restore_trainable(mngr, step: int, shardings: Mapping[str, jax.sharding.NamedSharding]) -> dict:
    """The trainable parameters saved at `step` (this run's, or another run's: stage 1 for stage
    2), flat, each restored with the sharding `shardings` gives its path (replicated where it
    gives none: a parameter the caller's model does not have, which it reports)."""
    mesh = next(iter(shardings.values())).mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    meta = mngr.item_metadata(step)["state"]

    def target(path, m):
        key = path[-1].key if path and hasattr(path[-1], "key") else None
        in_trainable = len(path) == 2 and getattr(path[0], "key", None) == "trainable"
        sharding = shardings.get(key, replicated) if in_trainable else replicated
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map_with_path(target, meta)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return dict(out["state"]["trainable"])


def steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint under `workdir/checkpoints`, as orbax judges them (a step
    folder renamed into place, or on an object store one with its commit marker)."""
    root = storage.as_path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(ocp.step.checkpoint_steps(root))
