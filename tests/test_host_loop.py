"""The trainer's host loop (issue 16, item 3): the host reads the device only at sync points (log
and checkpoint steps), every bucket that holds rows compiles before the first step, the batch goes
in the encoder's compute dtype, the checkpointed iterator position is that of the batches the
steps consumed (not the prefetched one), evaluation compiles once per shape however often it runs,
and a run of non-finite steps still stops the run, at the next sync point.

Each test drives one in-process `Trainer` over `_runs.build_assets`' eight utterances (0.5 to
1.34 s: 50 to 134 mel frames), with tests/tiny.py's model."""

import contextlib
import json
import logging
import threading
import traceback

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _runs import build_assets
from jax._src.array import ArrayImpl
from tiny import OVERRIDES, REPO

from blspkd_jax.training import checkpoint, objective, train_state
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.trainer import Trainer

TOTAL, LOG_EVERY, CKPT_EVERY = 7, 3, 4
SYNC_STEPS = {3, 4, 6, 7}  # log steps 3, 6 and the last; the checkpoint step 4
# Frame buckets: 40 holds no utterance, 80 three, 160 five.
# What every log row holds besides the step's own metrics.
LOGGED = (
    "learning_rate",
    "tokens_per_sec",
    "steps_per_sec",
    "nonfinite_skipped_total",
    "data_dropped_at_decode",
    "mfu",
)
BUCKETS = ["--config.data.frame_buckets=(40, 80, 160)", "--config.data.token_buckets=(48,)"]
MIXTURE = "--config.data.train_manifest={assets}/first.jsonl:1,{assets}/last.jsonl:3"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("host_loop"))


def _config(assets, *extra):
    config = config_lib.load_config(str(REPO / "configs/tiny.py"))
    config_lib.apply_overrides(
        config,
        [
            *OVERRIDES,
            f"--config.data.train_manifest={assets / 'train.jsonl'}",
            f"--config.model.llm.hf_path={assets / 'llm'}",
            f"--config.total_steps={TOTAL}",
            f"--config.log_every_steps={LOG_EVERY}",
            *extra,
        ],
    )
    return config


class DeviceReads:
    """Records every read of a device array's value (`int()`, `float()`, `np.asarray`,
    `jax.device_get` all pass through `jax.Array._value`) made by the main thread while armed.
    On CPU `jax.transfer_guard` cannot see these (the device's memory is the host's), so the
    property is wrapped instead."""

    def __init__(self, monkeypatch):
        self.armed = False
        self.reads: list[str] = []
        original = ArrayImpl._value

        def value(array):
            if self.armed and threading.current_thread() is threading.main_thread():
                self.reads.append("".join(traceback.format_stack(limit=8)))
            return original.fget(array)

        monkeypatch.setattr(ArrayImpl, "_value", property(value))

    @contextlib.contextmanager
    def allowed(self):
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed

    def allow(self, monkeypatch, cls, name, on_call=None):
        """`cls.name` may read the device (a sync point); `on_call(self_)` is told each call."""
        original = getattr(cls, name)

        def method(obj, *args, **kwargs):
            if on_call is not None:
                on_call(obj)
            with self.allowed():
                return original(obj, *args, **kwargs)

        monkeypatch.setattr(cls, name, method)


def _record_compiles(monkeypatch, events, skip_at=()):
    """Record each train-step compilation ("compile", (F, L), features dtype) and each step
    call ("step", features dtype); the calls numbered in `skip_at` (1-based) report a skipped,
    non-finite step."""
    original = train_state.compile_train_step
    calls = [0]

    def compile_train_step(step_fn, shardings, mesh, abstract_state, batch, log=print):
        compiled, stats = original(step_fn, shardings, mesh, abstract_state, batch, log)
        shape = (batch["features"].shape[-1], batch["input_ids"].shape[-1])
        events.append(("compile", shape, batch["features"].dtype))

        def step(state, gbatch, rng):
            calls[0] += 1
            events.append(("step", gbatch["features"].dtype))
            state, metrics = compiled(state, gbatch, rng)
            if calls[0] in skip_at:
                metrics = {**metrics, "skipped": jnp.ones_like(metrics["skipped"])}
            return state, metrics

        return step, stats

    monkeypatch.setattr(train_state, "compile_train_step", compile_train_step)


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """A 7-step run over two occurring buckets (and one empty), bfloat16 encoder, checkpoints at
    4 and 7, a final evaluation and one more after it, its training data a mixture of two
    sources (the manifest's first and last four rows, weights 1 and 3); everything the tests
    below check about it was recorded while it ran."""
    workdir = tmp_path_factory.mktemp("host_loop_run") / "w"
    lines = (assets / "train.jsonl").read_text().splitlines(keepends=True)
    (assets / "first.jsonl").write_text("".join(lines[:4]))
    (assets / "last.jsonl").write_text("".join(lines[4:]))
    config = _config(
        assets,
        *BUCKETS,
        MIXTURE.format(assets=assets),
        f"--config.checkpoint_every_steps={CKPT_EVERY}",
        f"--config.data.eval_manifest={assets / 'train.jsonl'}",
        "--config.model.encoder.dtype=bfloat16",
    )
    out = {"events": [], "read_steps": [], "traces": 0, "logs": []}
    logger = logging.getLogger("blspkd_jax.train")
    handler = logging.Handler()
    handler.emit = lambda record: out["logs"].append(record.getMessage())
    level = logger.level
    with pytest.MonkeyPatch.context() as mp:
        reads = DeviceReads(mp)
        _record_compiles(mp, out["events"])
        sums = objective.consistency_sums

        def counting_sums(*args, **kwargs):
            out["traces"] += 1  # called once per trace: a jit cache hit never calls it
            return sums(*args, **kwargs)

        mp.setattr(objective, "consistency_sums", counting_sums)
        reads.allow(mp, Trainer, "_read", lambda t: out["read_steps"].append(t.step))
        for name in ("save", "evaluate", "compile_steps"):
            reads.allow(mp, Trainer, name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            trainer = Trainer(config, workdir)
            reads.armed = True
            out["last"] = trainer.run()
            reads.armed = False
            out["evaluations"] = [out["last"], trainer.evaluate()]
        finally:
            reads.armed = False
            logger.removeHandler(handler)
            logger.setLevel(level)
        out["reads"] = reads.reads
    out["trainer"], out["workdir"], out["config"] = trainer, workdir, config
    return out


def test_the_host_reads_the_device_only_at_sync_points(run):
    assert run["reads"] == [], "a device read outside the sync points:\n" + run["reads"][0]
    assert set(run["read_steps"]) == SYNC_STEPS, run["read_steps"]
    last = run["last"]
    for key in LOGGED:
        assert np.isfinite(last[key]), key
    assert last["nonfinite_skipped_total"] == 0 and last["tokens_per_sec"] > 0


def test_every_occurring_bucket_compiles_before_the_first_step(run):
    events = run["events"]
    compiles = [e for e in events if e[0] == "compile"]
    first_step = next(i for i, e in enumerate(events) if e[0] == "step")
    assert all(events.index(c) < first_step for c in compiles)
    assert sorted(c[1] for c in compiles) == [(80, 48), (160, 48)]  # the empty (40, 48) is not
    assert sum(e[0] == "step" for e in events) == TOTAL
    # The device-side tally, compiled at start too, never again for the steps' own outputs.
    assert run["trainer"]._tally._cache_size() == 1
    logs = run["logs"]
    assert sum("train step 1/2 compiled" in m for m in logs) == 1
    assert sum("train step 2/2 compiled" in m for m in logs) == 1
    assert sum("train step memory per device" in m for m in logs) == 1


def test_features_go_in_the_encoders_compute_dtype(run):
    dtypes = {str(e[-1]) for e in run["events"]}
    assert dtypes == {"bfloat16"}, dtypes  # compiled for bfloat16 and given bfloat16


def test_checkpoints_hold_the_position_of_the_consumed_batches(run):
    """While step k runs, batch k + 1 is already read: the checkpoint of step k must still say
    that the next batch is k + 1 (0-based k), or a resumed run would skip one."""
    mngr = checkpoint.manager(run["workdir"])
    assert sorted(mngr.all_steps()) == [CKPT_EVERY, TOTAL]
    for step in mngr.all_steps():
        data = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        assert data["next_batch"] == step, (step, data)


def test_metrics_count_the_examples_drawn_from_each_source(run):
    """metrics.jsonl's examples/first and examples/last at each log step equal the real rows
    of the sources in the batches a fresh pipeline yields up to that step."""
    rows = [json.loads(x) for x in (run["workdir"] / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # the training rows, not the evaluation's
    assert [r["step"] for r in rows] == [3, 6, 7]
    it = iter(run["trainer"].train_data)
    batches = [next(it) for _ in range(TOTAL)]
    it.close()
    for r in rows:
        seen = np.concatenate([b["source"][b["example_mask"]] for b in batches[: r["step"]]])
        assert (r["examples/first"], r["examples/last"]) == (np.sum(seen == 0), np.sum(seen == 1))
    assert rows[-1]["examples/last"] > rows[-1]["examples/first"] > 0


def test_a_finished_run_compiles_no_train_step(run, monkeypatch):
    events = []
    _record_compiles(monkeypatch, events)
    config = run["config"].copy_and_resolve_references()
    config.data.eval_manifest = ""  # resumable: no final evaluation to wait for
    Trainer(config, run["workdir"]).run()
    assert events == []


def test_evaluation_compiles_once_per_shape(run):
    shapes = run["trainer"].eval_data.shapes
    assert len(shapes) == 2
    assert run["traces"] == len(shapes)  # two evaluations, each shape traced once
    first, second = run["evaluations"]
    for key in objective.CONSISTENCY_KEYS:
        assert first[f"eval/{key}"] == second[key], key


def test_a_run_of_nonfinite_steps_stops_at_the_next_sync_point(assets, tmp_path, monkeypatch):
    """Steps 1, 3 and 4 non-finite, at most 2 in a row: step 2 ends the first streak, the streak
    of 3 and 4 crosses the log step 3; the run stops at the next sync point, step 6, without
    saving its checkpoint."""
    events = []
    _record_compiles(monkeypatch, events, skip_at={1, 3, 4})
    config = _config(
        assets,
        "--config.checkpoint_every_steps=6",
        "--config.max_consecutive_nonfinite=2",
    )
    trainer = Trainer(config, tmp_path / "w")
    with pytest.raises(FloatingPointError, match=r"2 consecutive steps \(up to step 4\)") as e:
        trainer.run()
    assert "stops at step 6" in str(e.value)
    assert trainer.step == 6 and checkpoint.steps(tmp_path / "w") == []


def test_the_student_reuses_the_teachers_prompt_prefix_unless_the_llm_trains(run, assets):
    """The run's step takes the data's shortest prompt prefix from the teacher (every row of the
    manifest has the same system turn and instruction here: that prefix exactly); with the LLM's
    base weights trainable, or the switch off, it computes everything."""
    trainer = run["trainer"]
    prefix = len(trainer.train_data.layout.template().prefix)
    assert prefix > 0 and trainer.step_cfg.shared_prefix == prefix
    assert trainer.train_data.shared_prefix == prefix
    off = Trainer(_config(assets, "--config.train.share_prompt_prefix=false"), run["workdir"] / "x")
    assert off.step_cfg.shared_prefix == 0
    off.stop.close()
    llm = Trainer(
        _config(assets, "--config.train.trainable=('^adapter/', 'llm/.*/mlp/')"),
        run["workdir"] / "y",
    )
    assert llm.step_cfg.shared_prefix == 0
    llm.stop.close()
