"""`python -m blspkd_jax.data.prepare hf-audio`: local Hugging Face audio datasets (Parquet as the
Hub serves them, save_to_disk folders) to a manifest whose audio decodes to the dataset's, or to a
pack."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from blspkd_jax.data import packed
from blspkd_jax.data.manifest import read_rows
from blspkd_jax.data.prepare import main

AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _encoded(seconds: float, fmt: str, seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format=fmt, subtype="PCM_16")
    return buf.getvalue(), sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0]


def _table(n: int, seed: int) -> tuple[pa.Table, list]:
    """n good rows (WAV and FLAC bytes alternating), then one without text and one whose audio has
    no bytes and a path that is not here."""
    audio, text, ids, waves = [], [], [], []
    for i in range(n):
        fmt = "WAV" if i % 2 else "FLAC"
        data, wave = _encoded(0.3 + 0.1 * i, fmt, seed + i)
        audio.append({"bytes": data, "path": f"clip{i}.{fmt.lower()}"})
        text.append(f"sentence number {i}")
        ids.append(f"u{seed}-{i}")
        waves.append(wave)
    audio += [
        {"bytes": _encoded(0.5, "WAV", 99)[0], "path": None},
        {"bytes": None, "path": "/nope.wav"},
    ]
    text += ["   ", "has text"]
    ids += ["no-text", "no-audio"]
    table = pa.table({"audio": pa.array(audio, AUDIO), "sentence": text, "id": ids})
    return table, waves


def _check(out, table_waves, ids):
    rows = read_rows(out)
    assert [r.id for r in rows] == ids
    for r, wave in zip(rows, table_waves, strict=True):
        np.testing.assert_array_equal(sf.read(r.audio, dtype="float32")[0], wave)
        assert r.text.startswith("sentence number")


def test_parquet_files_as_the_hub_lays_them_out(tmp_path, capsys):
    d = tmp_path / "ds" / "data"
    d.mkdir(parents=True)
    t0, w0 = _table(3, 0)
    t1, w1 = _table(2, 10)
    pq.write_table(t0, d / "train-00000-of-00002.parquet")
    pq.write_table(t1, d / "train-00001-of-00002.parquet")
    pq.write_table(_table(1, 20)[0], d / "test-00000-of-00001.parquet")
    out = tmp_path / "m" / "train.jsonl"
    argv = ["hf-audio", str(tmp_path / "ds"), "--out", str(out), "--split", "train"]
    assert main([*argv, "--text-column", "sentence", "--id-column", "id"]) == 0
    _check(out, w0 + w1, [f"u0-{i}" for i in range(3)] + [f"u10-{i}" for i in range(2)])
    report = capsys.readouterr().out
    assert "5 rows" in report and "skipped 4" in report  # 2 bad rows in each file
    assert "no text" in report and "no audio bytes, and its path is not a file here" in report
    assert main([*argv[:-2], "--text-column", "missing"]) == 1
    assert "no column 'missing'" in capsys.readouterr().err


def test_save_to_disk_folders_and_a_pack(tmp_path):
    t, waves = _table(4, 5)
    root = tmp_path / "dd"
    for split in ("train", "validation"):
        (root / split).mkdir(parents=True)
        arrow = str(root / split / "data-00000-of-00001.arrow")
        with pa.OSFile(arrow, "wb") as f, pa.ipc.new_stream(f, t.schema) as w:  # datasets' format
            w.write_table(t)
        (root / split / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
        )
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    out = tmp_path / "m" / "val.jsonl"
    argv = ["hf-audio", str(root), "--out", str(out), "--text-column", "sentence"]
    assert main([*argv, "--split", "nope"]) == 1
    assert main([*argv, "--split", "validation", "--pack", str(tmp_path / "p")]) == 0
    _check(out, waves, [f"validation-{i:08d}" for i in range(4)])
    pack = packed.Pack(str(tmp_path / "p"))
    assert len(pack) == 4
    fields, wave = pack.read(2)
    assert fields["text"] == "sentence number 2"
    np.testing.assert_array_equal(wave, waves[2])


@pytest.mark.parametrize("magic", [b"RIFF....WAVE", b"fLaC", b"OggS", b"ID3\x04", b"\xff\xfb\x90"])
def test_the_audio_format_is_read_from_the_bytes(magic):
    from blspkd_jax.data.prepare import _extension

    want = {b"R": ".wav", b"f": ".flac", b"O": ".ogg", b"I": ".mp3", b"\xff": ".mp3"}[magic[:1]]
    assert _extension(magic + b"rest", "x.unknown") == want
