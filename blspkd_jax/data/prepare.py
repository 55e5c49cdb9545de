"""Turn LibriSpeech, Common Voice and GigaSpeech folders (their published layouts) into our JSON
Lines manifest (docs/method.md §6), with a progress bar and a summary of hours and skipped files.

    python -m blspkd_jax.data.prepare librispeech LibriSpeech --out ls.jsonl --split train-clean-100
    python -m blspkd_jax.data.prepare commonvoice cv-corpus-17.0/en --out cv.jsonl --split train
    python -m blspkd_jax.data.prepare gigaspeech GigaSpeech --out gs.jsonl --split XS
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

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


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blspkd_jax.data.prepare",
        description="Write a JSON Lines manifest for LibriSpeech, Common Voice or GigaSpeech.",
    )
    sub = parser.add_subparsers(dest="corpus", required=True)
    specs = {
        "librispeech": "subset folders, comma-separated (default: all under SRC)",
        "commonvoice": "TSV to read: train, dev, test, validated, ... (default: train)",
        "gigaspeech": f"subset: one of {' '.join(GIGASPEECH_SUBSETS)} (default: XS)",
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
        else:
            report = gigaspeech(args.src, args.out, subset=args.split or "XS", **common)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.rows == 0:
        print(f"error: {args.out}: no usable rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
