"""The teacher/student layout: exact transcript span, response + end-of-turn targets, padding."""

import numpy as np
import pytest
from tiny import tiny_chat_tokenizer

from blspkd_jax.data.features import silence_value
from blspkd_jax.data.layout import (
    CHATML_TEMPLATE,
    ChatLayout,
    LayoutError,
    build_layout,
    make_batch,
    render_template,
)

LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_chat_tokenizer(tmp_path_factory.mktemp("tok"))


def _messages(system, user, assistant=None):
    m = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return m + ([{"role": "assistant", "content": assistant}] if assistant is not None else [])


def test_layout_spans_match_rendered_template(tok):
    lay = build_layout(tok, "the cat sat", "hello world", "repeat after me: ", "Be brief.")
    ids = lay["input_ids"]
    assert ids.dtype == np.int32 and lay["speech_mask"].dtype == bool
    # The transcript span holds exactly the transcript's own tokens.
    assert tok.decode(ids[lay["speech_mask"]]) == "the cat sat"
    assert (
        ids[lay["speech_mask"]].tolist()
        == tok("the cat sat", add_special_tokens=False)["input_ids"]
    )
    # Response targets: the response and the end-of-turn token, and nothing else.
    resp = ids[lay["response_mask"]].tolist()
    assert resp[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(resp) == "hello world<|im_end|>"
    # The whole sequence is the template rendered with the real content, minus the newline
    # ChatML puts after the last end-of-turn token (no target, generation stops before it).
    full = tok.apply_chat_template(
        _messages("Be brief.", "repeat after me: the cat sat", "hello world"), tokenize=False
    )
    assert tok.decode(ids) + "\n" == full
    # The prompt part is exactly what generation feeds the model.
    prompt = tok.apply_chat_template(
        _messages("Be brief.", "repeat after me: the cat sat"),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tok.decode(ids[: lay["prompt_length"]]) == prompt
    # Speech strictly before response; both contiguous.
    sp, rp = np.flatnonzero(lay["speech_mask"]), np.flatnonzero(lay["response_mask"])
    assert np.all(np.diff(sp) == 1) and np.all(np.diff(rp) == 1) and sp[-1] < rp[0]
    assert rp[0] == lay["prompt_length"] and rp[-1] == len(ids) - 1


def test_absent_response_leaves_only_end_of_turn(tok):
    for response in (None, ""):
        lay = build_layout(tok, "hello world", response)
        assert lay["input_ids"][lay["response_mask"]].tolist() == [tok.eos_token_id]


def test_transcript_text_never_becomes_special_tokens(tok):
    lay = build_layout(tok, "the <|im_end|> cat", "ok")
    span = lay["input_ids"][lay["speech_mask"]].tolist()
    assert tok.eos_token_id not in span and len(span) > 3
    assert tok.decode(span) == "the <|im_end|> cat"


def test_system_none_and_default_instruction(tok):
    layout = ChatLayout(tok, system=None, default_instruction="repeat: ")
    lay = layout("the cat")
    assert tok.decode(lay["input_ids"]) + "\n" == tok.apply_chat_template(
        [
            {"role": "user", "content": "repeat: the cat"},
            {"role": "assistant", "content": ""},
        ],
        tokenize=False,
    )
    # lengths() (the index pass) agrees with the layouts it predicts.
    texts, resps, instrs = ["the cat", "hello world how"], ["a b", None], [None, "say: "]
    num_text, total = layout.lengths(texts, resps, instrs)
    for a, b in zip((num_text, total), layout.lengths(texts, resps, instrs, chunk=1), strict=True):
        np.testing.assert_array_equal(a, b)
    for t, r, i, n, k in zip(texts, resps, instrs, num_text, total, strict=True):
        lay = layout(t, r, i)
        assert lay["speech_mask"].sum() == n and len(lay["input_ids"]) == k


def test_other_template_shapes(tmp_path):
    # No template: a clear error naming what to set; an explicit template fixes it.
    bare = tiny_chat_tokenizer(tmp_path / "bare", chat_template=None)
    with pytest.raises(LayoutError, match="no chat template.*data.chat_template"):
        build_layout(bare, "the cat")
    lay = build_layout(bare, "the cat", "hi", chat_template=CHATML_TEMPLATE)
    assert lay["input_ids"][lay["response_mask"]][-1] == bare.eos_token_id
    # Llama-3 style: the end-of-turn token is <|eot_id|>, not the tokenizer's eos; the first
    # special token after the response is taken.
    lay = build_layout(bare, "the cat", "hi", chat_template=LLAMA3_TEMPLATE)
    eot = bare.convert_tokens_to_ids("<|eot_id|>")
    assert lay["input_ids"][lay["response_mask"]].tolist()[-1] == eot
    assert bare.decode(lay["input_ids"][lay["response_mask"]]) == "hi<|eot_id|>"
    # A template with no special token after the response: eos is appended to end the turn.
    t = render_template(bare, "", "S", PLAIN_TEMPLATE)
    assert t.suffix[-1] == bare.eos_token_id
    assert bare.decode(list(t.suffix)) == "\n<|im_end|>"


def test_make_batch_pads_into_bucket(tok):
    layout = ChatLayout(tok)
    rng = np.random.default_rng(0)
    exs = []
    for text, t in (("the cat sat", 7), ("hello world how are you", 11)):
        ex = layout(text, "ok")
        ex["features"] = rng.standard_normal((4, t)).astype(np.float32)
        exs.append(ex)
    b = make_batch(exs + [None], batch_size=4, frames=12, tokens=64, n_mels=4, pad_id=7)
    assert b["features"].shape == (4, 4, 12) and b["input_ids"].shape == (4, 64)
    assert b["example_mask"].tolist() == [True, True, False, False]
    for i, ex in enumerate(exs):
        n, t = len(ex["input_ids"]), ex["features"].shape[1]
        np.testing.assert_array_equal(b["features"][i, :, :t], ex["features"])
        assert np.all(b["features"][i, :, t:] == np.float32(silence_value(ex["features"])))
        assert b["feature_mask"][i].sum() == t and b["feature_mask"][i, :t].all()
        np.testing.assert_array_equal(b["input_ids"][i, :n], ex["input_ids"])
        assert np.all(b["input_ids"][i, n:] == 7) and b["attention_mask"][i].sum() == n
        assert b["text_lengths"][i] == b["speech_mask"][i].sum() == ex["speech_mask"].sum()
        assert b["response_mask"][i, :n].tolist() == ex["response_mask"].tolist()
    assert not b["attention_mask"][2:].any() and not b["features"][2:].any()
    assert b["text_lengths"].dtype == np.int32 and b["input_ids"].dtype == np.int32
    with pytest.raises(ValueError, match="does not fit the bucket"):
        make_batch(exs, batch_size=2, frames=8, tokens=64, n_mels=4, pad_id=0)
