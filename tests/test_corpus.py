"""The embedded speech corpus: the WordNet sentence list and its cleaning, the espeak-ng voice
table, and a tiny corpus build (audio format, manifests, split by sentence, determinism, resume)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blspkd_jax.demo import corpus, sentences

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make test installs it)"
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("he ran the race in  record time", "He ran the race in record time."),
        ("Did your boss write you up ?", "Did your boss write you up?"),
        (
            "I can't make out the faces in this photograph",
            "I can't make out the faces in this photograph.",
        ),
        ("a well-known actor was here,", "A well-known actor was here."),
        ("the `best' of times was had", None),  # quoted word
        ("he paid 40 dollars for the ticket", None),  # digits
        ("the NATO allies met in the city", None),  # acronym
        ("Dr. Smith will see you now", None),  # abbreviation
        ("the boys' toys were all broken", None),  # plural possessive
        ("he left -- and she stayed at home", None),  # dash
        ("a caf\u00e9 on the corner was open", None),  # not ASCII
        ("go home now", None),  # too short
    ],
)
def test_clean_sentence(raw, expected):
    assert sentences.clean_sentence(raw) == expected


def test_wordnet_examples_and_selection(tmp_path):
    # Four data files in WordNet's format: a licence header line, then synsets with a gloss whose
    # quoted parts are the usage examples.
    lines = {
        "verb": [
            '  1 This software and database is being provided to you, the LICENSEE "quoted"',
            '00001 29 v 01 run 0 000 | move fast; "she runs to the old house every day"; '
            '"he runs home"',
            '00002 29 v 01 walk 0 000 | go on foot; "she walks to the old house every day"',
        ],
        "adv": ['00003 02 r 01 fast 0 000 | quickly; "the dog ran to the house quickly today"'],
        "noun": [
            '00004 05 n 01 house 0 000 | a dwelling; "a big old house on the hill"; '
            '"we live in a big old house"',
            '00005 05 n 01 hut 0 000 | a shack; "She runs to the old house, every day!"',
        ],
        "adj": ['00006 00 a 01 old 0 000 | not young; "an old house"'],
    }
    for pos, data in lines.items():
        (tmp_path / f"data.{pos}").write_text("\n".join(data) + "\n")
    examples = sentences.wordnet_examples(tmp_path)
    assert [e for _, e in examples] == [
        "she runs to the old house every day",
        "he runs home",
        "she walks to the old house every day",
        "the dog ran to the house quickly today",
        "a big old house on the hill",
        "we live in a big old house",
        "She runs to the old house, every day!",
        "an old house",
    ]
    everything = sentences.select_sentences(examples, vocab_size=1000)
    # The short one is dropped, the noun phrase has no clause cue, and the last noun example
    # repeats the first verb example's words.
    assert everything == [
        "She runs to the old house every day.",
        "She walks to the old house every day.",
        "The dog ran to the house quickly today.",
        "We live in a big old house.",
    ]
    # Words ranked by count, ties alphabetically: house 4; old, the, to 3; day, every, she 2; then
    # a, big, dog, in, live, quickly, ran, runs (15th), today, walks, we once each.
    small = sentences.select_sentences(examples, vocab_size=15)
    assert small == ["She runs to the old house every day."]
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        sentences.wordnet_examples(tmp_path / "nowhere")


def test_shipped_sentences():
    text = sentences.SENTENCES_FILE.read_text(encoding="ascii")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    lines = sentences.load_sentences()
    assert 3000 <= len(lines) <= 10000
    assert len({tuple(sentences.words(s)) for s in lines}) == len(lines)
    for s in lines:
        assert sentences.clean_sentence(s) == s
        assert 5 <= len(sentences.words(s)) <= 16
    vocab = {w for s in lines for w in sentences.words(s)}
    assert len(vocab) <= sentences.VOCAB_SIZE


@pytest.mark.skipif(
    not (sentences.WORDNET_DIR / "data.verb").is_file(),
    reason="Debian package wordnet-base not installed",
)
def test_shipped_sentences_regenerate_from_wordnet(tmp_path):
    out = tmp_path / "sentences.txt"
    assert sentences.main(["--out", str(out)]) == 0
    assert out.read_text() == sentences.SENTENCES_FILE.read_text()


def test_variant_table():
    variants = corpus.VARIANTS
    assert len(variants) >= 6
    assert len({(v.voice, v.rate, v.pitch) for v in variants}) == len(variants)
    assert len({v.voice.split("+")[0] for v in variants}) >= 6  # distinct accents
    assert len({v.name for v in variants}) == len(variants)


@needs_espeak
def test_variant_voices_exist():
    espeak = corpus.find_espeak(install=False)
    corpus.check_variants(espeak, corpus.VARIANTS)
    bad = (corpus.Variant("vx", "en-us+nosuchvoice", 150, 50),)
    with pytest.raises(ValueError, match="nosuchvoice"):
        corpus.check_variants(espeak, bad)


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        corpus.find_espeak(install=False)


def test_missing_espeak_is_installed_with_apt_as_root(monkeypatch):
    calls, installed = [], []
    monkeypatch.setattr(corpus.os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        corpus.shutil,
        "which",
        lambda name: f"/usr/bin/{name}" if name == "apt-get" or installed else None,
    )

    def run(cmd, check):
        calls.append(cmd)
        if "install" in cmd:
            installed.append(True)

    monkeypatch.setattr(corpus.subprocess, "run", run)
    assert corpus.find_espeak() == "/usr/bin/espeak-ng"
    assert calls == [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "espeak-ng"]]


def test_plan_splits_by_sentence():
    all_sentences = sentences.load_sentences()
    kw = dict(num_sentences=1000, variants=8, voices_per_sentence=3, heldout_fraction=0.1)
    p = corpus.plan(all_sentences, seed=0, **kw)
    train = {r["text"] for r in p["train"]}
    held = {r["text"] for r in p["eval"]}
    assert len(held) == 100 and len(train) == 900 and not train & held
    assert len(p["train"]) == 2700 and len(p["eval"]) == 300
    assert {r["variant"] for r in p["train"]} == set(range(8))
    assert corpus.plan(all_sentences, seed=0, **kw) == p
    assert corpus.plan(all_sentences, seed=1, **kw) != p
    with pytest.raises(ValueError, match="--voices-per-sentence 9"):
        corpus.plan(all_sentences, seed=0, **{**kw, "voices_per_sentence": 9})


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make test installs it)")
    out = tmp_path_factory.mktemp("corpus")
    kw = dict(num_sentences=12, voices_per_sentence=2, heldout_fraction=0.25, seed=3, workers=2)
    summary = corpus.build_corpus(out, progress=False, **kw)
    return out, summary, kw


def test_tiny_corpus_audio_and_manifests(tiny_corpus):
    out, summary, _ = tiny_corpus
    train, held = _manifest(out / "train.jsonl"), _manifest(out / "eval.jsonl")
    assert len(train) == 9 * 2 and len(held) == 3 * 2
    seconds = 0.0
    for row in train + held:
        assert set(row) == {"id", "audio", "text"}
        assert not Path(row["audio"]).is_absolute()
        info = sf.info(str(out / row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        audio, _ = sf.read(str(out / row["audio"]), dtype="float32")
        assert np.sqrt(np.mean(audio**2)) > 0.01  # speech, not silence
        # espeak-ng at 140..185 words a minute: 1.5 to 5 words a second, plus margins.
        n_words = len(sentences.words(row["text"]))
        assert 0.15 * n_words < info.duration < 0.7 * n_words + 0.5
        seconds += info.duration
    train_texts, held_texts = {r["text"] for r in train}, {r["text"] for r in held}
    assert len(train_texts) == 9 and len(held_texts) == 3
    assert not train_texts & held_texts  # held out in every voice
    for rows in (train, held):
        voices = {}
        for r in rows:
            voices.setdefault(r["text"], set()).add(r["id"].rsplit("-", 1)[1])
        assert all(len(v) == 2 for v in voices.values())
    assert summary["train"]["utterances"] == 18 and summary["eval"]["sentences"] == 3
    total = summary["train"]["hours"] + summary["eval"]["hours"]
    assert total * 3600 == pytest.approx(seconds, rel=1e-6)
    assert (out / "train_sentences.txt").read_text().splitlines() == list(
        dict.fromkeys(r["text"] for r in train)
    )
    assert json.loads((out / "summary.json").read_text()) == summary


def test_tiny_corpus_is_deterministic(tiny_corpus, tmp_path):
    out, _, kw = tiny_corpus
    corpus.build_corpus(tmp_path, progress=False, **kw)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (out / name).read_text()
    for row in _manifest(out / "eval.jsonl"):
        assert (tmp_path / row["audio"]).read_bytes() == (out / row["audio"]).read_bytes()


def test_tiny_corpus_rebuild_is_noop_and_resumes(tiny_corpus, tmp_path):
    out, summary, kw = tiny_corpus
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    wavs = sorted((work / "wavs").glob("*.wav"))
    mtimes = [p.stat().st_mtime_ns for p in wavs]
    corpus.build_corpus(work, progress=False, **kw)
    assert [p.stat().st_mtime_ns for p in wavs] == mtimes
    wavs[0].unlink()
    resumed = corpus.build_corpus(work, progress=False, **kw)
    assert resumed["synthesized"] == 1 and wavs[0].is_file()
    assert (work / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    assert [p.stat().st_mtime_ns for p in wavs[1:]] == mtimes[1:]

    # Another sentence list or voice table would give other audio under the same file names.
    (work / "summary.json").unlink()
    (work / "content_key").write_text("0" * 16)
    with pytest.raises(ValueError, match="other sentences or voices"):
        corpus.build_corpus(work, progress=False, **kw)
