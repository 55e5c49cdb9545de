"""The composed model, loss positions, trainable/frozen split and the sharded train step."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import random_batch, tiny_config

from blspkd_jax import optim, sharding, train_state
from blspkd_jax.llm import LLM
from blspkd_jax.model import BLSPKD, LossConfig, compute_losses, loss_rows, splice_speech

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model_and_params():
    model = BLSPKD(tiny_config())
    batch = random_batch(0)
    params = model.init({"params": jax.random.key(0)}, batch)["params"]
    params = nn.unbox(params)
    # Give PLoRA non-zero B so that "LoRA changes nothing where the mask is 0" is a real test.
    flat = optim.flatten(params)
    for k in flat:
        if k.endswith("lora_b"):
            flat[k] = 0.1 * jax.random.normal(jax.random.key(hash(k) % 2**31), flat[k].shape)
    return model, optim.unflatten(flat), batch


def test_loss_rows_select_exact_positions():
    # One example: [sys sys] [t0 t1 t2] [mid] [r0 r1] [eot] [pad pad]
    ids = np.arange(1, 11, dtype=np.int32)[None]
    batch = {
        "input_ids": ids,
        "attention_mask": np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], bool),
        "speech_mask": np.array([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0]], bool),
        "response_mask": np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 0]], bool),
        "example_mask": np.array([True]),
    }
    rows = loss_rows(jax.tree.map(jnp.asarray, batch))
    # input_kl: the N transcript positions themselves.
    np.testing.assert_array_equal(np.flatnonzero(rows["input"][0]), [2, 3, 4])
    # response_kl: the logits predicting r0, r1 and eot sit one position earlier.
    np.testing.assert_array_equal(np.flatnonzero(rows["response"][0]), [5, 6, 7])
    batch["example_mask"] = np.array([False])
    rows = loss_rows(jax.tree.map(jnp.asarray, batch))
    assert not rows["input"].any() and not rows["response"].any()


def test_student_with_transcript_and_zero_lora_mask_is_teacher(model_and_params):
    model, params, batch = model_and_params
    llm = LLM(model.config.llm)
    p = {"params": params["llm"]}
    ids = jnp.asarray(batch["input_ids"])
    teacher = llm.apply(p, ids, attention_mask=batch["attention_mask"], return_hidden=True)
    text = llm.apply(p, ids, method=LLM.embed)
    # Splicing the transcript's own embeddings back in, with PLoRA off, is the teacher exactly.
    spliced = splice_speech(
        text, _transcript_embeddings(text, batch["speech_mask"]), batch["speech_mask"]
    )
    same = llm.apply(
        p,
        inputs_embeds=spliced,
        attention_mask=batch["attention_mask"],
        lora_mask=jnp.zeros_like(batch["speech_mask"]),
        return_hidden=True,
    )
    np.testing.assert_array_equal(np.asarray(same), np.asarray(teacher))
    # PLoRA on at the transcript positions changes those positions and what follows, never
    # what precedes them.
    on = llm.apply(
        p,
        inputs_embeds=spliced,
        attention_mask=batch["attention_mask"],
        lora_mask=batch["speech_mask"],
        return_hidden=True,
    )
    first = np.argmax(batch["speech_mask"], axis=1)
    for b in range(len(first)):
        np.testing.assert_array_equal(
            np.asarray(on[b, : first[b]]), np.asarray(teacher[b, : first[b]])
        )
        assert np.abs(np.asarray(on[b, first[b]] - teacher[b, first[b]])).max() > 1e-4


def _transcript_embeddings(text, speech_mask):
    """[B, L, H] -> [B, N_max, H]: the embeddings at the speech positions, packed to the front."""
    order = jnp.argsort(~jnp.asarray(speech_mask), axis=1, stable=True)
    return jnp.take_along_axis(text, order[..., None], axis=1)[
        :, : tiny_config().adapter.max_tokens
    ]


def test_example_independent_of_other_examples_padding(model_and_params):
    model, params, batch = model_and_params
    student, teacher, _ = model.apply({"params": params}, batch)
    other = {k: v.copy() for k, v in batch.items()}
    # Shrink example 1's audio and change example 2's tokens: example 0 must not move.
    other["feature_mask"][1, 40:] = False
    other["features"][1] *= other["feature_mask"][1]
    other["input_ids"][2] = (other["input_ids"][2] + 5) % 97
    s2, t2, _ = model.apply({"params": params}, other)
    np.testing.assert_allclose(np.asarray(s2[0]), np.asarray(student[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(t2[0]), np.asarray(teacher[0]))


def test_losses_are_finite_and_named(model_and_params):
    model, params, batch = model_and_params
    loss, metrics = compute_losses(model, params, batch, LossConfig(response_ce=1.0))
    for name in ("input_kl", "response_kl", "response_ce", "cif", "loss"):
        assert np.isfinite(float(metrics[name])), name
    expected = sum(float(metrics[k]) for k in ("input_kl", "response_kl", "response_ce", "cif"))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def _state(model, step_cfg, batch, mesh=None):
    mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, _ = optim.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    state, shardings = train_state.create_state(
        model, mesh, jax.random.key(0), abstract, step_cfg, tx
    )
    return state, shardings, tx, mesh


def test_frozen_weights_carry_no_optimizer_state():
    model = BLSPKD(tiny_config())
    batch = random_batch(0)
    step_cfg = train_state.StepConfig(trainable=("^adapter/",), loss=LossConfig())
    state, *_ = _state(model, step_cfg, batch)
    assert all(k.startswith("adapter/") for k in state.trainable)
    assert not any(k.startswith("adapter/") for k in state.frozen)
    n_trainable = optim.count_params(state.trainable)
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert optim.count_params(adam.mu) == n_trainable
    assert optim.count_params(adam.nu) == n_trainable
    # Everything the optimizer holds is the two moments plus scalar counters.
    assert optim.count_params(state.opt_state) == 2 * n_trainable + len(
        [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
    )
    # Stage 2 adds PLoRA: LoRA weights train, base LLM weights stay frozen.
    stage2 = train_state.StepConfig(trainable=("^adapter/", "lora_"), loss=LossConfig())
    state2, *_ = _state(model, stage2, batch)
    lora = [k for k in state2.trainable if "lora_" in k]
    assert lora and not any("lora_" in k for k in state2.frozen)
    assert any(k.startswith("llm/") for k in state2.frozen)


def test_train_step_updates_trainable_only_and_accumulation():
    model = BLSPKD(tiny_config())
    half = random_batch(3, batch=4)
    half["example_mask"][:] = True
    doubled = {k: np.concatenate([v, v]) for k, v in half.items()}
    results = {}
    for accum, batch in ((1, half), (2, doubled)):
        step_cfg = train_state.StepConfig(
            trainable=("^adapter/", "lora_"), loss=LossConfig(), grad_accum_steps=accum
        )
        state, shardings, tx, mesh = _state(model, step_cfg, batch)
        frozen_before = {k: np.asarray(v) for k, v in state.frozen.items()}
        step = jax.jit(train_state.make_train_step(model, step_cfg, tx))
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        for k, v in state.frozen.items():
            np.testing.assert_array_equal(np.asarray(v), frozen_before[k])
        results[accum] = (metrics, state.trainable)
    # Two identical micro-batches average to the single one's gradient.
    np.testing.assert_allclose(
        float(results[2][0]["loss"]), float(results[1][0]["loss"]), rtol=1e-5
    )
    for k, v in results[1][1].items():
        np.testing.assert_allclose(
            np.asarray(results[2][1][k]), np.asarray(v), atol=1e-6, err_msg=k
        )


def test_non_finite_loss_skips_update():
    model = BLSPKD(tiny_config())
    batch = random_batch(4)
    batch["features"][0, 0, 0] = np.nan
    step_cfg = train_state.StepConfig(trainable=("^adapter/",), loss=LossConfig())
    state, shardings, tx, mesh = _state(model, step_cfg, batch)
    before = {k: np.asarray(v) for k, v in state.trainable.items()}
    state, metrics = jax.jit(train_state.make_train_step(model, step_cfg, tx))(
        state, batch, jax.random.PRNGKey(0)
    )
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1
    for k, v in state.trainable.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


def _load(path, spec):
    data = np.load(path)
    losses = {k: float(data[k]) for k in data.files if k.startswith(f"{spec}|loss|")}
    params = {k.split("|", 2)[2]: data[k] for k in data.files if k.startswith(f"{spec}|param|")}
    return losses, params


def _assert_same_run(path_a, spec_a, path_b, spec_b, tol=1e-5):
    la, pa = _load(path_a, spec_a)
    lb, pb = _load(path_b, spec_b)
    assert la and pa
    for k, v in la.items():
        other = lb[k.replace(f"{spec_a}|", f"{spec_b}|", 1)]
        np.testing.assert_allclose(other, v, rtol=tol, atol=tol, err_msg=k)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], atol=tol, err_msg=k)


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, str(HERE / "_train_parity.py"), *args], env=env, **kw)


def test_meshes_match_single_device(tmp_path):
    out = tmp_path / "r.npz"
    proc = _run(
        ["--out", str(out), "--devices", "8", "--meshes", "1,1,1", "8,1,1", "1,8,1", "2,2,2"]
    )
    assert proc.wait(timeout=600) == 0
    for spec in ("8,1,1", "1,8,1", "2,2,2"):
        _assert_same_run(out, "1,1,1", out, spec)


def test_two_processes_match_single_process(tmp_path):
    ref = tmp_path / "ref.npz"
    single = _run(["--out", str(ref), "--devices", "1", "--meshes", "1,1,1"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = tmp_path / "mp.npz"
    common = ["--out", str(outs), "--devices", "2", "--meshes", "2,2,1", "--num-processes", "2"]
    coordinator = ["--coordinator", f"127.0.0.1:{port}"]
    procs = [_run([*common, *coordinator, "--process-id", str(i)]) for i in range(2)]
    assert single.wait(timeout=600) == 0
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    _assert_same_run(ref, "1,1,1", outs, "2,2,1")
