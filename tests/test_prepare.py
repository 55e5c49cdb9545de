"""Manifest preparation on tiny fake LibriSpeech, Common Voice and GigaSpeech trees built in their
published layouts."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blspkd_jax.data import prepare


def _tone(path: Path, seconds: float, sr: int = 16000, **kw) -> float:
    """Write a short tone; returns its exact duration in seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * sr))
    x = 0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / sr).astype(np.float32)
    sf.write(str(path), x, sr, **kw)
    return n / sr


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _resolve(manifest: Path, audio: str) -> Path:
    # docs/method.md §6: relative audio paths are relative to the manifest's folder.
    return Path(os.path.normpath(manifest.parent / audio))


@pytest.fixture
def librispeech_tree(tmp_path):
    root = tmp_path / "LibriSpeech"
    chapter = root / "dev-clean" / "84" / "121123"
    dur = {
        "84-121123-0000": _tone(chapter / "84-121123-0000.flac", 0.5),
        "84-121123-0003": _tone(chapter / "84-121123-0003.flac", 0.25),  # no transcript line
        "19-198-0001": _tone(root / "train-clean-100" / "19" / "198" / "19-198-0001.flac", 0.75),
    }
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n"
        "84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"  # audio missing
        "84-121123-0002\n"  # empty transcript
    )
    (root / "train-clean-100" / "19" / "198" / "19-198.trans.txt").write_text(
        "19-198-0001 I WAS TOLD SO\n"
    )
    return root, dur


def test_librispeech_rows_hours_and_skips(librispeech_tree, tmp_path):
    root, dur = librispeech_tree
    out = tmp_path / "out" / "ls.jsonl"
    report = prepare.librispeech(root, out, progress=False)
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["84-121123-0000", "19-198-0001"]
    assert [r["text"] for r in rows] == ["GO DO YOU HEAR", "I WAS TOLD SO"]
    for r in rows:
        assert Path(r["audio"]).is_absolute() and Path(r["audio"]).is_file()
    assert report.rows == 2
    assert report.seconds == pytest.approx(dur["84-121123-0000"] + dur["19-198-0001"])
    assert dict(report.skipped) == {
        "missing audio file": 1,
        "empty transcript": 1,
        "audio file with no transcript line": 1,
    }


def test_librispeech_split_relative_paths_and_case(librispeech_tree, tmp_path):
    root, _ = librispeech_tree
    out = tmp_path / "elsewhere" / "ls.jsonl"
    report = prepare.librispeech(
        root, out, subsets=["train-clean-100"], relative=True, case="sentence", progress=False
    )
    (row,) = _rows(out)
    assert report.rows == 1 and not report.skipped
    assert row["text"] == "I was told so"
    assert not Path(row["audio"]).is_absolute()
    assert _resolve(out, row["audio"]).samefile(
        root / "train-clean-100" / "19" / "198" / "19-198-0001.flac"
    )
    with pytest.raises(FileNotFoundError, match="--split test-other"):
        prepare.librispeech(root, out, subsets=["test-other"], progress=False)


@pytest.mark.parametrize("with_durations_tsv", [True, False])
def test_commonvoice(tmp_path, with_durations_tsv):
    lang = tmp_path / "cv-corpus-17.0-2024-03-15" / "en"
    clips = lang / "clips"
    mp3 = dict(format="MP3", subtype="MPEG_LAYER_III")
    true = {
        "common_voice_en_1.mp3": _tone(clips / "common_voice_en_1.mp3", 1.0, **mp3),
        "common_voice_en_2.mp3": _tone(clips / "common_voice_en_2.mp3", 2.0, **mp3),
        "common_voice_en_4.mp3": _tone(clips / "common_voice_en_4.mp3", 1.0, **mp3),
    }
    header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\n"
    (lang / "train.tsv").write_text(
        header + 'c1\tcommon_voice_en_1.mp3\tx1\tHe said "hello" to me.\t\t2\t0\n'
        "c2\tcommon_voice_en_2.mp3\tx2\tThe cat sat down.\t\t2\t0\n"
        "c3\tcommon_voice_en_3.mp3\tx3\tThis clip is missing.\t\t2\t0\n"
        "c4\tcommon_voice_en_4.mp3\tx4\t \t\t2\t0\n"
    )
    (lang / "dev.tsv").write_text(header + "c9\tcommon_voice_en_2.mp3\tx9\tDev row.\t\t2\t0\n")
    stated = {"common_voice_en_1.mp3": 1.25, "common_voice_en_2.mp3": 2.5}
    if with_durations_tsv:
        # Deliberately not the true lengths, to show the release's own table is what is read.
        lines = [f"{k}\t{int(v * 1000)}" for k, v in stated.items()]
        (lang / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "\n".join(lines) + "\n")

    out = tmp_path / "cv.jsonl"
    report = prepare.commonvoice(tmp_path, out, split="train", progress=False)
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["common_voice_en_1", "common_voice_en_2"]
    assert rows[0]["text"] == 'He said "hello" to me.'  # quotes survive: CV TSVs are unquoted
    assert all(Path(r["audio"]).is_file() for r in rows)
    assert dict(report.skipped) == {"missing audio file": 1, "empty sentence": 1}
    assert report.unknown_duration == 0
    expected = stated if with_durations_tsv else true
    # MP3 headers give the length up to encoder padding of a frame or two.
    tol = 1e-6 if with_durations_tsv else 0.1
    want = expected["common_voice_en_1.mp3"] + expected["common_voice_en_2.mp3"]
    assert report.seconds == pytest.approx(want, abs=tol)

    report = prepare.commonvoice(lang, out, split="dev", progress=False)
    assert [r["text"] for r in _rows(out)] == ["Dev row."] and report.rows == 1


def _gigaspeech_tree(tmp_path):
    root = tmp_path / "GigaSpeech"
    opus = root / "audio" / "podcast" / "P0000" / "POD0000000001.opus"
    _tone(opus, 6.0, sr=48000, format="OGG", subtype="OPUS")
    meta = {
        "dataset": "GigaSpeech",
        "audios": [
            {
                "aid": "POD0000000001",
                "path": "audio/podcast/P0000/POD0000000001.opus",
                "source": "podcast",
                "duration": 6.0,
                "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                "segments": [
                    {
                        "sid": "POD0000000001_S0000000",
                        "begin_time": 0.5,
                        "end_time": 2.25,
                        "text_tn": "DOUGLAS MCGRAY IS OUR GUIDE <COMMA> RIGHT <QUESTIONMARK>",
                        "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                    },
                    {
                        "sid": "POD0000000001_S0000001",
                        "begin_time": 2.25,
                        "end_time": 3.0,
                        "text_tn": "<MUSIC>",
                        "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                    },
                    {
                        "sid": "POD0000000001_S0000002",
                        "begin_time": 3.0,
                        "end_time": 4.0,
                        "text_tn": "ONLY IN THE BIG SUBSETS <PERIOD>",
                        "subsets": ["{XL}", "{L}", "{M}"],
                    },
                    {
                        "sid": "POD0000000001_S0000003",
                        "begin_time": 4.0,
                        "end_time": 5.5,
                        "text_tn": "YOU WALK IN <EXCLAMATIONPOINT> <NOISE>",
                        "subsets": ["{XL}", "{XS}"],
                    },
                ],
            },
            {
                "aid": "YOU0000000002",
                "path": "audio/youtube/P0000/YOU0000000002.opus",  # not downloaded
                "source": "youtube",
                "duration": 3.0,
                "subsets": ["{XL}", "{XS}"],
                "segments": [
                    {
                        "sid": "YOU0000000002_S0000000",
                        "begin_time": 0.0,
                        "end_time": 3.0,
                        "text_tn": "A MISSING RECORDING <PERIOD>",
                        "subsets": ["{XL}", "{XS}"],
                    }
                ],
            },
        ],
    }
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    return root, opus


def test_gigaspeech_segments(tmp_path):
    root, opus = _gigaspeech_tree(tmp_path)
    out = root / "manifests" / "xs.jsonl"
    report = prepare.gigaspeech(root, out, subset="xs", relative=True, progress=False)
    (row,) = _rows(out)
    assert row == {
        "id": "POD0000000001_S0000000",
        "audio": "../audio/podcast/P0000/POD0000000001.opus",
        "text": "DOUGLAS MCGRAY IS OUR GUIDE, RIGHT?",
        "offset": 0.5,
        "duration": 1.75,
    }
    assert _resolve(out, row["audio"]).samefile(opus)
    assert sf.info(str(opus)).duration >= row["offset"] + row["duration"]
    assert report.seconds == pytest.approx(1.75)
    assert dict(report.skipped) == {
        "garbage tag (<SIL>, <MUSIC>, <NOISE>, <OTHER>)": 2,
        "missing audio file": 1,
    }

    report = prepare.gigaspeech(root / "GigaSpeech.json", out, subset="M", progress=False)
    assert [r["text"] for r in _rows(out)] == [
        "DOUGLAS MCGRAY IS OUR GUIDE, RIGHT?",
        "ONLY IN THE BIG SUBSETS.",
    ]
    assert report.seconds == pytest.approx(2.75)
    with pytest.raises(ValueError, match="--split 'XXL'"):
        prepare.gigaspeech(root, out, subset="XXL", progress=False)


def test_gigaspeech_text():
    assert prepare.gigaspeech_text("HELLO <COMMA> WORLD <PERIOD>") == "HELLO, WORLD."
    assert prepare.gigaspeech_text("<SIL>") is None
    assert prepare.gigaspeech_text("I SEE <OTHER>") is None
    assert prepare.normalize_case("I THINK I'M RIGHT, I SAID.", "sentence") == (
        "I think I'm right, I said."
    )


def test_command_line(librispeech_tree, tmp_path, capsys):
    root, _ = librispeech_tree
    out = tmp_path / "ls.jsonl"
    assert prepare.main(["librispeech", str(root), "--out", str(out), "--split", "dev-clean"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 1 rows, 0.00 h" in printed
    assert "missing audio file" in printed and "skipped 3:" in printed
    assert len(_rows(out)) == 1
    assert prepare.main(["commonvoice", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    assert "no train.tsv" in capsys.readouterr().err
