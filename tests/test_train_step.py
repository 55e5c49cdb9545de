"""The composed model, loss positions, trainable/frozen split and the sharded train step."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import random_batch, tiny_config

from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD, splice_speech
from blspkd_jax.models.llm import LLM, is_lora_path
from blspkd_jax.training import flops, optim, train_state, weights
from blspkd_jax.training.config import ConfigError
from blspkd_jax.training.objective import LossConfig, compute_losses, loss_rows

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model_and_params():
    model = BLSPKD(tiny_config())
    batch = random_batch(0)
    # The initialisation the step tests below use (`_state`): one compiled program for the file.
    flat = dict(weights.random_params(model, _mesh_and_tx()[0], jax.random.key(0)))
    # Give PLoRA non-zero B so that "LoRA changes nothing where the mask is 0" is a real test.
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


def test_student_from_the_teachers_prefix_equals_the_full_student(model_and_params):
    """shared_prefix=P (no speech before P): the student starts from the teacher's keys and values
    at P; hidden states, every loss and the gradients of what trains (encoder, adapter, LoRA)
    equal the full computation's to float rounding."""
    model, params, batch = model_and_params
    P = int(np.argmax(batch["speech_mask"], axis=1).min())
    assert P >= 2
    full = jax.jit(model.apply)({"params": params}, batch)
    shared = jax.jit(functools.partial(model.apply, shared_prefix=P))({"params": params}, batch)
    for a, b in zip(full[:2], shared[:2], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)

    cfg = LossConfig(response_ce=0.5)

    def grads(prefix):
        fn = lambda p: compute_losses(model, p, batch, cfg, shared_prefix=prefix)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (_, m_full), g_full = grads(0)
    (_, m_shared), g_shared = grads(P)
    for k in m_full:
        np.testing.assert_allclose(m_shared[k], m_full[k], rtol=1e-5, atol=1e-7, err_msg=k)
    flat_full, flat_shared = optim.flatten(g_full), optim.flatten(g_shared)
    trained = [k for k in flat_full if not k.startswith("llm/") or is_lora_path(k)]
    assert any(is_lora_path(k) for k in trained)
    for k in trained:
        scale = float(np.abs(flat_full[k]).max()) or 1.0
        np.testing.assert_allclose(flat_shared[k], flat_full[k], atol=1e-5 * scale, err_msg=k)


def _transcript_embeddings(text, speech_mask):
    """[B, L, H] -> [B, N_max, H]: the embeddings at the speech positions, packed to the front."""
    order = jnp.argsort(~jnp.asarray(speech_mask), axis=1, stable=True)
    return jnp.take_along_axis(text, order[..., None], axis=1)[
        :, : tiny_config().adapter.max_tokens
    ]


def test_example_independent_of_other_examples_padding(model_and_params):
    model, params, batch = model_and_params
    fwd = jax.jit(model.apply)  # one program for both batches: only the data differs
    student, teacher, _ = fwd({"params": params}, batch)
    other = {k: v.copy() for k, v in batch.items()}
    # Shrink example 1's audio and change example 2's tokens: example 0 must not move.
    other["feature_mask"][1, 40:] = False
    other["features"][1] *= other["feature_mask"][1]
    other["input_ids"][2] = (other["input_ids"][2] + 5) % 97
    s2, t2, _ = fwd({"params": params}, other)
    np.testing.assert_allclose(np.asarray(s2[0]), np.asarray(student[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(t2[0]), np.asarray(teacher[0]))


def test_losses_are_finite_named_and_weighted(model_and_params):
    model, params, batch = model_and_params
    weights = {"input_kl": 0.5, "response_kl": 2.0, "response_ce": 1.5, "cif": 0.25}
    loss, metrics = jax.jit(compute_losses, static_argnums=(0, 3))(
        model, params, batch, LossConfig(**weights)
    )
    for name in (*weights, "loss"):
        assert np.isfinite(float(metrics[name])), name
    expected = sum(w * float(metrics[k]) for k, w in weights.items())
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # The cif term: |sum(alpha) - n| / n over the real examples only (the last row is filler).
    aux = jax.jit(model.apply)({"params": params}, batch)[2]
    sums = np.asarray(aux["alphas"], np.float64).sum(-1)
    n = batch["text_lengths"].astype(np.float64)
    real = batch["example_mask"]
    assert not real.all()
    want = np.mean(np.abs(sums - n)[real] / n[real])
    np.testing.assert_allclose(float(metrics["cif"]), want, rtol=1e-5)


def _mesh_and_tx():
    """The step tests' one-device mesh and optimizer."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, _ = optim.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    return mesh, tx


def _state(model, step_cfg):
    mesh, tx = _mesh_and_tx()
    params = weights.random_params(model, mesh, jax.random.key(0))
    state, shardings = train_state.create_state(params, mesh, step_cfg, tx)
    return state, shardings, tx, mesh


def _zero_state(model, step_cfg):
    """`create_state` from zero parameters in their shardings (no random init to compile), and
    `abstract_state` from their shapes alone: (state, shardings, abstract, abstract shardings)."""
    mesh, tx = _mesh_and_tx()
    params, shardings = weights.param_layout(model, mesh)
    zeros = {k: jax.device_put(np.zeros(v.shape, v.dtype), shardings[k]) for k, v in params.items()}
    state, state_shardings = train_state.create_state(zeros, mesh, step_cfg, tx)
    return (
        state,
        state_shardings,
        *train_state.abstract_state(params, shardings, mesh, step_cfg, tx),
    )


def test_frozen_weights_carry_no_optimizer_state():
    model = BLSPKD(tiny_config())
    step_cfg = train_state.StepConfig(trainable=("^adapter/",), loss=LossConfig())
    state, shardings, abstract, abstract_shardings = _zero_state(model, step_cfg)
    # The abstract state (what --compile-only and the step's ahead-of-time compile plan from) is
    # the built one's shapes, dtypes and shardings.
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), abstract
    )
    assert shardings == abstract_shardings
    assert jax.tree.map(lambda x: x.sharding, state) == abstract_shardings  # as built, too
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
    state2, *_ = _zero_state(model, stage2)
    lora = [k for k in state2.trainable if "lora_" in k]
    assert lora and not any("lora_" in k for k in state2.frozen)
    assert any(k.startswith("llm/") for k in state2.frozen)


def test_trainable_patterns_that_match_nothing_are_a_config_error():
    """Planning and building the state both refuse a run that would train nothing, naming the
    key and showing what parameter paths look like."""
    mesh, tx = _mesh_and_tx()
    params, shardings = weights.param_layout(BLSPKD(tiny_config()), mesh)
    step_cfg = train_state.StepConfig(trainable=("^adaptor/",), loss=LossConfig())
    for build in (
        lambda: train_state.abstract_state(params, shardings, mesh, step_cfg, tx),
        lambda: train_state.create_state(
            {
                k: jax.device_put(np.zeros(v.shape, v.dtype), shardings[k])
                for k, v in params.items()
            },
            mesh,
            step_cfg,
            tx,
        ),
    ):
        with pytest.raises(ConfigError, match=r"train.trainable \['\^adaptor/'\] matches no"):
            build()


def test_train_step_updates_trainable_only():
    model = BLSPKD(tiny_config())
    batch = random_batch(3)
    step_cfg = train_state.StepConfig(trainable=("^adapter/", "lora_"), loss=LossConfig())
    state, shardings, tx, mesh = _state(model, step_cfg)
    frozen_before = {k: np.asarray(v) for k, v in state.frozen.items()}
    trainable_before = {k: np.asarray(v) for k, v in state.trainable.items()}
    step = jax.jit(train_state.make_train_step(model, step_cfg, tx))
    for _ in range(2):  # the warmup's learning rate is 0 at step 0
        state, _ = step(state, batch, jax.random.PRNGKey(0))
    for k, v in state.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), frozen_before[k])
    changed = [k for k, v in state.trainable.items() if not np.array_equal(v, trainable_before[k])]
    # Every trained tensor moves, PLoRA's B included (its zero init gets a gradient from A).
    assert sorted(changed) == sorted(trainable_before)


def test_step_flops_count_every_scanned_layer():
    """MFU's numerator: the compiled step's FLOPs are what the traced step executes, the same
    looped or scanned (XLA's own count sees a scanned stack's body once)."""
    batch = random_batch(3)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step_cfg = train_state.StepConfig(trainable=("^adapter/", "lora_"), loss=LossConfig())
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    counted = {}
    mesh, tx = _mesh_and_tx()
    for scan in (False, True):
        model = BLSPKD(tiny_config(scan_layers=scan))
        # Shapes only: counting and compiling need no initialised parameters.
        params, param_shardings = weights.param_layout(model, mesh)
        abstract, shardings = train_state.abstract_state(
            params, param_shardings, mesh, step_cfg, tx
        )
        step = train_state.make_train_step(model, step_cfg, tx)
        with sharding.activate(mesh):
            counted[scan] = flops.matmul_flops(jax.make_jaxpr(step)(abstract, abstract_batch, rng))
    assert counted[False] > 0
    assert counted[True] == pytest.approx(counted[False], rel=1e-9)
    _, stats = train_state.compile_train_step(
        step, shardings, mesh, abstract, abstract_batch, log=lambda *a: None
    )
    assert stats["flops"] == pytest.approx(counted[True] / mesh.size, rel=1e-9)
    assert 0 < stats["xla_flops"] < stats["flops"]  # XLA counted one layer of the scanned stack


def test_gradient_accumulation_averages_two_different_micro_batches():
    """Accumulating over two micro-batches gives the mean of their gradients, taken one by one
    (before any optimizer): a missing division by n or a dropped micro-batch fails this."""
    model = BLSPKD(tiny_config())
    a, b = random_batch(3, batch=4), random_batch(5, batch=4)
    a["example_mask"][:] = b["example_mask"][:] = True
    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    step_cfg = train_state.StepConfig(
        trainable=("^adapter/", "lora_"), loss=LossConfig(response_ce=0.5), grad_accum_steps=2
    )
    state, *_ = _state(model, step_cfg)
    rng = jax.random.PRNGKey(0)
    grads, metrics = jax.jit(train_state.make_grad_fn(model, step_cfg))(
        state.trainable, state.frozen, both, rng
    )

    def loss(trainable, batch):  # the plain loss of one batch, no accumulation involved
        params = optim.unflatten({**trainable, **state.frozen})
        return compute_losses(model, params, batch, step_cfg.loss)

    one_by_one = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (loss_a, m_a), g_a = one_by_one(state.trainable, a)
    (loss_b, m_b), g_b = one_by_one(state.trainable, b)
    assert abs(float(loss_a) - float(loss_b)) > 1e-3  # the two micro-batches really differ
    np.testing.assert_allclose(float(metrics["loss"]), (loss_a + loss_b) / 2, rtol=1e-5)
    assert int(metrics["num_examples"]) == int(m_a["num_examples"]) + int(m_b["num_examples"])
    for k in g_a:
        want = (np.asarray(g_a[k]) + np.asarray(g_b[k])) / 2
        np.testing.assert_allclose(np.asarray(grads[k]), want, rtol=1e-4, atol=1e-7, err_msg=k)


def test_non_finite_loss_skips_update():
    model = BLSPKD(tiny_config())
    batch = random_batch(4)
    batch["features"][0, 0, 0] = np.nan
    # The configuration of test_train_step_updates_trainable_only: the same compiled program.
    step_cfg = train_state.StepConfig(trainable=("^adapter/", "lora_"), loss=LossConfig())
    state, shardings, tx, mesh = _state(model, step_cfg)
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


@pytest.mark.slow
def test_meshes_match_single_device(tmp_path):
    out = tmp_path / "r.npz"
    # data x fsdp x tensor all split at once (the same mesh over 2 processes: tests/test_train.py;
    # parameters over FSDP=8: tests/test_load_sharded.py).
    proc = _run(["--out", str(out), "--devices", "8", "--meshes", "1,1,1", "2,2,2"])
    assert proc.wait(timeout=600) == 0
    _assert_same_run(out, "1,1,1", out, "2,2,2")
