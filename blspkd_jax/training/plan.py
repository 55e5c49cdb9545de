"""Compile-only: will a config's train step fit a TPU slice, before renting it?

`python -m blspkd_jax.train --config C --workdir W --compile-only TOPOLOGY` builds exactly the
program the trainer would run (same model, mesh, shardings, step) for TOPOLOGY's devices, from
shapes alone: no weight, manifest, tokenizer or `train.init_from` is read, and nothing is written
to W. `model.*.hf_path` directories that do not exist yet are planned from the presets of the same
name (`models/presets`). The step is compiled by the real TPU compiler (libtpu, `pip install
'blspkd-jax[tpu]'`, runs on any machine) for a TPU topology such as `v5p:4x4x4`, or by XLA:CPU
for `cpu:N` (N virtual devices, no libtpu needed).

It reports, per device: argument, output and temporary bytes from the compiled program's memory
analysis against the chip's HBM (`CHIPS`); the FLOPs of one step; and the roofline bound on MFU.
The step is compiled for the largest bucket (most frames, most tokens), the one that needs the
most memory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from blspkd_jax.models import presets, sharding
from blspkd_jax.models.blspkd import BLSPKD, BLSPKDConfig, example_batch
from blspkd_jax.training import build, optim, train_state, weights
from blspkd_jax.training.config import ConfigError
from blspkd_jax.training.flops import step_flops

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures (bf16 peak: the dtype the shipped configs compute in)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float
    source: str


# Cloud TPU's system-architecture pages, "key specifications" tables (HBM in GiB as the v5p page
# writes it; the v4, v5e and v6e pages write "GB" for the same 32/16/32 GiB stacks).
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass
class Topology:
    """The devices of a slice (compile-only devices for a TPU, virtual CPU devices for `cpu:N`)
    and what one device holds: a TPU chip's figures divided over its TensorCores when the topology
    exposes each core as a device (v4's default)."""

    name: str
    devices: list
    chips: int
    chip: Chip | None  # None: CPU
    hbm_bytes: int  # per device
    peak_flops: float  # per device, FLOP/s; 0: unknown
    hbm_bytes_per_s: float  # per device; 0: unknown
    process_count: int


def topology(name: str, peak_tflops_per_device: float = 0.0) -> Topology:
    """`v5p:4x4x4`-style TPU topology names (v4, v5e, v5p, v6e) or `cpu:N`; ConfigError naming
    --compile-only for anything else. `cpu:N` needs N CPU devices (`jax_num_cpu_devices` set
    before JAX starts; `main` of train.py does) and holds the host's memory divided by N."""
    gen, sep, shape = name.partition(":")
    if gen == "cpu":
        try:
            n = int(shape) if sep else 1
        except ValueError:
            n = 0
        devices = jax.devices("cpu")
        if n < 1 or len(devices) < n:
            raise ConfigError(
                f"--compile-only {name}: expected cpu:N with 1 <= N <= the {len(devices)} CPU "
                "devices JAX started with"
            )
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        peak = peak_tflops_per_device * 1e12
        return Topology(name, devices[:n], n, None, ram // n, peak, 0.0, 1)
    if gen not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ConfigError(
            f"--compile-only {name}: expected cpu:N or a TPU topology GEN:AxB[xC] with GEN one "
            f"of {', '.join(CHIPS)} (e.g. v5p:4x4x4, v5e:4x8)"
        )
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; a
    # compile-only process drives none, so a second plan (or a run on this TPU VM) must not
    # stop it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except RuntimeError as e:
        if "not installed" in str(e):
            raise ConfigError(
                f"--compile-only {name}: the TPU compiler (libtpu) is not installed: pip install "
                "'blspkd-jax[tpu]' (any machine, no TPU needed)"
            ) from None
        raise ConfigError(f"--compile-only {name}: {str(e).splitlines()[0]}") from None
    devices = list(desc.devices)
    chips = len({tuple(d.coords) for d in devices})
    cores = len(devices) // chips
    chip = CHIPS[gen]
    return Topology(
        name,
        devices,
        chips,
        chip,
        chip.hbm_bytes // cores,
        chip.peak_bf16_flops / cores,
        chip.hbm_bytes_per_s / cores,
        len({d.process_index for d in devices}),
    )


# ----------------------------------------------------------------------------------------------
# The run's model and state, from shapes alone.


def planned_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model.*.hf_path` name directories that exist: each one as given
    when it exists (checked against its preset), else the preset of the same name."""
    out = ml_collections.ConfigDict(config.to_dict())
    for part in ("encoder", "llm"):
        path = out.model[part].hf_path
        if path:
            out.model[part].hf_path = presets.resolve(path, f"model.{part}.hf_path")
    return out


def check_shapes(config: ml_collections.ConfigDict, mesh) -> None:
    """The trainer's checks on what decides the compiled program (batch, accumulation, mesh and
    trainable patterns), each a ConfigError naming its key; files are not looked at."""
    if config.batch_size < 1:
        raise ConfigError(f"batch_size={config.batch_size}: expected a number >= 1")
    if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps}: expected a positive divisor of "
            f"batch_size={config.batch_size}"
        )
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.batch_size // config.grad_accum_steps) % replicas:
        raise ConfigError(
            f"batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} must "
            f"be a multiple of mesh.data x mesh.fsdp = {replicas} (the batch is split over them)"
        )
    for pattern in config.train.trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"train.trainable: {pattern!r} is not a regular expression ({e})"
            ) from None


def abstract_state(config, model: BLSPKD, mesh, step_cfg, tx):
    """(abstract TrainState, its shardings): what `train_state.create_state` builds from the run's
    parameters (`weights.run_layout`: frozen ones in `train.frozen_dtype`), as ShapeDtypeStructs."""
    abstract, shardings = weights.run_layout(config, model, mesh)
    return train_state.abstract_state(abstract, shardings, mesh, step_cfg, tx)


# ----------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass
class Plan:
    topology: Topology
    batch: dict  # the abstract global batch compiled for
    grad_accum_steps: int
    replicas: int  # mesh.data x mesh.fsdp: the batch is split over them
    trainable_params: int
    frozen_params: int
    state_bytes: int  # global, all devices together
    param_bytes: int  # global: the trained and frozen parameters, without optimizer state
    tensor: int  # mesh.tensor: weights are split over it, gathered over the others
    memory: dict[str, int]  # per device: argument, output, alias, temp, code, total
    compile_error: str  # "" when the compiler accepted the program
    flops_per_step: float  # global, executed (remat recompute included)
    model_flops_per_step: float  # global, without rematerialisation

    @property
    def per_device_bytes(self) -> int:
        return self.memory["total"]

    @property
    def fits(self) -> bool:
        return not self.compile_error and self.per_device_bytes <= self.topology.hbm_bytes

    def step_seconds_bound(self) -> float:
        """The least time a step can take on this slice (0: the peak is unknown): its executed
        FLOPs at every device's peak, or the least HBM traffic a device has, whichever is longer.
        That traffic is the larger of reading its arguments and writing its outputs, and reading
        every weight it multiplies with once (FSDP gathers all of them, split only over tensor)."""
        t = self.topology
        if not t.peak_flops:
            return 0.0
        compute = self.flops_per_step / (len(t.devices) * t.peak_flops)
        m = self.memory
        own = m.get("argument", 0) + m.get("output", 0)
        traffic = max(own, self.param_bytes / self.tensor)
        return max(compute, traffic / t.hbm_bytes_per_s if t.hbm_bytes_per_s else 0.0)

    @property
    def mfu_bound(self) -> float:
        """The best MFU this step can reach here: model FLOPs (no rematerialisation) over the
        slice's peak FLOPs in the least step time. Below 1 by the recomputed FLOPs at least."""
        t = self.step_seconds_bound()
        n = len(self.topology.devices)
        return self.model_flops_per_step / (t * n * self.topology.peak_flops) if t else 0.0


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),  # outputs written into donated arguments
        "temp": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
    return out


def _refused_memory(message: str) -> dict[str, int]:
    """The TPU compiler's refusal ("... temporaries (40.50G) exceeds available HBM (15.75G)") as
    {"total": needed, "available": limit} in bytes; {} when the message has no sizes."""
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", message)
    if len(sizes) < 2:
        return {}
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    needed, limit = (int(float(v) * scale[u]) for v, u in sizes[:2])
    return {"total": needed, "available": limit}


def _unrematerialised(cfg: BLSPKDConfig) -> BLSPKDConfig:
    return BLSPKDConfig(
        encoder=dataclasses.replace(cfg.encoder, remat="none"),
        adapter=dataclasses.replace(cfg.adapter, remat="none"),
        llm=dataclasses.replace(cfg.llm, remat="none"),
    )


@dataclasses.dataclass
class Step:
    """The program `make_plan` compiles: the run's model, mesh, abstract state and batch."""

    config: ml_collections.ConfigDict  # with preset directories for missing hf_paths
    model: BLSPKD
    mesh: Any
    step_cfg: train_state.StepConfig
    tx: Any
    state: train_state.TrainState  # of ShapeDtypeStructs
    state_shardings: train_state.TrainState
    batch: dict  # the largest bucket's abstract global batch


def prepare(config: ml_collections.ConfigDict, topo: Topology) -> Step:
    """Everything the trainer builds before its first compile, from shapes alone, on `topo`."""
    cfg = planned_config(config)
    model_cfg = build.model_config(cfg)
    data_cfg = build.data_config(cfg, model_cfg, topo.process_count)
    try:
        mesh = sharding.make_mesh(
            cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topo.devices
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_shapes(cfg, mesh)
    model = BLSPKD(model_cfg)
    step_cfg = build.step_config(cfg)
    tx, _ = build.optimizer(cfg)
    state, state_shardings = abstract_state(cfg, model, mesh, step_cfg, tx)
    frames, tokens = max(data_cfg.frame_buckets), max(data_cfg.token_buckets)
    batch = example_batch(model_cfg, cfg.batch_size, frames, tokens)
    # The trainer sends features in the encoder's compute dtype (objective.cast_features).
    features = batch["features"]
    batch["features"] = jax.ShapeDtypeStruct(features.shape, jnp.dtype(model_cfg.encoder.dtype))
    return Step(cfg, model, mesh, step_cfg, tx, state, state_shardings, batch)


def make_plan(
    config: ml_collections.ConfigDict, topo: Topology, log: Callable[[str], Any] = print
) -> Plan:
    """Build the run's abstract state and step for `topo` and compile it (see the module doc)."""
    s = prepare(config, topo)
    frames, tokens = s.batch["features"].shape[-1], s.batch["input_ids"].shape[-1]
    log(
        f"compiling the train step for {topo.name} ({len(topo.devices)} devices, mesh "
        f"{dict(s.mesh.shape)}), batch {s.config.batch_size} x {frames} frames x {tokens} "
        f"tokens, grad_accum_steps={s.config.grad_accum_steps}"
    )
    step = train_state.make_train_step(s.model, s.step_cfg, s.tx)
    flops = step_flops(step, s.state, s.batch, s.mesh)
    plain = BLSPKD(_unrematerialised(s.model.config))
    plain_step = train_state.make_train_step(plain, s.step_cfg, s.tx)
    model_flops = step_flops(plain_step, s.state, s.batch, s.mesh)
    error, memory = "", {}
    try:
        compiled, _ = train_state.compile_train_step(
            step, s.state_shardings, s.mesh, s.state, s.batch, log=lambda *_: None
        )
        memory = _memory(compiled)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        error = str(e)
        memory = _refused_memory(error)
    return Plan(
        topology=topo,
        batch=s.batch,
        grad_accum_steps=s.config.grad_accum_steps,
        replicas=s.mesh.shape["data"] * s.mesh.shape["fsdp"],
        trainable_params=optim.count_params(s.state.trainable),
        frozen_params=optim.count_params(s.state.frozen),
        state_bytes=_bytes(s.state),
        param_bytes=_bytes((s.state.trainable, s.state.frozen)),
        tensor=s.mesh.shape["tensor"],
        memory=memory,
        compile_error=error,
        flops_per_step=flops,
        model_flops_per_step=model_flops,
    )


# ----------------------------------------------------------------------------------------------
# The report.


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def advice(plan: Plan, config) -> list[str]:
    """What to change when the step does not fit, from where its memory goes: the state (more
    devices, bf16 frozen weights), the activations (gradient accumulation, rematerialisation)."""
    m, hbm = plan.memory, plan.topology.hbm_bytes
    tips = []
    if "argument" in m:
        state = m["argument"] + m["output"] - m["alias"] + m["code"]
        temp = m["temp"]
    else:  # the compiler refused before a memory analysis: all we know is the total
        state, temp = 0, m.get("total", 0)
    if state > 0.8 * hbm:
        tips.append(
            f"the state alone takes {_gib(state)} of {_gib(hbm)} a device: shard it over more "
            "devices (a larger slice, mesh.fsdp=-1), or --config.train.frozen_dtype=bfloat16 for "
            "the frozen weights"
        )
    n, b = config.grad_accum_steps, config.batch_size
    if temp and hbm > state:
        # Temporaries are mostly activations, which scale with the micro-batch b / n.
        want = n * temp / (hbm - state)
        ks = [k for k in range(n + 1, b + 1) if b % k == 0 and (b // k) % plan.replicas == 0]
        k = next((k for k in ks if k >= want), None)
        if k is not None:
            tips.append(
                f"temporaries ({_gib(temp)}) scale with the micro-batch ({b // n} now): try "
                f"--config.grad_accum_steps={k} (same global batch, micro-batch {b // k})"
            )
        else:
            tips.append(
                f"temporaries ({_gib(temp)}) exceed what accumulation over mesh.data x mesh.fsdp "
                f"= {plan.replicas} replicas can save: lower batch_size or use a larger slice"
            )
    remat = [p for p in ("encoder", "adapter", "llm") if config.model[p].remat != "full"]
    if remat:
        tips.append(
            "rematerialise more: "
            + " ".join(f"--config.model.{p}.remat=full" for p in remat)
            + " (recomputes activations in the backward pass instead of keeping them)"
        )
    return tips


def report(plan: Plan, config, out: Callable[[str], Any] = print) -> dict:
    """Print the plan as a table and return the summary that ends it as one JSON line."""
    t, m = plan.topology, plan.memory
    hbm = t.hbm_bytes
    chip = (
        f"TPU {t.chip.name}: {_gib(t.chip.hbm_bytes)} HBM, "
        f"{t.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 a chip ({t.chip.source})"
        if t.chip
        else f"CPU: host memory {_gib(hbm * len(t.devices))} shared by {len(t.devices)} devices"
    )
    out(f"topology {t.name}: {len(t.devices)} devices on {t.chips} chips; {chip}")
    out(
        f"parameters: {plan.trainable_params:,} trained, {plan.frozen_params:,} frozen; "
        f"state {_gib(plan.state_bytes)} in all"
    )
    if plan.compile_error:
        out("the compiler refused the program:")
        out("  " + plan.compile_error.strip().replace("\n", "\n  "))
    else:
        out("per device (compiled memory analysis):")
        rows = [
            ("arguments (state + batch)", m["argument"]),
            ("outputs (new state + metrics)", m["output"]),
            ("  of which in donated arguments", -m["alias"]),
            ("temporaries (activations, gradients)", m["temp"]),
            ("program", m["code"]),
            ("total", m["total"]),
        ]
        for name, n in rows:
            out(f"  {name:<38} {_gib(n):>12}")
        memory = "HBM" if t.chip else "host memory / devices"
        out(f"  {memory:<38} {_gib(hbm):>12}  ({100 * m['total'] / hbm:.0f}% used)")
    n = len(t.devices)
    out(
        f"FLOPs per step: {plan.flops_per_step:.4g} executed ({plan.flops_per_step / n:.4g} a "
        f"device), {plan.model_flops_per_step:.4g} without rematerialisation"
    )
    if t.peak_flops:
        secs = plan.step_seconds_bound()
        out(
            f"roofline: a step takes at least {secs:.3g} s at {t.peak_flops / 1e12:.0f} TFLOP/s "
            f"a device; MFU <= {100 * plan.mfu_bound:.0f}%"
        )
    fits = plan.fits
    if fits:
        out(f"fits: {_gib(m['total'])} of {_gib(hbm)} a device")
    else:
        out(f"does not fit {t.name}:")
        for tip in advice(plan, config):
            out(f"  - {tip}")
    cores = n // t.chips  # devices a chip (v4's topologies expose both TensorCores)
    return {
        "topology": t.name,
        "chips": t.chips,
        "devices": n,
        "per_chip_bytes": int(m.get("total", -1)) * cores,
        "hbm_bytes": int(m.get("available", hbm)) * cores,
        "fits": fits,
        "flops_per_step": plan.flops_per_step,
        "model_flops_per_step": plan.model_flops_per_step,
        "mfu_bound": round(plan.mfu_bound, 4),
        "memory": {k: v for k, v in m.items() if k != "available"},
        "grad_accum_steps": plan.grad_accum_steps,
        "batch_size": int(plan.batch["input_ids"].shape[0]),
    }
