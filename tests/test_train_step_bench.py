"""benchmarks/train_step.py times the same computation in both frameworks: on a tiny model, the
PyTorch step (benchmarks/torch_step.py) has loss terms equal to `compute_losses`, gradients equal
to JAX's, and one full step (clipping, AdamW with the decay mask) leaves the same parameters as
`make_train_step`."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import load_benchmark, random_batch, tiny_config

from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.training import optim, train_state
from blspkd_jax.training.objective import LossConfig, compute_losses

# Stage 2 with the encoder: every part of the student trains (as configs/tiny.py:stage2).
TRAINABLE = ("^adapter/", "^encoder/", "lora_")
LOSS = LossConfig(response_ce=0.5)  # every term on, with a weight that is not 1
# eps 1e-3 keeps Adam's first step (about lr * g / (|g| + eps)) smooth in g, so fp32 noise in a
# near-zero gradient cannot flip an update; weight decay large enough to show in the comparison.
OPTIM = dict(learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.5, eps=1e-3)


def _load_bench():
    """benchmarks/train_step.py and benchmarks/torch_step.py (which it puts on sys.path), as one
    namespace of the functions the tests use."""
    module = load_benchmark("train_step")
    import torch_step

    return types.SimpleNamespace(random_params=module.random_params, **vars(torch_step))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    bench = _load_bench()
    cfg = tiny_config(lora_rank=4)  # LoRA dropout 0: both steps are deterministic
    # PLoRA's B nonzero so that the LoRA branch and its gradients are part of the comparison.
    flat = bench.random_params(cfg, seed=3, lora_b_scale=1.0)
    batch = random_batch(1)  # padded examples of different lengths, the last one padding
    trainable, frozen = optim.split_trainable(flat, TRAINABLE)
    paths = bench.torch_param_paths(cfg, {k: v.shape for k, v in flat.items()})

    def torch_step():
        model = bench.export_torch(cfg, flat, tmp_path_factory.mktemp("export"))
        return bench.TorchTrainStep(model, paths, set(trainable), LOSS, **OPTIM)

    return bench, cfg, flat, trainable, frozen, batch, paths, torch_step


def _jax_losses_and_grads(cfg, trainable, frozen, batch):
    model = BLSPKD(cfg)

    def loss(tr):
        params = optim.unflatten({**tr, **frozen})
        return compute_losses(model, params, batch, LOSS)

    (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return metrics, grads


@pytest.mark.parametrize("plora_rows", [False, True])
def test_losses_and_gradients_equal_jax(setup, plora_rows):
    """Also with the PyTorch PLoRA branch computed at the speech rows only (`--ablate`)."""
    bench, cfg, flat, trainable, frozen, batch, paths, torch_step = setup
    metrics, grads = _jax_losses_and_grads(cfg, trainable, frozen, batch)
    step = torch_step()
    step.model._plora.rows = plora_rows
    total, terms = bench.torch_losses(step.model, bench.torch_batch(batch), LOSS)
    assert set(terms) == {"input_kl", "response_kl", "response_ce", "cif"}
    for name, value in terms.items():
        want = float(metrics[name])
        assert want > 0.1, name  # O(1) terms, so the relative bound means something
        np.testing.assert_allclose(float(value.detach()), want, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(float(total.detach()), float(metrics["loss"]), rtol=1e-4)

    total.backward()
    assert {paths[n] for n, p in step.model.named_parameters() if p.requires_grad} == set(grads)
    assert any("lora_a" in k for k in grads) and any("encoder/conv1" in k for k in grads)
    got = bench.from_torch(cfg, step.model, grads=True)
    worst = 0.0
    for k, want in grads.items():
        want = np.asarray(want)
        scale = np.abs(want).max()
        assert scale > 0, k  # every trained tensor gets a gradient
        worst = max(worst, np.abs(got[k] - want).max() / scale)
    # Measured 7.7e-5 (PLoRA on the first layer's q/k, through the attention softmax); the loss
    # terms themselves agree to 1e-7.
    assert worst <= 2e-4, worst


def test_one_step_updates_equal_make_train_step(setup):
    bench, cfg, flat, trainable, frozen, batch, paths, torch_step = setup
    model = BLSPKD(cfg)
    step_cfg = train_state.StepConfig(trainable=TRAINABLE, loss=LOSS)
    tx, _ = optim.make_optimizer(**OPTIM)
    # The state as create_state makes it on one device, without compiling the model's init.
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable={k: jnp.asarray(v) for k, v in trainable.items()},
        frozen={k: jnp.asarray(v) for k, v in frozen.items()},
        opt_state=tx.init({k: jnp.asarray(v) for k, v in trainable.items()}),
    )
    state, metrics = jax.jit(train_state.make_train_step(model, step_cfg, tx))(
        state, batch, jax.random.PRNGKey(0)
    )
    step = torch_step()
    got = step(bench.torch_batch(batch))
    assert not got["skipped"] and int(metrics["skipped"]) == 0
    np.testing.assert_allclose(float(got["grad_norm"]), float(metrics["grad_norm"]), rtol=1e-4)
    assert float(metrics["grad_norm"]) > 1.0  # clipping at 1.0 is part of this step
    updated = bench.from_torch(cfg, step.model)
    lr = OPTIM["learning_rate"]
    for k, v in state.trainable.items():
        assert np.abs(np.asarray(v) - flat[k]).max() > 0, k  # every trained tensor moved
        np.testing.assert_allclose(updated[k], np.asarray(v), atol=1e-3 * lr, rtol=0, err_msg=k)
    for k in frozen:  # frozen tensors stay as they were in PyTorch too
        np.testing.assert_array_equal(updated[k], flat[k])
    for name in ("input_kl", "response_kl", "response_ce", "cif", "loss"):
        np.testing.assert_allclose(float(got[name]), float(metrics[name]), rtol=1e-4)
