"""Loading a trained workdir and generating from its speech: a tiny run trained in-process (shared
with test_evaluate through `tiny_run`) is reloaded exactly, its speech prompts follow the training
layout, the CLI writes one row per input, and a transcript spliced into a speech prompt with PLoRA
off gives the text prompt's output."""

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import SENTENCES
from transformers import AutoModelForCausalLM

from blspkd_jax.data.layout import text_ids
from blspkd_jax.data.manifest import read_rows
from blspkd_jax.generate import main
from blspkd_jax.inference.generate import decode_response
from blspkd_jax.inference.respond import (
    build_prompts,
    generate_from_prompts,
    speech_responses,
    speech_vectors,
    stop_ids_for,
    text_responses,
)
from blspkd_jax.inference.workdir import RunError, load_run
from blspkd_jax.models import hf
from blspkd_jax.models.blspkd import BLSPKD
from blspkd_jax.models.llm import LLM
from blspkd_jax.training import optim

REPO = Path(__file__).parent.parent
MAX_NEW = 6
_CACHE: dict = {}


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def run(trained):
    return load_run(trained[0])


def test_load_run_reproduces_the_trained_params(trained, run):
    workdir, root, final = trained
    assert run.step == 2 and run.config.data.frame_buckets == (160,)  # lists back to tuples
    flat, ref = optim.flatten(run.params), optim.flatten(final)
    assert sorted(flat) == sorted(ref)
    for k in ref:  # frozen (LLM from HF, encoder from the seed) and trained alike
        np.testing.assert_array_equal(np.asarray(flat[k]), ref[k], err_msg=k)

    # The encoder is frozen and random: load_run's initialisation reproduced the trainer's.
    assert not any("encoder" in p for p in run.config.train.trainable)
    # The LLM's base weights are the saved Hugging Face directory's.
    _, hf_params = hf.load_llm(root / "llm")
    np.testing.assert_array_equal(
        np.asarray(flat["llm/embed_tokens/embedding"]),
        np.asarray(hf_params["embed_tokens"]["embedding"]),
    )
    # PLoRA B starts at zero: a trained run has moved it.
    lora_b = [k for k in flat if k.endswith("lora_b")]
    assert lora_b and any(np.abs(np.asarray(flat[k])).max() > 0 for k in lora_b)

    step1 = load_run(workdir, step=1)
    assert step1.step == 1
    assert not np.array_equal(
        np.asarray(optim.flatten(step1.params)["adapter/out_proj/kernel"]),
        ref["adapter/out_proj/kernel"],
    )


def test_load_run_stage2_takes_frozen_weights_from_init_from(trained, run, tmp_path):
    """A stage-2 run that trains only PLoRA and starts from the tiny run: its checkpoint holds
    PLoRA alone, so the adapter must come from train.init_from's latest checkpoint."""
    from blspkd_jax.training import checkpoint, train_state

    workdir, _, final = trained
    config = json.loads((workdir / "config.json").read_text())
    config["train"].update(trainable=["lora_"], init_from=str(workdir))
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    (stage2 / "config.json").write_text(json.dumps(config))
    ref = optim.flatten(final)
    lora = {k: jnp.asarray(v + 1.0) for k, v in ref.items() if "lora_" in k}
    state = train_state.TrainState(jnp.asarray(5, jnp.int32), lora, {}, ())
    mngr = checkpoint.manager(stage2, async_save=False)
    checkpoint.save(mngr, state, {}, force=True)
    mngr.close()

    got = optim.flatten(load_run(stage2).params)
    for k in ref:
        expect = ref[k] + 1.0 if "lora_" in k else ref[k]
        np.testing.assert_array_equal(np.asarray(got[k]), expect, err_msg=k)


def test_load_run_errors_name_the_workdir_and_steps(trained, tmp_path):
    with pytest.raises(RunError, match="nope"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="config.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(RunError, match=r"step 7.*1, 2"):
        load_run(trained[0], step=7)


def test_prompts_follow_the_training_layout(run):
    """A speech prompt is the layout's prompt part with the transcript span as N slots; a text
    prompt is that prompt part itself; both left-padded, filler rows empty."""
    transcript = SENTENCES[1]
    lay = run.layout(transcript, "a response")
    P0 = int(lay["prompt_length"])
    ids = text_ids(run.tokenizer, transcript)
    n = len(ids)
    p = build_prompts(run.layout, [n, ids], batch_size=3)
    L = p.input_ids.shape[1]
    assert (
        L >= P0 and p.attention_mask[:2, L - P0 :].all() and not p.attention_mask[:, : L - P0].any()
    )
    assert not p.attention_mask[2].any()  # filler
    np.testing.assert_array_equal(p.input_ids[1, L - P0 :], lay["input_ids"][:P0])
    np.testing.assert_array_equal(p.speech_mask[0, L - P0 :], lay["speech_mask"][:P0])
    assert not p.speech_mask[1].any()
    keep = ~lay["speech_mask"][:P0]
    np.testing.assert_array_equal(p.input_ids[0, L - P0 :][keep], lay["input_ids"][:P0][keep])
    # Another instruction changes the prefix only.
    q = build_prompts(run.layout, [n], ["Repeat: "])
    lay2 = run.layout(transcript, None, "Repeat: ")
    P2 = int(lay2["prompt_length"])
    np.testing.assert_array_equal(q.speech_mask[0, -P2:], lay2["speech_mask"][:P2])


def test_transcript_spliced_with_lora_off_gives_the_text_output(run):
    rows = read_rows(Path(run.config.data.train_manifest))[:4]
    ids = text_ids(run.tokenizer, [r.text for r in rows])
    stops = stop_ids_for(run, [None])
    text_prompts = build_prompts(run.layout, ids)
    speech_prompts = build_prompts(run.layout, [len(x) for x in ids])
    llm = LLM(run.model.config.llm)
    N = max(len(x) for x in ids)
    padded = np.array([x + [0] * (N - len(x)) for x in ids], np.int32)
    vectors = llm.apply({"params": run.llm_params}, padded, method=LLM.embed)

    from_text = generate_from_prompts(run, text_prompts, max_new_tokens=MAX_NEW, stop_ids=stops)
    spliced = generate_from_prompts(
        run, speech_prompts, vectors, lora=False, max_new_tokens=MAX_NEW, stop_ids=stops
    )
    np.testing.assert_array_equal(spliced, from_text)
    assert all(t not in stops for t in from_text[:, 0])  # every row says something
    # text_responses, against transformers' own greedy decoding of the same prompts.
    hf_llm = AutoModelForCausalLM.from_pretrained(run.config.model.llm.hf_path).eval()
    want = []
    for b in range(len(rows)):
        prompt = torch.tensor(text_prompts.input_ids[b][text_prompts.attention_mask[b]])[None]
        with torch.no_grad():
            out = hf_llm.generate(
                prompt,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=run.layout.pad_id,
            )
        want.append(decode_response(run.tokenizer, out[0, prompt.shape[1] :].numpy(), stops))
    got = text_responses(run, rows, max_new_tokens=MAX_NEW, batch_size=4, progress=False)
    assert got == want

    # Not vacuous: PLoRA on at those slots changes the LLM's output there.
    embeds = jnp.where(
        jnp.asarray(speech_prompts.speech_mask)[..., None],
        jnp.take_along_axis(
            vectors,
            jnp.clip(jnp.cumsum(speech_prompts.speech_mask, -1) - 1, 0)[..., None],
            axis=1,
        ),
        llm.apply({"params": run.llm_params}, speech_prompts.input_ids, method=LLM.embed),
    )
    call = jax.jit(
        lambda m: llm.apply(
            {"params": run.llm_params},
            inputs_embeds=embeds,
            attention_mask=speech_prompts.attention_mask,
            lora_mask=m,
        )
    )
    mask = jnp.asarray(speech_prompts.speech_mask)
    off, on = call(jnp.zeros_like(mask)), call(mask)
    assert float(jnp.abs(on - off).max()) > 1e-6


@functools.partial(jax.jit, static_argnames="model")
def alpha_sums(params, features, feature_mask, model):
    """sum(alpha) per row [B]: the CFormer's predicted transcript length (shared, compiled once)."""
    aux = model.apply({"params": params}, features, feature_mask, method=BLSPKD.speech)[2]
    return aux["alpha_sum"]


def test_speech_vectors_count_is_rounded_alpha_sum(run):
    from blspkd_jax.inference.respond import load_features

    rows = read_rows(Path(run.config.data.train_manifest))[:3]
    feats, mask = load_features(run, rows)
    assert feats.shape == (3, 40, 160)
    vectors, counts = speech_vectors(run, feats, mask)
    alpha_sum = np.asarray(alpha_sums(run.params, feats, mask, run.model))
    expect = np.minimum(np.maximum(1, np.round(alpha_sum)), run.model.config.adapter.max_tokens)
    np.testing.assert_array_equal(counts, expect)
    v = np.asarray(vectors)
    for b, n in enumerate(counts):  # exactly N vectors, zero after them
        assert np.abs(v[b, :n]).sum(-1).min() > 0 and not v[b, n:].any()


def test_speech_cli_writes_one_row_per_input(run, tmp_path):
    manifest = Path(run.config.data.train_manifest)
    out = tmp_path / "out.jsonl"
    rc = main(
        [
            "speech",
            f"--workdir={run.workdir}",
            f"--manifest={manifest}",
            f"--out={out}",
            f"--max-new-tokens={MAX_NEW}",
            "--batch-size=3",
        ]
    )
    assert rc == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    rows = read_rows(manifest)
    assert [g["id"] for g in got] == [r.id for r in rows] == [f"u{i}" for i in range(8)]
    assert all(isinstance(g["response"], str) for g in got)
    assert [g["response"] for g in got] == speech_responses(
        run, rows, max_new_tokens=MAX_NEW, batch_size=3, progress=False
    )
    assert not os.path.exists(str(out) + ".tmp")


def test_speech_cli_skips_and_lists_bad_rows(run, tmp_path, capsys):
    """Malformed lines, missing audio and audio longer than the encoder's window are skipped
    and listed as MANIFEST:LINE: reason; the other rows are answered, in order."""
    manifest = Path(run.config.data.train_manifest)
    good = [json.loads(x) for x in manifest.read_text().splitlines()][:2]
    for g in good:
        g["audio"] = str(manifest.parent / g["audio"])
    long_wav = tmp_path / "long.wav"
    seconds = 2 * run.model.config.encoder.max_source_positions / 100 + 0.5
    sf.write(long_wav, np.zeros(int(seconds * 16000), np.float32) + 0.01, 16000)
    lines = [
        json.dumps(good[0]),
        "{not json",
        json.dumps({"audio": str(tmp_path / "x.wav"), "text": "hi", "id": "gone"}),
        json.dumps({"audio": str(long_wav), "text": "hi", "id": "long"}),
        json.dumps(good[1]),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.jsonl"
    argv = ["speech", f"--workdir={run.workdir}", f"--manifest={bad}", f"--out={out}"]
    assert main([*argv, f"--max-new-tokens={MAX_NEW}"]) == 0
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err
    assert f"{bad}:3: audio file not found" in err
    assert f"{bad}:4: audio is" in err and "longer than the encoder" in err
    assert "3 rows skipped" in err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [g["id"] for g in good]
    # Nothing usable: an error, one line per skipped row, nothing written.
    out.unlink()
    bad.write_text(lines[2] + "\n")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1: audio file not found" in err and "no usable rows" in err
    assert not out.exists()
