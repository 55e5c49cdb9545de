"""Evaluation metrics against hand-computed values and plain-loop references (WER, BLEU, exact
match, KL, top-1 agreement, CIF length error), and the evaluation of a tiny trained run end to
end (its run is shared with test_speech_generate)."""

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_speech_generate import MAX_NEW, alpha_sums
from tiny import random_batch, tiny_config

from blspkd_jax.data.layout import text_ids
from blspkd_jax.data.manifest import read_rows
from blspkd_jax.inference.evaluate import evaluate_run
from blspkd_jax.inference.metrics import bleu, exact_match, wer
from blspkd_jax.inference.respond import load_features, speech_responses, speech_vectors
from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.models.llm import lm_head_kernel
from blspkd_jax.training import optim
from blspkd_jax.training.objective import CONSISTENCY_KEYS, LossConfig, consistency


def test_wer_exact_match_hand_computed():
    refs = ["The cat sat on the mat.", "hello world"]
    hyps = ["the cat sat on mat", "Hello, there world!"]
    # One deletion ("the") and one insertion ("there") over 8 reference words; case and
    # punctuation are normalised away.
    assert wer(hyps, refs) == pytest.approx(2 / 8)
    assert wer(["a b c"], ["a x c d"]) == pytest.approx(2 / 4)  # 1 substitution + 1 deletion
    assert exact_match(["a", "b ", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    assert math.isnan(exact_match([], []))


def _bleu_reference(hyps, refs):
    """Papineni et al.'s corpus BLEU by hand: clipped n-gram precisions (n = 1..4), geometric
    mean, brevity penalty exp(1 - r / c) when c < r. Whitespace tokens (the test text has no
    punctuation, where sacrebleu's 13a tokenizer would split)."""
    match, total = [0] * 4, [0] * 4
    c = r = 0
    for h, ref in zip(hyps, refs, strict=True):
        h, ref = h.split(), ref.split()
        c, r = c + len(h), r + len(ref)
        for n in range(1, 5):
            hc = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            match[n - 1] += sum(min(k, rc[g]) for g, k in hc.items())
            total[n - 1] += max(0, len(h) - n + 1)
    log_p = sum(math.log(m / t) for m, t in zip(match, total, strict=True)) / 4
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return 100 * bp * math.exp(log_p)


def test_bleu_hand_computed():
    hyps = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    refs = ["the cat sat on a mat today", "the quick brown fox jumps over the lazy dog"]
    expect = _bleu_reference(hyps, refs)
    assert 10 < expect < 90
    assert bleu(hyps, refs) == pytest.approx(expect, rel=1e-6)
    # By hand, "the cat sat on the mat" against "the cat sat on a mat": clipped n-gram matches
    # 5/6, 3/5, 2/4, 1/3 and equal lengths (no brevity penalty).
    by_hand = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(by_hand)
    assert bleu(refs, refs) == pytest.approx(100.0)


class _Batches:
    """A stand-in eval pipeline: iterating yields the batches, as grain's iterator does."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return (dict(b) for b in self.batches)


def _random_param(name: str, shape, rs) -> np.ndarray:
    """O(1) activations and logits with clear margins; PLoRA B at zero as at init."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "scale":
        return 1.0 + 0.1 * rs.randn(*shape)
    if leaf in ("bias", "embed_positions"):
        return 0.1 * rs.randn(*shape)
    if leaf == "embedding":
        return rs.randn(*shape)
    if leaf == "lora_b":
        return np.zeros(shape)
    return rs.randn(*shape) / np.sqrt(np.prod(shape[:-1]))


@pytest.fixture(scope="module")
def tiny_model():
    """A one-layer BLSP-KD with PLoRA, random parameters drawn from their shapes (no init to
    compile), and its jitted forward (student hidden, teacher hidden, aux)."""
    cfg = tiny_config(lora_rank=4)
    cfg = dataclasses.replace(
        cfg,
        encoder=dataclasses.replace(cfg.encoder, encoder_layers=1),
        llm=cfg.llm.replace(num_layers=1),
    )
    model = BLSPKD(cfg)
    key = jax.random.key(0)
    abstract = jax.eval_shape(
        lambda: nn.unbox(model.init({"params": key, "dropout": key}, random_batch(0))["params"])
    )
    rs = np.random.RandomState(0)
    flat = {
        k: jnp.asarray(_random_param(k, v.shape, rs), v.dtype)
        for k, v in optim.flatten(abstract).items()
    }
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b))
    return model, flat, fwd


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _sums_reference(model, fwd, params, batches, temperature):
    """Consistency by plain loops over full logits: KL(teacher || student) of the tempered
    softmaxes at each selected position, argmax agreement, and |max(1, round(sum a)) - n| / n."""
    head = np.asarray(lm_head_kernel(model.config.llm, params["llm"]), np.float64)
    acc = {k: [0.0, 0.0] for k in CONSISTENCY_KEYS}
    for b in batches:
        s, t, aux = jax.tree.map(np.asarray, fwd(params, b))
        for i in range(s.shape[0]):
            if not b["example_mask"][i]:
                continue
            n = b["text_lengths"][i]
            pred = max(1.0, np.round(aux["alpha_sum"][i]))
            acc["cif_length_error"][0] += abs(pred - n) / n
            acc["cif_length_error"][1] += 1
            L = s.shape[1]
            for j in range(L):
                is_input = b["speech_mask"][i, j]
                is_resp = j + 1 < L and b["response_mask"][i, j + 1] and b["attention_mask"][i, j]
                if not (is_input or is_resp):
                    continue
                ls, lt = s[i, j] @ head, t[i, j] @ head
                q, p = _log_softmax(ls / temperature), _log_softmax(lt / temperature)
                kl = float(np.sum(np.exp(p) * (p - q)))
                agree = float(np.argmax(ls) == np.argmax(lt))
                name = "input" if is_input else "response"
                acc[f"{name}_kl"][0] += kl
                acc[f"{name}_kl"][1] += 1
                acc[f"top1_{name}"][0] += agree
                acc[f"top1_{name}"][1] += 1
    return {k: num / den for k, (num, den) in acc.items()}


def test_consistency_matches_plain_loops(tiny_model):
    model, flat, fwd = tiny_model
    flat = dict(flat)
    rs = np.random.RandomState(1)
    for k in flat:  # PLoRA B away from zero: the student differs from the teacher
        if k.endswith("lora_b"):
            flat[k] = jnp.asarray(0.3 * rs.randn(*flat[k].shape), flat[k].dtype)
    params = optim.unflatten(flat)
    batches = [random_batch(1), random_batch(2)]
    loss_cfg = LossConfig(temperature=2.0)
    got = consistency(model, params, _Batches(batches), sharding.make_mesh(1, -1, 1), loss_cfg)
    expect = _sums_reference(model, fwd, params, batches, 2.0)
    assert set(got) == set(CONSISTENCY_KEYS)
    for k in got:
        assert got[k] == pytest.approx(expect[k], rel=1e-4, abs=1e-6), k
    assert 0 < got["top1_input"] < 1 and got["input_kl"] > 1e-4  # a case that can fail


def test_consistency_known_answer_when_student_is_the_teacher(tiny_model):
    """Speech vectors of zero where the transcript's tokens embed to zero, PLoRA B at zero: the
    student reads exactly the teacher's sequence, so KL is 0 and top-1 agreement is 1."""
    model, flat, fwd = tiny_model
    flat = dict(flat)
    for k in ("adapter/out_proj/kernel", "adapter/out_proj/bias"):
        flat[k] = jnp.zeros_like(flat[k])
    flat["llm/embed_tokens/embedding"] = flat["llm/embed_tokens/embedding"].at[0].set(0.0)
    assert all(not np.asarray(v).any() for k, v in flat.items() if k.endswith("lora_b"))
    params = optim.unflatten(flat)
    batch = random_batch(3)
    batch["input_ids"] = np.where(batch["speech_mask"], 0, batch["input_ids"])
    got = consistency(model, params, _Batches([batch]), sharding.make_mesh(1, -1, 1), LossConfig())
    assert got["input_kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["response_kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["top1_input"] == 1.0 and got["top1_response"] == 1.0
    _, _, aux = fwd(params, batch)
    ex = batch["example_mask"]
    n = batch["text_lengths"][ex]
    pred = np.maximum(1, np.round(np.asarray(aux["alpha_sum"])[ex]))
    assert got["cif_length_error"] == pytest.approx(np.mean(np.abs(pred - n) / n), rel=1e-6)


@pytest.fixture(scope="module")
def run(tiny_run):
    from blspkd_jax.inference.workdir import load_run

    return load_run(tiny_run[0])


def test_evaluate_run_end_to_end(run, tmp_path):
    root = Path(run.config.data.train_manifest).parent
    manifest = root / "eval.jsonl"
    out = tmp_path / "eval"
    m = evaluate_run(
        run,
        manifest,
        task="asr",
        instruction="Repeat: ",
        out=out,
        batch_size=3,
        max_new_tokens=MAX_NEW,
        worker_count=0,
        progress=False,
    )
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["rows"] == 5 and m["skipped"] == 0 and m["step"] == 2 and m["task"] == "asr"
    for k in (*CONSISTENCY_KEYS, "exact_match", "wer", "wer_text", "bleu", "bleu_text"):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
        assert f"| {k} |" in (out / "metrics.md").read_text()

    # The instruction reached every prompt: the written manifest, and the speech responses.
    evaluated = read_rows(out / "manifest.jsonl")
    assert [r.instruction for r in evaluated] == ["Repeat: "] * 5
    got = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == [f"u{i}" for i in range(5)]
    rows = read_rows(manifest)
    speech = speech_responses(
        run, rows, instruction="Repeat: ", max_new_tokens=MAX_NEW, batch_size=3, progress=False
    )
    assert [g["speech_response"] for g in got] == speech
    text = [g["text_response"] for g in got]
    refs = [json.loads(x)["reference"] for x in manifest.read_text().splitlines()]
    assert m["exact_match"] == pytest.approx(
        np.mean([a == b for a, b in zip(speech, text, strict=True)])
    )
    assert m["wer"] == pytest.approx(wer(speech, [r.text for r in rows]))
    assert m["bleu_text"] == pytest.approx(bleu(text, refs))

    # CIF length error over the pipeline's batches equals the per-row formula, and inference
    # cut each row's vectors at that length (up to the adapter's max_tokens).
    pred, counts = [], []
    for chunk in (rows[:3], rows[3:] + rows[:1]):  # batches of 3: the shapes already compiled
        feats, mask = load_features(run, chunk)
        a = np.asarray(alpha_sums(run.params, feats, mask, run.model))
        pred += list(np.maximum(1, np.round(a)))
        counts += list(speech_vectors(run, feats, mask)[1])
    pred, counts = np.array(pred[:5]), np.array(counts[:5])
    np.testing.assert_array_equal(counts, np.minimum(pred, run.model.config.adapter.max_tokens))
    n = np.array([len(x) for x in text_ids(run.tokenizer, [r.text for r in rows])])
    assert m["cif_length_error"] == pytest.approx(np.mean(np.abs(pred - n) / n), rel=1e-6)
