"""Manifest parsing, audio decoding, and `python -m blspkd_jax.data.check` on each bad-row kind."""

import json
import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf
from tiny import tiny_chat_tokenizer

from blspkd_jax.data import audio, check
from blspkd_jax.data.manifest import parse_line, read_manifest

MIN_S, MAX_S, MAX_TOK = 0.1, 2.0, 12
BAD_KINDS = (
    "malformed_json",
    "missing_key",
    "missing_file",
    "corrupt_file",
    "corrupt_data",
    "empty_audio",
    "nan_audio",
    "too_short",
    "too_long",
    "segment_outside",
    "empty_transcript",
    "long_transcript",
)


def write_wav(path, seconds, rate=16000, channels=1, seed=0, subtype="FLOAT"):
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    x = (0.1 * rng.standard_normal((n, channels))).astype(np.float32)
    sf.write(str(path), x if channels > 1 else x[:, 0], rate, subtype=subtype)
    return x


def write_bad_kinds(d):
    """One manifest line per bad-input kind: kind -> (line text, reason fragment, found at).

    `found at` is "index" for what the cheap startup pass sees, "decode" for what only decoding
    reveals. Audio files are written into `d`."""
    write_wav(d / "short.wav", 0.05)
    write_wav(d / "long.wav", 2.5)
    sf.write(str(d / "empty.wav"), np.zeros(0, np.float32), 16000)
    (d / "garbage.wav").write_bytes(os.urandom(2000))
    x = write_wav(d / "nan.wav", 0.5)
    x[100] = np.nan
    sf.write(str(d / "nan.wav"), x[:, 0], 16000, subtype="FLOAT")
    write_wav(d / "lostsync.flac", 1.0, subtype="PCM_16")
    b = bytearray((d / "lostsync.flac").read_bytes())
    b[len(b) // 3 : len(b) // 3 + 2000] = os.urandom(2000)  # libsndfile: "decoder lost sync"
    (d / "lostsync.flac").write_bytes(bytes(b))
    write_wav(d / "ok.wav", 0.5)
    row = lambda audio, text="the cat sat", **kw: json.dumps({"audio": audio, "text": text, **kw})
    kinds = {
        "malformed_json": ('{"audio": "ok.wav", "text": ', "malformed JSON", "index"),
        "missing_key": ('{"audio": "ok.wav"}', "missing key 'text'", "index"),
        "missing_file": (row("nope.wav"), "audio file not found", "index"),
        "corrupt_file": (row("garbage.wav"), "cannot decode audio", "index"),
        "corrupt_data": (row("lostsync.flac"), "cannot decode audio", "decode"),
        "empty_audio": (row("empty.wav"), "audio is empty", "index"),
        "nan_audio": (row("nan.wav"), "NaN or infinite", "decode"),
        "too_short": (row("short.wav"), "shorter than min_seconds=0.1", "index"),
        "too_long": (row("long.wav"), "longer than max_seconds=2", "index"),
        "segment_outside": (row("ok.wav", offset=0.4, duration=0.5), "exceeds the length", "index"),
        "empty_transcript": (row("ok.wav", "   "), "transcript is empty", "index"),
        "long_transcript": (row("ok.wav", "the cat sat " * 10), "max_text_tokens=12", "index"),
    }
    assert tuple(kinds) == BAD_KINDS
    return kinds


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_chat_tokenizer(tmp_path_factory.mktemp("tok"))


def test_parse_line(tmp_path):
    r = parse_line('{"audio": "sub/a.wav", "text": "hi", "offset": 1.5, "duration": 2}', 3, "/d")
    assert (r.audio, r.text, r.line, r.offset, r.duration) == ("/d/sub/a.wav", "hi", 3, 1.5, 2.0)
    assert r.id == "sub/a.wav@1.5" and r.response is None and r.instruction is None
    r = parse_line('{"audio": "/abs/a.wav", "text": "hi", "id": "u1", "response": "yo"}', 1, "/d")
    assert (r.audio, r.id, r.response) == ("/abs/a.wav", "u1", "yo")
    for text, reason in [
        ("[1, 2]", "expected a JSON object"),
        ('{"audio": 3, "text": "x"}', "'audio' must be a string"),
        ('{"audio": "a", "text": "x", "offset": -1}', "'offset' must be >= 0"),
        ('{"audio": "a", "text": "x", "duration": "2"}', "finite number of seconds"),
        ('{"audio": "a", "text": "x", "response": 5}', "'response' must be a string"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_line(text, 1, "/d")
    (tmp_path / "m.jsonl").write_text('{"audio": "a", "text": "x"}\n\n  \n{bad\n')
    rows, bad = read_manifest(tmp_path / "m.jsonl")
    assert [r.line for r in rows] == [1] and [(b.line, str(b).split(": ")[1]) for b in bad] == [
        (4, "malformed JSON")
    ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # librosa imports audioread
def test_decode_stereo_any_rate_and_segments(tmp_path):
    # Stereo 44.1 kHz is downmixed and resampled, exactly as librosa.load(sr=16000) does.
    write_wav(tmp_path / "st.wav", 0.7, rate=44100, channels=2)
    y = audio.load(tmp_path / "st.wav")
    ref, _ = librosa.load(str(tmp_path / "st.wav"), sr=16000, mono=True)
    assert (
        y.dtype == np.float32
        and len(y) == len(ref) == audio.probe(tmp_path / "st.wav").num_samples_16k
    )
    np.testing.assert_array_equal(y, ref)  # the same resampler, to the sample
    # A segment is the matching slice of the whole file.
    x = write_wav(tmp_path / "m.wav", 1.0)[:, 0]
    seg = audio.load(tmp_path / "m.wav", offset=0.25, duration=0.5)
    np.testing.assert_array_equal(seg, x[4000:12000])
    info = audio.probe(tmp_path / "m.wav", offset=0.25)
    assert info.num_samples == 12000 and info.channels == 1
    with pytest.raises(audio.AudioError, match="past the end"):
        audio.probe(tmp_path / "m.wav", offset=2.0)


def _bad_manifest(tmp_path):
    kinds = write_bad_kinds(tmp_path)
    write_wav(tmp_path / "st.wav", 0.7, rate=44100, channels=2)
    lines = [json.dumps({"audio": "ok.wav", "text": "the cat sat"})]
    expect = {}
    for line, reason, _ in kinds.values():
        lines.append(line)
        expect[len(lines)] = reason
        lines.append("")  # blank lines are skipped but counted
    lines.append(json.dumps({"audio": "st.wav", "text": "hello world", "response": "hi"}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, expect


def test_check_reports_every_bad_row(tmp_path, tok):
    path, expect = _bad_manifest(tmp_path)
    bad = check.check_manifest(
        str(path), tok, min_seconds=MIN_S, max_seconds=MAX_S, max_text_tokens=MAX_TOK
    )
    assert [b.line for b in bad] == sorted(expect)
    for b in bad:
        assert expect[b.line] in b.reason
        assert str(b) == f"{path}:{b.line}: {b.reason}"
    # Clean manifest (the good rows only): nothing reported.
    good = tmp_path / "good.jsonl"
    text = path.read_text().splitlines()
    good.write_text(text[0] + "\n" + text[-1] + "\n")
    assert check.check_manifest(str(good), tok, max_seconds=MAX_S) == []


def test_check_command_line(tmp_path, tok):
    path, expect = _bad_manifest(tmp_path)
    tok.save_pretrained(str(tmp_path / "tok"))
    args = [
        str(path),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--min-seconds",
        str(MIN_S),
        "--max-seconds",
        str(MAX_S),
        "--max-text-tokens",
        str(MAX_TOK),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "blspkd_jax.data.check", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(expect)
    for text, (line, reason) in zip(lines, sorted(expect.items()), strict=True):
        assert text.startswith(f"{path}:{line}: ") and reason in text
    total = sum(1 for x in path.read_text().splitlines() if x.strip())
    assert f"{path}: {total - len(expect)} of {total} rows usable" in out.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"audio": "ok.wav", "text": "the cat"}) + "\n")
    assert check.main([str(good)]) == 0


def test_check_refuses_an_empty_manifest_and_a_token_limit_without_a_tokenizer(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert check.main([str(empty)]) == 1
    assert "no rows (the manifest is empty)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        check.main([str(empty), "--max-text-tokens", "10"])
    assert e.value.code == 2 and "needs --tokenizer" in capsys.readouterr().err
