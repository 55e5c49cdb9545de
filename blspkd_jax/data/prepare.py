"""Turn LibriSpeech, Common Voice and GigaSpeech folders (their published layouts), and local
Hugging Face audio datasets, into our JSON Lines manifest (docs/method.md §6) or a pack, with a
progress bar and a summary of hours and skipped files.

    python -m blspkd_jax.data.prepare librispeech LibriSpeech --out ls.jsonl --split train-clean-100
    python -m blspkd_jax.data.prepare commonvoice cv-corpus-17.0/en --out cv.jsonl --split train
    python -m blspkd_jax.data.prepare gigaspeech GigaSpeech --out gs.jsonl --split XS
    python -m blspkd_jax.data.prepare hf-audio librispeech_asr/clean --out ls.jsonl --split train \
        --text-column text [--pack ls_packed]
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import glob
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from blspkd_jax.data import storage

CASES = ("keep", "lower", "sentence")
GIGASPEECH_SUBSETS = ("XS", "S", "M", "L", "XL", "DEV", "TEST")
# GigaSpeech's text_tn spells punctuation as tags; its garbage tags mark segments with no speech
# to transcribe, which the GigaSpeech authors exclude from training.
GIGASPEECH_PUNCTUATION = {
    "<COMMA>": ",",
    "<PERIOD>": ".",
    "<QUESTIONMARK>": "?",
    "<EXCLAMATIONPOINT>": "!",
}
GIGASPEECH_GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")


@dataclasses.dataclass
class Report:
    """What a preparation wrote and what it left out, by reason."""

    manifest: str
    rows: int = 0
    seconds: float = 0.0
    unknown_duration: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def summary(self) -> str:
        lines = [f"{self.manifest}: {self.rows} rows, {self.hours:.2f} h"]
        if self.unknown_duration:
            lines[0] += f" (+{self.unknown_duration} rows of unknown duration, not in the hours)"
        skipped = sum(self.skipped.values())
        lines.append(f"skipped {skipped}" + (":" if skipped else ""))
        lines += [f"  {n:8d}  {reason}" for reason, n in sorted(self.skipped.items())]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def normalize_case(text: str, case: str) -> str:
    """`keep` as is; `lower`; `sentence`: lower case, first letter and the pronoun I capitalised
    (for all-caps corpora such as LibriSpeech and GigaSpeech that an LLM reads more naturally)."""
    if case == "keep":
        return text
    if case not in CASES:
        raise ValueError(f"case {case!r}: expected one of {CASES}")
    text = text.lower()
    if case == "sentence":
        text = re.sub(r"\bi\b", "I", text)
        text = text[:1].upper() + text[1:]
    return text


def _audio_ref(path: Path, out: Path, relative: bool) -> str:
    if relative:
        return os.path.relpath(path.resolve(), out.resolve().parent)
    return str(path.resolve())


def _write_manifest(out: Path, rows: Iterable[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def _duration(path: Path) -> float | None:
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError):
        return None
    return info.frames / info.samplerate if info.frames > 0 else None


# --- LibriSpeech ----------------------------------------------------------------------------------


def librispeech(
    src: str | Path,
    out: str | Path,
    *,
    subsets: list[str] | None = None,
    relative: bool = False,
    case: str = "keep",
    progress: bool = True,
) -> Report:
    """`src` is `LibriSpeech/` (holding subsets such as train-clean-100) or one subset folder; the
    layout is `<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` with one
    `<utterance-id> <TRANSCRIPT>` a line and `<utterance-id>.flac` beside it. `subsets` picks
    subset folders of `src` (default: all)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: LibriSpeech folder not found")
    roots = [src]
    if subsets:
        roots = [src / s for s in subsets]
        for r in roots:
            if not r.is_dir():
                have = sorted(p.name for p in src.iterdir() if p.is_dir())
                raise FileNotFoundError(f"--split {r.name}: no folder {r}; {src} has {have}")
    transcripts = sorted(t for r in roots for t in r.rglob("*.trans.txt"))
    if not transcripts:
        raise FileNotFoundError(
            f"{src}: no <speaker>-<chapter>.trans.txt files; expected LibriSpeech/<subset>/"
            "<speaker>/<chapter>/ folders"
        )
    report = Report(str(out))
    rows = []
    for trans in tqdm(transcripts, desc="librispeech", unit="chapter", disable=not progress):
        listed = set()
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            listed.add(uid)
            audio = trans.parent / f"{uid}.flac"
            text = text.strip()
            if not text:
                report.skipped["empty transcript"] += 1
                continue
            if not audio.is_file():
                report.skipped["missing audio file"] += 1
                continue
            seconds = _duration(audio)
            if seconds is None:
                report.skipped["unreadable audio file"] += 1
                continue
            report.rows += 1
            report.seconds += seconds
            rows.append(
                {
                    "id": uid,
                    "audio": _audio_ref(audio, out, relative),
                    "text": normalize_case(text, case),
                }
            )
        orphans = [p for p in trans.parent.glob("*.flac") if p.stem not in listed]
        report.skipped["audio file with no transcript line"] += len(orphans)
    report.skipped = +report.skipped  # drop zero counts
    _write_manifest(out, rows)
    return report


# --- Common Voice ---------------------------------------------------------------------------------


def _commonvoice_dir(src: Path, split: str, lang: str | None) -> Path:
    """The `<lang>` folder holding `<split>.tsv`: `src` itself, `src/<lang>` or
    `src/cv-corpus-*/<lang>`."""
    if (src / f"{split}.tsv").is_file():
        return src
    candidates = sorted(
        {p.parent for pattern in (f"*/{split}.tsv", f"*/*/{split}.tsv") for p in src.glob(pattern)}
    )
    if lang is not None:
        candidates = [c for c in candidates if c.name == lang]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"{src}: no {split}.tsv" + (f" for language {lang!r}" if lang else "") + "; expected "
            "cv-corpus-*/<lang>/{train,dev,test,validated,...}.tsv with clips/ beside them"
        )
    raise ValueError(
        f"{src}: several Common Voice folders have {split}.tsv ({[str(c) for c in candidates]}); "
        "pass --lang or point SRC at one of them"
    )


def commonvoice(
    src: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    lang: str | None = None,
    relative: bool = False,
    case: str = "keep",
    progress: bool = True,
) -> Report:
    """`src` is a Common Voice release (`cv-corpus-*/<lang>/`, or a folder above it): `<split>.tsv`
    is tab-separated with a header naming at least `path` and `sentence`; clips are `clips/<path>`
    (MP3). Durations come from `clip_durations.tsv` (milliseconds) when the release has it, else
    from the audio header when libsndfile reads MP3, else they are counted as unknown."""
    src, out = Path(src), Path(out)
    folder = _commonvoice_dir(src, split, lang)
    report = Report(str(out))
    known: dict[str, float] = {}
    durations_tsv = folder / "clip_durations.tsv"
    if durations_tsv.is_file():
        with open(durations_tsv, encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                ms = rec.get("duration[ms]") or rec.get("duration")
                if rec.get("clip") and ms:
                    known[rec["clip"]] = float(ms) / 1000
    mp3_readable = "MP3" in sf.available_formats()
    if not known and not mp3_readable:
        report.notes.append(
            f"libsndfile {sf.__libsndfile_version__} cannot read MP3: durations are unknown and "
            "the clips need converting (or libsndfile >= 1.1.0) before training"
        )
    tsv = folder / f"{split}.tsv"
    with open(tsv, encoding="utf-8", newline="") as f:
        # Common Voice sentences contain quote characters; its TSVs are not quoted.
        records = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if records and not {"path", "sentence"} <= set(records[0]):
        raise ValueError(f"{tsv}: header {list(records[0])} lacks 'path' and 'sentence' columns")
    rows = []
    for rec in tqdm(records, desc=f"commonvoice {split}", unit="clip", disable=not progress):
        text = (rec.get("sentence") or "").strip()
        clip = (rec.get("path") or "").strip()
        if not clip:
            report.skipped["row without a clip path"] += 1
            continue
        audio = folder / "clips" / clip
        if not text:
            report.skipped["empty sentence"] += 1
            continue
        if not audio.is_file():
            report.skipped["missing audio file"] += 1
            continue
        seconds = known.get(clip)
        if seconds is None and mp3_readable:
            seconds = _duration(audio)
            if seconds is None:
                report.skipped["unreadable audio file"] += 1
                continue
        if seconds is None:
            report.unknown_duration += 1
        else:
            report.seconds += seconds
        report.rows += 1
        rows.append(
            {
                "id": Path(clip).stem,
                "audio": _audio_ref(audio, out, relative),
                "text": normalize_case(text, case),
            }
        )
    _write_manifest(out, rows)
    return report


# --- GigaSpeech -----------------------------------------------------------------------------------


def gigaspeech_text(text_tn: str) -> str | None:
    """GigaSpeech's normalised transcript -> plain text: punctuation tags become marks attached to
    the previous word; None when the segment carries a garbage tag (no speech to transcribe)."""
    words = text_tn.split()
    if any(w in GIGASPEECH_GARBAGE for w in words):
        return None
    out: list[str] = []
    for w in words:
        if w in GIGASPEECH_PUNCTUATION:
            if out:
                out[-1] += GIGASPEECH_PUNCTUATION[w]
        else:
            out.append(w)
    return " ".join(out)


def _gigaspeech_json(src: Path) -> Path:
    if src.is_file():
        return src
    path = src / "GigaSpeech.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no GigaSpeech.json (expected beside the audio/ folder)")
    return path


def gigaspeech(
    src: str | Path,
    out: str | Path,
    *,
    subset: str = "XS",
    relative: bool = False,
    case: str = "keep",
    progress: bool = True,
) -> Report:
    """`src` is the GigaSpeech folder holding `GigaSpeech.json` and `audio/<source>/<id>/<aid>.opus`
    (or the JSON file itself). Each kept segment becomes a row with `offset` and `duration` in
    seconds into its recording. `subset` is one of XS S M L XL DEV TEST (segments tagged `{XS}`,
    ...). The whole JSON is loaded at once (several GiB of memory for the XL metadata)."""
    src, out = Path(src), Path(out)
    tag = "{" + subset.strip("{}").upper() + "}"
    if tag.strip("{}") not in GIGASPEECH_SUBSETS:
        raise ValueError(f"--split {subset!r}: expected one of {GIGASPEECH_SUBSETS}")
    meta_path = _gigaspeech_json(src)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if "audios" not in meta:
        raise ValueError(f"{meta_path}: no 'audios' list (not a GigaSpeech metadata file)")
    root = meta_path.parent
    report = Report(str(out))
    rows = []
    for audio_meta in tqdm(
        meta["audios"], desc=f"gigaspeech {tag}", unit="audio", disable=not progress
    ):
        segments = [s for s in audio_meta.get("segments", []) if tag in s.get("subsets", ())]
        if not segments:
            continue
        audio = root / audio_meta["path"]
        if not audio.is_file():
            report.skipped["missing audio file"] += len(segments)
            continue
        ref = _audio_ref(audio, out, relative)
        for seg in segments:
            text = gigaspeech_text(seg.get("text_tn", ""))
            if text is None:
                report.skipped["garbage tag (<SIL>, <MUSIC>, <NOISE>, <OTHER>)"] += 1
                continue
            if not text:
                report.skipped["empty transcript"] += 1
                continue
            begin, end = float(seg["begin_time"]), float(seg["end_time"])
            if not end > begin >= 0:
                report.skipped["bad begin/end time"] += 1
                continue
            report.rows += 1
            report.seconds += end - begin
            rows.append(
                {
                    "id": seg["sid"],
                    "audio": ref,
                    "text": normalize_case(text, case),
                    "offset": round(begin, 3),
                    "duration": round(end - begin, 3),
                }
            )
    _write_manifest(out, rows)
    return report


# --- Hugging Face datasets (local: save_to_disk folders, Parquet files) ---------------------------
#
# `hf-audio SRC` reads what the Hub serves or `datasets` writes, with pyarrow (no `datasets`):
# a folder written by `Dataset.save_to_disk` (state.json beside `data-*.arrow`) or by
# `DatasetDict.save_to_disk` (dataset_dict.json, one such folder per split: `--split`); or Parquet
# files, one or a folder of them as the Hub lays them out (`data/train-00000-of-00004.parquet`;
# `--split train` keeps that split's). The audio column is `datasets.Audio`'s storage, a struct of
# `bytes` and `path`: the bytes become files under the manifest's folder's `audio/` (in the format
# they encode: WAV, FLAC, MP3, OGG), or the path is used when there are no bytes and it exists.


# Leading bytes -> the file extension libsndfile recognises the format by.
MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"))


def _extension(data: bytes, path: str | None) -> str:
    for magic, ext in MAGIC:
        if data.startswith(magic):
            return ext
    if data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):  # an MPEG frame header
        return ".mp3"
    return os.path.splitext(path or "")[1].lower() or ".bin"


def _tables(src: str, split: str | None) -> tuple[list[str], str]:
    """(the files to read, "arrow" or "parquet")."""
    p = Path(src)
    if p.is_file() and p.suffix == ".parquet":
        return [str(p)], "parquet"
    if not p.is_dir():
        raise FileNotFoundError(f"{src}: no such folder or .parquet file")
    if (p / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ValueError(f"{src}: --split must be one of {splits} (got {split!r})")
        p = p / split
    if (p / "state.json").is_file():  # Dataset.save_to_disk
        state = json.loads((p / "state.json").read_text())
        files = [str(p / f["filename"]) for f in state.get("_data_files", [])]
        if not files:
            raise ValueError(f"{p / 'state.json'}: lists no data files")
        return files, "arrow"
    files = sorted(glob.glob(str(p / "**" / "*.parquet"), recursive=True))
    if split:
        files = [f for f in files if os.path.basename(f).startswith(f"{split}-")]
    if not files:
        raise FileNotFoundError(
            f"{src}: no state.json (save_to_disk) and no "
            + (f"{split}-*.parquet" if split else "*.parquet")
            + " files"
        )
    return files, "parquet"


def _batches(files: list[str], kind: str, columns: list[str]) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        if kind == "parquet":
            pf = pq.ParquetFile(f)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{f}: no column {missing[0]!r} (has {pf.schema_arrow.names})")
            yield from pf.iter_batches(batch_size=256, columns=columns)
            continue
        with pa.memory_map(f) as source:
            try:  # save_to_disk writes the Arrow stream format
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
            names = reader.schema.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{f}: no column {missing[0]!r} (has {names})")
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for b in batches:
                yield b.select(columns)


def hf_audio(
    src: str,
    out: str,
    *,
    text_column: str = "text",
    audio_column: str = "audio",
    response_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
    case: str = "keep",
    relative: bool = True,
):
    """Write the manifest `out` (and the audio files under its folder's `audio/`); returns the
    `prepare.Report`."""
    files, kind = _tables(src, split)
    columns = [audio_column, text_column, *(c for c in (response_column, id_column) if c)]
    out_path = Path(out)
    audio_dir = out_path.parent / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    report = Report(str(out))
    rows = []
    bar = tqdm(desc=f"hf-audio {os.path.basename(src.rstrip('/'))}", unit="row")
    n = 0
    for batch in _batches(files, kind, columns):
        for rec in batch.to_pylist():
            bar.update(1)
            n += 1
            text = rec.get(text_column)
            if not isinstance(text, str) or not text.strip():
                report.skipped["no text"] += 1
                continue
            audio = rec.get(audio_column)
            if isinstance(audio, dict):
                data, given = audio.get("bytes"), audio.get("path")
            else:  # a plain column of paths or bytes
                data, given = (audio, None) if isinstance(audio, bytes) else (None, audio)
            row_id = str(rec[id_column]) if id_column else f"{split or 'row'}-{n - 1:08d}"
            if data:
                name = f"{n - 1:08d}{_extension(data, given)}"
                target = audio_dir / name
                if not target.exists() or target.stat().st_size != len(data):
                    storage.write_atomic(target, data)
            elif given and os.path.isfile(given):
                target = Path(given)
            else:
                report.skipped["no audio bytes, and its path is not a file here"] += 1
                continue
            seconds = _duration(target)
            if seconds is None:
                report.unknown_duration += 1
            else:
                report.seconds += seconds
            row = {"id": row_id, "audio": _audio_ref(target, out_path, relative)}
            row["text"] = normalize_case(text.strip(), case)
            if response_column and isinstance(rec.get(response_column), str):
                row["response"] = rec[response_column]
            rows.append(row)
    bar.close()
    _write_manifest(out_path, rows)
    report.rows = len(rows)
    return report


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blspkd_jax.data.prepare",
        description="Write a JSON Lines manifest for LibriSpeech, Common Voice, GigaSpeech or a "
        "local Hugging Face audio dataset.",
    )
    sub = parser.add_subparsers(dest="corpus", required=True)
    specs = {
        "librispeech": "subset folders, comma-separated (default: all under SRC)",
        "commonvoice": "TSV to read: train, dev, test, validated, ... (default: train)",
        "gigaspeech": f"subset: one of {' '.join(GIGASPEECH_SUBSETS)} (default: XS)",
        "hf-audio": "split of a DatasetDict folder, or prefix of the Parquet files to read",
    }
    for name, split_help in specs.items():
        p = sub.add_parser(name, help=f"prepare a {name} folder")
        p.add_argument("src", help="the corpus folder as published")
        p.add_argument("--out", required=True, help="manifest to write (.jsonl)")
        p.add_argument("--split", default=None, help=split_help)
        p.add_argument(
            "--relative",
            action="store_true",
            help="write audio paths relative to the manifest's folder (default: absolute)",
        )
        p.add_argument("--case", choices=CASES, default="keep", help="transcript case")
        if name == "commonvoice":
            p.add_argument("--lang", default=None, help="language folder when SRC holds several")
        if name == "hf-audio":
            p.add_argument("--text-column", default="text", help="the transcript's column")
            p.add_argument("--audio-column", default="audio", help="the datasets.Audio column")
            p.add_argument("--response-column", default=None, help="a column for 'response'")
            p.add_argument("--id-column", default=None, help="a column for 'id'")
            p.add_argument("--pack", default=None, metavar="DIR", help="then pack it into DIR")
            p.add_argument("--examples-per-shard", type=int, default=1000, help="with --pack")
            p.add_argument("--features", type=int, default=0, metavar="N_MELS", help="with --pack")
    args = parser.parse_args(argv)
    common = dict(relative=args.relative, case=args.case)
    try:
        if args.corpus == "librispeech":
            subsets = [s for s in (args.split or "").split(",") if s] or None
            report = librispeech(args.src, args.out, subsets=subsets, **common)
        elif args.corpus == "commonvoice":
            report = commonvoice(
                args.src, args.out, split=args.split or "train", lang=args.lang, **common
            )
        elif args.corpus == "gigaspeech":
            report = gigaspeech(args.src, args.out, subset=args.split or "XS", **common)
        else:
            report = hf_audio(
                args.src,
                args.out,
                text_column=args.text_column,
                audio_column=args.audio_column,
                response_column=args.response_column,
                id_column=args.id_column,
                split=args.split,
                **common,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.rows == 0:
        print(f"error: {args.out}: no usable rows", file=sys.stderr)
        return 1
    if getattr(args, "pack", None):
        from blspkd_jax.data.pack import pack

        pack(
            args.out,
            args.pack,
            examples_per_shard=args.examples_per_shard,
            features=args.features,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
