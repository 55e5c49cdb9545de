"""Loading a trained workdir and generating from its speech: a tiny run trained in-process (shared
with test_evaluate through `tiny_run`) is reloaded exactly, its speech prompts follow the training
layout, the CLI writes one row per input, and a transcript spliced into a speech prompt with PLoRA
off gives the text prompt's output."""

import functools
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from test_layout import SENTENCES, tiny_chat_tokenizer
from tiny import tiny_llm_config

from blspkd_jax import config as config_lib
from blspkd_jax import hf, optim
from blspkd_jax.data.layout import text_ids
from blspkd_jax.generate import (
    build_prompts,
    decode_response,
    generate_from_prompts,
    main,
    read_rows,
    speech_responses,
    speech_vectors,
    stop_ids_for,
    text_responses,
)
from blspkd_jax.llm import LLM
from blspkd_jax.model import BLSPKD
from blspkd_jax.workdir import RunError, load_run

REPO = Path(__file__).parent.parent
MAX_NEW = 6
_CACHE: dict = {}

OVERRIDES = [
    "--config.total_steps=2",
    "--config.batch_size=4",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1",
    "--config.peak_tflops_per_device=1.0",
    "--config.data.worker_count=0",
    "--config.data.frame_buckets=(160,)",
    "--config.data.token_buckets=(48,)",
    "--config.data.max_seconds=1.5",
    "--config.data.max_text_tokens=24",
    "--config.model.encoder.d_model=32",
    "--config.model.encoder.encoder_layers=1",
    "--config.model.encoder.encoder_attention_heads=2",
    "--config.model.encoder.encoder_ffn_dim=64",
    "--config.model.encoder.max_source_positions=80",
    "--config.model.adapter.n_pre=1",
    "--config.model.adapter.n_post=1",
    "--config.model.adapter.max_tokens=24",
    "--config.model.llm.lora_rank=4",
    "--config.optim.warmup_steps=1",
    # The encoder stays frozen: its weights come back from the seed alone, which load_run must
    # reproduce; the adapter and PLoRA train.
    "--config.train.trainable=('^adapter/', 'lora_')",
]


def _write_audio(path, seconds, rate, rs):
    """Noise with a slow envelope (not silence, so the log-mel has structure); some rows at 8 kHz
    stereo, which the loader resamples and averages."""
    n = int(seconds * rate)
    env = 0.2 + 0.8 * np.abs(np.sin(np.linspace(0, 6, n)))
    x = (0.1 * rs.randn(n) * env).astype(np.float32)
    sf.write(path, np.stack([x, -x], 1) if rate != 16000 else x, rate)


def tiny_run(tmp_path_factory):
    """(workdir, assets dir, the trainer's final params): a 2-step run with PLoRA, a random tiny
    LLM saved as an HF directory with a ChatML tokenizer, and noise audio with real transcripts.
    Built once per session (test_evaluate imports it)."""
    if "run" in _CACHE:
        return _CACHE["run"]
    from blspkd_jax.train import Trainer

    root = tmp_path_factory.mktemp("tiny_run")
    tok = tiny_chat_tokenizer(root / "llm")
    cfg = tiny_llm_config(len(tok), num_layers=1, tie_word_embeddings=True)
    params = LLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    # O(1) logits with clear margins (not init's near-uniform ones), so that greedy responses
    # are words that depend on the prompt, not a tie broken by rounding.
    rs = np.random.RandomState(1)
    params = {
        k: (1 + 0.2 * rs.randn(*v.shape))
        if k.endswith("scale")
        else (rs.randn(*v.shape) if "embed" in k else 0.3 * rs.randn(*v.shape))
        for k, v in optim.flatten(nn.unbox(params)).items()
    }
    hf.save_llm(
        root / "llm", cfg, optim.unflatten({k: v.astype(np.float32) for k, v in params.items()})
    )

    rs = np.random.RandomState(0)
    (root / "audio").mkdir()
    rows = []
    for i in range(8):
        rate = 8000 if i % 3 == 2 else 16000
        _write_audio(root / "audio" / f"u{i}.wav", 0.5 + 0.12 * i, rate, rs)
        row = {"audio": f"audio/u{i}.wav", "text": SENTENCES[i % len(SENTENCES)], "id": f"u{i}"}
        if i % 2:
            row["response"] = SENTENCES[(i + 1) % len(SENTENCES)]
        row["reference"] = SENTENCES[(i + 2) % len(SENTENCES)]
        rows.append(row)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))

    config = config_lib.load_config(str(REPO / "configs/tiny.py"))
    config_lib.apply_overrides(
        config,
        [
            *OVERRIDES,
            f"--config.data.train_manifest={root / 'train.jsonl'}",
            f"--config.model.llm.hf_path={root / 'llm'}",
        ],
    )
    trainer = Trainer(config, root / "workdir")
    trainer.run()
    final = jax.tree.map(np.asarray, trainer.state.params())
    _CACHE["run"] = (root / "workdir", root, final)
    return _CACHE["run"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory)


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
    from blspkd_jax import checkpoint, train_state

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
    assert [decode_response(run.tokenizer, t, stops) for t in from_text] == text_responses(
        run, rows, max_new_tokens=MAX_NEW, batch_size=4, progress=False
    )

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
    from blspkd_jax.generate import load_features

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


def test_speech_cli_reports_bad_rows(run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "text": "hi"}\n{not json\n')
    rc = main(["speech", f"--workdir={run.workdir}", f"--manifest={bad}", f"--out={tmp_path}/o"])
    assert rc == 1 and f"{bad}:2: malformed JSON" in capsys.readouterr().err
    bad.write_text('{"audio": "x.wav", "text": "hi"}\n')
    rc = main(["speech", f"--workdir={run.workdir}", f"--manifest={bad}", f"--out={tmp_path}/o"])
    err = capsys.readouterr().err
    assert rc == 1 and "line 1" in err and "x.wav" in err and "not found" in err
    assert not (tmp_path / "o").exists()
