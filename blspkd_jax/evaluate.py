"""Evaluation (SPEC section 9): text-speech consistency on held-out pairs, and a trained run's
greedy responses scored against each other and against references.

    python -m blspkd_jax.evaluate --workdir DIR --manifest EVAL.jsonl [--step N] \\
        [--instruction TEXT] [--task asr|translation|continuation] [--out DIR/eval]

Consistency, per batch, is one jitted pass of teacher and student giving sums that add up over the
eval set: input_kl and response_kl (mean KL at the positions their losses use), top-1 agreement of
the two passes' next-token predictions at those positions, and the CIF length error
|N_pred - N| / N with N_pred = max(1, round(sum(alpha))) as inference would cut it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from blspkd_jax import losses, sharding, train_state
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data.manifest import BadRow, DataError
from blspkd_jax.llm import lm_head_kernel
from blspkd_jax.model import BLSPKD, LossConfig, loss_rows

log = logging.getLogger(__name__)

CONSISTENCY_KEYS = ("input_kl", "response_kl", "top1_input", "top1_response", "cif_length_error")


def consistency_sums(model: BLSPKD, params, batch, loss_cfg: LossConfig) -> dict[str, jax.Array]:
    """{name: (weighted sum, weight)} for one batch; divide after summing over batches."""
    student, teacher, aux = model.apply({"params": params}, batch)
    B, L, H = student.shape
    head = lm_head_kernel(model.config.llm, params["llm"])
    s, t = student.reshape(B * L, H), teacher.reshape(B * L, H)
    rows = {k: v.reshape(-1) for k, v in loss_rows(batch).items()}
    top_s = losses.top1_predictions(s, head, tile_rows=loss_cfg.tile_rows or None)
    top_t = losses.top1_predictions(t, head, tile_rows=loss_cfg.tile_rows or None)
    agree = (top_s == top_t).astype(jnp.float32)
    # Both KL terms from one pass over the vocabulary: one weight column per selection.
    names = ("input", "response")
    w = jnp.stack([rows[n] for n in names], -1).astype(jnp.float32)
    kl = losses.kd_kl(
        s, t, head, w, temperature=loss_cfg.temperature, tile_rows=loss_cfg.tile_rows or None
    )
    out = {}
    for k, name in enumerate(names):
        total = w[:, k].sum()
        out[f"{name}_kl"] = (kl[k] * total, total)
        out[f"top1_{name}"] = ((agree * w[:, k]).sum(), total)
    n = batch["text_lengths"].astype(jnp.float32)
    pred = jnp.maximum(1.0, jnp.round(aux["alpha_sum"]))
    ex = batch["example_mask"].astype(jnp.float32)
    err = jnp.abs(pred - n) / jnp.maximum(n, 1.0)
    out["cif_length_error"] = ((err * ex).sum(), ex.sum())
    return out


def consistency(
    model: BLSPKD, params, pipeline, mesh, loss_cfg: LossConfig, *, max_batches: int = 0
) -> dict[str, float]:
    """Consistency metrics over an eval pipeline (one ordered pass, or `max_batches`)."""
    step = jax.jit(functools.partial(consistency_sums, model, loss_cfg=loss_cfg))
    totals: dict[str, list[float]] = {k: [0.0, 0.0] for k in CONSISTENCY_KEYS}
    it = iter(pipeline)
    try:
        for i, batch in enumerate(it):
            if max_batches and i >= max_batches:
                break
            batch.pop("line", None)
            with sharding.activate(mesh):
                sums = step(params, train_state.global_batch(mesh, batch))
            for k, (num, den) in jax.device_get(sums).items():
                totals[k][0] += float(num)
                totals[k][1] += float(den)
    finally:
        it.close()
    return {k: (num / den if den else float("nan")) for k, (num, den) in totals.items()}


# ----------------------------------------------------------------------------------------------
# SPEC section 9's metrics for a trained run on an eval manifest:
#   python -m blspkd_jax.evaluate --workdir DIR --manifest EVAL.jsonl [--task asr] ...

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
    "bleu": "corpus BLEU of the speech responses against the references",
    "bleu_text": "corpus BLEU of the transcript-prompt responses against the references",
}


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what WER is scored on."""
    import unicodedata

    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(kept.split())


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER (total substitutions + deletions + insertions over total reference words) on
    `normalize_text`-ed strings. Pairs whose reference normalises to nothing are left out."""
    import jiwer

    pairs = [
        (normalize_text(h), normalize_text(r))
        for h, r in zip(hypotheses, references, strict=True)
        if normalize_text(r)
    ]
    if not pairs:
        return float("nan")
    return float(jiwer.wer([r for _, r in pairs], [h for h, _ in pairs]))


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100; its default 13a tokenizer, exp smoothing), one reference
    per row."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses, {len(references)} references")
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def exact_match(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of rows whose two responses are equal (after stripping outer whitespace)."""
    if len(a) != len(b):
        raise ValueError(f"exact_match: {len(a)} and {len(b)} responses")
    if not a:
        return float("nan")
    return sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True)) / len(a)


def prepare_manifest(
    manifest: str | os.PathLike, out: str | os.PathLike, instruction: str | None, max_rows: int = 0
) -> tuple[list[dict], list[BadRow]]:
    """Write the evaluated rows to `out` (absolute audio paths, explicit ids, `instruction` in
    every row when given, the first `max_rows` when > 0) so that the consistency pass and both
    generations read exactly the same prompts. Returns (the written objects, malformed rows)."""
    manifest = os.fspath(manifest)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"eval manifest not found: {manifest}")
    base = os.path.dirname(os.path.abspath(manifest))
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
    with open(out, "w") as f:
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
) -> dict:
    """SPEC section 9's metrics of a run (a workdir path or a loaded `workdir.Run`) on `manifest`.

    - consistency (`consistency()`): input_kl, response_kl, top1_input, top1_response,
      cif_length_error, over an eval pipeline built from the run's data config;
    - exact_match: greedy speech responses vs greedy transcript responses;
    - task "asr": wer (speech response vs the transcript) and wer_text (the text prompt's);
    - bleu and bleu_text against each row's "reference" (its reference output, e.g. the
      translation) when every row has one; task "translation" requires them;
    - task None: "translation" when every row has a "reference", else "continuation".
    `instruction` replaces every row's instruction. Rows the pipeline can't use (too long for the
    run's data config, unreadable audio) are skipped by both parts and counted in "skipped".
    Writes `out` (default WORKDIR/eval): manifest.jsonl (the rows evaluated), responses.jsonl,
    metrics.json and metrics.md; returns the metrics.
    """
    from blspkd_jax import generate as gen
    from blspkd_jax.data.pipeline import eval_pipeline
    from blspkd_jax.train import data_config
    from blspkd_jax.workdir import Run, RunError, load_run

    if not isinstance(run, Run):
        run = load_run(run, step)
    elif step is not None and step != run.step:
        raise RunError(f"evaluate_run: the given run is at step {run.step}, not {step}")
    out = Path(out) if out else run.workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    eval_manifest = out / "manifest.jsonl"
    objs, malformed = prepare_manifest(manifest, eval_manifest, instruction, max_rows)
    task = _infer_task(task, objs)
    if malformed:
        log.warning("%s: %d malformed rows skipped (%s)", manifest, len(malformed), malformed[0])

    devices = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    batch_size = -(-batch_size // devices) * devices  # the batch is split over data x fsdp
    dc = dataclasses.replace(
        data_config(run.config, 1),
        eval_manifest=str(eval_manifest),
        batch_size_per_process=batch_size,
        shuffle=False,
        **({} if worker_count is None else {"worker_count": worker_count}),
    )
    pipeline = eval_pipeline(dc, run.tokenizer, workdir=str(out), process_index=0, process_count=1)
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
        "rows": len(rows),
        "skipped": len(malformed) + len(pipeline.bad_rows),
    }
    metrics.update(consistency(run.model, run.params, pipeline, run.mesh, run.loss_cfg))
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    speech = gen.speech_responses(run, rows, **kw)
    text = gen.text_responses(run, rows, **kw)
    metrics["exact_match"] = exact_match(speech, text)
    references = None
    if task == "asr":
        metrics["wer"] = wer(speech, [r.text for r in rows])
        metrics["wer_text"] = wer(text, [r.text for r in rows])
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

    records = []
    for i, (r, s, t) in enumerate(zip(rows, speech, text, strict=True)):
        rec = {"id": r.id, "speech_response": s, "text_response": t, "transcript": r.text}
        if references is not None:
            rec[REFERENCE_KEY] = references[i]
        records.append(rec)
    gen.write_jsonl(out / "responses.jsonl", records)
    finite = {k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(finite, indent=1) + "\n")  # NaN: null
    (out / "metrics.md").write_text(metrics_markdown(metrics))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.evaluate", description=__doc__)
    ap.add_argument("--workdir", required=True, help="a training run's workdir")
    ap.add_argument("--manifest", required=True, help="eval JSON Lines (audio, text, ...)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--instruction", default=None, help="replaces every row's instruction")
    ap.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="asr: WER against the transcript; translation: BLEU against each row's "
        f"'{REFERENCE_KEY}'; default: translation if every row has one, else continuation",
    )
    ap.add_argument("--out", default=None, help="output folder (default: WORKDIR/eval)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=0, help="evaluate the first N rows (0: all)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from blspkd_jax.workdir import RunError

    try:
        metrics = evaluate_run(
            args.workdir,
            args.manifest,
            step=args.step,
            instruction=args.instruction,
            task=args.task,
            out=args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_rows=args.max_rows,
        )
    except (RunError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(metrics_markdown(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
