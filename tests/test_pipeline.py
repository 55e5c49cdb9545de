"""The grain pipeline: Whisper-equal features, static buckets, exact resumption, disjoint process
slices, and bad rows skipped (or fatal in strict mode)."""

import dataclasses
import itertools
import json
import re

import grain
import librosa
import numpy as np
import pytest
from test_manifest import BAD_KINDS, write_bad_kinds, write_wav
from tiny import REPO, tiny_chat_tokenizer
from transformers import WhisperFeatureExtractor

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import index as index_lib
from blspkd_jax.data import peek
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.data.manifest import DataError, read_manifest
from blspkd_jax.data.pipeline import (
    BATCH_KEYS,
    DataConfig,
    DataPipeline,
    eval_pipeline,
    train_pipeline,
)
from blspkd_jax.data.sources import parse_sources

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # librosa -> audioread

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
    "hello",
    "world",
    "how",
    "are",
    "you",
    "today",
    "a",
    "quick",
    "brown",
    "fox",
]
CFG = DataConfig(
    batch_size_per_process=2,
    frame_buckets=(60, 120, 200),
    token_buckets=(16, 24, 40),
    min_seconds=0.1,
    max_seconds=2.0,
    max_text_tokens=12,
    worker_count=0,
    probe_threads=2,
    system_prompt="",  # no system turn: keeps the tiny sequences inside tiny buckets
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_chat_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """15 good rows of 0.15-1.95 s, 1-8 words, some with responses; one stereo 44.1 kHz."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(15):
        seconds = float(rng.uniform(0.15, 1.95))
        stereo = i == 3
        write_wav(d / f"u{i}.wav", seconds, 44100 if stereo else 16000, 2 if stereo else 1, i)
        row = {"audio": f"u{i}.wav", "text": " ".join(rng.choice(WORDS, int(rng.integers(1, 8))))}
        if i % 3:
            row["response"] = " ".join(rng.choice(WORDS, int(rng.integers(0, 8))))
        lines.append(json.dumps(row))
    path = d / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(manifest, **kw):
    return dataclasses.replace(CFG, train_manifest=str(manifest), eval_manifest=str(manifest), **kw)


def _epoch(pipeline, n=None):
    it = iter(pipeline)
    out = list(itertools.islice(it, n if n is not None else pipeline.batches_per_epoch))
    it.close()
    return out


def _lines(batches):
    return [int(x) for b in batches for x in b["line"][b["example_mask"]]]


def test_features_equal_whisper_feature_extractor(corpus, tok):
    p = eval_pipeline(_cfg(corpus), tok, process_index=0, process_count=1)
    rows = {r.line: r for r in read_manifest(corpus)[0]}
    fe = WhisperFeatureExtractor(feature_size=80)
    checked = 0
    for b in _epoch(p):
        frames = b["features"].shape[-1]
        for i in np.flatnonzero(b["example_mask"]):
            wave, _ = librosa.load(rows[b["line"][i]].audio, sr=16000, mono=True)
            ref = fe(wave, sampling_rate=16000, padding="longest", return_tensors="np")
            ref = ref["input_features"][0]
            t = ref.shape[-1]
            assert b["feature_mask"][i].sum() == t
            np.testing.assert_allclose(b["features"][i, :, :t], ref, atol=1e-4, rtol=0)
            # Pad frames equal Whisper's own zero padding, except the few frames whose 400-sample
            # STFT window straddles the end of the audio (frames t-1 .. t+2).
            pad = fe(wave, sampling_rate=16000, padding="max_length", max_length=frames * 160)
            pad = pad["input_features"][0]
            np.testing.assert_allclose(b["features"][i, :, t + 3 :], pad[:, t + 3 :], atol=1e-4)
            np.testing.assert_allclose(b["features"][i, :, : t - 2], pad[:, : t - 2], atol=1e-4)
            checked += 1
    assert checked == len(rows)


def test_bucket_shapes_are_the_configured_ones(corpus, tok):
    p = eval_pipeline(_cfg(corpus), tok, process_index=0, process_count=1)
    fb, tb = CFG.frame_buckets, CFG.token_buckets
    assert len(p.shapes) >= 3, "the corpus should exercise several buckets"
    seen = set()
    for b in _epoch(p):
        assert sorted(b) == sorted(BATCH_KEYS)
        bsz, n_mels, frames = b["features"].shape
        length = b["input_ids"].shape[1]
        assert (bsz, n_mels) == (2, 80) and frames in fb and length in tb
        seen.add((frames, length))
        for k, dt in [("features", np.float32), ("input_ids", np.int32), ("line", np.int32)]:
            assert b[k].dtype == dt
        for k in ("feature_mask", "attention_mask", "speech_mask", "response_mask"):
            assert b[k].dtype == bool
        real = b["example_mask"]
        t = b["feature_mask"].sum(-1)[real]
        n = b["attention_mask"].sum(-1)[real]
        # Each row sits in the smallest bucket that holds it.
        assert np.all(t <= frames) and np.all(t > ([0, *fb][fb.index(frames)]))
        assert np.all(n <= length) and np.all(n > ([0, *tb][tb.index(length)]))
        np.testing.assert_array_equal(b["text_lengths"], b["speech_mask"].sum(-1))
        assert not b["attention_mask"][~real].any() and np.all(b["line"][~real] == -1)
    assert seen == set(p.shapes)
    assert sorted(_lines(_epoch(p))) == list(range(1, 16))


def test_order_is_seeded_and_each_epoch_covers_every_row(corpus, tok):
    p = train_pipeline(_cfg(corpus), tok, process_index=0, process_count=1)
    n = p.batches_per_epoch
    batches = _epoch(p, 2 * n)
    e0, e1 = _lines(batches[:n]), _lines(batches[n:])
    assert sorted(e0) == sorted(e1) == list(range(1, 16)) and e0 != e1
    again = _lines(_epoch(train_pipeline(_cfg(corpus), tok, process_index=0, process_count=1), n))
    other = _lines(
        _epoch(train_pipeline(_cfg(corpus, seed=1), tok, process_index=0, process_count=1), n)
    )
    assert again == e0 and other != e0


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_restored_iterator_yields_identical_batches(corpus, tok, tmp_path):
    p = train_pipeline(_cfg(corpus), tok, process_index=0, process_count=1)
    it = iter(p)
    k = p.batches_per_epoch - 2  # the continuation crosses into the next epoch
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)  # orbax's grain handler
    expected = [next(it) for _ in range(4)]
    it.close()
    fresh = iter(train_pipeline(_cfg(corpus), tok, process_index=0, process_count=1))
    fresh.set_state(state)
    _assert_same([next(fresh) for _ in range(4)], expected)
    restored = grain.checkpoint.CheckpointHandler().restore(tmp_path, item=iter(p))
    _assert_same([next(restored) for _ in range(4)], expected)


def test_process_slices_are_disjoint_and_cover(corpus, tok):
    for make in (eval_pipeline, train_pipeline):
        parts = [make(_cfg(corpus), tok, process_index=i, process_count=2) for i in (0, 1)]
        assert parts[0].batches_per_epoch == parts[1].batches_per_epoch
        epochs = [_epoch(p) for p in parts]
        for b0, b1 in zip(*epochs, strict=True):  # every step: one bucket for all processes
            assert b0["features"].shape == b1["features"].shape
            assert b0["input_ids"].shape == b1["input_ids"].shape
        lines = [_lines(e) for e in epochs]
        assert not set(lines[0]) & set(lines[1])
        assert sorted(lines[0] + lines[1]) == list(range(1, 16))


def test_worker_processes_match_in_process_decoding(corpus, tok):
    cfg = _cfg(corpus, worker_count=2)
    serial = _epoch(train_pipeline(_cfg(corpus), tok, process_index=0, process_count=1), 6)
    p = train_pipeline(cfg, tok, process_index=0, process_count=1)
    it = iter(p)
    parallel = [next(it) for _ in range(3)]
    state = it.get_state()
    parallel += [next(it) for _ in range(3)]
    it.close()
    _assert_same(parallel, serial)
    # The state does not depend on the worker count: restore a parallel state in-process.
    inproc = iter(train_pipeline(_cfg(corpus), tok, process_index=0, process_count=1))
    inproc.set_state(state)
    _assert_same([next(inproc) for _ in range(3)], serial[3:])


def _mixed_manifest(d, corpus, kinds):
    good = corpus.read_text().splitlines()[:4]
    for i in range(4):
        (d / f"u{i}.wav").write_bytes((corpus.parent / f"u{i}.wav").read_bytes())
    lines, expect = list(good), {}
    for line, reason, phase in kinds.values():
        lines.append(line)
        expect[len(lines)] = (reason, phase)
    path = d / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, expect


def test_bad_rows_are_skipped_counted_and_logged(corpus, tok, tmp_path):
    kinds = write_bad_kinds(tmp_path)
    path, expect = _mixed_manifest(tmp_path, corpus, kinds)
    work = tmp_path / "work"
    cfg = _cfg(path)
    p = eval_pipeline(cfg, tok, workdir=str(work), process_index=0, process_count=1)
    logged = [json.loads(x) for x in (work / "skipped.jsonl").read_text().splitlines()]
    index_phase = {k for k, (_, phase) in expect.items() if phase == "index"}
    assert {r["line"] for r in logged} == index_phase and len(p.bad_rows) == len(index_phase)
    for r in logged:
        assert sorted(r) == ["file", "line", "manifest", "reason"] and r["manifest"] == str(path)
        assert expect[r["line"]][0] in r["reason"]
    it = iter(p)
    batches = list(it)  # training goes on past the rows that fail to decode
    assert it.dropped_at_decode == 2
    assert sorted(_lines(batches)) == [1, 2, 3, 4]
    logged = [json.loads(x) for x in (work / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in logged) == sorted(expect)
    for r in logged:
        assert expect[r["line"]][0] in r["reason"]
    # A restart logs nothing twice.
    list(eval_pipeline(cfg, tok, workdir=str(work), process_index=0, process_count=1))
    assert len((work / "skipped.jsonl").read_text().splitlines()) == len(expect)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_strict_fails_at_first_bad_row(corpus, tok, tmp_path, kind):
    kinds = write_bad_kinds(tmp_path)
    _, reason, phase = kinds[kind]
    path, _ = _mixed_manifest(tmp_path, corpus, {kind: kinds[kind]})
    cfg = _cfg(path, strict=True)
    if phase == "index":
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}:5: .*{re.escape(reason)}"):
            DataPipeline(cfg, tok, str(path), train=False, process_index=0, process_count=1)
    else:
        p = DataPipeline(cfg, tok, str(path), train=False, process_index=0, process_count=1)
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}:5: .*{re.escape(reason)}"):
            list(p)


def test_config_errors_name_the_key(corpus, tok):
    for kw, key in [
        ({"frame_buckets": (61, 120)}, "data.frame_buckets"),
        ({"token_buckets": (40, 16)}, "data.token_buckets"),
        ({"max_seconds": 3.0}, "data.max_seconds=3.0"),
        ({"min_seconds": 0.0}, "data.min_seconds"),
    ]:
        with pytest.raises(ValueError, match=key):
            eval_pipeline(_cfg(corpus, **kw), tok, process_index=0, process_count=1)


# ----------------------------------------------------------------------------------------------
# Mixtures: data.train_manifest=PATH:WEIGHT,...


def test_source_specs_parse_and_bad_ones_name_the_key():
    got = parse_sources(
        "a/train.jsonl:3, gs://b/c/asr.jsonl:0.5,gs://b/d/other.jsonl,x/train.jsonl"
    )
    assert [(s.name, s.path, s.weight) for s in got] == [
        ("train", "a/train.jsonl", 3.0),
        ("asr", "gs://b/c/asr.jsonl", 0.5),
        ("other", "gs://b/d/other.jsonl", 1.0),
        ("x/train.jsonl", "x/train.jsonl", 1.0),  # a second "train": named by its path
    ]
    for spec, message in [
        ("a.jsonl:0", "'a.jsonl:0': the weight must be a positive number"),
        ("a.jsonl:-2", "the weight must be a positive number"),
        ("a.jsonl,,b.jsonl", "an empty entry"),
        ("", "is empty"),
        ("a.jsonl,a.jsonl", "a.jsonl is named twice"),
    ]:
        with pytest.raises(ValueError, match=f"^data.eval_manifest.*{re.escape(message)}"):
            parse_sources(spec, "data.eval_manifest")


@pytest.fixture(scope="module")
def two_sources(corpus, tmp_path_factory):
    """The corpus split in two manifests beside it: rows 1-10 in big.jsonl, 11-15 in small.jsonl."""
    lines = corpus.read_text().splitlines()
    d = corpus.parent
    (d / "big.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (d / "small.jsonl").write_text("\n".join(lines[10:]) + "\n")
    return d / "big.jsonl", d / "small.jsonl"


def _drawn(batches):
    """(source, line) of every real example, in order."""
    return [
        (int(s), int(x))
        for b in batches
        for s, x in zip(b["source"][b["example_mask"]], b["line"][b["example_mask"]], strict=True)
    ]


def test_a_mixture_draws_each_source_by_weight(two_sources, tok):
    big, small = two_sources
    spec = f"{big}:1,{small}:3"  # 10 and 5 rows; the small one 3x as often
    p = train_pipeline(_cfg(spec), tok, process_index=0, process_count=1)
    assert p.source_names == ["big", "small"] and p.plan.mixed
    # The plan against the formula: an epoch draws about R = 15 rows; source i's rows up to
    # epoch e are floor(e * q_i), q = 15 * (1/4, 3/4) = (3.75, 11.25).
    epochs = 8
    for i, q in enumerate((3.75, 11.25)):
        drawn = sum(int((p.index.source_ids[p.plan.draw(e)] == i).sum()) for e in range(epochs))
        assert drawn == int(np.floor(epochs * q))
    # A source's rows are drawn in passes: each of its rows once before any twice.
    small_rows = np.concatenate([p.plan.draw(e) for e in range(epochs)])
    small_rows = small_rows[p.index.source_ids[small_rows] == 1]
    for s in range(0, len(small_rows) - 5, 5):
        assert sorted(small_rows[s : s + 5]) == sorted(np.flatnonzero(p.index.source_ids == 1))
    # The batches: every example carries its source, its line is a line of that source, and
    # the iterator's per-source counts equal the batches'.
    it = iter(p)
    n = sum(p.plan._count(e) for e in range(epochs))
    batches = [next(it) for _ in range(n)]
    drawn = _drawn(batches)
    assert {x for s, x in drawn if s == 0} == set(range(1, 11))
    assert {x for s, x in drawn if s == 1} == set(range(1, 6))
    counts = it.examples_per_source
    assert counts == {"big": sum(s == 0 for s, _ in drawn), "small": sum(s == 1 for s, _ in drawn)}
    assert counts == {"big": 30, "small": 90}  # floor(8 * 3.75), floor(8 * 11.25)
    it.close()


def test_a_mixture_is_seeded_resumes_exactly_and_splits_over_processes(two_sources, tok):
    big, small = two_sources
    spec = f"{big}:2,{small}:1"
    p = train_pipeline(_cfg(spec), tok, process_index=0, process_count=1)
    it = iter(p)
    k = p.batches_per_epoch + 3  # a resumed stream crosses epochs of different lengths
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(10)]
    it.close()
    again = iter(train_pipeline(_cfg(spec), tok, process_index=0, process_count=1))
    _assert_same([next(again) for _ in range(k + 10)][k:], expected)
    fresh = iter(train_pipeline(_cfg(spec), tok, process_index=0, process_count=1))
    fresh.set_state(state)
    assert fresh.examples_per_source == state["examples_per_source"]
    _assert_same([next(fresh) for _ in range(10)], expected)
    other = iter(train_pipeline(_cfg(spec, seed=1), tok, process_index=0, process_count=1))
    assert _drawn([next(other) for _ in range(k + 10)][k:]) != _drawn(expected)
    # Two processes: one bucket per step, disjoint halves, together the one-process stream.
    one = iter(
        train_pipeline(_cfg(spec, batch_size_per_process=4), tok, process_index=0, process_count=1)
    )
    halves = [
        iter(train_pipeline(_cfg(spec), tok, process_index=i, process_count=2)) for i in (0, 1)
    ]
    for _ in range(12):
        whole, b0, b1 = next(one), next(halves[0]), next(halves[1])
        assert b0["input_ids"].shape == b1["input_ids"].shape == whole["input_ids"][:2].shape
        for key in ("line", "source", "input_ids"):
            np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), whole[key])


def test_an_eval_mixture_reads_every_row_of_every_source_once(two_sources, tok):
    big, small = two_sources
    p = eval_pipeline(_cfg(f"{big}:5,{small}"), tok, process_index=0, process_count=1)
    drawn = _drawn(_epoch(p))
    assert sorted(drawn) == [(0, x) for x in range(1, 11)] + [(1, x) for x in range(1, 6)]


def test_peek_prints_the_batches_training_would_read(two_sources, tok, capsys):
    big, small = two_sources
    spec = f"{big}:1,{small}:3"
    argv = [
        "--config",
        str(REPO / "configs/tiny.py"),
        "--batches",
        "6",
        f"--config.data.train_manifest={spec}",
        f"--config.model.llm.tokenizer_path={tok.name_or_path}",
        "--config.batch_size=2",
        "--config.model.encoder.num_mel_bins=80",
        "--config.data.frame_buckets=(60, 120, 200)",
        "--config.data.token_buckets=(16, 24, 40)",
        "--config.data.max_seconds=2.0",
        "--config.data.max_text_tokens=12",
    ]
    assert peek.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = _epoch(train_pipeline(_cfg(spec), tok, process_index=0, process_count=1), 6)
    assert len(lines) == 6
    for line, b in zip(lines, expected, strict=True):
        assert sorted(line) == ["frames", "ids", "sources", "tokens"]
        assert (line["frames"], line["tokens"]) == (
            b["features"].shape[-1],
            b["input_ids"].shape[-1],
        )
        # Row ids default to the audio as written: big.jsonl's line n is u{n-1}.wav, small's
        # u{n+9}.wav.
        want = [(f"u{x - 1 + 10 * s}.wav", ["big", "small"][s]) for s, x in _drawn([b])]
        assert list(zip(line["ids"], line["sources"], strict=True)) == want
    assert peek.main([*argv, "--config.data.nope=1"]) == 2
    assert "data.nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The index, built once: MANIFEST.index-KEY.npz beside the manifest.


def _indexes(folder, name):
    return sorted(p.name for p in folder.glob(f"{name}.index-*.npz"))


def _same_index(a, b):
    assert a.manifests == b.manifests and a.files == b.files
    for f in ("source_ids", *index_lib._SAVED):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_a_later_start_reads_the_index_instead_of_probing_and_tokenising(
    corpus, tok, tmp_path, monkeypatch
):
    kinds = write_bad_kinds(tmp_path)
    path, expect = _mixed_manifest(tmp_path, corpus, kinds)
    first = eval_pipeline(_cfg(path), tok, process_index=0, process_count=1)
    assert len(_indexes(tmp_path, path.name)) == 1
    monkeypatch.setattr(audio_lib, "probe", lambda *a, **k: pytest.fail("probed an audio file"))
    monkeypatch.setattr(ChatLayout, "lengths", lambda *a, **k: pytest.fail("tokenised a row"))
    second = eval_pipeline(_cfg(path), tok, process_index=0, process_count=1)
    _same_index(second.index, first.index)
    assert second.bad_rows == first.bad_rows and len(first.bad_rows) > 0
    _assert_same(_epoch(second), _epoch(first))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:"):  # strict: from the file too
        eval_pipeline(_cfg(path, strict=True), tok, process_index=0, process_count=1)


def test_the_index_follows_the_manifest_the_tokenizer_and_the_limits(corpus, tok, tmp_path):
    path = tmp_path / "m.jsonl"
    lines = corpus.read_text().splitlines()
    for i in range(15):
        (tmp_path / f"u{i}.wav").write_bytes((corpus.parent / f"u{i}.wav").read_bytes())
    path.write_text("\n".join(lines[:10]) + "\n")
    eval_pipeline(_cfg(path), tok, process_index=0, process_count=1)
    eval_pipeline(_cfg(path, max_text_tokens=3), tok, process_index=0, process_count=1)
    assert len(_indexes(tmp_path, "m.jsonl")) == 2  # other limits: another index
    path.write_text("\n".join(lines) + "\n")  # the manifest grew: a new index, all 15 rows
    p = eval_pipeline(_cfg(path), tok, process_index=0, process_count=1)
    assert len(_indexes(tmp_path, "m.jsonl")) == 3 and len(p.index) == 15
    fresh = index_lib.build_index(str(path), p.layout, _cfg(path))[0]
    _same_index(p.index, fresh)
    # A damaged index file is rebuilt, not trusted; data.cache_index=False writes none.
    for name in _indexes(tmp_path, "m.jsonl"):
        (tmp_path / name).write_bytes(b"not an index")
    p = eval_pipeline(_cfg(path), tok, process_index=0, process_count=1)
    _same_index(p.index, fresh)
    other = tmp_path / "other.jsonl"
    other.write_text(path.read_text())
    eval_pipeline(_cfg(other, cache_index=False), tok, process_index=0, process_count=1)
    assert _indexes(tmp_path, "other.jsonl") == []
