"""The optimizer's pieces against explicit formulas: the learning-rate schedules, the decay mask and
the trainable/frozen split."""

import math

import numpy as np
import pytest

from blspkd_jax.training import optim


def _expected(step, peak, warmup, total, decay, end_factor):
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / max(1, total - warmup)
    end = peak * end_factor
    if decay == "cosine":
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
    if decay == "linear":
        return peak + (end - peak) * t
    return peak


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedules_follow_their_formulas(decay, warmup):
    peak, total, end_factor = 2e-3, 50, 0.1
    schedule = optim.learning_rate_schedule(peak, warmup, total, decay, end_factor)
    for step in [0, 1, 5, 9, 10, 11, 25, 49, 50, 60]:
        want = _expected(step, peak, warmup, total, decay, end_factor)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_a_warmup_as_long_as_the_run_reaches_the_peak(decay):
    schedule = optim.learning_rate_schedule(1e-3, 60, 40, decay, 0.1)
    np.testing.assert_allclose(float(schedule(20)), 1e-3 * 20 / 40, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(40)), 1e-3, rtol=1e-5)


def test_unknown_decay_is_refused_by_key():
    with pytest.raises(ValueError, match="optim.decay"):
        optim.learning_rate_schedule(1e-3, 10, 100, "exponential")


def test_decay_mask_and_trainable_split():
    assert optim.decays("adapter/cif_proj/kernel", np.zeros((3, 4)))
    assert not optim.decays("adapter/cif_proj/bias", np.zeros(4))
    assert not optim.decays("llm/norm/scale", np.zeros(4))
    assert not optim.decays("encoder/layers/layers_0/self_attn_layer_norm/scale", np.zeros(4))
    flat = {"adapter/a": 1, "llm/blocks/q_proj/lora_a": 2, "llm/blocks/q_proj/kernel": 3}
    trainable, frozen = optim.split_trainable(flat, ["^adapter/", "lora_"])
    assert sorted(trainable) == ["adapter/a", "llm/blocks/q_proj/lora_a"]
    assert list(frozen) == ["llm/blocks/q_proj/kernel"]
