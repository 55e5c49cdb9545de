"""Load a trained run from its workdir: the resolved config, the model, its parameters at a
checkpoint, the tokenizer and the chat layout. Generation, evaluation and export start here.

A checkpoint holds only what training changed; `training.weights.assemble_params` rebuilds the
rest exactly as the trainer built it (pretrained weights, `train.init_from`, the seed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections
from etils import epath
from jax.sharding import Mesh

from blspkd_jax.data import storage
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.data.pipeline import DataConfig
from blspkd_jax.errors import UserError
from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.training import build, checkpoint, optim, weights
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.objective import LossConfig

log = logging.getLogger(__name__)


class RunError(UserError):
    """A workdir or checkpoint step can't be loaded; the message names it and what was expected."""


@dataclasses.dataclass
class Run:
    """A trained run, ready for inference. `params` is the nested tree `model.apply` takes."""

    workdir: epath.Path
    step: int
    config: ml_collections.ConfigDict
    model: BLSPKD
    params: dict
    tokenizer: Any
    layout: ChatLayout
    mesh: Mesh
    loss_cfg: LossConfig
    data: DataConfig  # the run's data options for one process (frame buckets, mel bins, ...)

    @property
    def llm_params(self) -> dict:
        return self.params["llm"]


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run saved as `workdir/config.json` (any `etils.epath` path:
    local, gs://, ...)."""
    path = _path(workdir) / "config.json"
    if not _path(workdir).is_dir():
        raise RunError(f"workdir {workdir} does not exist (expected a training run's directory)")
    if not path.is_file():
        raise RunError(
            f"{path} not found: {workdir} is not a training workdir (python -m blspkd_jax.train "
            "writes config.json there at start)"
        )
    try:
        return config_lib.read_saved_config(path)
    except config_lib.ConfigError as e:
        raise RunError(str(e)) from None


def _path(path: str | os.PathLike) -> epath.Path:
    """A workdir as an epath.Path: a URL (`gs://...`) through `storage`, a local path as given."""
    return storage.as_path(path) if storage.is_url(path) else epath.Path(path)


def default_mesh() -> Mesh:
    """Every local device on the fsdp axis: fits any device count (a run trained on 8 GPUs loads
    on 1 CPU), and parameters are still sharded rather than copied."""
    return sharding.make_mesh(1, -1, 1)


def load_run(
    workdir: str | os.PathLike, step: int | None = None, *, mesh: Mesh | None = None
) -> Run:
    """The run in `workdir` at checkpoint `step` (None: the latest), on `mesh` (None:
    `default_mesh()`: every device of every process). On several processes every process calls
    this alike and the parameters are sharded over all of them (no process holds the model)."""
    workdir = _path(workdir)
    config = read_config(workdir)
    steps = checkpoint.steps(workdir)
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

    model = BLSPKD(build.model_config(config))
    try:
        flat = weights.assemble_params(config, model, mesh, checkpoint_step=(workdir, step))
    except weights.WeightsError as e:
        raise RunError(f"{workdir / 'config.json'}: {e}") from None
    log.info("loaded %s step %d", workdir, step)

    from transformers import AutoTokenizer  # seconds to import (it brings torch): only when used

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
        data=build.data_config(config, model.config, 1),
    )
