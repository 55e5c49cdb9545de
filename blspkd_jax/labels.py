"""Continuation labels (BLSP's "continuation writing", SPEC section 5): the frozen LLM continues
each transcript under an instruction, and that continuation becomes the row's `response`.

    python -m blspkd_jax.labels --llm HF_DIR --manifest IN.jsonl --out OUT.jsonl \\
        [--instruction TEXT] [--system TEXT] [--batch-size N] [--max-new-tokens N]

Rows are written to OUT in the manifest's order, one flushed line at a time, so an interrupted run
resumes: rows already in OUT (matched by "id", else by position) are skipped on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from blspkd_jax import generate as gen
from blspkd_jax.data.layout import CHATML_TEMPLATE, DEFAULT_SYSTEM, ChatLayout, text_ids
from blspkd_jax.data.manifest import DataError

# BLSP's continuation instruction. It is prepended verbatim to the transcript in the user turn (the
# layout's `{instruction}{transcript}`), so it ends with the separator.
DEFAULT_INSTRUCTION = (
    "Continue the following text in a coherent and engaging style with less than 40 words.\n\n"
)
MIN_BUCKET = 16
WINDOW_BATCHES = 16  # rows are sorted by length within windows of this many batches


def bucket_length(n: int) -> int:
    """Padded prompt length: the next power of two (at least `MIN_BUCKET`), so that jit compiles
    one program per bucket rather than one per prompt length."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def stop_token_ids(config, tokenizer, layout: ChatLayout, instruction: str) -> tuple[int, ...]:
    """Every id that ends the assistant turn: the template's end-of-turn token, the tokenizer's
    eos and the LLM config's eos (Llama 3 instruct models end turns with <|eot_id|>, not eos)."""
    ids = {layout.template(instruction).suffix[-1]}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(gen.token_ids(config.eos_token_id))
    return tuple(sorted(ids))


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
    """
    layout = ChatLayout(tokenizer, system, chat_template, instruction)
    template = layout.template(instruction)
    stops = stop_token_ids(module.config, tokenizer, layout, instruction)
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
            ids = np.full((batch_size, P), layout.pad_id, np.int32)
            mask = np.zeros((batch_size, P), np.int32)
            for j, i in enumerate(rows):
                ids[j, P - len(prompts[i]) :] = prompts[i]
                mask[j, P - len(prompts[i]) :] = 1
            key = None if rng is None else jax.random.fold_in(rng, num_batches)
            new = gen.generate(
                module,
                params,
                input_ids=jnp.asarray(ids),
                attention_mask=jnp.asarray(mask),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=layout.pad_id,
                temperature=temperature,
                top_p=top_p,
                rng=key,
            )
            new = np.asarray(new)
            num_batches += 1
            for j, i in enumerate(rows):
                toks = new[j].tolist()
                cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
                results[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()
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


def read_rows(path: str) -> list[dict]:
    """The JSON objects of a manifest, one per non-blank line; each needs a string "text"."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected a JSON object with a string 'text'")
            rows.append(row)
    return rows


def _read_done(path: str) -> list[dict]:
    """Rows already written to OUT. An unfinished last line (the run was killed mid-write) is cut
    off the file; a malformed complete line is an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete, newline, partial = data.rpartition(b"\n")
    if partial:
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


def _write_all(path: str, rows: Sequence[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def label_manifest(manifest: str, out: str, module, params, tokenizer, **kwargs) -> tuple[int, int]:
    """Write `out`: every row of `manifest` with a "response" (see `continuations` for `kwargs`).

    Resumable: rows of `manifest` already in `out` (same "id", else same position, and the same
    "text") are kept and not generated again; the others are appended as they finish. Returns
    (rows kept, rows generated). The finished file lists the rows in the manifest's order.
    """
    if os.path.abspath(manifest) == os.path.abspath(out):
        raise ValueError(f"--out {out} must differ from --manifest (the input is never rewritten)")
    rows = read_rows(manifest)
    keys = _row_keys(rows)
    done_rows = _read_done(out)
    done = dict(zip(_row_keys(done_rows), done_rows, strict=True))
    for key, row in zip(keys, rows, strict=True):
        if key in done and done[key].get("text") != row["text"]:
            raise DataError(
                f"{out}: its row for {key[0]} {key[1]!r} has text {done[key].get('text')!r} but "
                f"{manifest} has {row['text']!r}: this output belongs to another manifest; "
                "delete it or choose another --out"
            )
    todo = [i for i, k in enumerate(keys) if k not in done]
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        responses = continuations(
            module, params, tokenizer, [rows[i]["text"] for i in todo], **kwargs
        )
        with open(out, "a", encoding="utf-8") as f:
            for i, resp in zip(todo, responses, strict=True):
                row = {**rows[i], "response": resp}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                done[keys[i]] = row
                done_rows.append(row)
    # Resumed around rows done out of order (or given an output with extra rows): put it in order.
    if _row_keys(done_rows) != keys:
        _write_all(out, [done[k] for k in keys])
    return len(rows) - len(todo), len(todo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.labels",
        description="Add a 'response' to every manifest row: the LLM's continuation of the "
        "transcript under an instruction (greedy by default). Rerunning resumes an unfinished OUT.",
    )
    ap.add_argument("--llm", required=True, help="Hugging Face LLM directory (with tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --llm)")
    ap.add_argument("--manifest", required=True, help="input JSON Lines manifest")
    ap.add_argument("--out", required=True, help="output manifest (resumed if it exists)")
    ap.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help="text put before the transcript in the user turn (default: BLSP's continuation "
        "instruction followed by a blank line)",
    )
    ap.add_argument(
        "--system", default=DEFAULT_SYSTEM, help="system prompt ('' for no system turn)"
    )
    ap.add_argument(
        "--chat-template",
        default=None,
        help="'chatml' or a Jinja file, for tokenizers without a chat template",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from blspkd_jax import hf

    template = args.chat_template
    if template == "chatml":
        template = CHATML_TEMPLATE
    elif template:
        with open(template, encoding="utf-8") as f:
            template = f.read()
    try:
        module, params = hf.load_llm(args.llm, dtype=jnp.dtype(args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.llm)
        kept, made = label_manifest(
            args.manifest,
            args.out,
            module,
            params,
            tokenizer,
            instruction=args.instruction,
            system=args.system or None,
            chat_template=template,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            rng=jax.random.key(args.seed) if args.temperature > 0 else None,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as e:  # DataError, LayoutError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {kept} rows kept from an earlier run, {made} generated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
