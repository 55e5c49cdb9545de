"""The embedded speech corpus: WordNet example sentences spoken by espeak-ng in several voice, rate
and pitch variants, written as 16 kHz WAV files with train and held-out manifests split by sentence.

    python -m blspkd_jax.data.corpus --out DIR [--num-sentences N] [--variants K]
        [--voices-per-sentence P] [--heldout-fraction F] [--seed S] [--workers W]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from blspkd_jax.demo import sentences as sentences_lib

SAMPLE_RATE = 16_000
# espeak-ng pads every utterance with up to half a second of silence; keep a short margin only.
SILENCE_MARGIN_S = 0.1
SILENCE_LEVEL = 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One speaker of the corpus: an espeak-ng voice (language+variant), speed and pitch."""

    name: str
    voice: str  # espeak-ng -v, e.g. "en-gb+f3" (accent + voice variant)
    rate: int  # espeak-ng -s, words per minute
    pitch: int  # espeak-ng -p, 0..99


# Eight accents of English crossed with female and male voice variants, rates and pitches.
VARIANTS = (
    Variant("v0", "en-us", 165, 50),
    Variant("v1", "en-gb+f3", 150, 65),
    Variant("v2", "en-us+m3", 185, 40),
    Variant("v3", "en-gb-scotland+f2", 140, 58),
    Variant("v4", "en-029+m5", 170, 45),
    Variant("v5", "en-gb-x-rp+f4", 175, 72),
    Variant("v6", "en-us-nyc+m7", 155, 35),
    Variant("v7", "en-gb-x-gbclan+f1", 160, 60),
)

DEFAULTS = dict(
    num_sentences=3000, variants=len(VARIANTS), voices_per_sentence=1, heldout_fraction=0.1, seed=0
)


def find_espeak(install: bool = True) -> str:
    """Path of the espeak-ng binary; installs the Debian package with apt-get when missing and we
    are root, otherwise raises with the command to run."""
    path = shutil.which("espeak-ng")
    if path:
        return path
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("espeak-ng not found: installing it with apt-get", file=sys.stderr)
        try:
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "espeak-ng"], check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"installing espeak-ng with apt-get failed ({e})") from e
        path = shutil.which("espeak-ng")
        if path:
            return path
    raise RuntimeError(
        "espeak-ng is not installed (the embedded corpus is spoken by it): run "
        "'sudo apt-get install espeak-ng' on Debian/Ubuntu, 'brew install espeak-ng' on macOS, "
        "or put an espeak-ng binary on PATH"
    )


def check_variants(espeak: str, variants: tuple[Variant, ...]) -> None:
    """espeak-ng silently falls back to its default voice for an unknown name, so check each
    variant's language and voice variant against its own voice lists first."""

    def listed(arg: str, column: int) -> set[str]:
        out = subprocess.run([espeak, arg], capture_output=True, text=True, check=True).stdout
        return {line.split()[column] for line in out.splitlines()[1:] if line.split()}

    languages = listed("--voices=en", 1)
    variant_files = {f.split("/")[-1] for f in listed("--voices=variant", 4)}
    for v in variants:
        language, _, variant = v.voice.partition("+")
        if language not in languages or (variant and variant not in variant_files):
            raise ValueError(
                f"voice variant {v.name}: espeak-ng ({espeak}) has no voice {v.voice!r}; "
                f"languages {sorted(languages)}, variants like f1..f5, m1..m7"
            )


def synthesize(espeak: str, text: str, variant: Variant) -> np.ndarray:
    """`text` spoken by `variant`: float32 mono samples at 16 kHz, silence trimmed to a margin."""
    cmd = [espeak, "-v", variant.voice, "-s", str(variant.rate), "-p", str(variant.pitch)]
    # Text goes in on stdin so that no sentence can be read as a command-line option.
    proc = subprocess.run([*cmd, "--stdout"], input=text.encode(), capture_output=True)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(
            f"espeak-ng failed on {text!r} with voice {variant.voice}: "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    audio = soxr.resample(audio, sr, SAMPLE_RATE, "HQ")
    loud = np.flatnonzero(np.abs(audio) > SILENCE_LEVEL)
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r} with voice {variant.voice}")
    margin = int(SILENCE_MARGIN_S * SAMPLE_RATE)
    return audio[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def _write_wav(path: Path, audio: np.ndarray) -> int:
    # Write then rename, so an interrupted build never leaves a truncated file that looks complete.
    tmp = path.with_name(path.name + ".part")
    sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return len(audio)


def plan(
    sentences: list[str],
    *,
    num_sentences: int,
    variants: int,
    voices_per_sentence: int,
    heldout_fraction: float,
    seed: int,
) -> dict[str, list[dict]]:
    """Which sentence goes to which split and voices: {"train": [...], "eval": [...]}, each item
    {"id", "audio", "text", "variant"}. Sentences are split before voices are drawn, so a held-out
    sentence never appears in train in any voice. A pure function of its arguments."""
    if not 1 <= variants <= len(VARIANTS):
        raise ValueError(f"--variants {variants}: expected 1..{len(VARIANTS)} (the variant table)")
    if not 1 <= voices_per_sentence <= variants:
        raise ValueError(
            f"--voices-per-sentence {voices_per_sentence}: expected 1..--variants ({variants})"
        )
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction {heldout_fraction}: expected 0 <= F < 1")
    if not 1 <= num_sentences <= len(sentences):
        raise ValueError(
            f"--num-sentences {num_sentences}: expected 1..{len(sentences)} (sentences available)"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(sentences))[:num_sentences]
    n_eval = int(round(num_sentences * heldout_fraction))
    if heldout_fraction > 0 and num_sentences >= 2:
        n_eval = min(max(n_eval, 1), num_sentences - 1)
    width = len(str(len(sentences) - 1))
    splits = {"train": [], "eval": []}
    for i, idx in enumerate(chosen):
        voices = np.sort(rng.choice(variants, size=voices_per_sentence, replace=False))
        split = "eval" if i < n_eval else "train"
        for v in voices:
            uid = f"s{idx:0{width}d}-{VARIANTS[v].name}"
            splits[split].append(
                {"id": uid, "audio": f"wavs/{uid}.wav", "text": sentences[idx], "variant": int(v)}
            )
    return splits


def _content_key(sentences: list[str]) -> str:
    # File names are (sentence index, variant name); they stay valid across seeds and sizes but not
    # across a different sentence list or variant table, which this key detects.
    h = hashlib.sha256("\n".join(sentences).encode())
    h.update(repr((VARIANTS, SAMPLE_RATE, SILENCE_MARGIN_S)).encode())
    return h.hexdigest()[:16]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_corpus(
    out_dir: str | Path,
    *,
    num_sentences: int = DEFAULTS["num_sentences"],
    variants: int = DEFAULTS["variants"],
    voices_per_sentence: int = DEFAULTS["voices_per_sentence"],
    heldout_fraction: float = DEFAULTS["heldout_fraction"],
    seed: int = DEFAULTS["seed"],
    workers: int | None = None,
    sentences_file: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Build (or finish) the corpus in `out_dir`; returns the summary also written to
    `out_dir/summary.json`. Writes wavs/*.wav, train.jsonl, eval.jsonl, train_sentences.txt,
    eval_sentences.txt and content_key (a hash of the sentence list and the variant table).
    Existing WAVs are reused, so a rerun resumes and a complete one is a no-op.
    `sentences_file`: one sentence a line, cleaned like the built-in WordNet list."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if sentences_file is None:
        sentences = sentences_lib.load_sentences()
        source = sentences_lib.SOURCE
    else:
        raw = sentences_lib.load_sentences(sentences_file)
        sentences = [s for s in map(sentences_lib.clean_sentence, raw) if s is not None]
        source = f"{sentences_file} ({len(sentences)} of {len(raw)} lines kept after cleaning)"
    config = dict(
        num_sentences=num_sentences,
        variants=variants,
        voices_per_sentence=voices_per_sentence,
        heldout_fraction=heldout_fraction,
        seed=seed,
        content_key=_content_key(sentences),
    )
    summary_path = out_dir / "summary.json"
    if summary_path.is_file():
        previous = json.loads(summary_path.read_text())
        if previous.get("config") == config and all(
            (out_dir / name).is_file() for name in ("train.jsonl", "eval.jsonl")
        ):
            manifests = [out_dir / "train.jsonl", out_dir / "eval.jsonl"]
            rows = [json.loads(x) for m in manifests for x in m.read_text().splitlines()]
            if all((out_dir / r["audio"]).is_file() for r in rows):
                if progress:
                    print(f"{out_dir}: corpus already complete ({len(rows)} utterances)")
                return previous
    # Written before the first WAV, so an interrupted build is recognised too.
    key_path = out_dir / "content_key"
    if key_path.is_file() and key_path.read_text().strip() != config["content_key"]:
        raise ValueError(
            f"{out_dir} holds a corpus built from other sentences or voices (content key "
            f"{key_path.read_text().strip()} != {config['content_key']}); pass another --out or "
            "delete that folder"
        )

    splits = plan(
        sentences,
        num_sentences=num_sentences,
        variants=variants,
        voices_per_sentence=voices_per_sentence,
        heldout_fraction=heldout_fraction,
        seed=seed,
    )
    espeak = find_espeak()
    check_variants(espeak, VARIANTS[:variants])
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    _write_text(key_path, config["content_key"] + "\n")
    items = splits["train"] + splits["eval"]
    todo = [r for r in items if not (out_dir / r["audio"]).is_file()]
    pending = {r["id"] for r in todo}
    frames = {
        r["id"]: sf.info(str(out_dir / r["audio"])).frames for r in items if r["id"] not in pending
    }

    def job(r: dict) -> tuple[str, int]:
        audio = synthesize(espeak, r["text"], VARIANTS[r["variant"]])
        return r["id"], _write_wav(out_dir / r["audio"], audio)

    # Threads suffice: the work runs in espeak-ng child processes and in soxr/libsndfile, which
    # release the GIL, and no process is forked from a caller that may already hold JAX's threads.
    workers = workers or min(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2, 8
    )
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(
            total=len(todo), unit="utt", desc="espeak-ng", disable=not progress or not todo
        ) as bar,
    ):
        for uid, n in pool.map(job, todo):
            frames[uid] = n
            bar.update()

    summary = dict(
        config=config,
        out_dir=str(out_dir),
        source=source,
        licence="WordNet 3.0 licence (see blspkd_jax/data/sentences_en.txt)"
        if sentences_file is None
        else "as given by the sentence file",
        sample_rate=SAMPLE_RATE,
        variants={v.name: dataclasses.asdict(v) for v in VARIANTS[:variants]},
        synthesized=len(todo),
    )
    for split, rows in splits.items():
        lines = [json.dumps({k: r[k] for k in ("id", "audio", "text")}) for r in rows]
        _write_text(out_dir / f"{split}.jsonl", "".join(x + "\n" for x in lines))
        texts = list(dict.fromkeys(r["text"] for r in rows))
        _write_text(out_dir / f"{split}_sentences.txt", "".join(t + "\n" for t in texts))
        summary[split] = dict(
            sentences=len(texts),
            utterances=len(rows),
            hours=sum(frames[r["id"]] for r in rows) / SAMPLE_RATE / 3600,
        )
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    if progress:
        tr, ev = summary["train"], summary["eval"]
        print(
            f"{out_dir}: train {tr['utterances']} utterances of {tr['sentences']} sentences "
            f"({tr['hours']:.2f} h), eval {ev['utterances']} utterances of {ev['sentences']} "
            f"sentences ({ev['hours']:.2f} h); {len(todo)} synthesized in {summary['seconds']} s"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blspkd_jax.data.corpus",
        description="Build the embedded espeak-ng speech corpus (offline, deterministic).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-sentences", type=int, default=DEFAULTS["num_sentences"])
    parser.add_argument(
        "--variants",
        type=int,
        default=DEFAULTS["variants"],
        help=f"how many voice/rate/pitch variants of the table to use (1..{len(VARIANTS)})",
    )
    parser.add_argument(
        "--voices-per-sentence",
        type=int,
        default=DEFAULTS["voices_per_sentence"],
        help="variants each sentence is spoken in (drawn from the seed)",
    )
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULTS["heldout_fraction"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--workers", type=int, default=None, help="parallel espeak-ng processes")
    parser.add_argument(
        "--sentences", default=None, help="own sentence file (default: built-in WordNet list)"
    )
    args = parser.parse_args(argv)
    try:
        build_corpus(
            args.out,
            num_sentences=args.num_sentences,
            variants=args.variants,
            voices_per_sentence=args.voices_per_sentence,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            workers=args.workers,
            sentences_file=args.sentences,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
