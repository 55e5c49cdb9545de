"""A run's parameters, assembled in one place for the trainer, generation, evaluation and export.

Sources, later ones winning where they overlap:
1. pretrained Hugging Face weights (`model.encoder.hf_path`, `model.llm.hf_path`);
2. `train.init_from`: an export directory (`python -m blspkd_jax.export`) or another run's latest
   checkpoint (stage 2 starting from stage 1);
3. a checkpoint of the run itself (what training changed, for inference);
4. the random initialisation from `seed`, computed only for the parameters no source supplied
   (a frozen random encoder is never saved: every load draws it again, identically).
Every array is created directly in the sharding the rules table gives its logical axes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from blspkd_jax.errors import UserError
from blspkd_jax.models import encoder, hf, llm_hf, sharding
from blspkd_jax.models.blspkd import BLSPKD, BLSPKDConfig, init_fn
from blspkd_jax.models.blspkd_hf import exported_params, is_exported
from blspkd_jax.training import checkpoint, optim

log = logging.getLogger(__name__)


class WeightsError(UserError):
    """A weight source can't be used; the message names the config key or directory."""


def param_layout(model: BLSPKD, mesh: Mesh) -> tuple[dict, dict[str, NamedSharding]]:
    """(flat {"a/b/c": ShapeDtypeStruct}, flat {"a/b/c": NamedSharding}) of the model's
    parameters on `mesh`, from the structure alone (nothing is computed)."""
    boxed = jax.eval_shape(init_fn(model), jax.random.key(0))
    shardings = sharding.logical_shardings(mesh, boxed)
    return optim.flatten(nn.unbox(boxed)), optim.flatten(shardings)


def run_layout(
    config: ml_collections.ConfigDict, model: BLSPKD, mesh: Mesh
) -> tuple[dict, dict[str, NamedSharding]]:
    """`param_layout` in the dtypes the run keeps its parameters in: trained ones
    (`train.trainable`) in the model's `param_dtype` (fp32 master copies in every shipped config),
    frozen ones in `train.frozen_dtype` when set (bf16 halves the memory and FSDP traffic of a
    frozen 7B LLM). Training, inference and the compile-only plan all place parameters by this."""
    abstract, shardings = param_layout(model, mesh)
    name = config.train.get("frozen_dtype", "")
    if not name:
        return abstract, shardings
    try:
        dtype = np.dtype(jnp.dtype(name))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise WeightsError(
            f"train.frozen_dtype: expected '' or a float dtype such as 'bfloat16', got {name!r}"
        )
    _, frozen = optim.split_trainable(abstract, config.train.trainable)
    for k, v in frozen.items():
        if jnp.issubdtype(v.dtype, jnp.floating):
            abstract[k] = jax.ShapeDtypeStruct(v.shape, dtype)
    return abstract, shardings


def place_params(model: BLSPKD, mesh: Mesh, flat: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays (numpy or memory-mapped) for every parameter, flat, each put into its sharding
    in the model's parameter dtype (every process reads only the slices it holds)."""
    abstract, shardings = param_layout(model, mesh)
    missing = sorted(set(abstract) - set(flat))
    if missing:
        raise WeightsError(f"place_params: no value for {missing[:3]}")
    return {
        k: sharding.shard_host_array(np.asarray(flat[k], abstract[k].dtype), shardings[k])
        for k in abstract
    }


_RANDOM_INIT: dict = {}


def random_params(
    model: BLSPKD,
    mesh: Mesh,
    rng: jax.Array,
    paths: Iterable[str] | None = None,
    dtypes: Mapping[str, np.dtype] | None = None,
) -> dict[str, jax.Array]:
    """The random initialisation of `paths` (None: every parameter), flat, each created in its
    sharding and cast to `dtypes[path]` where given. Only the requested outputs leave the jitted
    init, so XLA computes nothing else; the values equal those of a full init with the same `rng`.
    Compiled once per request a process."""
    _, shardings = param_layout(model, mesh)
    paths = tuple(sorted(shardings if paths is None else paths))
    cast = tuple(sorted((k, np.dtype(v).name) for k, v in (dtypes or {}).items() if k in paths))
    key = (model, mesh, paths, cast)
    if key not in _RANDOM_INIT:
        init = init_fn(model)

        def some(r):
            flat = optim.flatten(nn.unbox(init(r)))
            out = {k: flat[k] for k in paths}
            return {**out, **{k: out[k].astype(dtype) for k, dtype in cast}}

        _RANDOM_INIT[key] = jax.jit(some, out_shardings={k: shardings[k] for k in paths})
    with sharding.activate(mesh):
        return _RANDOM_INIT[key](rng)


def pretrained_params(
    config: ml_collections.ConfigDict, model_cfg: BLSPKDConfig
) -> dict[str, np.ndarray]:
    """Flat {"encoder/...", "llm/...": host tensor} for every part a Hugging Face directory supplies
    (`model.encoder.hf_path`, `model.llm.hf_path`), nothing read yet (`models/lazy.py`: each is
    read slice by slice as it is placed); PLoRA is never part of them."""
    out: dict[str, np.ndarray] = {}
    if config.model.encoder.hf_path:
        sd = hf.read_state_dict(config.model.encoder.hf_path, lazy_read=True)
        params = encoder.host_params_from_hf(model_cfg.encoder, sd)
        out.update({f"encoder/{k}": v for k, v in optim.flatten(params).items()})
    if config.model.llm.hf_path:
        sd = hf.read_state_dict(config.model.llm.hf_path, lazy_read=True)
        base = dataclasses.replace(model_cfg.llm, lora_rank=0)
        params = llm_hf.host_params_from_hf(base, sd)
        out.update({f"llm/{k}": v for k, v in optim.flatten(params).items()})
    return out


def init_from_params(
    path: str | os.PathLike, model_cfg: BLSPKDConfig, shardings: Mapping[str, NamedSharding]
) -> dict[str, jax.Array]:
    """`train.init_from`'s parameters that this model has: every parameter of an export, or the
    trained parameters of another run's latest checkpoint, placed in `shardings`."""
    if is_exported(path):
        got = exported_params(path, model_cfg)
        return {
            k: sharding.shard_host_array(v, shardings[k]) for k, v in got.items() if k in shardings
        }
    steps = checkpoint.steps(path)
    if not steps:
        raise WeightsError(
            f"train.init_from={path}: neither an export (python -m blspkd_jax.export) nor a "
            "training workdir with a checkpoint"
        )
    got = _restore(path, steps[-1], shardings)
    log.info("train.init_from: %d tensors from %s step %d", len(got), path, steps[-1])
    return {k: v for k, v in got.items() if k in shardings}


def _restore(workdir, step: int, shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    mngr = checkpoint.manager(workdir, async_save=False)
    try:
        return checkpoint.restore_trainable(mngr, step, shardings)
    finally:
        mngr.close()


def assemble_params(
    config: ml_collections.ConfigDict,
    model: BLSPKD,
    mesh: Mesh,
    *,
    checkpoint_step: tuple[str | os.PathLike, int] | None = None,
) -> dict[str, jax.Array]:
    """The run's parameters, flat {"a/b/c": array} in their shardings on `mesh`: pretrained
    weights, then `train.init_from`, then `checkpoint_step` = (workdir, step) of the run's own
    checkpoint, then the random initialisation from `config.seed` for whatever none supplied.

    Raises WeightsError naming the source whose tensors do not fit the config's model.
    """
    abstract, shardings = run_layout(config, model, mesh)
    flat: dict[str, jax.Array] = {}

    def take(source: str, got: Mapping, host: bool = False) -> None:
        for k, v in got.items():
            if k not in abstract:
                raise WeightsError(
                    f"{source}: holds {k}, which the config's model does not have; "
                    f"its parameters look like {sorted(abstract)[:3]}"
                )
            if tuple(v.shape) != tuple(abstract[k].shape):
                raise WeightsError(
                    f"{source}: {k} has shape {tuple(v.shape)}, the config's model "
                    f"{tuple(abstract[k].shape)}"
                )
            if host:
                v = sharding.shard_host_array(v, shardings[k], abstract[k].dtype)
            elif v.dtype != abstract[k].dtype:  # e.g. a trained stage-1 adapter frozen in stage 2
                v = _cast(v, abstract[k].dtype)
            flat[k] = v

    take("model.*.hf_path", pretrained_params(config, model.config), host=True)
    init_from = config.train.get("init_from", "")
    if init_from:
        take(f"train.init_from={init_from}", init_from_params(init_from, model.config, shardings))
    if checkpoint_step is not None:
        workdir, step = checkpoint_step
        take(
            f"{os.fspath(workdir)}/checkpoints/{step}",
            _restore(workdir, step, shardings),
        )
    missing = sorted(set(abstract) - set(flat))
    if missing:
        dtypes = {k: abstract[k].dtype for k in missing}
        flat.update(random_params(model, mesh, jax.random.key(config.seed), missing, dtypes))
    return flat


def _cast(x: jax.Array, dtype) -> jax.Array:
    """`x` in `dtype`, in the same sharding (each device converts its own shard)."""
    return jax.jit(lambda a: a.astype(dtype), out_shardings=x.sharding)(x)
