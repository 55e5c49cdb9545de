"""What trains and how: the trainable/frozen split of the parameters and the AdamW optimizer.

Parameters are handled as flat dicts keyed by "/"-joined paths ("adapter/cif_proj/kernel"). A list
of regular expressions picks the trainable ones (stage 1: the adapter; stage 2: the adapter and
PLoRA). Frozen parameters never enter `jax.grad` and carry no optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, jax.Array]:
    """Nested params -> {"a/b/c": leaf}."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def split_trainable(
    flat: Mapping[str, jax.Array], patterns: Sequence[str]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(trainable, frozen) by `re.search` of any pattern on each path."""
    compiled = [re.compile(p) for p in patterns]
    trainable = {k: v for k, v in flat.items() if any(c.search(k) for c in compiled)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return trainable, frozen


def decays(path: str, leaf) -> bool:
    """Weight decay applies to matrices only: never to norms, biases, or 1-D tensors."""
    name = path.rsplit("/", 1)[-1]
    if name in ("bias", "scale") or "norm" in path.lower():
        return False
    return getattr(leaf, "ndim", 2) >= 2


def learning_rate_schedule(
    peak: float, warmup_steps: int, total_steps: int, decay: str = "cosine", end_factor: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine or linear decay to
    `peak * end_factor` at `total_steps`, or constant: optax's schedules."""
    warmup = max(0, min(warmup_steps, total_steps))
    end = peak * end_factor
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(total_steps, warmup + 1), end
        )
    if decay == "constant":
        # optax's warmup_constant_schedule stays at 0 when there is no warmup.
        return (
            optax.warmup_constant_schedule(0.0, peak, warmup)
            if warmup
            else optax.constant_schedule(peak)
        )
    if decay == "linear":
        # optax has no warmup-then-linear-decay in one call: its two linear pieces, joined.
        rest = max(1, total_steps - warmup)
        pieces = [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, end, rest)]
        return optax.join_schedules(pieces, [warmup])
    raise ValueError(f"optim.decay: expected 'cosine', 'linear' or 'constant', got {decay!r}")


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    end_factor: float = 0.0,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and a decay mask; returns (optimizer, lr schedule)."""
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps, decay, end_factor)

    def mask(params):
        return {k: decays(k, v) for k, v in params.items()}

    chain = []
    if grad_clip_norm:
        chain.append(optax.clip_by_global_norm(grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
    return optax.chain(*chain), schedule


def count_params(tree) -> int:
    return int(sum(jnp.size(x) for x in jax.tree.leaves(tree)))
