"""Streaming speech input: each piece equals its offline counterpart (the causal log-mel bit for
bit, the encoder chunk by chunk, CIF's threshold rule frame by frame), chunk-causal attention is
causal, and a stream of a trained chunk-causal run generates the same token ids as offline
inference under the same rule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import build_tiny_run

from blspkd_jax.data.features import StreamingLogMel, log_mel
from blspkd_jax.data.manifest import read_rows
from blspkd_jax.inference import stream as stream_lib
from blspkd_jax.inference.respond import (
    build_prompts,
    generate_from_prompts,
    load_features,
    speech_responses,
    speech_vectors,
    stop_ids_for,
)
from blspkd_jax.inference.workdir import load_run
from blspkd_jax.models.adapter import CFormer, CFormerConfig
from blspkd_jax.models.cif import StreamingCIF, cif
from blspkd_jax.models.encoder import (
    WhisperEncoder,
    WhisperEncoderChunk,
    WhisperEncoderConfig,
    chunk_mel_frames,
)

MAX_NEW = 6


def _pieces(x, rng):
    """`x` cut at random places (pieces of 1 sample to 0.3 s, as a microphone delivers)."""
    out, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 4800))
        out.append(x[i : i + n])
        i += n
    return out


def test_streaming_log_mel_equals_the_causal_log_mel_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000 * 3) * np.linspace(0.01, 1, 48000)).astype(np.float32)
    s = StreamingLogMel(80)
    got = np.concatenate([s.push(p) for p in _pieces(x, rng)] + [s.finish()], axis=1)
    np.testing.assert_array_equal(got, log_mel(x, 80, causal=True))
    # The causal clamp differs from the offline one only where a frame is more than 80 dB below
    # the loudest frame of the whole utterance but not below the loudest so far.
    off = log_mel(x, 80)
    assert off.shape == got.shape and np.allclose(off[:, -100:], got[:, -100:])


def _encoder_config(scan, chunk=4):
    return WhisperEncoderConfig(
        num_mel_bins=8, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        encoder_ffn_dim=32, max_source_positions=40, pad_to_30s=False, chunk_frames=chunk,
        scan_layers=scan,
    )  # fmt: skip


@pytest.mark.parametrize("scan", [False, True])
# The last chunk partly past the end of the audio; whole; and past the position table (6 does not
# divide max_source_positions=40, and 79 mel frames fill all 40 encoder frames).
@pytest.mark.parametrize("chunk,F", [(4, 37), (4, 40), (6, 79)])
def test_encoder_chunks_equal_the_chunk_causal_encoder(scan, chunk, F):
    c = _encoder_config(scan, chunk)
    K, L = c.chunk_frames, c.encoder_layers
    S = -(-c.max_source_positions // K) * K
    mel = np.random.default_rng(0).standard_normal((1, 8, F)).astype(np.float32)
    enc = WhisperEncoder(c)
    params = jax.jit(enc.init)(jax.random.key(0), jnp.zeros((1, 8, F)), jnp.ones((1, F), bool))[
        "params"
    ]
    full = jax.jit(enc.apply)({"params": params}, mel, np.ones((1, F), bool))
    chunk_step = jax.jit(WhisperEncoderChunk(c).apply)  # one program for every chunk
    E = (F + 1) // 2
    cache = jnp.zeros((L, 1, S, 2, 8))
    keys, values, seen = cache, cache, jnp.zeros((1, S), bool)
    outs = []
    for s in range(0, E, K):
        idx = np.arange(2 * s - 2, 2 * s - 2 + chunk_mel_frames(K))
        ok = (idx >= 0) & (idx < F)
        window = np.where(ok, mel[:, :, np.clip(idx, 0, F - 1)], 0)
        h, (k, v) = chunk_step(
            {"params": params}, window, ok[None], jnp.int32(s), (keys, values), seen
        )
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k, s, axis=2)
        values = jax.lax.dynamic_update_slice_in_dim(values, v, s, axis=2)
        seen = seen.at[:, s : s + K].set(ok[2:-1:2])
        outs.append(h)
    np.testing.assert_allclose(np.concatenate(outs, 1)[:, :E], full, atol=2e-6)


def test_chunk_causal_encoder_and_cformer_do_not_look_ahead():
    c = _encoder_config(False)
    F = 40
    mel = np.random.default_rng(0).standard_normal((1, 8, F)).astype(np.float32)
    enc = WhisperEncoder(c)
    params = jax.jit(enc.init)(jax.random.key(0), jnp.zeros((1, 8, F)), jnp.ones((1, F), bool))[
        "params"
    ]
    later = mel.copy()
    later[:, :, 30:] += 3.0  # mel frame 30 is first read by encoder frame 14, in chunk 3
    apply = jax.jit(enc.apply)
    a, b = (apply({"params": params}, m, np.ones((1, F), bool)) for m in (mel, later))
    diff = np.abs(np.asarray(a - b))[0].max(-1)
    assert np.all(diff[:12] == 0) and np.all(diff[12:] > 0)
    # Full attention (chunk_frames=0) lets every frame see the change.
    full = WhisperEncoder(dataclasses.replace(c, chunk_frames=0))
    apply = jax.jit(full.apply)
    a, b = (apply({"params": params}, m, np.ones((1, F), bool)) for m in (mel, later))
    assert np.all(np.abs(np.asarray(a - b))[0].max(-1) > 0)

    ac = CFormerConfig(
        d_model=16, num_heads=2, ffn_dim=32, n_pre=1, n_post=1, llm_hidden=12, max_tokens=16,
        chunk_frames=4, firing="threshold",
    )  # fmt: skip
    h = np.random.default_rng(1).standard_normal((1, 20, 16)).astype(np.float32)
    cf = CFormer(ac)
    p = jax.jit(cf.init)(jax.random.key(0), h)["params"]
    h2 = h.copy()
    h2[:, 16:] += 3.0  # the last chunk
    apply = jax.jit(cf.apply)
    (y1, m1, a1), (y2, m2, a2) = (apply({"params": p}, x) for x in (h, h2))
    np.testing.assert_array_equal(a1["alphas"][:, :16], a2["alphas"][:, :16])
    # Tokens that fired before frame 16 are the same (causal post-CIF layers).
    fired = int(np.floor(np.cumsum(a1["alphas"][0])[15]))
    assert fired >= 2
    np.testing.assert_array_equal(y1[:, :fired], y2[:, :fired])


@pytest.mark.parametrize("method", ["segment", "dense", "scan"])
def test_streaming_cif_equals_threshold_firing(method):
    rng = np.random.default_rng(1)
    for T in (3, 50, 133):
        a = rng.uniform(0, 0.6, (1, T)).astype(np.float32)
        x = rng.standard_normal((1, T, 5)).astype(np.float32)
        tokens, mask = jax.jit(
            lambda x, a: cif(x, a, None, max_tokens=80, firing="threshold", method=method)
        )(x, a)
        n = int(mask.sum())
        total = float(a.sum())
        want = int(np.floor(total)) + (total % 1 >= 0.5 or total < 1)
        assert n == want
        s = StreamingCIF(5)
        got = np.concatenate([s.push(x[0, i : i + 4], a[0, i : i + 4]) for i in range(0, T, 4)])
        got = np.concatenate([got, s.finish()])
        np.testing.assert_allclose(got, np.asarray(tokens[0, :n]), atol=2e-6)
        assert len(s.fire_frames) == int(np.floor(total))
    # A tail below half a token is dropped; nothing fired at all keeps it.
    a = np.asarray([[0.6, 0.6, 0.2]], np.float32)
    assert int(cif(np.ones((1, 3, 2)), a, None, max_tokens=4, firing="threshold")[1].sum()) == 1
    a = np.asarray([[0.1, 0.1]], np.float32)
    assert int(cif(np.ones((1, 2, 2)), a, None, max_tokens=4, firing="threshold")[1].sum()) == 1


@pytest.fixture(scope="module")
def chunk_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk_run")
    overrides = (
        "--config.model.encoder.chunk_frames=4",
        "--config.model.encoder.pad_to_30s=false",
        "--config.model.adapter.max_tokens=64",
    )
    workdir, assets, _ = build_tiny_run(root, overrides)
    return load_run(workdir), assets


def test_stream_equals_offline_under_the_stream_rule(chunk_run):
    run, assets = chunk_run
    rows = read_rows(assets / "eval.jsonl")
    streamer = stream_lib.Streamer(run, max_new_tokens=MAX_NEW)
    rng = np.random.default_rng(0)
    from blspkd_jax.data import audio as audio_lib

    stops = stop_ids_for(run, [None])
    for r in rows[:3]:
        wave = audio_lib.load(r.audio)
        session = streamer.session()
        fired_early = 0
        for piece in _pieces(wave, rng):
            fired_early = session.push(piece)
        n = session.finish()
        ids = list(session.response_ids())
        assert 0 < fired_early <= n
        # Offline, the same rule: as many vectors, the same generated ids.
        feats, mask = load_features(run, [r], rule="stream")
        vectors, counts = speech_vectors(run, feats, mask, rule="stream")
        assert int(counts[0]) == n
        prompts = build_prompts(run.layout, [n])
        new = generate_from_prompts(run, prompts, vectors, max_new_tokens=MAX_NEW, stop_ids=stops)
        want = [int(t) for t in new[0]]
        cut = next((k for k, t in enumerate(want) if t in stops), len(want))
        assert ids == want[:cut], (ids, want)
        assert len(session.fire_frames) == n and session.timing.end_to_first_token_s > 0
    texts = speech_responses(run, rows[:3], rule="stream", max_new_tokens=MAX_NEW, progress=False)
    assert len(texts) == 3


def test_a_full_attention_run_cannot_stream(tiny_run):
    run = load_run(tiny_run[0])
    with pytest.raises(stream_lib.StreamError, match="chunk_frames=0"):
        stream_lib.Streamer(run)


def test_generate_cli_stream_equals_the_stream_rule(chunk_run, tmp_path):
    import json

    from blspkd_jax.generate import main

    run, assets = chunk_run
    outs = {}
    for name, flags in (
        ("stream", ["--stream", "--chunk-ms", "70"]),
        ("rule", ["--rule", "stream"]),
    ):
        out = tmp_path / f"{name}.jsonl"
        argv = ["speech", "--workdir", str(run.workdir), "--manifest", str(assets / "eval.jsonl")]
        assert main([*argv, "--out", str(out), "--max-new-tokens", str(MAX_NEW), *flags]) == 0
        outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in outs["stream"]] == [r["response"] for r in outs["rule"]]
    assert all(r["first_token_s"] > 0 for r in outs["stream"])
    # --stream with --rule offline is a usage error.
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "x.jsonl"), "--stream", "--rule", "offline"])


def test_web_demo_answers_an_uploaded_wav_in_a_browser(chunk_run, tmp_path):
    from _browser import answer, browser, serve

    run, assets = chunk_run
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF this is not audio at all")
    want = None
    with serve(run.workdir, "--max-new-tokens", str(MAX_NEW)) as url, browser() as driver:
        response, timing = answer(driver, url, assets / "audio" / "u1.wav")
        assert "streaming" in timing and "first response token" in timing, timing
        message, _ = answer(driver, url, bad)
    assert message.startswith("Could not read the audio"), message
    # The page shows what the streaming path answers (its first instruction: the demo's repeat).
    from blspkd_jax.data import audio as audio_lib
    from blspkd_jax.inference.web import INSTRUCTIONS

    session = stream_lib.Streamer(run, max_new_tokens=MAX_NEW).session(INSTRUCTIONS[0])
    session.push(audio_lib.load(assets / "audio" / "u1.wav"))
    session.finish()
    want = run.tokenizer.decode(list(session.response_ids()), skip_special_tokens=True).strip()
    assert response == want


def test_export_refuses_a_chunk_causal_run(chunk_run):
    from blspkd_jax.models.blspkd_hf import ExportError, hf_config

    with pytest.raises(ExportError, match="chunk_frames=4"):
        hf_config(chunk_run[0].model.config)


def test_web_answerer_offline_for_a_full_attention_run_and_messages_for_bad_audio(
    tiny_run, tmp_path
):
    from blspkd_jax.inference.respond import speech_responses
    from blspkd_jax.inference.web import Answerer

    run = load_run(tiny_run[0])
    answerer = Answerer(run, max_new_tokens=MAX_NEW, out_dir=str(tmp_path))
    assert answerer.mode == "offline"
    row = read_rows(tiny_run[1] / "eval.jsonl")[0]
    *_, (text, figure, timing) = answerer.answer(str(tiny_run[1] / row.audio), None)
    assert "offline" in timing and figure.endswith(".png")
    want = speech_responses(run, [row], max_new_tokens=MAX_NEW, batch_size=1, progress=False)
    assert text == want[0]
    assert next(answerer.answer(None, None))[0].startswith("No audio")
    assert next(answerer.answer_wave(np.zeros(100, np.float32), None))[0].startswith("The audio is")
    long = np.zeros(16000 * 31, np.float32)
    assert "longer than" in next(answerer.answer_wave(long, None))[0]
