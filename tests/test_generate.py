"""KV-cache generation against transformers' `generate(do_sample=False)` (Llama, Qwen2; batched,
left-padded, early eos), speech prompts with PLoRA against a cache-free loop, and sampling."""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from test_llm import _randomize

from blspkd_jax.inference.generate import generate, greedy, select_token
from blspkd_jax.models import hf, llm

V, H, FF, NL = 96, 32, 64, 2
P, N = 9, 12  # prompt length (with left padding), new tokens
FAMILIES = {
    # Llama: explicit pad id (filled after eos); Qwen2: two eos ids, no pad (fill = first eos).
    "llama": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
}


def _prompts(seed, lengths):
    """Left-padded random prompts [B, P] and their mask; pads hold id 0 (masked)."""
    rs = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), P), np.int64)
    mask = np.zeros((len(lengths), P), np.int64)
    for b, n in enumerate(lengths):
        ids[b, P - n :] = rs.randint(3, V, n)
        mask[b, P - n :] = 1
    return ids, mask


def _torch_generate(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=N,
            do_sample=False,
            **kw,
        )
    return out.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, torch model, eos ids, fill id). The eos ids are tokens that greedy
    decoding of the test prompts emits mid-way, so rows stop early and at different steps."""
    out = {}
    for i, (fam, (cls, kw)) in enumerate(FAMILIES.items()):
        cfg = cls(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=NL, **kw)
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        _randomize(model, i, scale=0.2)  # clear argmax margins
        ids, mask = _prompts(0, [P, 5, 7, 2])
        free = _torch_generate(model, ids, mask, eos_token_id=None, pad_token_id=0)[:, P:]
        if fam == "llama":  # one eos: the token that the most rows emit mid-way
            rows_with = [np.any(free[:, 1 : N - 2] == t, axis=1).sum() for t in range(V)]
            eos, fill = [int(np.argmax(rows_with))], 1
        else:  # an eos per row, at growing steps: every row stops, transformers' output is short
            eos = sorted({int(free[b, 2 + b]) for b in range(len(free))})
            fill = eos[0]
        for c in (model.config, model.generation_config):
            c.eos_token_id = eos if len(eos) > 1 else eos[0]
            c.pad_token_id = 1 if fam == "llama" else None
        path = tmp_path_factory.mktemp(fam)
        model.save_pretrained(path)
        out[fam] = (path, model, eos, fill)
    return out


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_greedy_equals_transformers_generate(saved, fam):
    path, model, eos, fill = saved[fam]
    module, params = hf.load_llm(path)
    ids, mask = _prompts(0, [P, 5, 7, 2])
    ref = _torch_generate(model, ids, mask)  # the model's own eos/pad, like ours by default
    ours = np.asarray(greedy(module, params, ids, max_new_tokens=N, attention_mask=mask))
    assert ours.shape == (4, P + N)
    # transformers stops as soon as every row has: the rest of ours must be the fill.
    assert np.array_equal(ours[:, : ref.shape[1]], ref)
    assert np.all(ours[:, ref.shape[1] :] == fill)
    new = ours[:, P:]
    stopped = np.isin(new, eos)
    assert stopped.any(axis=1).sum() >= 2  # several rows stop early, at different steps
    for row, s in zip(new, stopped, strict=True):
        if s.any():
            first = int(np.argmax(s))
            assert first < N - 1 and np.all(row[first + 1 :] == fill)


def test_generate_rejects_bad_arguments(saved):
    module, params = hf.load_llm(saved["llama"][0])
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="left-padded"):
        generate(module, params, input_ids=ids, attention_mask=[[1, 1, 0, 1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs rng"):
        generate(module, params, input_ids=ids, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="lora_rank 0"):
        generate(module, params, input_ids=ids, lora_mask=np.ones((1, 4)), max_new_tokens=2)
    with pytest.raises(ValueError, match="exactly one"):
        generate(module, params, max_new_tokens=2)


# ----------------------------------------------------------------------------------------------
# Speech prompts: embeddings plus a PLoRA mask.


@pytest.fixture(scope="module")
def lora_llm(saved):
    """(module, params) of the Qwen2 model with PLoRA whose A and B are both nonzero."""
    base_module, base = hf.load_llm(saved["qwen2"][0])
    config = base_module.config.with_lora(rank=4, alpha=8.0, dropout=0.0)
    # Shapes from eval_shape (no compile), values drawn here: A and B both nonzero.
    shapes = jax.eval_shape(
        lambda: llm.LLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    )["params"]
    rs = np.random.RandomState(0)
    lora = traverse_util.unflatten_dict(
        {
            k: jnp.asarray(0.3 * rs.randn(*v.shape), jnp.float32)
            for k, v in traverse_util.flatten_dict(llm.split_lora(shapes)[1]).items()
        }
    )
    return llm.LLM(config), llm.merge_params(base, lora)


def _loop_reference(module, params, embeds, mask, lora_mask, eos, fill):
    """Greedy by re-running the full forward (no cache) on prompt + generated tokens each step,
    PLoRA on at the prompt's speech positions only. The sequence grows inside a fixed buffer whose
    unused tail is masked out (causal attention never looks there), so it compiles once."""
    fwd = jax.jit(
        lambda e, m, lm: module.apply(
            {"params": params}, inputs_embeds=e, attention_mask=m, lora_mask=lm
        )
    )
    table = params["embed_tokens"]["embedding"]
    B = embeds.shape[0]
    embeds = jnp.concatenate([embeds, jnp.zeros((B, N, H), embeds.dtype)], axis=1)
    mask = np.concatenate([mask, np.zeros((B, N), mask.dtype)], axis=1)
    lora_mask = np.concatenate([lora_mask, np.zeros((B, N), lora_mask.dtype)], axis=1)
    out = np.full((B, N), fill, np.int32)
    done = np.zeros(B, bool)
    for i in range(N):
        logits = np.asarray(fwd(embeds, mask, lora_mask))[:, P + i - 1]
        tok = np.where(done, fill, logits.argmax(-1))
        out[:, i] = tok
        done |= np.isin(tok, eos)
        embeds = embeds.at[:, P + i].set(table[tok])
        mask[:, P + i] = 1
    return out


def test_speech_prompt_plora_in_prefill_only(saved, lora_llm):
    module, params = lora_llm
    _, model, eos, fill = saved["qwen2"]
    ids, mask = _prompts(0, [P, 5, 7, 2])
    text = _torch_generate(model, ids, mask)[:, P:]  # the base LLM on the text prompt
    text = np.pad(text, ((0, 0), (0, N - text.shape[1])), constant_values=fill)
    embeds = module.apply({"params": params}, jnp.asarray(ids), method="embed")
    # The "transcript" span: 3 positions before each prompt's last token (inside the real tokens
    # or not: padding stays off).
    speech = np.zeros((4, P), np.int32)
    speech[:, P - 4 : P - 1] = 1
    speech *= mask.astype(np.int32)
    run = functools.partial(
        generate, module, params, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=N
    )

    # A zero PLoRA mask over spliced-in embeddings gives the text prompt's output exactly.
    assert np.array_equal(np.asarray(run(lora_mask=np.zeros_like(speech))), text)
    # With PLoRA on at the speech positions: equal to a cache-free loop that applies it at those
    # prompt positions and never at generated ones, and different from the text output.
    ours = np.asarray(run(lora_mask=speech))
    ref = _loop_reference(module, params, embeds, mask, speech, eos, fill)
    assert np.array_equal(ours, ref)
    assert not np.array_equal(ours, text)


# ----------------------------------------------------------------------------------------------
# Sampling.


def test_sampling_limits_and_determinism(saved):
    module, params = hf.load_llm(saved["llama"][0])
    ids, mask = _prompts(1, [P, 6])
    run = functools.partial(
        generate,
        module,
        params,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=N,
        eos_token_id=(),
    )
    ref = np.asarray(run())
    key = jax.random.key(7)
    # One compiled program serves every temperature/top_p/key (they are traced arguments).
    assert np.array_equal(np.asarray(run(temperature=1.0, top_p=1e-6, rng=key)), ref)
    assert np.array_equal(np.asarray(run(temperature=1e-4, rng=key)), ref)
    a = np.asarray(run(temperature=1.5, rng=key))
    assert np.array_equal(np.asarray(run(temperature=1.5, rng=key)), a)
    b = np.asarray(run(temperature=1.5, rng=jax.random.key(8)))
    assert not np.array_equal(a, b) and not np.array_equal(a, ref)


def test_select_token_distribution():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
    keys = jax.random.key(0)
    draw = jax.jit(select_token, static_argnames="sample")

    def freq(t, p):
        tok = np.asarray(draw(logits, keys, jnp.float32(t), jnp.float32(p), sample=True))
        return np.bincount(tok, minlength=4) / len(tok)

    # top_p 0.7: mass above token 3 (0.5) < 0.7 keeps it; above token 2 (0.8) does not.
    f = freq(1.0, 0.7)
    assert f[0] == 0 and f[2] == 0
    np.testing.assert_allclose(f[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    # Full nucleus at temperature 2: softmax(log p / 2) ∝ sqrt(p).
    expect = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(freq(2.0, 1.0), expect, atol=0.03)
    # Greedy ignores the key.
    assert np.all(np.asarray(draw(logits, keys, 1.0, 1.0, sample=False)) == 1)


SHARDED = r"""
import os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import PartitionSpec as P
from blspkd_jax.inference.generate import generate, param_shardings
from blspkd_jax.models import hf, sharding
path, eos = sys.argv[1], int(sys.argv[2])
module, params = hf.load_llm(path)
rs = np.random.RandomState(0)
ids = rs.randint(3, 96, (8, 9)).astype(np.int32)
mask = np.ones((8, 9), np.int32)
for b, n in enumerate([9, 5, 7, 2, 9, 4, 1, 8]):
    mask[b, : 9 - n] = 0
kw = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
one = np.asarray(generate(module, params, input_ids=ids, attention_mask=mask, **kw))
mesh = sharding.make_mesh(1, 4, 2)
_, placed = hf.load_llm(path, mesh=mesh)
targets = param_shardings(module, mesh)
for x, s in zip(jax.tree.leaves(placed), jax.tree.leaves(targets), strict=True):
    assert x.sharding == s, (x.sharding, s)
assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
got = generate(module, placed, input_ids=ids, attention_mask=mask, **kw)  # compiles
assert got.sharding.spec == P(("data", "fsdp"), None), got.sharding
moved, put = [], jax.device_put
jax.device_put = lambda *a, **k: moved.append(a) or put(*a, **k)  # every reshard goes through it
again = generate(module, placed, input_ids=ids, attention_mask=mask, **kw)
jax.device_put = put
assert moved == [], len(moved)  # the params went into the compiled program where they were
odd = generate(module, placed, input_ids=ids[:3], attention_mask=mask[:3], **kw)
kept = generate(module, placed, input_ids=ids, attention_mask=mask, weights="sharded", **kw)
assert (np.asarray(got) == one).all() and (np.asarray(again) == one).all(), (got, one)
assert (np.asarray(odd) == one[:3]).all()  # 3 rows on 8 devices: the batch runs replicated
assert (np.asarray(kept) == one).all()
# The decode loop of the gathered program: no all-gather inside the model's step (only the
# token choice, an argmax over the vocabulary split by tensor, communicates there).
import blspkd_jax.inference.generate as g
mine = [v for k, v in g._COMPILED.items() if k[1] == mesh and k[2][0][0] == 8 and k[4]]
(fn, shardings, rules), = mine
args = (placed, ids, mask, None, np.float32(1), np.float32(1), np.zeros(2, np.uint32))
args = jax.tree.map(g._place, args, shardings, is_leaf=lambda x: x is None)
with sharding.activate(mesh, rules):
    hlo = fn.lower(*args).compile().as_text()
comps, name = {}, None
for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
        name, comps[head.group(1)] = head.group(1), []
    elif name and line.startswith("}"):
        name = None
    elif name:
        comps[name].append(line)
todo = [re.search(r"body=%?([\w.\-]+)", l).group(1) for c in comps.values() for l in c
        if " while(" in l]
loop = set()
while todo:
    c = todo.pop()
    if c in comps and c not in loop:
        loop.add(c)
        called = r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)"
        todo += [n for l in comps[c] for n in re.findall(called, l)]
gathers = [l for c in loop for l in comps[c] if re.search(r" all-gather(-start)?\(", l)]
assert gathers and not [l for l in gathers if "/LLM/" in l], gathers
print("OK", (one == eos).any(), flush=True)
"""


@pytest.mark.slow
def test_sharded_generation_equals_one_device(saved):
    """On 8 virtual devices (fsdp 4 x tensor 2) with the LLM loaded straight into its shardings,
    greedy tokens equal the single-device run's (weights gathered once or kept sharded); the
    output comes back split by batch; no parameter is moved before the compiled program (it takes
    the weights where they are; only the prompts are copied in from the host); and in the
    compiled decode loop nothing of the model's step is all-gathered (the weights were, once).
    """
    path, _, eos, _ = saved["llama"]
    p = subprocess.run(
        [sys.executable, "-c", SHARDED, str(path), str(eos[0])],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "OK True" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
