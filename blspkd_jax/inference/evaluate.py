"""Evaluation of a trained run (docs/method.md §7, `python -m blspkd_jax.evaluate`): text-speech
consistency on held-out pairs (`training.objective.consistency`) and the run's greedy responses
from speech and from the transcript, scored against each other and against references.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
from etils import epath

from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data import storage
from blspkd_jax.data.manifest import BadRow, DataError, write_jsonl
from blspkd_jax.data.pipeline import eval_pipeline
from blspkd_jax.inference import multihost
from blspkd_jax.inference.metrics import bleu, exact_match, sentence_match, wer
from blspkd_jax.inference.respond import speech_responses, text_responses
from blspkd_jax.inference.workdir import Run, RunError, load_run
from blspkd_jax.training.objective import consistency

log = logging.getLogger(__name__)

TASKS = ("asr", "translation", "continuation")
REFERENCE_KEY = "reference"  # a row's reference output for BLEU (e.g. its translation)

DESCRIPTIONS = {
    "input_kl": "mean KL(teacher || student) at the transcript positions (T = loss.temperature)",
    "response_kl": "mean KL(teacher || student) at the response positions",
    "top1_input": "top-1 agreement of teacher and student at the transcript positions",
    "top1_response": "top-1 agreement of teacher and student at the response positions",
    "cif_length_error": "mean |N_pred - N| / N, N_pred = max(1, round(sum alpha))",
    "exact_match": "greedy response from speech == greedy response from the transcript",
    "wer": "WER of the speech response against the transcript",
    "wer_text": "WER of the transcript-prompt response against the transcript",
    "sentence_match": "speech response == transcript (normalised; 1 - sentence error rate)",
    "sentence_match_text": "transcript-prompt response == transcript (normalised)",
    "bleu": "corpus BLEU of the speech responses against the references",
    "bleu_text": "corpus BLEU of the transcript-prompt responses against the references",
}


def prepare_manifest(
    manifest: str | os.PathLike, out: str | os.PathLike, instruction: str | None, max_rows: int = 0
) -> tuple[list[dict], list[BadRow]]:
    """Write the evaluated rows to `out` (absolute audio paths, explicit ids, `instruction` in
    every row when given, the first `max_rows` when > 0) so that the consistency pass and both
    generations read exactly the same prompts. Returns (the written objects, malformed rows)."""
    manifest = os.fspath(manifest)
    if not storage.isfile(manifest):
        raise FileNotFoundError(f"eval manifest not found: {manifest}")
    base = storage.parent(manifest)
    kept, bad = [], []
    for number, _, text in manifest_lib.iter_lines(manifest):
        if max_rows and len(kept) >= max_rows:
            break
        try:
            row = manifest_lib.parse_line(text, number, base)
        except ValueError as e:
            bad.append(BadRow(manifest, number, str(e)))
            continue
        obj = {**json.loads(text), "audio": row.audio, "id": row.id}
        if instruction is not None:
            obj["instruction"] = instruction
        kept.append(obj)
    with storage.open(out, "w") as f:
        for obj in kept:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return kept, bad


def _infer_task(task: str | None, objs: Sequence[dict]) -> str:
    if task is None:
        has_refs = bool(objs) and all(isinstance(o.get(REFERENCE_KEY), str) for o in objs)
        return "translation" if has_refs else "continuation"
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def evaluate_run(
    run,
    manifest: str | os.PathLike,
    *,
    step: int | None = None,
    instruction: str | None = None,
    task: str | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    max_rows: int = 0,
    worker_count: int | None = None,
    progress: bool = True,
    rule: str = "offline",
) -> dict:
    """The metrics of docs/method.md §7 for a run (a workdir path or a loaded `workdir.Run`) on
    `manifest`:

    - consistency (`consistency()`): input_kl, response_kl, top1_input, top1_response,
      cif_length_error, over an eval pipeline built from the run's data config;
    - exact_match: greedy speech responses vs greedy transcript responses;
    - task "asr": wer (speech response vs the transcript) and wer_text (the text prompt's),
      sentence_match and sentence_match_text (whole response == transcript, normalised);
    - bleu and bleu_text against each row's "reference" (its reference output, e.g. the
      translation) when every row has one; task "translation" requires them;
    - task None: "translation" when every row has a "reference", else "continuation".
    `rule` is how speech becomes vectors for the generations (`respond.RULES`: "stream" is
    what a stream computes). `instruction` replaces every row's instruction. Rows the pipeline
    can't use (too long for the run's data config, unreadable audio) are skipped by both parts
    and counted in "skipped".
    Writes `out` (default WORKDIR/eval): manifest.jsonl (the rows evaluated), responses.jsonl,
    metrics.json and metrics.md; returns the metrics.

    On several processes (a multi-host mesh) every process calls this alike: each loads its own
    rows of every batch (the consistency pass and both generations), the metrics come out the
    same on every process, and process 0 writes `out`.
    """
    if not isinstance(run, Run):
        run = load_run(run, step)
    elif step is not None and step != run.step:
        raise RunError(f"evaluate_run: the given run is at step {run.step}, not {step}")
    out = storage.as_path(out) if out else run.workdir / "eval"  # local, or a URL
    writer = multihost.is_writer()
    # Every process reads the same rows. Process 0 keeps them in OUT; the others in a local
    # scratch file, so no process depends on seeing another's disk.
    scratch = None
    if writer:
        storage.makedirs(out)
        eval_manifest = out / "manifest.jsonl"
    else:
        scratch = tempfile.TemporaryDirectory(prefix="blspkd-eval-")
        eval_manifest = Path(scratch.name) / "manifest.jsonl"
    try:
        return _evaluate(
            run,
            manifest,
            eval_manifest,
            out,
            instruction=instruction,
            task=task,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_rows=max_rows,
            worker_count=worker_count,
            progress=progress,
            rule=rule,
        )
    finally:
        if scratch is not None:
            scratch.cleanup()


def _evaluate(
    run,
    manifest,
    eval_manifest: Path,
    out: epath.Path,
    *,
    instruction,
    task,
    batch_size,
    max_new_tokens,
    max_rows,
    worker_count,
    progress,
    rule,
) -> dict:
    writer = multihost.is_writer()
    objs, malformed = prepare_manifest(manifest, eval_manifest, instruction, max_rows)
    task = _infer_task(task, objs)
    if malformed and writer:
        log.warning("%s: %d malformed rows skipped (%s)", manifest, len(malformed), malformed[0])

    processes = jax.process_count()
    # The batch is split over data x fsdp, and each process loads its own share of it.
    devices = math.lcm(multihost.batch_divisor(run.mesh), processes)
    batch_size = -(-batch_size // devices) * devices
    dc = dataclasses.replace(
        run.data,
        eval_manifest=str(eval_manifest),
        batch_size_per_process=batch_size // processes,
        shuffle=False,
        **({} if worker_count is None else {"worker_count": worker_count}),
    )
    pipeline = eval_pipeline(
        dc,
        run.tokenizer,
        workdir=str(out) if writer else None,  # process 0 lists the skipped rows
        process_index=jax.process_index(),
        process_count=processes,
    )
    usable = {int(x) for x in pipeline.index.lines}
    rows, _ = manifest_lib.read_manifest(eval_manifest)
    rows = [r for r in rows if r.line in usable]
    objs = [objs[r.line - 1] for r in rows]  # the written manifest has no blank lines

    metrics: dict = {
        "workdir": str(run.workdir),
        "step": run.step,
        "manifest": os.fspath(manifest),
        "task": task,
        "instruction": instruction,
        "rule": rule,
        "rows": len(rows),
        "skipped": len(malformed) + len(pipeline.bad_rows),
    }
    metrics.update(consistency(run.model, run.params, pipeline, run.mesh, run.loss_cfg))
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    speech = speech_responses(run, rows, rule=rule, **kw)
    text = text_responses(run, rows, **kw)
    metrics["exact_match"] = exact_match(speech, text)
    references = None
    if task == "asr":
        metrics["wer"] = wer(speech, [r.text for r in rows])
        metrics["wer_text"] = wer(text, [r.text for r in rows])
        metrics["sentence_match"] = sentence_match(speech, [r.text for r in rows])
        metrics["sentence_match_text"] = sentence_match(text, [r.text for r in rows])
    missing = [r.line for r, o in zip(rows, objs, strict=True) if REFERENCE_KEY not in o]
    if task == "translation" and missing:
        raise DataError(
            f"{eval_manifest}:{missing[0]}: task 'translation' needs a {REFERENCE_KEY!r} "
            f"(the reference translation) in every row; {len(missing)} rows have none"
        )
    if rows and not missing:  # BLEU wherever every row carries a reference
        references = [str(o[REFERENCE_KEY]) for o in objs]
        metrics["bleu"] = bleu(speech, references)
        metrics["bleu_text"] = bleu(text, references)

    if writer:
        records = []
        for i, (r, s, t) in enumerate(zip(rows, speech, text, strict=True)):
            rec = {"id": r.id, "speech_response": s, "text_response": t, "transcript": r.text}
            if references is not None:
                rec[REFERENCE_KEY] = references[i]
            records.append(rec)
        write_jsonl(out / "responses.jsonl", records)
        finite = {k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()}
        (out / "metrics.json").write_text(json.dumps(finite, indent=1) + "\n")  # NaN: null
        (out / "metrics.md").write_text(metrics_markdown(metrics))
    multihost.barrier("evaluation written")
    return metrics


def metrics_markdown(metrics: dict) -> str:
    """The metrics as a markdown table, one metric a row, with what each measures."""
    head = (
        f"# Evaluation: {metrics['workdir']} at step {metrics['step']}\n\n"
        f"manifest `{metrics['manifest']}`, task {metrics['task']}, "
        f"{metrics['rows']} rows ({metrics['skipped']} skipped)"
        + (f", instruction {metrics['instruction']!r}" if metrics["instruction"] else "")
        + "\n\n| metric | value | what it measures |\n|---|---:|---|\n"
    )
    lines = [
        f"| {k} | {metrics[k]:.4f} | {desc} |" for k, desc in DESCRIPTIONS.items() if k in metrics
    ]
    return head + "\n".join(lines) + "\n"
