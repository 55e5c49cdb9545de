"""The decoder LLM against transformers' PyTorch models (Llama, Qwen2, Qwen3, Mistral): logits,
left padding, export round trips, bf16, scan/remat, the KV cache, and PLoRA."""

import copy
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util
from tiny import run_on_cpu_devices

from blspkd_jax.models import hf, layers, llm, llm_hf
from blspkd_jax.models.layers import unstack_layers

V, H, FF, NL = 64, 32, 48, 2
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: with head_dim 8 and theta 5e5 the wavelengths (6.3, 167, ...) then fall
    # in the ramp and the "divided by factor" bands, so every branch of the scaling is exercised.
    "original_max_position_embeddings": 8,
}
FAMILIES = {
    "llama_gqa_llama3": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5, rope_scaling=LLAMA3_ROPE
        ),
    ),
    "llama_tied_bias": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),  # head_dim != H / heads
    ),
    "mistral": (transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
}
TOL = 1e-4  # fp32 logits vs transformers


def _randomize(model, seed, scale=0.15):
    """Weights large enough that logits are O(1), so a 1e-4 tolerance means something (and
    argmax is not decided by float rounding in the generation tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(scale * noise)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, torch model): tiny random models saved once for the whole file."""
    out = {}
    for i, (fam, (cls, kw)) in enumerate(FAMILIES.items()):
        cfg = cls(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=FF,
            num_hidden_layers=NL,
            attn_implementation="eager",
            **kw,
        )
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        _randomize(model.eval(), i)
        path = tmp_path_factory.mktemp(fam)
        model.save_pretrained(path)
        out[fam] = (path, model)
    return out


def _torch_logits(model, ids, attention_mask=None, position_ids=None):
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


def _ids(seed, shape):
    return np.random.RandomState(seed).randint(0, V, shape).astype(np.int32)


@functools.cache
def _forward(config):
    """One jitted forward per config (eager Flax compiles every op separately: far slower here)."""
    module = llm.LLM(config)
    return jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, attention_mask=mask))


def _logits(module, params, ids, mask=None):
    mask = np.ones(ids.shape, np.int32) if mask is None else mask
    return np.asarray(_forward(module.config)(params, jnp.asarray(ids), jnp.asarray(mask)))


# ----------------------------------------------------------------------------------------------
# Parity with transformers.


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_logits_and_left_padding_match_transformers(saved, fam):
    path, model = saved[fam]
    module, params = hf.load_llm(path)
    ids = _ids(0, (2, 12))
    ref = _torch_logits(model, ids)
    ours = _logits(module, params, ids)
    assert ours.shape == (2, 12, V)
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ref).max() > 1.0  # the tolerance is small against the logits' scale

    # Left padding: row 1 is its 9 real tokens after 3 pads; each row must equal itself run alone.
    mask = np.ones((2, 12), np.int32)
    mask[1, :3] = 0
    padded = _logits(module, params, ids, mask)
    alone = _torch_logits(model, ids[1:, 3:])
    assert np.abs(padded[0] - ref[0]).max() <= TOL
    assert np.abs(padded[1, 3:] - alone[0]).max() <= TOL


def test_llama3_rope_frequencies_match_transformers(saved):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path, model = saved["llama_gqa_llama3"]
    config = llm.LLMConfig.from_hf(hf.read_config(path))
    assert config.rope_type == "llama3" and config.rope_original_max_position_embeddings == 8
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    np.testing.assert_allclose(llm.rope_inv_freq(config), ref.numpy(), rtol=1e-6)
    # The scaling really changes the frequencies (so the logits test covers it).
    plain = llm.rope_inv_freq(dataclasses.replace(config, rope_type="default"))
    assert np.abs(plain - ref.numpy()).max() > 1e-3


def test_old_and_new_rope_spellings_agree(saved):
    new = hf.read_config(saved["llama_gqa_llama3"][0])
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = new["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"}
    old["rope_scaling"]["type"] = old["rope_scaling"].pop("rope_type")
    assert llm.LLMConfig.from_hf(old) == llm.LLMConfig.from_hf(new)


@pytest.mark.parametrize("fam", ["llama_gqa_llama3", "qwen2", "qwen3"])
def test_export_round_trip(saved, fam, tmp_path):
    path, model = saved[fam]
    module, params = hf.load_llm(path)
    config = module.config
    assert llm.LLMConfig.from_hf(config.to_hf()) == config
    hf.save_llm(tmp_path, config, params)

    # safetensors round trip is exact, tensor for tensor (a tied head writes no lm_head.weight).
    original = hf.read_state_dict(path)
    exported = hf.read_state_dict(tmp_path)
    assert set(exported) == set(original) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    for k, a in exported.items():
        assert a.dtype == original[k].dtype and np.array_equal(a, original[k]), k

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert type(reloaded) is type(model)
    ids = _ids(1, (2, 10))
    np.testing.assert_array_equal(_torch_logits(reloaded.eval(), ids), _torch_logits(model, ids))
    _, params2 = hf.load_llm(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert np.array_equal(a, b)


def test_bf16_close_to_fp32(saved):
    path, model = saved["llama_gqa_llama3"]
    ids = _ids(2, (2, 12))
    ref = _torch_logits(model, ids)
    module, params = hf.load_llm(path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    ours = _logits(module, params, ids)
    err = np.abs(ours - ref).max()
    # Measured 0.026-0.036 over 3 inputs x 3 families (logits of max |x| ~ 3); transformers' own
    # bf16 model is off by 0.023-0.035 on the same inputs.
    assert err < 0.08, err
    torch_bf16 = _torch_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
    assert err < 2 * np.abs(torch_bf16 - ref).max()
    module, params = hf.load_llm(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert module.config.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_random_init_exports_to_transformers(tmp_path):
    """A model built from sizes (no checkpoint) saves as a directory transformers runs alike."""
    config = llm.LLMConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_layers=NL,
        num_heads=4,
        num_kv_heads=2,
        model_type="mistral",
        rope_theta=1e4,
        eos_token_id=[1, 2],
        initializer_range=0.3,  # large weights, so logits are O(1) and the check is tight
    )
    assert config.head_dim == 8 and config.eos_token_id == (1, 2)
    init = jax.jit(lambda k: llm.LLM(config).init(k, jnp.zeros((1, 1), jnp.int32))["params"])
    params = nn.unbox(init(jax.random.key(0)))
    assert abs(float(params["embed_tokens"]["embedding"].std()) - 0.3) < 0.05
    hf.save_llm(tmp_path, config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config.sliding_window is None and model.config.eos_token_id == [1, 2]
    ids = _ids(8, (2, 12))
    ref = _torch_logits(model.eval(), ids)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(_logits(llm.LLM(config), params, ids), ref, atol=TOL)
    with pytest.raises(ValueError, match="cannot express"):
        dataclasses.replace(config, qkv_bias=True).to_hf()
    with pytest.raises(ValueError, match="not a multiple"):
        dataclasses.replace(config, num_kv_heads=3)
    with pytest.raises(ValueError, match="lora_targets"):
        config.with_lora(targets=("q", "lm_head"))


# ----------------------------------------------------------------------------------------------
# Loading errors.


def test_config_and_checkpoint_errors(saved):
    path, _ = saved["mistral"]
    cfg = hf.read_config(path)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        llm.LLMConfig.from_hf({**cfg, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        llm.LLMConfig.from_hf({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        llm.LLMConfig.from_hf({**cfg, "hidden_act": "gelu"})
    with pytest.raises(TypeError, match="unknown override"):
        llm.LLMConfig.from_hf(cfg, not_a_field=1)

    config = llm.LLMConfig.from_hf(cfg)
    sd = dict(hf.read_state_dict(path))
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        llm_hf.params_from_hf(config, missing)
    extra = {**sd, "model.layers.0.self_attn.o_proj.bias": np.zeros(H, np.float32)}
    with pytest.raises(ValueError, match="o_proj.bias"):
        llm_hf.params_from_hf(config, extra)
    wrong = {**sd, "model.norm.weight": np.zeros(H + 1, np.float32)}
    with pytest.raises(ValueError, match="model.norm.weight"):
        llm_hf.params_from_hf(config, wrong)
    # Harmless extras are ignored.
    rope_table = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4)}
    llm_hf.params_from_hf(config, {**sd, **rope_table})


def test_sliding_window_beyond_window_raises(saved):
    path, _ = saved["mistral"]
    config = llm.LLMConfig.from_hf(hf.read_config(path), sliding_window=8)
    params = llm_hf.params_from_hf(config, hf.read_state_dict(path))
    run = lambda n: jax.eval_shape(
        llm.LLM(config).apply, {"params": params}, jnp.zeros((1, n), int)
    )
    run(8)  # at the window full attention is identical: allowed
    with pytest.raises(ValueError, match="sliding_window 8"):
        run(9)
    qwen = hf.read_config(saved["qwen2"][0])
    assert llm.LLMConfig.from_hf(qwen).sliding_window is None  # use_sliding_window false
    on = {**qwen, "use_sliding_window": True, "sliding_window": 16, "layer_types": None}
    assert llm.LLMConfig.from_hf({**on, "max_window_layers": 1}).sliding_window == 16
    assert llm.LLMConfig.from_hf({**on, "max_window_layers": NL}).sliding_window is None


# ----------------------------------------------------------------------------------------------
# Methods used by the distillation loss and the composed model.


@pytest.mark.parametrize("fam", ["llama_gqa_llama3", "qwen2"])  # untied and tied heads
def test_embed_hidden_and_lm_head(saved, fam):
    path, _ = saved[fam]
    module, params = hf.load_llm(path)

    @jax.jit
    def outputs(params, ids):
        v = {"params": params}
        emb = module.apply(v, ids, method=llm.LLM.embed)
        return (
            module.apply(v, ids),
            module.apply(v, ids, return_hidden=True),
            emb,
            module.apply(v, inputs_embeds=emb),
        )

    ids = jnp.asarray(_ids(3, (2, 12)))
    logits, hidden, emb, from_embeds = outputs(params, ids)
    head = llm.lm_head_kernel(module.config, params)
    assert hidden.shape == (2, 12, H) and head.shape == (H, V)
    np.testing.assert_allclose(hidden @ head, logits, atol=1e-5)
    np.testing.assert_array_equal(emb, params["embed_tokens"]["embedding"][ids])
    np.testing.assert_array_equal(from_embeds, logits)


# ----------------------------------------------------------------------------------------------
# scan / remat.


def test_scan_and_remat_change_nothing(saved):
    path, _ = saved["qwen3"]
    base = llm.LLMConfig.from_hf(hf.read_config(path))
    ids = jnp.asarray(_ids(4, (2, 12)))
    w = jnp.asarray(np.random.RandomState(0).randn(2, 12, V).astype(np.float32))

    def run(scan, remat):
        config = dataclasses.replace(base, scan_layers=scan, remat=remat)
        params = llm_hf.params_from_hf(config, hf.read_state_dict(path))
        module = llm.LLM(config)
        loss = lambda p: jnp.sum(module.apply({"params": p}, ids) * w)
        loss, grad = jax.jit(jax.value_and_grad(loss))(params)
        if scan:
            assert grad["blocks"]["layers"]["attn"]["q_proj"]["kernel"].shape[0] == NL
            grad = {**grad, "blocks": unstack_layers(grad["blocks"], NL)}
        return loss, grad

    ref_loss, ref_grad = run(False, "none")
    # Scanned with full remat, looped with remat (the prevent_cse path).
    for scan, remat in [(True, "full"), (False, "dots")]:
        loss, grad = run(scan, remat)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
            # Equal up to float32 summation order (measured max 4e-6 on grads of size ~5).
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# KV cache.


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_prefill_then_decode_equals_full_forward(saved, scan):
    path, model = saved["llama_gqa_llama3"]
    config = llm.LLMConfig.from_hf(hf.read_config(path), scan_layers=scan)
    params = llm_hf.params_from_hf(config, hf.read_state_dict(path))
    module = llm.LLM(config)
    P, N = 6, 5  # prompt length, decode steps
    ids = _ids(5, (2, P + N))
    mask = np.ones((2, P + N), np.int32)
    mask[1, :2] = 0  # row 1: a left-padded prompt
    # The reference: transformers' full forward with generate()'s positions for left padding.
    full = _torch_logits(model, ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0))

    cache = llm.init_cache(config, batch_size=2, max_length=P + N + 2)  # room to spare
    step = jax.jit(
        lambda cache, ids, mask: module.apply(
            {"params": params, "cache": cache},
            ids,
            attention_mask=mask,
            decode=True,
            mutable=["cache"],
        )
    )
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    logits, v = step(cache, ids[:, :P], mask[:, :P])
    np.testing.assert_allclose(logits[0], full[0, :P], atol=TOL)
    np.testing.assert_allclose(logits[1, 2:], full[1, 2:P], atol=TOL)
    for t in range(P, P + N):
        logits, v = step(v["cache"], ids[:, t : t + 1], mask[:, t : t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=TOL)
    assert int(v["cache"]["cache_index"]) == P + N
    assert np.array_equal(v["cache"]["cache_mask"][:, : P + N], mask)


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_prefix_keys_and_values_continue_a_forward(saved, scan, remat):
    """keep_kv=P returns each layer's first P keys and values; a second call on the tokens after
    them, given those (`prefix_kv`) and the prefix's mask, equals the tail of one full call,
    PLoRA on in the tail included (BLSP-KD's student starts from the teacher's prompt this way),
    and its gradient wrt the tail's inputs and LoRA weights is the full call's."""
    path, _ = saved["llama_gqa_llama3"]
    config = llm.LLMConfig.from_hf(hf.read_config(path), scan_layers=scan, remat=remat)
    config = config.with_lora(rank=4, alpha=8.0)
    base = llm_hf.params_from_hf(config, hf.read_state_dict(path))
    lora = jax.tree.map(lambda x: x + 0.1, llm.init_lora_params(config, jax.random.key(0)))
    params = llm.merge_params(base, lora)
    module = llm.LLM(config)
    P, L = 5, 12
    ids = jnp.asarray(_ids(8, (2, L)))
    mask = jnp.ones((2, L), bool).at[1, 9:].set(False)  # row 1: right padding
    lora_mask = jnp.zeros((2, L)).at[:, P + 1 : P + 4].set(1.0)
    embeds = jax.jit(lambda p, i: module.apply({"params": p}, i, method=llm.LLM.embed))(params, ids)

    def full(lora, x):
        return module.apply(
            {"params": llm.merge_params(base, lora)},
            inputs_embeds=x,
            attention_mask=mask,
            lora_mask=lora_mask,
            return_hidden=True,
        )[:, P:]

    hidden, kv = jax.jit(
        lambda: module.apply(
            {"params": params}, ids, attention_mask=mask, return_hidden=True, keep_kv=P
        )
    )()
    heads, dh = config.num_kv_heads, config.head_dim
    assert kv["k"].shape == kv["v"].shape == (config.num_layers, 2, P, heads, dh)

    def tail(lora, x):
        return module.apply(
            {"params": llm.merge_params(base, lora)},
            inputs_embeds=x,
            attention_mask=mask[:, P:],
            lora_mask=lora_mask[:, P:],
            return_hidden=True,
            prefix_kv=kv,
            prefix_mask=mask[:, :P],
        )

    want, got = jax.jit(full)(lora, embeds), jax.jit(tail)(lora, embeds[:, P:])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The first call is the plain forward (LoRA off without a mask).
    zero = jax.tree.map(jnp.zeros_like, lora)
    np.testing.assert_allclose(hidden[:, P:], jax.jit(full)(zero, embeds), rtol=1e-5, atol=1e-5)

    def grad(f, x):
        return jax.jit(jax.grad(lambda lo, x: jnp.sum(f(lo, x) ** 2), argnums=(0, 1)))(lora, x)

    g_full, g_tail = grad(full, embeds), grad(tail, embeds[:, P:])
    # Float32 rounding differs between XLA programs: the same full call with and without remat
    # differs by up to 2.2e-5 of a gradient's largest entry (scanned, AVX-512 CPU), so 1e-4 of it.
    pairs = [*zip(jax.tree.leaves(g_tail[0]), jax.tree.leaves(g_full[0]), strict=True)]
    for a, b in [*pairs, (g_tail[1], g_full[1][:, P:])]:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


# ----------------------------------------------------------------------------------------------
# PLoRA.


@pytest.fixture(scope="module")
def lora_model(saved):
    """(jitted base forward, jitted LoRA forward, params with nonzero LoRA A and B, the module)."""
    path, _ = saved["qwen2"]  # biased projections: LoRA adds to x W + b
    module, base = hf.load_llm(path)
    config = module.config.with_lora(rank=4, alpha=8.0, dropout=0.1)
    lora = llm.init_lora_params(config, jax.random.key(0))
    # B is zero at init; make it nonzero so that the LoRA branch does something.
    keys = iter(jax.random.split(jax.random.key(1), 100))
    lora = traverse_util.unflatten_dict(
        {
            k: (0.3 * jax.random.normal(next(keys), v.shape) if k[-1] == "lora_b" else v)
            for k, v in traverse_util.flatten_dict(lora).items()
        }
    )
    lmod = llm.LLM(config)

    forward = jax.jit(lambda params, ids, m: lmod.apply({"params": params}, ids, lora_mask=m))

    # The base reference is called the same way (no attention_mask): XLA may fold a constant mask
    # differently from a mask argument, which moves float32 rounding between two programs.
    base_forward = jax.jit(lambda params, ids: module.apply({"params": params}, ids))
    return functools.partial(base_forward, base), forward, llm.merge_params(base, lora), lmod


def test_lora_init_params(saved):
    path, _ = saved["mistral"]
    config = llm.LLMConfig.from_hf(hf.read_config(path)).with_lora(targets=("q", "v", "down"))
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (16, 16.0, 0.05)
    lora = llm.init_lora_params(config, jax.random.key(3))
    flat = traverse_util.flatten_dict(lora, sep="/")
    assert sorted({k.split("/")[3] for k in flat}) == ["down_proj", "q_proj", "v_proj"]
    assert len(flat) == NL * 3 * 2 and all(llm.is_lora_path(k) for k in flat)
    a = flat["blocks/layers_0/attn/q_proj/lora_a"]
    b = flat["blocks/layers_0/attn/q_proj/lora_b"]
    assert a.shape == (H, 16) and b.shape == (16, 4 * 8)
    # PEFT's kaiming_uniform(a=sqrt(5)) for A: U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in).
    assert np.all(b == 0) and np.abs(a).max() <= 1 / np.sqrt(H)
    assert abs(float(np.std(a)) * np.sqrt(3 * H) - 1) < 0.1
    down_a = flat["blocks/layers_1/mlp/down_proj/lora_a"]  # fan_in = intermediate_size
    assert down_a.shape == (FF, 16) and np.abs(down_a).max() <= 1 / np.sqrt(FF)
    assert not np.array_equal(a, flat["blocks/layers_1/attn/q_proj/lora_a"])
    scanned = llm.init_lora_params(dataclasses.replace(config, scan_layers=True), jax.random.key(3))
    assert scanned["blocks"]["layers"]["mlp"]["down_proj"]["lora_a"].shape == (NL, FF, 16)
    assert np.abs(scanned["blocks"]["layers"]["mlp"]["down_proj"]["lora_a"]).max() <= 1 / np.sqrt(
        FF
    )
    # Merged into loaded base weights and split apart again.
    base = llm_hf.params_from_hf(config, hf.read_state_dict(path))
    merged = llm.merge_params(base, lora)
    base2, lora2 = llm.split_lora(merged)
    assert jax.tree.structure(base2) == jax.tree.structure(base)
    assert jax.tree.structure(lora2) == jax.tree.structure(lora)
    with pytest.raises(ValueError, match="more than one tree"):
        llm.merge_params(base, base)
    with pytest.raises(ValueError, match="lora_rank is 0"):
        llm.init_lora_params(dataclasses.replace(config, lora_rank=0), jax.random.key(0))


def test_lora_zero_mask_is_base_bit_for_bit(lora_model):
    base_forward, forward, params, _ = lora_model
    ids = jnp.asarray(_ids(6, (2, 12)))
    ref = base_forward(ids)
    zeros = jnp.zeros((2, 12), jnp.float32)
    np.testing.assert_array_equal(forward(params, ids, None), ref)
    np.testing.assert_array_equal(forward(params, ids, zeros), ref)


def test_lora_span_changes_only_span_and_after(lora_model):
    base_forward, forward, params, _ = lora_model
    ids = _ids(7, (2, 12))
    ref = np.asarray(base_forward(jnp.asarray(ids)))
    m = np.zeros((2, 12), np.float32)
    m[:, 3:6] = 1.0  # "speech" positions 3..5
    out = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(m)))
    np.testing.assert_array_equal(out[:, :3], ref[:, :3])  # causal: before the span untouched
    assert np.abs(out[:, 3:] - ref[:, 3:]).max(axis=-1).min() > 1e-2  # span (and after) moves


def _linear_with_b(lin, x):
    p = nn.unbox(lin.init(jax.random.key(1), x)["params"])
    return {**p, "lora_b": jax.random.normal(jax.random.key(2), p["lora_b"].shape)}


def test_lora_capacity_changes_only_the_cost(lora_model):
    """PLoRA's branch on N gathered rows per sequence (`lora_capacity`) equals it on all L, dropout
    on: hidden states and gradients (LoRA weights and inputs)."""
    *_, params, lmod = lora_model
    base, lora = llm.split_lora(params)
    embeds = jax.random.normal(jax.random.key(3), (3, 12, H))
    m = np.zeros((3, 12), np.float32)
    m[0, 3:7], m[1, 8:12], m[2, 5] = 1.0, 1.0, 1.0  # at most 4 speech positions
    ct = jax.random.normal(jax.random.key(4), (3, 12, H))

    def loss(capacity, lora, x):
        hidden = lmod.apply(
            {"params": llm.merge_params(base, lora)},
            inputs_embeds=x,
            lora_mask=jnp.asarray(m),
            lora_capacity=capacity,
            return_hidden=True,
            deterministic=False,
            rngs={"dropout": jax.random.key(6)},
        )
        return jnp.sum(hidden * ct), hidden

    def run(capacity, lora):
        return jax.jit(jax.value_and_grad(functools.partial(loss, capacity), (0, 1), True))(
            lora, embeds
        )

    (_, got), g_got = run(4, lora)
    (_, want), g_want = run(None, lora)
    (_, off), _ = run(4, jax.tree.map(jnp.zeros_like, lora))
    assert float(jnp.abs(got - off).max()) > 1e-2  # the branch (and its dropout) did something
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_lora_projection_formula():
    lin = llm.Linear(6, ("embed", "heads"), use_bias=True, lora_rank=3, lora_alpha=6.0)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    p = {**_linear_with_b(lin, x), "bias": jnp.ones(6)}
    m = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32)
    y = np.asarray(jax.jit(lin.apply)({"params": p}, x, llm.lora_rows(jnp.asarray(m))))
    xn = np.asarray(x, np.float64)
    base = xn @ np.asarray(p["kernel"]) + 1.0
    delta = xn @ np.asarray(p["lora_a"]) @ np.asarray(p["lora_b"]) * (6.0 / 3)
    np.testing.assert_allclose(y, base + m[..., None] * delta, atol=1e-5)
    # Off where the mask is 0, bit for bit: the same as no mask at all.
    no_lora = np.asarray(jax.jit(lin.apply)({"params": p}, x))
    np.testing.assert_array_equal(y[m == 0], no_lora[m == 0])


def test_row_dot_gradients_need_no_full_width_copy():
    """A kernel's gradient through `row_dot` equals the plain product's, and XLA:CPU forms it
    without laying the [B, L, out] output gradient out again (the copy the plain 3-axis product
    gets: BENCHMARKS.md run G)."""
    B, L, H, F = 4, 32, 24, 40
    x = jax.random.normal(jax.random.key(0), (B, L, H))
    w = jax.random.normal(jax.random.key(1), (H, F))
    ct = jax.random.normal(jax.random.key(2), (B, L, F))

    def loss(dot, w, x):
        return jnp.sum(jnp.tanh(dot(x, w)) * ct)

    plain, rows = (
        jax.jit(jax.grad(functools.partial(loss, d), argnums=(0, 1)))
        for d in (jnp.dot, layers.row_dot)
    )
    for a, b in zip(plain(w, x), rows(w, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense contraction only"):
        layers.row_dot_general(x, w, (((1,), (0,)), ((), ())))
    hlo = rows.lower(w, x).compile().as_text()
    full = re.compile(rf"= f32\[(?:{B},{L},{F}|{F},{B},{L}|{F},{B * L})\]\S* (?:copy|transpose)\(")
    assert not [line for line in hlo.splitlines() if full.search(line)]


def test_dropout_keeps_one_minus_rate_and_the_mean():
    # 16 hashed bits per element: the kept fraction is 1 - rate, kept values are scaled by
    # 1 / (1 - rate), so the mean is preserved; each key draws its own mask, odd widths too.
    x = jnp.ones((64, 33, 257), jnp.float32)
    for rate in (0.05, 0.5):
        y = np.asarray(jax.jit(llm.dropout, static_argnums=1)(x, rate, jax.random.key(3)))
        kept = y != 0
        n = kept.size
        assert abs(kept.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
        np.testing.assert_allclose(y[kept], 1 / (1 - round(rate * 65536) / 65536), rtol=1e-6)
        assert abs(y.mean() - 1) < 4 * np.sqrt(rate / (1 - rate) / n)
        # Neighbouring elements (consecutive counters) are independent.
        both = (kept[..., 0:-1:2] & kept[..., 1::2]).mean()
        assert abs(both - (1 - rate) ** 2) < 4 * np.sqrt((1 - rate) ** 2 / (n // 2))
    for key in (jax.random.key(4), jax.random.fold_in(jax.random.key(3), 1)):
        other = np.asarray(llm.dropout(x, 0.5, key))
        assert abs(((other != 0) != (y != 0)).mean() - 0.5) < 0.01  # independent masks
    np.testing.assert_array_equal(llm.dropout(x, 0.0, jax.random.key(3)), x)


SHARDED_DROPOUT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from blspkd_jax.models import llm
x, key = jnp.ones((8, 12, 40)), jax.random.key(7)
drop = lambda x, k: llm.dropout(x, 0.3, k)
one = np.asarray(jax.jit(drop)(x, key))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("a", "b", "c"))
for spec in (P("a"), P(("a", "b"), "c"), P(None, None, ("a", "b", "c")), P("c", "a", "b")):
    s = NamedSharding(mesh, spec)
    got = jax.jit(drop, out_shardings=s)(jax.device_put(x, s), key)
    assert (np.asarray(got) == one).all(), spec
"""


@pytest.mark.slow
def test_dropout_mask_is_the_same_under_any_sharding():
    # The sharded train step must equal one device's with dropout on, too.
    run_on_cpu_devices(SHARDED_DROPOUT)


def test_lora_dropout_only_when_not_deterministic():
    lin = llm.Linear(6, ("embed", "heads"), lora_rank=3, lora_dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    p = _linear_with_b(lin, x)
    m = jnp.asarray([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], jnp.float32)
    rows = llm.lora_rows(m)
    # Weights and inputs are arguments, not closure constants: XLA would otherwise fold x W at
    # compile time, differently from the reference program below.
    run = jax.jit(
        lambda det, seed, p, x: lin.apply(
            {"params": p}, x, rows, det, rngs={"dropout": jax.random.key(seed)}
        ),
        static_argnums=0,
    )
    np.testing.assert_array_equal(run(True, 5, p, x), run(True, 6, p, x))  # the rng is unused
    det, drop5, drop6 = (
        np.asarray(run(d, k, p, x)) for d, k in ((True, 5), (False, 5), (False, 6))
    )
    on = np.asarray(m) != 0
    assert np.abs(drop5 - det)[on].max() > 1e-3 and np.abs(drop5 - drop6)[on].max() > 1e-3
    # Where the mask is 0, training mode is still exactly x W: dropout never leaks through.
    no_lora = np.asarray(jax.jit(lin.apply)({"params": p}, x))
    np.testing.assert_array_equal(drop5[~on], no_lora[~on])
    with pytest.raises(Exception, match="dropout"):  # training mode needs the "dropout" rng
        lin.apply({"params": p}, x, rows, False)


def test_dropout_of_gathered_rows_is_the_whole_arrays_mask():
    x = jax.random.normal(jax.random.key(0), (3, 10, 7))
    key = jax.random.key(5)
    whole = np.asarray(llm.dropout(x, 0.4, key)).reshape(30, 7)
    rows = jnp.asarray([[2, 17, 29], [0, 5, 11]], jnp.int32)  # row numbers of x [30 rows]
    picked = jnp.asarray(x).reshape(30, 7)[rows]
    np.testing.assert_array_equal(llm.dropout(picked, 0.4, key, rows), whole[np.asarray(rows)])


def test_lora_rows_hold_the_mask_in_order():
    m = jnp.asarray([[0, 1, 1, 0, 0.5], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]], jnp.float32)
    rows = llm.lora_rows(m, 3)
    np.testing.assert_array_equal(rows.index, [[1, 2, 4], [5, 5, 5], [0, 1, 2]])
    np.testing.assert_array_equal(rows.scale, [[1, 1, 0.5], [0, 0, 0], [1, 1, 1]])
    # Past the capacity a position gets no PLoRA (the caller's bound); the default is L.
    assert llm.lora_rows(m).index.shape == (3, 5)
    np.testing.assert_array_equal(llm.lora_rows(m).index[2], [0, 1, 2, 4, 5])


def test_lora_branch_on_gathered_rows_is_the_full_row_formula(monkeypatch):
    """PLoRA's branch on N gathered rows (dropout on) equals the formula over all L rows,
    `x W + b + m * (dropout(x) A B) * alpha / r` with the mask `dropout(x)` draws for the whole
    [B, L, in] input, in values and in gradients (A, B and x)."""
    keys = []

    def recording(x, rate, rng, rows=None):
        keys.append(rng)
        return own(x, rate, rng, rows)

    own = llm.dropout
    monkeypatch.setattr(llm, "dropout", recording)
    lin = llm.Linear(6, ("embed", "heads"), use_bias=True, lora_rank=3, lora_dropout=0.3)
    x = jax.random.normal(jax.random.key(0), (3, 9, 5))
    p = {**_linear_with_b(lin, x), "bias": jnp.linspace(-1, 1, 6)}
    m = np.zeros((3, 9), np.float32)
    m[0, 2:5], m[1, 6:9], m[2, 0] = 1.0, 0.5, 1.0
    rows = llm.lora_rows(jnp.asarray(m), 3)  # at most 3 non-zero positions per sequence
    ct = jax.random.normal(jax.random.key(4), (3, 9, 6))

    def ours(p, x):
        y = lin.apply({"params": p}, x, rows, False, rngs={"dropout": jax.random.key(9)})
        return y, jnp.sum(y * ct)

    def formula(p, x, rng):
        h = own(x, 0.3, rng)  # the whole input's mask
        delta = h @ p["lora_a"] @ p["lora_b"] * (16.0 / 3)
        y = x @ p["kernel"] + p["bias"] + jnp.asarray(m)[..., None] * delta
        return y, jnp.sum(y * ct)

    y, _ = ours(p, x)
    grads = jax.grad(lambda p, x: ours(p, x)[1], argnums=(0, 1))(p, x)
    rng = keys[0]
    y_ref, _ = formula(p, x, rng)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    off = m == 0  # off the mask: x W + b exactly, as without PLoRA
    np.testing.assert_array_equal(np.asarray(y)[off], np.asarray(lin.apply({"params": p}, x))[off])
    g_ref = jax.grad(lambda p, x: formula(p, x, rng)[1], argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads[0]["lora_a"]).max()) > 1e-2  # the branch has a gradient


# ----------------------------------------------------------------------------------------------
# Attention: `_attend` (its VJP written out) in query blocks; cuDNN's through jax.nn on a GPU.


def _attention_reference(q, k, v, mask, scale):
    """softmax(q k^T * scale) v in float64, written out; a row with no allowed key gets the mean
    of v (the finite fill's uniform softmax)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, Dh = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)  # query heads n*G .. n*G+G-1 share key/value head n // G
            s = q[b, :, n] @ k[b, :, kv].T * scale  # [T, S]
            m = np.broadcast_to(mask[b, 0], s.shape)
            s = np.where(m, s, -np.inf)
            s = np.where(m.any(-1, keepdims=True), s, 0.0)  # all masked: uniform
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, kv]
    return out


@pytest.mark.parametrize("per_query", [True, False])
def test_attention_blocks_match_the_formula(per_query):
    rng = np.random.RandomState(0)
    B, T, N, K, Dh = 2, 11, 4, 2, 8
    q, k, v = (rng.randn(B, T, h, Dh).astype(np.float32) for h in (N, K, K))
    if per_query:  # causal with left padding: row 1's first 3 queries see no key at all
        valid = np.arange(T)[None, :] >= np.array([0, 3])[:, None]
        mask = valid[:, None, None, :] & (np.arange(T)[None, :] <= np.arange(T)[:, None])
        mask = mask & valid[:, None, :, None]
    else:  # keys only, shared by every query; example 1 has none
        mask = np.zeros((B, 1, 1, T), bool)
        mask[0, ..., :7] = True
    ref = _attention_reference(q, k, v, mask, 0.3)

    def loss(q, k, v, block):
        o = layers.attention(q, k, v, jnp.asarray(mask), scale=0.3, query_block=block)
        return jnp.sum(o * jnp.asarray(ref, jnp.float32)), o

    grads = {}
    for block in (4, 64):  # blocks of 4, the last one padded; no blocking
        (_, out), grads[block] = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3
        )(q, k, v, block)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, atol=2e-6)
    for a, b in zip(grads[4], grads[64], strict=True):  # nor do blocks and remat change grads
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert np.abs(np.asarray(grads[64][0])).max() > 0.1  # the gradients are not trivially zero


def _attention_autograd(q, k, v, mask, scale, cotangent):
    """Output and (dq, dk, dv) of `sum(attention * cotangent)` by torch autograd in float64: an
    independent check of `_attend`'s written-out VJP. A masked score is replaced (masked_fill), so
    it has no gradient, even in a row with no allowed key."""
    tq, tk, tv = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kr, vr = (a.repeat_interleave(G, dim=2) for a in (tk, tv))
    s = torch.einsum("btnd,bsnd->bnts", tq, kr) * scale
    s = s.masked_fill(~torch.tensor(np.broadcast_to(mask, s.shape)), -1e300)
    o = torch.einsum("bnts,bsnd->btnd", s.softmax(-1), vr)
    (o * torch.tensor(np.asarray(cotangent, np.float64))).sum().backward()
    return o.detach().numpy(), [a.grad.numpy() for a in (tq, tk, tv)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_attention_gradients_match_float64_autograd(dtype, scale):
    # GQA (3 query heads per key head), per-query causal mask with left padding (example 1's
    # first 3 queries see no key), blocks of 4 over 11 queries (ragged last block).
    rng = np.random.RandomState(1)
    B, T, N, K, Dh = 2, 11, 6, 2, 8
    q, k, v, ct = (rng.randn(B, T, h, Dh).astype(np.float32) for h in (N, K, K, N))
    valid = np.arange(T)[None, :] >= np.array([0, 3])[:, None]
    mask = valid[:, None, None, :] & (np.arange(T)[None, :] <= np.arange(T)[:, None])
    dt = jnp.dtype(dtype)
    q, k, v, ct = (np.asarray(jnp.asarray(a, dt).astype(jnp.float32)) for a in (q, k, v, ct))
    ref_out, ref_grads = _attention_autograd(
        q, k, v, mask, Dh**-0.5 if scale is None else scale, ct
    )

    def loss(q, k, v):
        o = layers.attention(q, k, v, jnp.asarray(mask), scale=scale, query_block=4)
        return jnp.sum(o.astype(jnp.float32) * ct), o

    args = (jnp.asarray(a, dt) for a in (q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    assert out.dtype == dt and all(g.dtype == dt for g in grads)
    tol = 2e-6 if dtype == "float32" else 3e-2  # bf16: the products' inputs and outputs rounded
    for ours, ref in zip([out, *grads], [ref_out, *ref_grads], strict=True):
        ours = np.asarray(jnp.asarray(ours, jnp.float32))
        assert np.abs(ours - ref).max() <= tol * max(1.0, np.abs(ref).max())
    assert np.abs(ref_grads[0][1, :3]).max() == 0  # no gradient to queries that see no key
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32)[1, :3], 0)


def test_attention_implementation_choice():
    pick = layers.attention_implementation
    q, k = (2, 1024, 32, 128), (2, 1024, 8, 128)
    assert pick(q, k, jnp.bfloat16, True, "cuda", "9.0") == "cudnn"
    assert pick(q, k, jnp.float16, False, "cuda", "8.0") == "cudnn"
    assert pick(q, k, jnp.float32, True, "cuda", "9.0") == "xla"  # cuDNN takes fp16/bf16 only
    for platform in ("cpu", "tpu", "rocm"):
        assert pick(q, k, jnp.bfloat16, True, platform, None) == "xla"
    wide = (2, 1024, 32, 256)
    assert pick(wide, wide, jnp.bfloat16, True, "cuda", "9.0") == "cudnn"
    assert pick(wide, wide, jnp.bfloat16, True, "cuda", "8.0") == "xla"  # 256 needs Hopper
    assert pick((2, 1024, 20, 60), (2, 1024, 20, 60), jnp.bfloat16, True, "cuda", "9.0") == "xla"
    odd = (2, 1501, 20, 64)
    assert pick(odd, odd, jnp.bfloat16, True, "cuda", "9.0") == "xla"  # masked: even lengths
    assert pick(odd, odd, jnp.bfloat16, False, "cuda", "9.0") == "cudnn"
    assert pick((2, 1, 32, 128), k, jnp.bfloat16, True, "cuda", "9.0") == "xla"  # one decode step
    assert layers.attention_implementation(q, k, jnp.bfloat16, True, *layers._platform()) == (
        "cudnn" if jax.default_backend() == "gpu" else "xla"
    )


def test_blocked_attention_matches_transformers(saved, monkeypatch):
    # Blocks of 5 queries over 12 tokens (ragged last block) with left padding and GQA.
    path, model = saved["llama_gqa_llama3"]
    module, params = hf.load_llm(path)
    monkeypatch.setattr(layers, "ATTENTION_QUERY_BLOCK", 5)
    monkeypatch.setattr(layers, "ATTENTION_BLOCKED_ABOVE", 0)
    ids = _ids(0, (2, 12))
    mask = np.ones((2, 12), np.int32)
    mask[1, :3] = 0
    fwd = jax.jit(lambda p, ids, m: module.apply({"params": p}, ids, attention_mask=m))
    ours = np.asarray(fwd(params, ids, mask))
    assert np.isfinite(ours).all()  # row 1's padded queries see no key
    assert np.abs(ours[0] - _torch_logits(model, ids[:1])[0]).max() <= TOL
    assert np.abs(ours[1, 3:] - _torch_logits(model, ids[1:, 3:])[0]).max() <= TOL
