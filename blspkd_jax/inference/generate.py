"""Autoregressive generation with the LLM's KV cache: text prompts (ids) or speech prompts
(embeddings with PLoRA at the speech positions), greedy or temperature/top-p sampling.

One call is one jit-compiled program: a prefill over the whole left-padded prompt, then a
`lax.while_loop` of one-token decode steps that exits as soon as every row has stopped. It compiles
once per (batch, prompt length, max_new_tokens) shape, so callers pad prompts to `bucket_length`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.inference import multihost
from blspkd_jax.models import sharding
from blspkd_jax.models.llm import LLM, init_cache

MIN_BUCKET = 16


def token_ids(eos) -> tuple[int, ...]:
    """An id, a list of ids or None, as a tuple of ints."""
    if eos is None:
        return ()
    if isinstance(eos, int | np.integer):
        return (int(eos),)
    return tuple(int(t) for t in eos)


def default_pad_id(config, stop_ids: Sequence[int]) -> int:
    """transformers' rule for the fill after a row stops: pad_token_id, else the first eos."""
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    return int(stop_ids[0]) if stop_ids else 0


def select_token(logits, key, temperature, top_p, sample: bool):
    """Next token `[B]` from logits `[B, V]`: argmax, or a draw from `softmax(logits / temperature)`
    restricted to the top-p nucleus (the fewest most-probable tokens whose mass reaches `top_p`;
    the most probable token is always kept)."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    # A token is in the nucleus when the mass strictly above it is still short of top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def output_head(llm: LLM, hidden):
    """The LLM's output head on `[B, L, H]` (tied or not), as the module computes it."""
    if llm.config.tie_word_embeddings:
        return llm.embed_tokens.attend(hidden)
    return llm.lm_head(hidden)


def _cache_logical(name: str, ndim: int) -> tuple:
    """Logical axes of one KV-cache leaf (a leading layer axis when the layers are scanned):
    keys and values `[B, S, K, Dh]` split by batch and KV heads, the mask `[B, S]` by batch."""
    base = {
        "cached_key": ("act_batch", None, "act_kv_heads", None),
        "cached_value": ("act_batch", None, "act_kv_heads", None),
        "cache_mask": ("act_batch", None),
    }.get(name, ())
    return (None,) * (ndim - len(base)) + base


def cache_shardings(config, mesh: Mesh, batch: int, length: int, rules=sharding.RULES):
    """NamedShardings of `init_cache(config, batch, length)`'s leaves by the rules table (a
    dimension its axes do not divide is replicated)."""
    abstract = jax.eval_shape(lambda: init_cache(config, batch, length))

    def one(path, x):
        names = _cache_logical(str(getattr(path[-1], "key", path[-1])), x.ndim)
        spec = sharding.logical_to_spec(names, rules) if names else PartitionSpec()
        return NamedSharding(mesh, sharding.divisible_spec(mesh, spec, x.shape))

    return jax.tree_util.tree_map_with_path(one, abstract)


@functools.lru_cache(maxsize=32)
def param_shardings(module: LLM, mesh: Mesh):
    """The LLM's parameters' NamedShardings on `mesh` by the rules table: the shardings the
    trainer and `hf.load_llm(..., mesh=)` put them in (FSDP over `embed`, tensor over heads).
    (Kept per module and mesh: tracing the model's init costs time at 7B.)"""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    return sharding.logical_shardings(mesh, boxed)


def _generate(
    params,
    prompt,
    attention_mask,
    lora_mask,
    temperature,
    top_p,
    rng,
    *,
    module: LLM,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sample: bool,
    embeds: bool,
    cache_specs,
    gather_specs,
):
    if gather_specs is not None:  # FSDP weights gathered once here, not at every decode step
        params = jax.lax.with_sharding_constraint(params, gather_specs)
    B, P = attention_mask.shape
    N = max_new_tokens
    rng = jax.random.wrap_key_data(rng)  # passed as its uint32 data: host data in, like the rest
    # The last generated token is never fed back, so the cache needs P + N - 1 slots.
    cache = jax.lax.with_sharding_constraint(init_cache(module.config, B, P + N - 1), cache_specs)
    prompt_kw = {"inputs_embeds": prompt} if embeds else {"input_ids": prompt}
    hidden, v = module.apply(
        {"params": params, "cache": cache},
        **prompt_kw,
        attention_mask=attention_mask,
        lora_mask=lora_mask,  # PLoRA at the prompt's speech positions, prefill only
        return_hidden=True,
        decode=True,
        mutable=["cache"],
    )
    # Only the last prompt position predicts anything: never build [B, P, V] logits.
    logits = module.apply({"params": params}, hidden[:, -1:], method=output_head)[:, 0]

    stops = jnp.asarray(stop_ids, jnp.int32)
    is_stop = lambda t: (t[:, None] == stops[None, :]).any(-1)
    alive = attention_mask.any(-1)  # an all-padding row (batch filler) generates nothing
    token = select_token(logits, jax.random.fold_in(rng, 0), temperature, top_p, sample)
    token = jnp.where(alive, token, pad_id)
    done = ~alive | is_stop(token)
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(token)
    feed_mask = jnp.ones((B, 1), jnp.int32)

    def cond(state):
        i, _, done, _, _ = state
        return (i < N) & ~done.all()

    def body(state):
        i, token, done, out, cache = state
        logits, v = module.apply(
            {"params": params, "cache": cache},
            token[:, None],
            attention_mask=feed_mask,
            decode=True,
            mutable=["cache"],
        )
        nxt = select_token(logits[:, 0], jax.random.fold_in(rng, i), temperature, top_p, sample)
        nxt = jnp.where(done, pad_id, nxt)  # transformers' fill after a row has stopped
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        cache = jax.lax.with_sharding_constraint(v["cache"], cache_specs)
        return i + 1, nxt, done | is_stop(nxt), out, cache

    cache = jax.lax.with_sharding_constraint(v["cache"], cache_specs)
    state = (jnp.ones((), jnp.int32), token, done, out, cache)
    return jax.lax.while_loop(cond, body, state)[3]


_COMPILED: dict = {}


def _program(module: LLM, mesh: Mesh, shapes: tuple, lora: bool, gather: bool, **static):
    """(the jitted generation program, its input shardings) for one configuration; built once
    and kept, so that jit's compilation cache is hit on every later batch of the same shapes.

    Parameters come in their rules-table shardings, the batch split over data x fsdp (replicated
    where the batch does not divide), the KV cache by batch and KV heads; the compiled program
    is the whole prefill + decode loop, so nothing is gathered outside it. With `gather` the
    weights are all-gathered over the batch axes once at its start (`gathered_shardings`).
    """
    key = (module, mesh, shapes, lora, gather, tuple(sorted(static.items())))
    if key not in _COMPILED:
        B, P = shapes[0][:2]
        # A batch that does not divide runs replicated; its activations must not be pinned to
        # the batch axes either.
        rules = batch_rules(mesh, B)
        batch = lambda shape: NamedSharding(  # noqa: E731
            mesh,
            sharding.divisible_spec(
                mesh, PartitionSpec(sharding.BATCH_AXES, *[None] * (len(shape) - 1)), shape
            ),
        )
        scalar = NamedSharding(mesh, PartitionSpec())
        cache_specs = cache_shardings(
            module.config, mesh, B, P + static["max_new_tokens"] - 1, rules
        )
        params_in = param_shardings(module, mesh)
        gather_specs = gathered_shardings(params_in) if gather else None
        in_shardings = (
            params_in,
            *(batch(s) for s in shapes),
            batch(shapes[1]) if lora else None,
            scalar,
            scalar,
            scalar,
        )
        fn = jax.jit(
            functools.partial(
                _generate,
                module=module,
                cache_specs=cache_specs,
                gather_specs=gather_specs,
                **static,
            ),
            in_shardings=in_shardings,
            out_shardings=batch((B, static["max_new_tokens"])),
        )
        _COMPILED[key] = (fn, in_shardings, rules)
    return _COMPILED[key]


def gathered_shardings(shardings):
    """`shardings` with the batch axes (data, fsdp) dropped: every device then holds its tensor
    slice of each weight whole, so decoding reads local weights instead of gathering them."""

    def drop(s: NamedSharding) -> NamedSharding:
        entries = []
        for e in s.spec:
            kept = tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a not in
                         sharding.BATCH_AXES)  # fmt: skip
            entries.append(kept[0] if len(kept) == 1 else kept or None)
        return NamedSharding(s.mesh, PartitionSpec(*entries))

    return jax.tree.map(drop, shardings)


def gathered_bytes(params, shardings) -> int:
    """Bytes one device holds of `params` in their `gathered_shardings(shardings)`."""
    gathered = jax.tree.leaves(gathered_shardings(shardings))
    return sum(
        math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
        for x, s in zip(jax.tree.leaves(params), gathered, strict=True)
    )


def _gather_fits(params, shardings) -> bool:
    """Whether the gathered weights take at most half of a device's free memory (devices that
    report none, such as CPUs: yes)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return True
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return gathered_bytes(params, shardings) <= free // 2


def batch_rules(mesh: Mesh, batch: int):
    """The rules table, with activations' batch axis replicated when the batch does not split
    over the mesh's data x fsdp devices."""
    if batch % multihost.batch_divisor(mesh) == 0:
        return sharding.RULES
    return tuple((k, None if k == "act_batch" else v) for k, v in sharding.RULES)


def _place(x, target: NamedSharding):
    """`x` in `target`: global arrays already there pass through, host arrays are split (each
    process copying only its own slices; every process holds the same host array)."""
    if x is None:
        return None
    if isinstance(x, jax.Array):
        return x if x.sharding.is_equivalent_to(target, x.ndim) else jax.device_put(x, target)
    return multihost.global_from_host(np.asarray(x), target)


def mesh_of(params) -> Mesh:
    """The mesh the params live on (their NamedShardings'), else a one-device mesh of the
    default device (params on one device or on the host)."""
    for leaf in jax.tree.leaves(nn.unbox(params)):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def generate(
    module: LLM,
    params,
    *,
    input_ids=None,
    inputs_embeds=None,
    attention_mask=None,
    lora_mask=None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng=None,
    mesh: Mesh | None = None,
    weights: str = "auto",
) -> jax.Array:
    """New tokens `[B, max_new_tokens]` int32 after a left-padded prompt, as a global array split
    by batch over the mesh's data x fsdp devices (`multihost.to_host` brings it to every host).

    - Prompt: `input_ids [B, L]` (text) or `inputs_embeds [B, L, H]` (e.g. a text prompt with CIF
      vectors spliced in) plus `lora_mask [B, L]`, 1 at the speech positions: PLoRA is on there
      during the prefill and off for every generated token.
    - `attention_mask [B, L]`: 1 = token, 0 = left padding (default all ones). A row with no token
      at all is batch filler: it generates only `pad_token_id`.
    - Stops a row at any id of `eos_token_id` (None: the module config's eos; `()` never stops);
      positions after a stop hold `pad_token_id` (None: the config's pad, else the first eos, else
      0), as transformers' generate does. The loop ends when every row has stopped.
    - `temperature == 0` is greedy (argmax); `temperature > 0` samples from the tempered softmax
      restricted to the top-p nucleus, which needs `rng` (a jax.random key).
    - `mesh`: where it runs (None: the params' mesh, else one device). The prefill and the whole
      decode loop are one compiled program with explicit shardings: parameters in their
      rules-table shardings (FSDP, tensor), the batch and the KV cache split by batch and KV heads,
      so no parameter is gathered outside it. Host inputs may be numpy on every process (each
      copies in only its own rows); on several processes every process passes the same batch.
    - `weights`: "gathered" all-gathers the FSDP-sharded weights once, at the program's start, so
      the decode loop reads them locally (an FSDP layout would gather every layer again for every
      token: the whole model's bytes per token); "sharded" keeps them split (for a model too big
      to hold whole per tensor group); "auto" gathers when that takes at most half of a device's
      free memory.
    """
    config = module.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            "generate: pass exactly one of input_ids [B, L] and inputs_embeds [B, L, H]"
        )
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"generate: temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]"
        )
    sample = temperature > 0
    if sample and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng, a jax.random key")
    prompt = _as_input(input_ids if inputs_embeds is None else inputs_embeds)
    B, L = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = np.ones((B, L), np.int32)
    attention_mask = _as_input(attention_mask)
    if not isinstance(attention_mask, jax.Array) or attention_mask.is_fully_addressable:
        m = np.asarray(attention_mask).astype(np.int32)
        if m.shape != (B, L) or np.any(np.diff(m, axis=-1) < 0):
            raise ValueError(
                f"generate: attention_mask {m.shape} must be [B, L] = {(B, L)} and left-padded "
                "(zeros before ones in every row)"
            )
    if lora_mask is not None and not config.lora_rank:
        raise ValueError("generate: lora_mask given but the LLM config has lora_rank 0 (no PLoRA)")
    stop_ids = token_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    pad_id = default_pad_id(config, stop_ids) if pad_token_id is None else int(pad_token_id)
    mesh = mesh_of(params) if mesh is None else mesh
    lora_mask = None if lora_mask is None else _as_input(lora_mask)
    if weights not in ("auto", "gathered", "sharded"):
        raise ValueError(f"generate: weights must be auto, gathered or sharded, got {weights!r}")
    params = nn.unbox(params)
    gather = weights == "gathered" or (
        weights == "auto" and _gather_fits(params, param_shardings(module, mesh))
    )
    shapes = (tuple(prompt.shape), (B, L))
    fn, in_shardings, rules = _program(
        module,
        mesh,
        shapes,
        lora_mask is not None,
        gather,
        max_new_tokens=int(max_new_tokens),
        stop_ids=stop_ids,
        pad_id=pad_id,
        sample=sample,
        embeds=inputs_embeds is not None,
    )
    if rng is None:  # greedy: the key is never used; key(0)'s data, without a device round trip
        rng = np.zeros(2, np.uint32)
    elif jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    args = (
        params,
        prompt,
        attention_mask,
        lora_mask,
        np.float32(max(temperature, 1e-6)),  # only divides when sampling
        np.float32(top_p),
        np.asarray(rng, np.uint32),
    )
    placed = jax.tree.map(_place, args, in_shardings, is_leaf=lambda x: x is None)
    with sharding.activate(mesh, rules):
        return fn(*placed)


def _as_input(x):
    """Host data stays on the host (placed into the mesh by `_place`); arrays stay as they are."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


def greedy(
    module: LLM,
    params,
    input_ids,
    *,
    max_new_tokens: int,
    attention_mask=None,
    eos_token_id: int | Sequence[int] | None = None,
) -> jax.Array:
    """Prompt and greedy continuation, `[B, L + max_new_tokens]` (README's Python API).

    The same ids as transformers' `generate(do_sample=False)` for that model on left-padded
    prompts: `eos_token_id` None means the model config's eos; after a row's eos come pad ids
    (the config's pad, else the first eos), also once every row has stopped early.
    """
    new = generate(
        module,
        params,
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
    )
    return jnp.concatenate([jnp.asarray(input_ids, jnp.int32), new], axis=1)


def bucket_length(n: int) -> int:
    """Padded prompt length: the next power of two (at least `MIN_BUCKET`), so that jit compiles
    one program per bucket rather than one per prompt length."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def stop_token_ids(
    eos_token_id, tokenizer, layout: ChatLayout, instruction: str | None
) -> tuple[int, ...]:
    """Every id that ends the assistant turn: the template's end-of-turn token, the tokenizer's
    eos and the LLM config's `eos_token_id` (Llama 3 instruct models end turns with <|eot_id|>,
    not eos)."""
    ids = {layout.template(instruction).suffix[-1]}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(token_ids(eos_token_id))
    return tuple(sorted(ids))


def decode_response(tokenizer, new_ids, stop_ids: Sequence[int]) -> str:
    """New tokens up to the first stop id, decoded without special tokens and stripped."""
    toks = [int(t) for t in new_ids]
    stops = set(stop_ids)
    cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
    return tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()
