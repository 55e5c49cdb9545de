"""Continuation labels: prompts from the chat template, responses cut at the end of turn, equal to
`greedy` on each prompt; the command resumes without redoing rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from tiny import tiny_chat_tokenizer, tiny_llm_config
from transformers import AutoTokenizer

from blspkd_jax import labels as labels_cli
from blspkd_jax.data.layout import build_layout
from blspkd_jax.data.manifest import read_rows
from blspkd_jax.generate import greedy
from blspkd_jax.inference import labels
from blspkd_jax.inference.generate import bucket_length
from blspkd_jax.models import hf, llm

INSTRUCTION = "Continue: "
SYSTEM = "be brief"
NEW = 10
ROWS = [
    {"id": "a", "audio": "a.wav", "text": "the cat sat on the mat"},
    {"audio": "b.wav", "text": "hello world"},
    {
        "id": "c",
        "audio": "c.wav",
        "text": "a quick brown fox jumps over the lazy dog, again and again",
    },
    {"audio": "d.wav", "text": "repeat after me please", "response": "old label"},
    {"id": "e", "audio": "e.wav", "text": "you are"},
    {"id": "f", "audio": "f.wav", "text": "how are you today my friend, said the dog to the cat"},
]
CLI = ["--instruction", INSTRUCTION, "--system", SYSTEM, "--batch-size", "4"]
CLI += ["--max-new-tokens", str(NEW), "--no-progress"]


def _prompts(tokenizer):
    """Left-padded prompts of all rows from the training layout (a path independent of labels')."""
    ps = [
        build_layout(tokenizer, r["text"], None, INSTRUCTION, SYSTEM)
        for r in ROWS  # prompt = everything before the response
    ]
    ps = [p["input_ids"][: p["prompt_length"]] for p in ps]
    L = max(len(p) for p in ps)
    ids = np.zeros((len(ps), L), np.int32)
    mask = np.zeros((len(ps), L), np.int32)
    for i, p in enumerate(ps):
        ids[i, L - len(p) :], mask[i, L - len(p) :] = p, 1
    return ids, mask


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama + ChatML tokenizer in one Hugging Face directory, and the expected
    responses. The eos column of the head copies (x1.1) the token greedy emits most, so some
    responses end at <|im_end|> and others run to the token limit."""
    path = tmp_path_factory.mktemp("llm")
    tok = tiny_chat_tokenizer(path)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = tiny_llm_config(len(tok), eos_token_id=eos, pad_token_id=tok.pad_token_id)
    shapes = nn.unbox(
        jax.eval_shape(
            lambda: llm.LLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        )["params"]
    )
    rs = np.random.RandomState(0)
    flat = {
        k: np.float32(1.0) + 0.1 * rs.randn(*v.shape) if k[-1] == "scale" else rs.randn(*v.shape)
        for k, v in traverse_util.flatten_dict(shapes).items()
    }
    flat = {
        k: (v if k[0] == "embed_tokens" else 0.3 * v).astype(np.float32) for k, v in flat.items()
    }
    ids, mask = _prompts(tok)
    module = llm.LLM(config)
    run = lambda p: np.asarray(
        greedy(module, p, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos)
    )[:, ids.shape[1] :]
    free = run(traverse_util.unflatten_dict(flat))
    counts = np.bincount(free[:, 1:].ravel(), minlength=len(tok))
    counts[[eos, tok.pad_token_id]] = 0
    common = counts.argmax()
    head = flat[("lm_head", "kernel")]
    head[:, eos] = 1.1 * head[:, common]
    params = traverse_util.unflatten_dict(flat)
    hf.save_llm(path, config, params)

    new = run(params)
    stopped = (new == eos).any(axis=1)
    assert 0 < stopped.sum() < len(ROWS)  # both kinds of response occur
    expect = []
    for row in new.tolist():
        cut = row.index(eos) if eos in row else len(row)
        expect.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return path, expect


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def counted(monkeypatch):
    """Counts the real (non-filler) rows passed to generate."""
    calls = []
    real = labels.generate

    def counting(*args, attention_mask, **kw):
        calls.append(int(np.asarray(attention_mask).any(-1).sum()))
        return real(*args, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(labels, "generate", counting)
    return calls


def test_labels_command_and_resume(model_dir, tmp_path, counted):
    path, expect = model_dir
    manifest, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(manifest, ROWS)
    args = ["--llm", str(path), "--manifest", str(manifest), *CLI]
    assert labels_cli.main([*args, "--out", str(out)]) == 0
    full = out.read_text()
    rows = _read(out)
    # Every row kept as it was, in order, with the greedy continuation of its own prompt.
    assert [{k: v for k, v in r.items() if k != "response"} for r in rows] == [
        {k: v for k, v in r.items() if k != "response"} for r in ROWS
    ]
    assert [r["response"] for r in rows] == expect
    assert sum(counted) == 6 and len(counted) == 2  # two batches of at most 4

    # Interrupted after 3 rows, halfway through writing the 4th: only 3 rows are generated again.
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20])
    counted.clear()
    assert labels_cli.main([*args, "--out", str(out)]) == 0
    assert sum(counted) == 3 and out.read_text() == full
    # Nothing left to do.
    counted.clear()
    assert labels_cli.main([*args, "--out", str(out)]) == 0
    assert counted == [] and out.read_text() == full

    # Rows done out of order, matched by id: the rest is generated and the file put in order.
    _write(out, [rows[5], rows[0]])
    counted.clear()
    assert labels_cli.main([*args, "--out", str(out)]) == 0
    assert sum(counted) == 4 and out.read_text() == full

    # An output that belongs to another manifest is refused, not silently mixed.
    _write(out, [{**rows[0], "text": "something else"}])
    assert labels_cli.main([*args, "--out", str(out)]) == 1
    assert labels_cli.main([*args, "--out", str(manifest)]) == 1


def test_add_continuations_api(model_dir):
    path, expect = model_dir
    module, params = hf.load_llm(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    out = labels.add_continuations(
        module,
        params,
        tok,
        ROWS,
        instruction=INSTRUCTION,
        system=SYSTEM,
        batch_size=4,
        max_new_tokens=NEW,
    )
    assert [r["response"] for r in out] == expect
    assert [r["text"] for r in out] == [r["text"] for r in ROWS]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]


def test_labels_in_another_folder_keep_audio_paths_resolving(model_dir, tmp_path):
    """A manifest with relative audio paths labelled into another folder: each row's audio
    resolves, from the new manifest's folder, to the same file as from the input's."""
    path, _ = model_dir
    manifest = tmp_path / "data" / "in.jsonl"
    manifest.parent.mkdir()
    rows = [*ROWS[:2], {**ROWS[2], "audio": str(tmp_path / "abs.wav")}]
    _write(manifest, rows)
    out = tmp_path / "elsewhere" / "deeper" / "out.jsonl"
    args = ["--llm", str(path), "--manifest", str(manifest), "--out", str(out), *CLI]
    assert labels_cli.main(args) == 0
    written = _read(out)
    assert written[0]["audio"] == "../../data/a.wav"  # relative stays relative
    assert written[2]["audio"] == str(tmp_path / "abs.wav")  # absolute stays absolute
    assert [r.audio for r in read_rows(out)] == [r.audio for r in read_rows(manifest)]
