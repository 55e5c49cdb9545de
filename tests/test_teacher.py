"""The demo's teacher: tokenizer and LM directory load with transformers and with our loader, the
chat template lays out rows as the pipeline expects, training is deterministic and lowers the loss,
and the recorded greedy responses are what transformers' generate produces."""

import json

import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import AutoModelForCausalLM, AutoTokenizer

from blspkd_jax.data.layout import build_layout
from blspkd_jax.demo import teacher
from blspkd_jax.demo.sentences import load_sentences
from blspkd_jax.models import hf

TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    steps=40,
    warmup_steps=5,
    tokens_per_batch=512,
    eval_max_new_tokens=6,
    bucket_multiple=96,
)


@pytest.fixture(scope="module")
def sentences():
    return load_sentences()[:56]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sentences):
    """The CLI on 50 sentences (6 more to measure on), tiny sizes."""
    root = tmp_path_factory.mktemp("teacher")
    train, evals = root / "train.txt", root / "eval.txt"
    train.write_text("# comment\n" + "\n".join(sentences[:50]) + "\n")
    evals.write_text("\n".join(sentences[50:]) + "\n")
    out = root / "teacher"
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k not in ("steps", "vocab_size")]
    argv = ["--sentences", str(train), "--out", str(out), "--eval-sentences", str(evals)]
    argv += ["--steps", "40", "--vocab-size", "320", "--no-progress", *sets]
    assert teacher.main(argv) == 0
    return out, json.loads((out / teacher.SUMMARY_FILE).read_text())


def test_continuation():
    sentence = "The dog's bone, it seems, is gone!"
    assert teacher.continuation(sentence) == "dog's bone it seems is gone the"


def test_tokenizer_loads_and_renders_chatml(trained, sentences):
    out, _ = trained
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == 320
    for text in [*sentences[:5], "Naïve café — 42 <|im_end|> ok"]:
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text
    messages = [
        {"role": "user", "content": "Repeat the following text: hi there"},
        {"role": "assistant", "content": "hi there"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nRepeat the following text: hi there<|im_end|>\n"
        "<|im_start|>assistant\nhi there<|im_end|>\n"
    )
    # The pipeline's layout: the transcript span decodes to the transcript, the row ends at eos.
    row = build_layout(tok, sentences[0], "ok", teacher.REPEAT_INSTRUCTION, system=None)
    assert tok.decode(row["input_ids"][row["speech_mask"]]) == sentences[0]
    assert row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"][row["response_mask"]]) == "ok<|im_end|>"


def test_lm_loads_with_ours_and_transformers(trained, sentences):
    out, summary = trained
    module, params = hf.load_llm(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert module.config.tie_word_embeddings and module.config.vocab_size == 320
    n = sum(int(np.prod(x.shape)) for x in traverse_util.flatten_dict(params).values())
    assert n == summary["num_params"]
    ids = [
        build_layout(tok, s, s, teacher.REPEAT_INSTRUCTION, None)["input_ids"]
        for s in sentences[:3]
    ]
    L = max(map(len, ids))
    batch = np.full((3, L), tok.pad_token_id, np.int32)
    mask = np.zeros((3, L), np.int32)
    for i, x in enumerate(ids):  # left padding, as generation uses
        batch[i, L - len(x) :], mask[i, L - len(x) :] = x, 1
    ours = np.asarray(module.apply({"params": params}, batch, attention_mask=mask))
    with torch.no_grad():
        theirs = model(torch.tensor(batch).long(), attention_mask=torch.tensor(mask)).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-4, rtol=0)


def test_recorded_responses_match_transformers_generate(trained, sentences):
    """The summary's greedy responses (made by our generate through the labels command's code)
    equal transformers' generate on the same prompt."""
    out, summary = trained
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    instructions = {"repeat": teacher.REPEAT_INSTRUCTION, "continue": teacher.CONTINUE_VARIANTS[0]}
    for task, instruction in instructions.items():
        result = summary["eval"][task]
        assert 0.0 <= result["exact_match"] <= 1.0 and result["wer"] >= 0.0
        for ex in result["examples"]:
            messages = [{"role": "user", "content": instruction + ex["text"]}]
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                new = model.generate(
                    ids, max_new_tokens=TINY["eval_max_new_tokens"], do_sample=False
                )[0, ids.shape[1] :]
            assert tok.decode(new, skip_special_tokens=True).strip() == ex["response"]


def test_loss_decreases(trained):
    _, summary = trained
    losses = [h["loss"] for h in summary["loss_history"]]
    assert losses[0] > np.log(320) - 0.5  # a random init predicts about uniformly
    assert losses[-1] < losses[0] - 1.0
    assert summary["eval_loss"] < losses[0] - 1.0


def test_same_seed_same_model(tmp_path, sentences):
    kw = dict(TINY, steps=6, evaluate=False, progress=False)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        teacher.train_teacher(sentences[:30], tmp_path / name, seed=seed, **kw)
        runs[name] = hf.read_state_dict(tmp_path / name)
    assert runs["a"].keys() == runs["b"].keys()
    for k in runs["a"]:
        np.testing.assert_array_equal(runs["a"][k], runs["b"][k])
    assert any(not np.array_equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (
        tmp_path / "b/tokenizer.json"
    ).read_bytes()


def test_training_rows_match_the_pipeline_layout(trained, sentences):
    out, _ = trained
    tok = AutoTokenizer.from_pretrained(out)
    cfg = teacher.TeacherConfig(repeat_fraction=1.0, scramble_fraction=0.0, bucket_multiple=16)
    conv = teacher.Conversations(tok, sentences[:8], cfg)
    rows = conv.sample(np.random.default_rng(0))
    assert len(rows) == 16
    for k, (ids, start, end, prompt_len, text_weight) in enumerate(rows):
        s = sentences[k // 2]
        if k % 2 == 0:
            want = build_layout(tok, s, s, teacher.REPEAT_INSTRUCTION, None)
        else:  # the continuation variant is drawn: find which one lays out this row
            layouts = [
                build_layout(tok, s, teacher.continuation(s), ins, None)
                for ins in teacher.CONTINUE_VARIANTS
            ]
            want = next(x for x in layouts if list(x["input_ids"]) == ids)
        assert ids == list(want["input_ids"]) and text_weight == 1.0
        assert prompt_len == want["prompt_length"]
        assert np.array_equal(np.nonzero(want["speech_mask"])[0], np.arange(start, end))

    scrambled = teacher.Conversations(tok, sentences[:8], cfg.__class__(scramble_fraction=1.0))
    for ids, start, end, _, text_weight in scrambled.sample(np.random.default_rng(0)):
        words = tok.decode(ids[start:end]).split()
        assert text_weight == 0.0 and sorted(words) in [sorted(s.split()) for s in sentences[:8]]

    batches = teacher.make_batches(rows, np.random.default_rng(0), cfg, tok.pad_token_id)
    assert sum(int(m.any(-1).sum()) for _, m, _ in batches) == len(rows)
    for ids, mask, w in batches:
        assert ids.shape == mask.shape == w.shape and ids.shape[1] % 16 == 0
        assert not w[:, 0].any() and not w[~mask].any() and (ids[~mask] == tok.pad_token_id).all()
        assert set(np.unique(w[mask][1:])) <= {0.0, 1.0, cfg.response_weight}
