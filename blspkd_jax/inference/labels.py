"""Continuation labels (BLSP's "continuation writing", docs/method.md §5): the frozen LLM continues
each transcript under an instruction, and that continuation becomes the row's `response`
(`python -m blspkd_jax.labels`).

Rows are written to OUT in the manifest's order, one flushed line at a time, so an interrupted run
resumes: rows already in OUT (matched by "id", else by position) are skipped on the next run.
Audio paths are rewritten to resolve from OUT's folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from blspkd_jax.data import storage
from blspkd_jax.data.layout import DEFAULT_SYSTEM, ChatLayout, text_ids
from blspkd_jax.data.manifest import DataError, read_rows, write_jsonl
from blspkd_jax.inference import multihost
from blspkd_jax.inference.generate import (
    bucket_length,
    decode_response,
    generate,
    stop_token_ids,
)

# BLSP's continuation instruction. It is prepended verbatim to the transcript in the user turn (the
# layout's `{instruction}{transcript}`), so it ends with the separator.
DEFAULT_INSTRUCTION = (
    "Continue the following text in a coherent and engaging style with less than 40 words.\n\n"
)
WINDOW_BATCHES = 16  # rows are sorted by length within windows of this many batches


def continuations(
    module,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = DEFAULT_SYSTEM,
    chat_template: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng=None,
    progress: bool = False,
) -> Iterator[str]:
    """The LLM's continuation of each transcript, yielded in input order as soon as it and every
    earlier one are done.

    Prompt: the chat template with `system`, a user turn `instruction + transcript` and the
    assistant's generation prompt (exactly the prompt part of the training layout). Within windows
    of `WINDOW_BATCHES` batches, prompts are sorted by length, left-padded to `bucket_length` and
    run `batch_size` at a time (short batches are filled with empty rows). A response is the new
    tokens up to the first end-of-turn/eos token, decoded without special tokens and stripped.
    Greedy by default; `temperature > 0` samples (needs `rng`; one key per batch).

    `params` may be sharded over a multi-process mesh (`hf.load_llm(path, dtype, mesh=)`): every
    process then calls this with the same texts, each copies its own rows of every batch in,
    and every process gets every response.
    """
    layout = ChatLayout(tokenizer, system, chat_template, instruction)
    template = layout.template(instruction)
    stops = stop_token_ids(module.config.eos_token_id, tokenizer, layout, instruction)
    if temperature > 0 and rng is None:
        raise ValueError("continuations: sampling (temperature > 0) needs rng, a jax.random key")
    window = batch_size * WINDOW_BATCHES
    bar = tqdm(total=len(texts), desc="continuations", unit="row", disable=not progress)
    num_batches = 0
    for w0 in range(0, len(texts), window):
        chunk = list(texts[w0 : w0 + window])
        transcripts = text_ids(tokenizer, chunk)
        prompts = [[*template.prefix, *ids, *template.middle] for ids in transcripts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[str | None] = [None] * len(prompts)
        emitted = 0
        for b0 in range(0, len(order), batch_size):
            rows = order[b0 : b0 + batch_size]
            P = bucket_length(max(len(prompts[i]) for i in rows))
            # Host prompts, whole on every process; generate copies each process's rows in.
            ids = np.full((batch_size, P), layout.pad_id, np.int32)
            mask = np.zeros((batch_size, P), np.int32)
            for j, i in enumerate(rows):
                ids[j, P - len(prompts[i]) :] = prompts[i]
                mask[j, P - len(prompts[i]) :] = 1
            key = None if rng is None else jax.random.fold_in(rng, num_batches)
            new = generate(
                module,
                params,
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=layout.pad_id,
                temperature=temperature,
                top_p=top_p,
                rng=key,
            )
            new = multihost.to_host(new)  # every process decodes (the writer writes)
            num_batches += 1
            for j, i in enumerate(rows):
                results[i] = decode_response(tokenizer, new[j], stops)
            bar.update(len(rows))
            while emitted < len(results) and results[emitted] is not None:
                yield results[emitted]
                emitted += 1
    bar.close()


def add_continuations(module, params, tokenizer, rows: Iterable[dict], **kwargs) -> list[dict]:
    """`rows` (manifest dicts with a "text") with "response" set to the LLM's continuation; the
    keyword arguments are those of `continuations`."""
    rows = list(rows)
    responses = continuations(module, params, tokenizer, [r["text"] for r in rows], **kwargs)
    return [{**r, "response": resp} for r, resp in zip(rows, responses, strict=True)]


# ----------------------------------------------------------------------------------------------
# Manifests, resumable.


def _row_keys(rows: Sequence[dict]) -> list[tuple]:
    """Identity of each row for resuming: its "id" (with its occurrence number, should ids repeat),
    else its position among the manifest's rows."""
    seen: dict[str, int] = {}
    keys = []
    for pos, row in enumerate(rows):
        if row.get("id") is not None:
            rid = str(row["id"])
            keys.append(("id", rid, seen.get(rid, 0)))
            seen[rid] = seen.get(rid, 0) + 1
        else:
            keys.append(("pos", pos))
    return keys


def _read_done(path: str) -> list[dict]:
    """Rows already written to OUT. An unfinished last line (the run was killed mid-write) is cut
    off the file; a malformed complete line is an error. (An object in a bucket is whole: what
    it holds was uploaded at once.)"""
    if storage.is_url(path):
        p = storage.as_path(path)
        data = p.read_bytes() if p.exists() else b""
    elif os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    else:
        return []
    complete, newline, partial = data.rpartition(b"\n")
    if partial and not storage.is_url(path):
        with open(path, "r+b") as f:
            f.truncate(len(complete) + len(newline))
    rows = []
    for number, raw in enumerate(complete.split(b"\n") if newline else [], start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(
                f"{path}:{number}: malformed JSON; fix or delete this output file"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise DataError(f"{path}:{number}: expected a JSON object with a string 'response'")
        rows.append(row)
    return rows


def label_manifest(manifest: str, out: str, module, params, tokenizer, **kwargs) -> tuple[int, int]:
    """Write `out`: every row of `manifest` with a "response" (see `continuations` for `kwargs`).

    Resumable: rows of `manifest` already in `out` (same "id", else same position, and the same
    "text") are kept and not generated again; the others are appended as they finish. Returns
    (rows kept, rows generated). The finished file lists the rows in the manifest's order.
    On several processes, every process calls this alike; process 0 alone reads and writes `out`
    (the rows still to do are its decision, sent to the others).
    """
    manifest, out = os.fspath(manifest), os.fspath(out)
    if storage.as_path(manifest) == storage.as_path(out):
        raise DataError(f"--out {out} must differ from --manifest (the input is never rewritten)")
    folder = storage.parent(out)
    # Audio paths that resolve from OUT's folder (relative ones were relative to the manifest's).
    rows = [{**r.fields, "audio": r.audio_from(folder)} for r in read_rows(manifest)]
    keys = _row_keys(rows)
    writer = multihost.is_writer()
    done_rows: list[dict] = []
    done: dict = {}
    plan: dict = {"todo": [], "error": None}
    if writer:
        try:
            done_rows = _read_done(out)
            done = dict(zip(_row_keys(done_rows), done_rows, strict=True))
            _check_same_manifest(manifest, out, keys, rows, done)
            plan["todo"] = [i for i, k in enumerate(keys) if k not in done]
        except DataError as e:
            plan["error"] = str(e)
    plan = multihost.broadcast_json(plan)  # the others must not go on into collectives alone
    if plan["error"] is not None:
        raise DataError(plan["error"])
    todo = plan["todo"]
    if todo:
        responses = continuations(
            module, params, tokenizer, [rows[i]["text"] for i in todo], **kwargs
        )
        # A line at a time (in a bucket: the whole object again at most every 30 s and at the end).
        log = storage.LineLog(out) if writer else None
        try:
            for i, resp in zip(todo, responses, strict=True):
                if log is None:
                    continue
                row = {**rows[i], "response": resp}
                log.write(json.dumps(row, ensure_ascii=False))
                done[keys[i]] = row
                done_rows.append(row)
        finally:
            if log is not None:
                log.close()
    # Resumed around rows done out of order (or given an output with extra rows): put it in order.
    if writer and _row_keys(done_rows) != keys:
        write_jsonl(out, [done[k] for k in keys])
    multihost.barrier("labels written")
    return len(rows) - len(todo), len(todo)


def _check_same_manifest(manifest, out, keys, rows, done) -> None:
    """Refuse an `out` whose rows have other texts than `manifest`'s (another manifest's)."""
    for key, row in zip(keys, rows, strict=True):
        if key in done and done[key].get("text") != row["text"]:
            raise DataError(
                f"{out}: its row for {key[0]} {key[1]!r} has text {done[key].get('text')!r} but "
                f"{manifest} has {row['text']!r}: this output belongs to another manifest; "
                "delete it or choose another --out"
            )
