"""Load a trained run from its workdir: the resolved config, the model, its parameters at a
checkpoint, the tokenizer and the chat layout. Generation, evaluation and export start here.

A checkpoint holds only what training changed (`checkpoint.py`); the rest is rebuilt as the trainer
built it, later sources winning: the `hf_path` weights, `train.init_from`'s parameters (stage 2
starting from stage 1's checkpoint or export), this run's checkpoint, and for whatever none of
them holds (a frozen random encoder) the trainer's random initialisation from the config's seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from blspkd_jax import build, checkpoint, optim, sharding, train_state
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.model import BLSPKD, LossConfig

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A workdir or checkpoint step can't be loaded; the message names it and what was expected."""


@dataclasses.dataclass
class Run:
    """A trained run, ready for inference. `params` is the nested tree `model.apply` takes."""

    workdir: Path
    step: int
    config: ml_collections.ConfigDict
    model: BLSPKD
    params: dict
    tokenizer: Any
    layout: ChatLayout
    mesh: Mesh
    loss_cfg: LossConfig

    @property
    def llm_params(self) -> dict:
        return self.params["llm"]


def _tuples(x):
    """JSON lists back to the tuples the config held (`save_config` wrote tuples as lists)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run saved as `workdir/config.json`."""
    path = Path(workdir) / "config.json"
    if not Path(workdir).is_dir():
        raise RunError(f"workdir {workdir} does not exist (expected a training run's directory)")
    if not path.is_file():
        raise RunError(
            f"{path} not found: {workdir} is not a training workdir (python -m blspkd_jax.train "
            "writes config.json there at start)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    return ml_collections.ConfigDict(_tuples(data))


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint under `workdir/checkpoints` (orbax renames a step's folder
    into place only once it is fully written, so a bare integer name is a finished save)."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _abstract_batch(model_cfg, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A small batch to trace the init with: parameter shapes don't depend on it, but the encoder
    in 30 s mode accepts only its full window."""
    enc = model_cfg.encoder
    frames = 2 * enc.max_source_positions if enc.pad_to_30s else 32
    tokens = 8
    shapes = {
        "features": ((batch, enc.num_mel_bins, frames), np.float32),
        "feature_mask": ((batch, frames), np.bool_),
        "input_ids": ((batch, tokens), np.int32),
        "attention_mask": ((batch, tokens), np.bool_),
        "speech_mask": ((batch, tokens), np.bool_),
        "response_mask": ((batch, tokens), np.bool_),
        "text_lengths": ((batch,), np.int32),
        "example_mask": ((batch,), np.bool_),
    }
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def _restore(workdir: Path, step: int, flat_shard: dict) -> dict:
    """The trainable parameters saved at `step` of `workdir` (flat), in this run's shardings."""
    mngr = checkpoint.manager(workdir, async_save=False)
    try:
        got = checkpoint.restore_trainable(
            mngr, step, types.SimpleNamespace(trainable=flat_shard, frozen={})
        )
    finally:
        mngr.close()
    return {k: jax.device_put(v, flat_shard[k]) if k in flat_shard else v for k, v in got.items()}


def _init_fn(model: BLSPKD, batch: dict):
    """`train_state.create_state`'s initialiser: the same module and the same rng for "params"
    and "dropout" give the same values (the dummy batch's shape doesn't enter them)."""

    def init(rng):
        dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch)
        return model.init({"params": rng, "dropout": rng}, dummy)["params"]

    return init


def _init_from(path: str, model_cfg, flat_shard: dict, workdir: Path) -> dict:
    """`train.init_from`'s parameters, read as the trainer reads them: an export directory
    (`python -m blspkd_jax.export`) or another run's latest checkpoint."""
    from blspkd_jax import export

    if export.is_exported(path):
        shardings = types.SimpleNamespace(trainable=flat_shard, frozen={})
        return export.init_from_export(path, model_cfg, shardings)
    steps = checkpoint_steps(path)
    if not steps:
        raise RunError(
            f"{workdir / 'config.json'}: train.init_from={path} has no checkpoint (nor is it an "
            "export), but this run's weights start from it"
        )
    log.info("train.init_from: %s step %d", path, steps[-1])
    return _restore(Path(path), steps[-1], flat_shard)


_INIT_CACHE: dict = {}


def _random_init(model: BLSPKD, mesh: Mesh, init, shardings, rng) -> dict:
    """The trainer's random initialisation, flat, materialised directly in its shards; compiled
    once per (model, mesh) in a process."""
    key = (model, mesh)
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)
    with sharding.activate(mesh):
        return optim.flatten(_INIT_CACHE[key](rng))


def default_mesh() -> Mesh:
    """Every local device on the fsdp axis: fits any device count (a run trained on 8 GPUs loads
    on 1 CPU), and parameters are still sharded rather than copied."""
    return sharding.make_mesh(1, -1, 1)


def load_run(
    workdir: str | os.PathLike, step: int | None = None, *, mesh: Mesh | None = None
) -> Run:
    """The run in `workdir` at checkpoint `step` (None: the latest), on `mesh` (None:
    `default_mesh()`). Single process: every array is addressable here."""
    from transformers import AutoTokenizer

    workdir = Path(workdir)
    config = read_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RunError(
            f"{workdir / 'checkpoints'} holds no checkpoint: train first (python -m "
            f"blspkd_jax.train --workdir {workdir} ...)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(
            f"{workdir} has no checkpoint at step {step}; saved steps: {', '.join(map(str, steps))}"
        )
    mesh = default_mesh() if mesh is None else mesh

    model_cfg = build.model_config(config)
    model = BLSPKD(model_cfg)
    rng = jax.random.key(config.seed)
    init = _init_fn(model, _abstract_batch(model_cfg, mesh.shape["data"] * mesh.shape["fsdp"]))
    abstract, shardings = train_state.param_shardings(mesh, init, rng)
    abstract, flat_shard = optim.flatten(abstract), optim.flatten(shardings)

    # Later sources win, as in the trainer: pretrained weights, then train.init_from's trained
    # parameters, then this run's checkpoint.
    flat: dict = {}
    for k, v in build.pretrained_weights(config, model_cfg).items():
        v = np.asarray(v, dtype=abstract[k].dtype)
        flat[k] = train_state.shard_host_array(v, flat_shard[k])
    init_from = config.train.get("init_from", "")
    if init_from:
        got = _init_from(init_from, model_cfg, flat_shard, workdir)
        flat.update({k: v for k, v in got.items() if k in abstract})  # as the trainer does
    got = _restore(workdir, step, flat_shard)
    unknown = sorted(set(got) - set(abstract))
    if unknown:
        raise RunError(
            f"checkpoint {workdir / 'checkpoints' / str(step)} holds parameters this config's "
            f"model does not have ({unknown[:3]}); was {workdir / 'config.json'} edited?"
        )
    flat.update(got)
    for k, v in flat.items():
        if tuple(v.shape) != tuple(abstract[k].shape):
            raise RunError(
                f"{workdir} step {step}: {k} has shape {tuple(v.shape)}, the model built from "
                f"config.json {tuple(abstract[k].shape)}"
            )
    # What no file holds is the trainer's random initialisation (frozen and never saved).
    missing = set(abstract) - set(flat)
    if missing:
        fresh = _random_init(model, mesh, init, shardings, rng)
        flat.update({k: fresh[k] for k in missing})
    log.info("loaded %s step %d (%d trained tensors)", workdir, step, len(got))

    tokenizer = AutoTokenizer.from_pretrained(build.tokenizer_path(config))
    d = config.data
    layout = ChatLayout(tokenizer, d.system_prompt or None, d.chat_template, d.instruction)
    return Run(
        workdir=workdir,
        step=int(step),
        config=config,
        model=model,
        params=optim.unflatten(flat),
        tokenizer=tokenizer,
        layout=layout,
        mesh=mesh,
        loss_cfg=build.loss_config(config),
    )
