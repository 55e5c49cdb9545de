"""The training program behind `python -m blspkd_jax.train`: one `Trainer` per run.

Builds the mesh, the sharded state (restoring the latest checkpoint in the workdir if there is
one), the grain pipeline, and runs the compiled step with logging (progress bar, metrics.jsonl,
TensorBoard), periodic evaluation and checkpoints. The workdir may be a URL (`gs://bucket/run`):
config, metrics, TensorBoard events and checkpoints all go there (`data.storage`), so every process
of a pod writes to one place and a rerun on other machines resumes from it. Rerunning resumes
exactly: the data iterator's position is checkpointed with the state. A preemption (SIGTERM,
agreed on by every process through orbax) or Ctrl-C saves and exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time

import jax
import jax.numpy as jnp

from blspkd_jax.data import storage
from blspkd_jax.data.pipeline import eval_pipeline, train_pipeline
from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD, example_batch
from blspkd_jax.training import build, checkpoint, optim, train_state, weights
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.objective import consistency

log = logging.getLogger("blspkd_jax.train")


class MetricWriter:
    """metrics.jsonl + TensorBoard, written by process 0 only, into a local or remote workdir.

    Locally every row is on disk at once. An object store cannot append, so there both files are
    uploaded whole, at most every `upload_seconds` and when the run ends or stops; TensorBoard
    writes gs:// and s3:// itself (tensorboardX, through google-cloud-storage or boto3)."""

    def __init__(self, workdir: str, enabled: bool, upload_seconds: float = 30.0):
        self.enabled = enabled
        self.tb = None
        self.remote = storage.is_url(workdir)
        self.upload_seconds, self._uploaded = upload_seconds, time.monotonic()
        if enabled:
            self.jsonl = storage.LineLog(f"{workdir}/metrics.jsonl", upload_seconds)
            tb_dir = f"{workdir}/tensorboard"
            try:
                from tensorboardX import SummaryWriter
                from tensorboardX.record_writer import REGISTERED_FACTORIES

                scheme = tb_dir.split("://", 1)[0] if self.remote else None
                if scheme is None or scheme in REGISTERED_FACTORIES:
                    self.tb = SummaryWriter(tb_dir)
                else:
                    log.warning(
                        "TensorBoard cannot write %s://: no events (metrics.jsonl has all)", scheme
                    )
            except ImportError:  # pragma: no cover - tensorboardX is a requirement
                log.warning("tensorboardX not installed: no TensorBoard logs")

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row))
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            # A remote events file is uploaded whole at each flush: not at every row.
            if not self.remote or time.monotonic() - self._uploaded >= self.upload_seconds:
                self.tb.flush()
                self._uploaded = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


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


# What a resumed run may change: how long it runs, what it logs and where it runs, not what or
# how it learns.
RESUMABLE_KEYS = (
    "total_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_steps",
    "eval_max_batches",
    "max_consecutive_nonfinite",
    "peak_tflops_per_device",
    "mesh.",
    "distributed.",
    "data.worker_count",
    "data.worker_buffer_size",
    "data.eval_manifest",
)


def check_resume(config, workdir: str) -> None:
    """A workdir with checkpoints resumes only under the config it was trained with (apart from
    RESUMABLE_KEYS): anything else is a ConfigError naming the first keys that differ."""
    saved = storage.as_path(workdir) / "config.json"
    if not checkpoint.steps(workdir) or not saved.is_file():
        return
    # A key the saved config lacks (added to base_config since) counts as its default.
    old = {
        **config_lib.flatten(config_lib.base_config()),
        **config_lib.flatten(config_lib.read_saved_config(saved)),
    }
    new = config_lib.flatten(config)
    changed = [k for k in sorted(new) if old.get(k) != new[k] and not k.startswith(RESUMABLE_KEYS)]
    if changed:
        diffs = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in changed[:3])
        raise config_lib.ConfigError(
            f"{workdir} holds checkpoints of a run with another config ({diffs}"
            f"{', ...' if len(changed) > 3 else ''}): rerun with the same config to resume, or "
            "choose a new --workdir"
        )


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while training: the first asks the loop to save a checkpoint at
    the end of the current step and exit; a second exits at once, leaving the last complete
    checkpoint intact (orbax renames a save into place only once it is whole).

    Given `starting`, a signal before `started()` (while the model is built and compiled: there
    is nothing to save yet) prints that message and exits at once.

    With `agree` (several processes), the first signal is handed to JAX's preemption service as
    a SIGTERM to this process, so that every process stops at the step the service agrees on
    (the loop asks `reached_preemption` each step): a process that stopped on its own would
    leave the others waiting in the next collective.

    A thread reads the signals from a wakeup fd, so each is acknowledged the moment it arrives,
    even while the main thread waits for the device inside a step or compiles. (A plain
    KeyboardInterrupt is not enough: raised inside a garbage-collector callback, Python drops it.)
    """

    def __init__(self, signals, starting: str | None = None, agree: bool = False):
        self.signals = set(signals)
        self.signum: int | None = None
        self.starting = starting
        self.agree = agree
        self.finishing = False  # the loop is over: a signal stops the final evaluation
        self._read, write = socket.socketpair()
        self._write = write
        write.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        # The Python-level handler does nothing: the thread below acts on every signal.
        self._old = {s: signal.signal(s, lambda *_: None) for s in self.signals}
        threading.Thread(target=self._watch, daemon=True, name="stop-request").start()

    def _watch(self) -> None:
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.signals:
                    self._on_signal(signum)

    def started(self) -> None:
        self.starting = None

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.starting is not None:
            print(f"\n{name}: {self.starting}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        if self.signum is None and not self.finishing:
            self.signum = signum
            when = "at the step all processes agree on" if self.agree else "after this step"
            print(
                f"\n{name}: saving a checkpoint {when}, then exiting (Ctrl-C again quits at "
                "once); rerun the same command to resume",
                file=sys.stderr,
                flush=True,
            )
            if self.agree and signum != signal.SIGTERM:
                # JAX's preemption notifier owns SIGTERM (no Python handler is installed for it).
                os.kill(os.getpid(), signal.SIGTERM)
            return
        print(
            f"\n{name}: quitting now; the last complete checkpoint is kept, rerun the same "
            "command to resume from it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old.items():
            signal.signal(s, h)
        self._write.close()
        self._read.close()


class Trainer:
    """Everything one run holds; `run()` trains to `total_steps`."""

    def __init__(self, config, workdir: str | os.PathLike):
        # Several processes must stop at the same step, or the others wait forever in the next
        # collective: there JAX's preemption service owns SIGTERM and orbax tells every process
        # the agreed step (`reached_preemption`). One process handles the signal itself.
        self.multiprocess = jax.process_count() > 1
        signals = [signal.SIGINT] if self.multiprocess else [signal.SIGTERM, signal.SIGINT]
        self.stop = StopRequest(
            signals,
            starting="interrupted before training started: nothing to save; rerun the same "
            "command to start (or resume from the last checkpoint)",
            agree=self.multiprocess,
        )
        try:
            self._start(config, workdir)
        except BaseException:
            self.stop.close()
            raise

    def _start(self, config, workdir: str | os.PathLike) -> None:
        self.config = config
        # A string (a local path as given, or a URL): pathlib would turn gs://b/r into ./gs:/b/r.
        self.workdir = os.fspath(workdir).rstrip("/") or "/"
        d = config.data
        for key, path in (
            ("--workdir", self.workdir),
            ("data.train_manifest", d.train_manifest),
            ("data.eval_manifest", d.eval_manifest),
        ):
            if storage.is_url(path):
                try:
                    storage.as_path(path)
                except ValueError as e:  # a scheme epath cannot open
                    raise config_lib.ConfigError(f"{key}: {e}") from None
        storage.makedirs(self.workdir)
        self.is_main = jax.process_index() == 0
        # Everything the config decides is checked here, before any weight is read or any
        # program compiled; each mistake is one ConfigError naming its key.
        self.model_cfg = build.model_config(config)
        build.check_config(config, self.model_cfg)
        self.data_cfg = build.data_config(config, self.model_cfg, jax.process_count())
        check_resume(config, self.workdir)
        try:
            self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
        replicas = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if (config.batch_size // config.grad_accum_steps) % replicas:
            raise config_lib.ConfigError(
                f"batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} "
                f"must be a multiple of mesh.data x mesh.fsdp = {replicas} (the batch is split "
                "over them)"
            )
        if self.is_main:
            config_lib.save_config(config, f"{self.workdir}/config.json")
        self.model = BLSPKD(self.model_cfg)
        self.loss_cfg = build.loss_config(config)
        log.info(
            "%d processes, %d devices, mesh %s",
            jax.process_count(),
            jax.device_count(),
            dict(self.mesh.shape),
        )
        self.step_cfg = build.step_config(config)
        self.tx, self.schedule = build.optimizer(config)

        self.tokenizer = build.tokenizer_path(config)
        self.train_data = train_pipeline(self.data_cfg, self.tokenizer, self.workdir)
        self.eval_data = (
            eval_pipeline(self.data_cfg, self.tokenizer, self.workdir)
            if config.data.eval_manifest
            else None
        )

        params = weights.assemble_params(config, self.model, self.mesh)
        self.state, self.state_shardings = train_state.create_state(
            params, self.mesh, self.step_cfg, self.tx
        )
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
                example_batch(self.model_cfg, self.config.batch_size, frames, tokens),
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
        log.info(
            "metrics go to %s and TensorBoard events to %s; draw them with python -m "
            "blspkd_jax.plot curves --workdir %s",
            f"{self.workdir}/metrics.jsonl",
            f"{self.workdir}/tensorboard",
            self.workdir,
        )
        stop = self.stop
        # MFU against the peak of the dtype the LLM (most of the FLOPs) computes in.
        compute = jnp.dtype(config.model.llm.dtype)
        peak = config.peak_tflops_per_device * 1e12 or measure_matmul_peak(dtype=compute)
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
                gbatch = sharding.global_batch(self.mesh, batch)
                self.state, metrics = step_fn(self.state, gbatch, rng)
                step = int(self.state.step)
                stop.started()  # the first step is compiled and done: a signal now saves
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
                # Several processes stop only at the step the preemption service agreed on (a
                # Ctrl-C was forwarded to it); a single process stops at once.
                preempted = self.ckpt.reached_preemption(step)
                if preempted:
                    stop.signum = stop.signum or signal.SIGTERM
                if preempted or (stop.signum is not None and not self.multiprocess):
                    self.save(force=True)
                    self.ckpt.wait_until_finished()
                    log.warning(
                        "stopped at step %d (%s); checkpoint saved in %s: rerun the same command "
                        "to resume",
                        step,
                        signal.Signals(stop.signum).name,
                        f"{self.workdir}/checkpoints",
                    )
                    sys.exit(128 + stop.signum)
            stop.finishing = True
            self.save(force=True)
            self.ckpt.wait_until_finished()
            if self.eval_data is not None:
                final = self.evaluate()
                writer.write(int(self.state.step), final, prefix="eval/")
                last.update({f"eval/{k}": v for k, v in final.items()})
        finally:
            stop.close()
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
            f"step {self.ckpt.latest_step()} in {self.workdir}/checkpoints; lower "
            "optim.learning_rate or check the data before resuming."
        )

    def evaluate(self) -> dict[str, float]:
        return consistency(
            self.model,
            self.state.params(),
            self.eval_data,
            self.mesh,
            self.loss_cfg,
            max_batches=self.config.eval_max_batches,
        )
