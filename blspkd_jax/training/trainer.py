"""The training program behind `python -m blspkd_jax.train`: one `Trainer` per run.

Builds the mesh, the sharded state (restoring the latest checkpoint in the workdir if there is
one), the grain pipeline, and runs the compiled step with logging (progress bar, metrics.jsonl,
TensorBoard), periodic evaluation and checkpoints. The workdir may be a URL (`gs://bucket/run`):
config, metrics, TensorBoard events and checkpoints all go there (`data.storage`), so every process
of a pod writes to one place and a rerun on other machines resumes from it. Rerunning resumes
exactly: the data iterator's position is checkpointed with the state. A preemption (SIGTERM,
agreed on by every process through orbax) or Ctrl-C saves and exits.

The host never waits for the device between sync points (log steps, checkpoints, evaluation, a
stop): every bucket's step is compiled before the first, each step is dispatched and the next
batch read, decoded and sent while it runs, and the per-step counts (tokens, skipped steps, the
run of non-finite ones) add up on the device until the next sync point reads them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from blspkd_jax.data import storage
from blspkd_jax.data.layout import HOST_KEYS
from blspkd_jax.data.pipeline import eval_pipeline, train_pipeline
from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD, example_batch
from blspkd_jax.models.llm import is_lora_path
from blspkd_jax.training import build, checkpoint, optim, train_state, weights
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.flops import measure_matmul_peak
from blspkd_jax.training.metrics import MetricWriter
from blspkd_jax.training.objective import cast_features, consistency, consistency_fn

log = logging.getLogger("blspkd_jax.train")


# Steps dispatched but not finished that the host lets pile up before it reads the next batch:
# enough that the device always has the next step queued while the host fetches, few enough
# that a fast input pipeline cannot stack a whole log window's batches in device memory.
MAX_STEPS_IN_FLIGHT = 2

TALLY_KEYS = ("skipped", "tokens", "run", "tripped", "steps")


def _tally_step(tally: dict, skipped: jax.Array, tokens: jax.Array, limit: int) -> dict:
    """One step's `skipped` and `num_tokens` added to the device-side tally since the last sync
    point (int32 scalars).

    skipped / tokens: sums over the steps; steps: how many steps; run: the current streak of
    skipped (non-finite) steps, carried across sync points; tripped: the step count (1-based,
    since the last sync) at which the streak first reached `limit`, 0 if it has not. The host
    reads it only at sync points, so nothing here waits for the device.
    """
    skipped = skipped.astype(jnp.int32)
    run = jnp.where(skipped > 0, tally["run"] + 1, 0)
    steps = tally["steps"] + 1
    tripped = jnp.where((tally["tripped"] == 0) & (run >= limit), steps, tally["tripped"])
    return {
        "skipped": tally["skipped"] + skipped,
        "tokens": tally["tokens"] + tokens.astype(jnp.int32),
        "run": run,
        "tripped": tripped,
        "steps": steps,
    }


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
    "data.cache_index",
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
        if storage.is_url(self.workdir):  # (the manifests' schemes: build.check_config)
            try:
                storage.as_path(self.workdir)
            except ValueError as e:  # a scheme epath cannot open
                raise config_lib.ConfigError(f"--workdir: {e}") from None
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
        self.step_cfg = dataclasses.replace(
            self.step_cfg, shared_prefix=self._shared_prefix(config)
        )
        self.step_fn = train_state.make_train_step(self.model, self.step_cfg, self.tx)
        # Features go to the device in the encoder's compute dtype, cast on the host: its first
        # op casts them to that dtype anyway, bfloat16 halves the bytes sent, and the step is
        # compiled ahead of time for exactly this dtype.
        self.feature_dtype = jnp.dtype(self.model_cfg.encoder.dtype)
        self.compiled: dict[tuple[int, int], object] = {}
        self.compile_stats: dict[tuple[int, int], dict] = {}
        self.flops_per_step = -1.0  # the largest bucket's
        # One jitted evaluation for the whole run: each eval batch shape compiles once, not once
        # per evaluation.
        self._consistency = consistency_fn(self.model, self.loss_cfg)
        self.ckpt = checkpoint.manager(self.workdir, keep=config.keep_checkpoints)
        self.iterator = iter(self.train_data)
        restored = checkpoint.restore(self.ckpt, self.state)
        if restored is not None:
            self.state, data_state = restored
            if data_state:
                self.iterator.set_state(data_state)
        # The steps taken, counted on the host: the state's own counter lives on the device, and
        # reading it would wait for the step in flight.
        self.step = int(self.state.step)
        # The iterator's position after the batches the steps so far consumed: what a checkpoint
        # holds. While a step runs the iterator is a batch further on (`run` prefetches), and a
        # resumed run must read that batch again.
        self._data_state = self.iterator.get_state()
        if restored is not None:
            log.info("resumed from step %d", self.step)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._tally = jax.jit(
            functools.partial(_tally_step, limit=int(config.max_consecutive_nonfinite))
        )

    def _compiled_step(self, frames: int, tokens: int):
        """The train step compiled for batches of `frames` mel frames and `tokens` tokens."""
        key = (frames, tokens)
        if key not in self.compiled:
            abstract_state = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state
            )
            batch = example_batch(self.model_cfg, self.config.batch_size, frames, tokens)
            features = batch["features"]
            batch["features"] = jax.ShapeDtypeStruct(features.shape, self.feature_dtype)
            self.compiled[key], stats = train_state.compile_train_step(
                self.step_fn,
                self.state_shardings,
                self.mesh,
                abstract_state,
                batch,
                log=lambda _: None,  # `compile_steps` logs one line per bucket instead
            )
            self.compile_stats[key] = stats
            self.flops_per_step = max(self.flops_per_step, stats["flops"])
        return self.compiled[key]

    def compile_steps(self) -> None:
        """Compile the train step ahead of time for every bucket that holds rows (a line per
        bucket as it goes), then log the memory of the largest once: no step compiles mid-run,
        and the worst case is known before the first step."""
        shapes = [s for s in self.train_data.shapes if s not in self.compiled]
        for i, (frames, tokens) in enumerate(shapes):
            t = time.perf_counter()
            self._compiled_step(frames, tokens)
            log.info(
                "train step %d/%d compiled: bucket of %d frames x %d tokens, %.2f GFLOPs/step "
                "per device, %.1f s",
                i + 1,
                len(shapes),
                frames,
                tokens,
                self.compile_stats[frames, tokens]["flops"] / 1e9,
                time.perf_counter() - t,
            )
        if shapes:
            self._log_memory()
        # The tally's own small program, so that nothing at all compiles once steps run.
        zero = self._new_tally()
        self._tally(zero, zero["skipped"], zero["tokens"])

    def _log_memory(self) -> None:
        key = max(self.compile_stats, key=lambda k: self.compile_stats[k]["temp_bytes"])
        s = self.compile_stats[key]
        if s["temp_bytes"] < 0:
            log.info("train step memory: not reported by the %s backend", jax.default_backend())
            return
        log.info(
            "train step memory per device (largest bucket, %d frames x %d tokens): temp %.1f MiB,"
            " args %.1f MiB, outputs %.1f MiB",
            *key,
            s["temp_bytes"] / 2**20,
            s["argument_bytes"] / 2**20,
            s["output_bytes"] / 2**20,
        )

    def _next_batch(self) -> tuple[dict[str, jax.Array], tuple[int, int]]:
        """The next training batch on the mesh (features in the compute dtype) and its bucket
        shape (F, L). The device copy starts at once; it overlaps the step in flight."""
        batch = next(self.iterator)
        for key in HOST_KEYS:
            batch.pop(key, None)
        batch = cast_features(batch, self.feature_dtype)
        shape = (batch["features"].shape[-1], batch["input_ids"].shape[-1])
        if shape not in self.compiled:  # only if the plan's buckets missed one: never expected
            log.warning("train step for %d frames x %d tokens compiles mid-run", *shape)
            self._compiled_step(*shape)
            self._log_memory()
        return sharding.global_batch(self.mesh, batch), shape

    def _new_tally(self, run: int = 0) -> dict[str, jax.Array]:
        """A zero tally (`_tally_step`) that carries the streak of non-finite steps `run`."""
        values = {k: np.int32(run if k == "run" else 0) for k in TALLY_KEYS}
        return jax.device_put(values, self._replicated)

    def _read(self, tree):
        """Every device value the training loop reads passes here, and only at sync points (log
        steps, checkpoints, a stop): anywhere else a read would make the host wait for the step in
        flight, and the device for the host."""
        return jax.device_get(tree)

    def _shared_prefix(self, config) -> int:
        """Positions the student takes from the teacher (`train.share_prompt_prefix`): the data's
        shortest prompt prefix, or 0 when off or when the LLM's base weights train."""
        llm_trains = any(k.startswith("llm/") and not is_lora_path(k) for k in self.state.trainable)
        if not config.train.share_prompt_prefix or llm_trains:
            return 0
        log.info(
            "the student reuses the teacher's first %d positions (the shortest prompt prefix)",
            self.train_data.shared_prefix,
        )
        return self.train_data.shared_prefix

    def save(self, force: bool = False) -> None:
        if self.step != self.ckpt.latest_step():  # the end of a run may land on a periodic save
            checkpoint.save(self.ckpt, self.state, self._data_state, force=force)

    def run(self) -> dict:
        """Train from the current step to `total_steps`; returns the last logged metrics (with
        the final evaluation's, prefixed "eval/").

        The host loop: dispatch step k (asynchronous), note the iterator's position, add the
        step's counts to the device-side tally, then read, decode and send batch k + 1 while step
        k runs. The host reads the device only at sync points: log steps (the metrics and the
        tally), checkpoint steps and a stop (the tally, so that no checkpoint follows a run of
        `max_consecutive_nonfinite` skipped steps), and evaluation.
        """
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
        bar = None
        if self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=config.total_steps, initial=self.step, desc="train", unit="step")
        total_skipped = 0
        last = {}
        tally, tally_start = self._new_tally(), self.step  # the steps since the last sync point
        in_flight: collections.deque = collections.deque()
        # Since the last log row: the steps, their tokens (from the tally) and their FLOPs (the
        # compiled buckets', known on the host).
        window_first, window_tokens, window_flops = self.step, 0, 0.0
        window_start = time.perf_counter()
        try:
            if self.step < config.total_steps:  # a finished run (or total_steps=0) compiles none
                self.compile_steps()
            pending = self._next_batch() if self.step < config.total_steps else None
            while self.step < config.total_steps:
                gbatch, shape = pending
                self.state, metrics = self.compiled[shape](self.state, gbatch, rng)
                self.step += 1
                step = self.step
                stop.started()  # every step is compiled and one dispatched: a signal now saves
                self._data_state = self.iterator.get_state()  # before the next batch is read
                tally = self._tally(tally, metrics["skipped"], metrics["num_tokens"])
                window_flops += self.compile_stats[shape]["flops"]
                # Wait (without reading) only once the host is MAX_STEPS_IN_FLIGHT steps ahead:
                # the device then still has a step queued while the next batch is fetched.
                in_flight.append(metrics["skipped"])
                if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                # Batch k + 1 is read, decoded and copied while step k runs.
                pending = self._next_batch() if step < config.total_steps else None

                log_now = step % config.log_every_steps == 0 or step == config.total_steps
                save_now = step % config.checkpoint_every_steps == 0
                # Several processes stop only at the step the preemption service agreed on (a
                # Ctrl-C was forwarded to it); a single process stops at once.
                preempted = self.ckpt.reached_preemption(step)
                if preempted:
                    stop.signum = stop.signum or signal.SIGTERM
                stopping = preempted or (stop.signum is not None and not self.multiprocess)
                if log_now or save_now or stopping:
                    counts = {k: int(v) for k, v in self._read(tally).items()}
                    if counts["tripped"]:
                        self._stop_nonfinite(
                            config.max_consecutive_nonfinite, tally_start + counts["tripped"]
                        )
                    total_skipped += counts["skipped"]
                    window_tokens += counts["tokens"]
                    tally, tally_start = self._new_tally(counts["run"]), step
                if log_now:
                    values = self._read({"m": metrics, "lr": self.schedule(step - 1)})
                    elapsed = time.perf_counter() - window_start  # the tally read waited
                    last = {k: float(v) for k, v in values["m"].items()}
                    last.update(
                        learning_rate=float(values["lr"]),
                        tokens_per_sec=window_tokens / elapsed,
                        steps_per_sec=(step - window_first) / elapsed,
                        nonfinite_skipped_total=total_skipped,
                        data_dropped_at_decode=self._data_state.get(
                            "dropped_at_decode", self.iterator.dropped_at_decode
                        ),
                    )
                    drawn = self._data_state.get("examples_per_source", {})
                    last.update({f"examples/{name}": n for name, n in drawn.items()})
                    if self.flops_per_step > 0:
                        last["mfu"] = window_flops / elapsed / peak
                    writer.write(step, last)
                    window_first, window_tokens, window_flops = step, 0, 0.0
                    window_start = time.perf_counter()
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}"
                        )
                if bar is not None:
                    bar.update(step - bar.n)
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    t = time.perf_counter()
                    writer.write(step, self.evaluate(), prefix="eval/")
                    window_start += time.perf_counter() - t  # the throughput of training only
                if save_now:
                    self.save()
                if stopping:
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
                writer.write(self.step, final, prefix="eval/")
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
            f"their updates were skipped, and the run stops at step {self.step}, where the "
            f"host next read the counts. The last good checkpoint is step "
            f"{self.ckpt.latest_step()} in {self.workdir}/checkpoints; lower "
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
            sums_fn=self._consistency,
        )
