"""The training program: `python -m blspkd_jax.train --config configs/NAME.py --workdir DIR`.

Builds the mesh, the sharded state (restoring the latest checkpoint in DIR if there is one), the
grain pipeline, and runs the compiled step with logging (progress bar, metrics.jsonl,
TensorBoard), periodic evaluation and checkpoints. Rerunning the same command resumes exactly:
the data iterator's position is checkpointed with the state. SIGTERM/SIGINT save and exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax import build, checkpoint, distributed, optim, sharding, train_state
from blspkd_jax import config as config_lib
from blspkd_jax.model import BLSPKD

log = logging.getLogger("blspkd_jax.train")

REQUIRED_KEYS = (
    "data.train_manifest",
    "data.eval_manifest",
    "model.encoder.hf_path",
    "model.llm.hf_path",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "total_steps",
    "batch_size",
    "log_every_steps",
    "checkpoint_every_steps",
    "seed",
)


class MetricWriter:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - lives with the run
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a requirement
                log.warning("tensorboardX not installed: no TensorBoard logs")

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def data_config(config, process_count: int):
    from blspkd_jax.data.pipeline import DataConfig

    if config.batch_size % process_count:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {process_count} processes"
        )
    d = config.data
    return DataConfig(
        train_manifest=d.train_manifest,
        eval_manifest=d.eval_manifest,
        batch_size_per_process=config.batch_size // process_count,
        frame_buckets=tuple(d.frame_buckets),
        token_buckets=tuple(d.token_buckets),
        min_seconds=d.min_seconds,
        max_seconds=d.max_seconds,
        max_text_tokens=d.max_text_tokens,
        n_mels=d.n_mels,
        worker_count=d.worker_count,
        worker_buffer_size=d.worker_buffer_size,
        seed=config.seed,
        shuffle=d.shuffle,
        strict=d.strict,
        instruction=d.instruction,
        system_prompt=d.system_prompt,
        chat_template=d.chat_template,
    )


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """This device's dense matmul FLOP/s in `dtype` (best of `repeats`), measured: the denominator
    of MFU when no nominal peak is configured."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class Trainer:
    """Everything one run holds; `run()` trains to `total_steps`."""

    def __init__(self, config, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            config_lib.save_config(config, self.workdir / "config.json")

        self.model_cfg = build.model_config(config)
        self.model = BLSPKD(self.model_cfg)
        self.loss_cfg = build.loss_config(config)
        if config.data.n_mels != self.model_cfg.encoder.num_mel_bins:
            raise ValueError(
                f"data.n_mels={config.data.n_mels} but the encoder expects "
                f"{self.model_cfg.encoder.num_mel_bins} mel bins"
            )
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        log.info(
            "%d processes, %d devices, mesh %s",
            jax.process_count(),
            jax.device_count(),
            dict(self.mesh.shape),
        )
        self.step_cfg = train_state.StepConfig(
            trainable=tuple(config.train.trainable),
            loss=self.loss_cfg,
            grad_accum_steps=config.grad_accum_steps,
        )
        o = config.optim
        self.tx, self.schedule = optim.make_optimizer(
            learning_rate=o.learning_rate,
            warmup_steps=o.warmup_steps,
            total_steps=config.total_steps,
            decay=o.decay,
            end_factor=o.end_factor,
            weight_decay=o.weight_decay,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            grad_clip_norm=o.grad_clip_norm,
        )

        from blspkd_jax.data.pipeline import eval_pipeline, train_pipeline

        self.tokenizer = build.tokenizer_path(config)
        self.data_cfg = data_config(config, jax.process_count())
        self.train_data = train_pipeline(self.data_cfg, self.tokenizer, str(self.workdir))
        self.eval_data = (
            eval_pipeline(self.data_cfg, self.tokenizer, str(self.workdir))
            if config.data.eval_manifest
            else None
        )
        max_n = int(config.data.max_text_tokens)
        if max_n > self.model_cfg.adapter.max_tokens:
            raise ValueError(
                f"data.max_text_tokens={max_n} exceeds model.adapter.max_tokens="
                f"{self.model_cfg.adapter.max_tokens}: CIF could not emit one vector per token"
            )

        F, L = self.train_data.shapes[0]
        example = self._abstract_batch(F, L)
        pretrained = build.pretrained_weights(config, self.model_cfg)
        self.state, self.state_shardings = train_state.create_state(
            self.model,
            self.mesh,
            jax.random.key(config.seed),
            example,
            self.step_cfg,
            self.tx,
            pretrained,
        )
        if config.train.init_from:
            self._init_from(config.train.init_from)
        n_train = optim.count_params(self.state.trainable)
        n_frozen = optim.count_params(self.state.frozen)
        log.info("parameters: %d trainable, %d frozen", n_train, n_frozen)
        self.step_fn = train_state.make_train_step(self.model, self.step_cfg, self.tx)
        self.compiled: dict[tuple[int, int], object] = {}
        self.flops_per_step = -1.0
        self.ckpt = checkpoint.manager(self.workdir, keep=config.keep_checkpoints)
        self.iterator = iter(self.train_data)
        restored = checkpoint.restore(self.ckpt, self.state)
        if restored is not None:
            self.state, data_state = restored
            if data_state:
                self.iterator.set_state(data_state)
            log.info("resumed from step %d", int(self.state.step))

    def _abstract_batch(self, frames: int, tokens: int) -> dict:
        B, n_mels = self.config.batch_size, self.config.data.n_mels
        shapes = {
            "features": ((B, n_mels, frames), np.float32),
            "feature_mask": ((B, frames), np.bool_),
            "input_ids": ((B, tokens), np.int32),
            "attention_mask": ((B, tokens), np.bool_),
            "speech_mask": ((B, tokens), np.bool_),
            "response_mask": ((B, tokens), np.bool_),
            "text_lengths": ((B,), np.int32),
            "example_mask": ((B,), np.bool_),
        }
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}

    def _init_from(self, workdir: str) -> None:
        """Start from another run's trained parameters (stage 2 from stage 1), or from an export
        (`python -m blspkd_jax.export`): every parameter it has and this run has is copied;
        optimizer state starts fresh."""
        from blspkd_jax import export

        if export.is_exported(workdir):  # a directory written by python -m blspkd_jax.export
            got, step = export.init_from_export(workdir, self.model_cfg, self.state_shardings), 0
        else:
            mngr = checkpoint.manager(workdir, async_save=False)
            step = mngr.latest_step()
            if step is None:
                raise ValueError(f"train.init_from: {workdir} has no checkpoint")
            got = checkpoint.restore_trainable(mngr, step, self.state_shardings)
        trainable, frozen = dict(self.state.trainable), dict(self.state.frozen)
        for k, v in got.items():
            if k in trainable:
                trainable[k] = v
            elif k in frozen:
                frozen[k] = v
        self.state = self.state.replace(trainable=trainable, frozen=frozen)
        log.info("initialised %d tensors from %s step %d", len(got), workdir, step)

    def _compiled_step(self, frames: int, tokens: int):
        key = (frames, tokens)
        if key not in self.compiled:
            abstract_state = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state
            )
            self.compiled[key], stats = train_state.compile_train_step(
                self.step_fn,
                self.state_shardings,
                self.mesh,
                abstract_state,
                self._abstract_batch(frames, tokens),
                log=log.info,
            )
            # MFU uses the largest bucket's FLOPs as reported; smaller buckets report less work.
            self.flops_per_step = max(self.flops_per_step, stats["flops"])
        return self.compiled[key]

    def save(self, force: bool = False) -> None:
        step = int(self.state.step)
        if step != self.ckpt.latest_step():  # the end of a run may land on a periodic save
            checkpoint.save(self.ckpt, self.state, self.iterator.get_state(), force=force)

    def run(self) -> dict:
        config = self.config
        writer = MetricWriter(self.workdir, self.is_main)
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        peak = config.peak_tflops_per_device * 1e12 or measure_matmul_peak()
        rng = jax.random.PRNGKey(config.seed)
        start = int(self.state.step)
        bar = None
        if self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step")
        consecutive_bad, total_skipped = 0, 0
        last = {}
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while int(self.state.step) < config.total_steps:
                batch = next(self.iterator)
                batch.pop("line", None)
                F, L = batch["features"].shape[-1], batch["input_ids"].shape[-1]
                step_fn = self._compiled_step(F, L)
                gbatch = train_state.global_batch(self.mesh, batch)
                self.state, metrics = step_fn(self.state, gbatch, rng)
                step = int(self.state.step)
                skipped = int(metrics["skipped"])
                total_skipped += skipped
                consecutive_bad = consecutive_bad + 1 if skipped else 0
                window_tokens += int(metrics["num_tokens"])
                if consecutive_bad >= config.max_consecutive_nonfinite:
                    self._stop_nonfinite(consecutive_bad, step)
                if step % config.log_every_steps == 0 or step == config.total_steps:
                    elapsed = time.perf_counter() - window_start
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    last.update(
                        learning_rate=float(self.schedule(step - 1)),
                        tokens_per_sec=window_tokens / elapsed,
                        steps_per_sec=config.log_every_steps / elapsed,
                        nonfinite_skipped_total=total_skipped,
                        data_dropped_at_decode=self.iterator.dropped_at_decode,
                    )
                    if self.flops_per_step > 0:
                        step_time = elapsed / config.log_every_steps
                        last["mfu"] = self.flops_per_step / step_time / peak
                    writer.write(step, last)
                    window_tokens, window_start = 0, time.perf_counter()
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}"
                        )
                if bar is not None:
                    bar.update(step - bar.n)
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    writer.write(step, self.evaluate(), prefix="eval/")
                if step % config.checkpoint_every_steps == 0:
                    self.save()
                if stop["signal"] is not None:
                    log.warning("signal %d: saving at step %d and exiting", stop["signal"], step)
                    self.save(force=True)
                    self.ckpt.wait_until_finished()
                    sys.exit(128 + stop["signal"])
            self.save(force=True)
            self.ckpt.wait_until_finished()
            if self.eval_data is not None:
                final = self.evaluate()
                writer.write(int(self.state.step), final, prefix="eval/")
                last.update({f"eval/{k}": v for k, v in final.items()})
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            writer.close()
            self.iterator.close()
        return last

    def _stop_nonfinite(self, count: int, step: int) -> None:
        self.ckpt.wait_until_finished()
        raise FloatingPointError(
            f"{count} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
            f"their updates were skipped and the run stops here. The last good checkpoint is "
            f"step {self.ckpt.latest_step()} in {self.workdir / 'checkpoints'}; lower "
            "optim.learning_rate or check the data before resuming."
        )

    def evaluate(self) -> dict[str, float]:
        from blspkd_jax import evaluate

        return evaluate.consistency(
            self.model,
            self.state.params(),
            self.eval_data,
            self.mesh,
            self.loss_cfg,
            max_batches=self.config.eval_max_batches,
        )


def parse_args(argv):
    rest, overrides = config_lib.split_argv(argv)
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.train", description=__doc__)
    ap.add_argument("--config", required=True, help="config file, path.py[:arg]")
    ap.add_argument("--workdir", required=True, help="checkpoints, logs and metrics go here")
    args = ap.parse_args(rest)
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    config_lib.require_keys(config, REQUIRED_KEYS, args.config)
    return args, config


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    try:
        args, config = parse_args(sys.argv[1:] if argv is None else argv)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = config.distributed
    distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    trainer = Trainer(config, args.workdir)
    final = trainer.run()
    if jax.process_index() == 0:
        print(json.dumps({"step": int(trainer.state.step), **final}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
