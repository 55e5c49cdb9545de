"""The demo's CTC-pretrained speech encoder: the loss against brute-force path enumeration, greedy
decoding against its definition, and a tiny pretraining run that learns, saves a Whisper directory
the BLSP-KD loaders read, reports bad rows and resumes."""

import itertools
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from blspkd_jax.demo import asr_encoder
from blspkd_jax.models import hf


def _collapse(path):
    out = []
    for k, s in enumerate(path):
        if s != 0 and (k == 0 or s != path[k - 1]):
            out.append(s)
    return out


def test_ctc_loss_equals_sum_over_alignments():
    """-log sum over every frame path that collapses to the target, divided by target symbols."""
    rng = np.random.default_rng(0)
    T, K = 5, 3
    logits = rng.normal(size=(2, T, K)).astype(np.float32)
    frame_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
    labels = np.array([[1, 1, 2], [2, 0, 0]], np.int32)  # a repeat needs a blank between
    label_mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
    got = float(asr_encoder.ctc_loss(logits, frame_mask, labels, label_mask))
    logp = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float64)
    nll = 0.0
    for b in range(2):
        t_len, target = int(frame_mask[b].sum()), list(labels[b][label_mask[b]])
        total = sum(
            np.exp(sum(logp[b, t, s] for t, s in enumerate(path)))
            for path in itertools.product(range(K), repeat=t_len)
            if _collapse(path) == target
        )
        nll -= np.log(total)
    np.testing.assert_allclose(got, nll / label_mask.sum(), rtol=1e-5)


def test_greedy_ctc_merges_repeats_then_drops_blanks():
    assert asr_encoder.greedy_ctc([0, 3, 3, 0, 3, 1, 1, 0, 0, 2]) == [3, 3, 1, 2]
    assert asr_encoder.greedy_ctc([0, 0]) == []


def test_character_labels_round_trip():
    labels = asr_encoder.Labels()
    ids = labels.encode("He's  here, NOW!")
    assert min(ids) >= 1 and max(ids) < labels.size
    assert labels.decode(ids) == "he's here now"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make test installs it)")
    from blspkd_jax.demo.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus(
        out, num_sentences=8, voices_per_sentence=1, heldout_fraction=0.25, seed=1, progress=False
    )
    return out


def test_pretraining_learns_saves_and_resumes(corpus, tmp_path):
    train = tmp_path / "train.jsonl"
    rows = corpus.joinpath("train.jsonl").read_text().splitlines()
    bad = json.dumps({"audio": "missing.wav", "text": "no such file"})
    train.write_text(
        "\n".join(
            [
                *(
                    json.dumps({**json.loads(r), "audio": str(corpus / json.loads(r)["audio"])})
                    for r in rows
                ),
                bad,
                "{not json",
            ]
        )
        + "\n"
    )
    cfg = asr_encoder.AsrEncoderConfig(
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        steps=60,
        batch_size=4,
        learning_rate=5e-3,
        warmup_steps=5,
    )
    out = tmp_path / "enc"
    summary = asr_encoder.pretrain_encoder(train, out, cfg=cfg, progress=False)
    assert summary["train_utterances"] == len(rows)
    reasons = summary["skipped"]
    assert len(reasons) == 2 and any("missing.wav" in r for r in reasons)
    assert all(r.startswith(f"{train}:") for r in reasons)
    first, last = summary["history"][0]["loss"], summary["final_loss"]
    assert last < 0.5 * first, (first, last)

    # The saved directory is a Whisper encoder that the BLSP-KD loaders read.
    module, params = hf.load_whisper_encoder(out, pad_to_30s=False)
    assert module.config.d_model == 32 and module.config.num_mel_bins == cfg.n_mels
    mel = jnp.asarray(np.random.default_rng(0).normal(size=(1, cfg.n_mels, 60)), jnp.float32)
    h = module.apply({"params": params}, mel)
    assert h.shape == (1, 30, 32) and bool(jnp.isfinite(h).all())
    # A second call finds the summary and trains nothing.
    again = asr_encoder.pretrain_encoder(train, out, cfg=cfg, progress=False)
    assert again["final_loss"] == last
    assert not (tmp_path / "enc.tmp").exists()


def test_refuses_a_foreign_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an asr_encoder output"):
        asr_encoder.pretrain_encoder(tmp_path / "m.jsonl", tmp_path / "out")
