"""Responses from a trained run: speech prompts (the CFormer's vectors spliced into the chat
template where the transcript would be) and, for comparison, the transcript's text prompts, both
decoded greedily in batches of similar length (what `python -m blspkd_jax.generate speech`,
evaluation and the export check run).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data.features import log_mel, pad_features
from blspkd_jax.data.layout import text_ids
from blspkd_jax.data.manifest import BadRow, DataError
from blspkd_jax.inference import multihost
from blspkd_jax.inference.generate import (
    batch_rules,
    bucket_length,
    decode_response,
    generate,
    param_shardings,
    stop_token_ids,
)
from blspkd_jax.models import sharding
from blspkd_jax.models.blspkd import BLSPKD, splice_speech
from blspkd_jax.models.llm import LLM


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded generation prompts `[B, P]`: the prompt part of the training layout (system
    turn, user turn = instruction + transcript-or-speech, assistant header)."""

    input_ids: np.ndarray  # int32; speech slots and padding hold the layout's pad id
    attention_mask: np.ndarray  # bool: False = left padding; an all-False row is batch filler
    speech_mask: np.ndarray  # bool: the speech slots (the speech vectors go here, PLoRA on)


def build_prompts(
    layout, spans: Sequence, instructions: Sequence[str | None] | None = None, *, batch_size=None
) -> PromptBatch:
    """Prompts from the layout's template pieces around each row's span.

    `spans[b]` is an int N (N speech slots: inference's CIF length, which varies per row) or a
    sequence of token ids (a text prompt). `instructions[b]` None means the layout's default.
    The length is `generate.bucket_length` of the longest; rows beyond `len(spans)` up to
    `batch_size` are filler (no tokens).
    """
    instructions = [None] * len(spans) if instructions is None else list(instructions)
    B = len(spans) if batch_size is None else batch_size
    if len(spans) > B or len(instructions) != len(spans):
        raise ValueError(
            f"build_prompts: {len(spans)} spans, {len(instructions)} instructions, batch {B}"
        )
    pieces = []
    for span, ins in zip(spans, instructions, strict=True):
        t = layout.template(ins)
        speech = isinstance(span, int | np.integer)
        mid = [layout.pad_id] * int(span) if speech else [int(i) for i in span]
        ids = [*t.prefix, *mid, *t.middle]
        mask = [False] * len(t.prefix) + [speech] * len(mid) + [False] * len(t.middle)
        pieces.append((ids, mask))
    P = bucket_length(max((len(ids) for ids, _ in pieces), default=1))
    out = PromptBatch(
        input_ids=np.full((B, P), layout.pad_id, np.int32),
        attention_mask=np.zeros((B, P), bool),
        speech_mask=np.zeros((B, P), bool),
    )
    for b, (ids, mask) in enumerate(pieces):
        out.input_ids[b, P - len(ids) :] = ids
        out.attention_mask[b, P - len(ids) :] = True
        out.speech_mask[b, P - len(ids) :] = mask
    return out


# How speech becomes vectors at inference: "offline", the paper's (log-mel clamped over the whole
# utterance, CIF rescaled to round(sum(alpha)) tokens), or "stream", what a stream computes
# (the causal log-mel, CIF's threshold rule: `inference.stream` equals it token for token).
RULES = ("offline", "stream")


def rule_model(model: BLSPKD, rule: str) -> BLSPKD:
    """`model` with CIF's firing rule for `rule` (the "stream" rule fires by threshold)."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} unknown, expected one of {RULES}")
    firing = "threshold" if rule == "stream" else model.config.adapter.firing
    if firing == model.config.adapter.firing:
        return model
    adapter = dataclasses.replace(model.config.adapter, firing=firing)
    return BLSPKD(dataclasses.replace(model.config, adapter=adapter))


@functools.partial(jax.jit, static_argnames=("model",))
def _speech_vectors(params, features, feature_mask, *, model: BLSPKD):
    tokens, token_mask, aux = model.apply(
        {"params": params}, features, feature_mask, method=BLSPKD.speech
    )
    return tokens, token_mask.sum(-1), aux["alphas"]


def _run_speech(run, features, feature_mask, rule="offline"):
    """Encoder + CFormer on a batch (host arrays, or global arrays split by batch) on the run's
    mesh, CIF firing by `rule` -> (vectors, counts, alphas) as global arrays split by batch."""
    place = lambda x: (  # noqa: E731
        x
        if isinstance(x, jax.Array)
        else multihost.global_from_host(x, multihost.batch_spec(run.mesh, np.shape(x)))
    )
    with sharding.activate(run.mesh, batch_rules(run.mesh, features.shape[0])):
        model = rule_model(run.model, rule)
        return _speech_vectors(run.params, place(features), place(feature_mask), model=model)


def speech_vectors(run, features, feature_mask, rule="offline", *, return_alphas=False):
    """Encoder + CFormer in inference mode (no target lengths: CIF emits
    `N_b = max(1, round(sum(alpha_b)))` vectors, at most `model.adapter.max_tokens`; under the
    "stream" rule by threshold).

    log-mel `[B, n_mels, F]`, mask `[B, F]` (host arrays of the whole batch, or global arrays
    split by batch) -> (vectors `[B, max_tokens, H]`, a global array split by batch; N `[B]` int
    on the host) and, with `return_alphas`, the firing weights `[B, ceil(F/2)]` on the host (as
    `speech_alphas`, from the same run of the program).
    """
    tokens, counts, alphas = _run_speech(run, features, feature_mask, rule)
    if return_alphas:
        return tokens, multihost.to_host(counts), multihost.to_host(alphas)
    return tokens, multihost.to_host(counts)


def speech_alphas(run, features, feature_mask) -> np.ndarray:
    """The CFormer's firing weights `[B, ceil(F/2)]` for log-mel `[B, n_mels, F]` (0 on padding),
    from the same compiled program as `speech_vectors`."""
    _, _, alphas = _run_speech(run, features, feature_mask)
    return multihost.to_host(alphas)


_SPLICE: dict = {}


def _splice(run, module: LLM, input_ids, speech_mask, vectors):
    """The prompt's text embeddings with `vectors` at the speech slots, `[B, P, H]`, split by
    batch on the run's mesh (jit with explicit shardings: the embedding table stays sharded)."""
    mesh = run.mesh
    key = (module, mesh, input_ids.shape, vectors.shape)
    if key not in _SPLICE:

        def splice(params, ids, mask, vec):
            text = module.apply({"params": params}, ids, method=LLM.embed)
            return splice_speech(text, vec, mask)

        B, P = input_ids.shape
        _SPLICE[key] = jax.jit(
            splice,
            in_shardings=(
                param_shardings(module, mesh),
                multihost.batch_spec(mesh, (B, P)),
                multihost.batch_spec(mesh, (B, P)),
                multihost.batch_spec(mesh, vectors.shape),
            ),
            out_shardings=multihost.batch_spec(mesh, (B, P, module.config.hidden_size)),
        )
    fn = _SPLICE[key]
    args = (
        input_ids,
        speech_mask,
        vectors,
    )
    placed = [
        x
        if isinstance(x, jax.Array)
        else multihost.global_from_host(x, multihost.batch_spec(mesh, x.shape))
        for x in args
    ]
    with sharding.activate(mesh, batch_rules(mesh, input_ids.shape[0])):
        return fn(nn.unbox(run.llm_params), *placed)


def generate_from_prompts(
    run,
    prompts: PromptBatch,
    vectors=None,
    *,
    lora: bool = True,
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> np.ndarray:
    """Greedy new tokens `[B, max_new_tokens]` for a prompt batch (on every process).

    With `vectors [B, N, H]`, the k-th speech slot of row b gets `vectors[b, k]` and PLoRA is on
    at the speech slots (`lora=False` switches it off: the base LLM); without, the prompt's ids
    are read as text. The prompts are host arrays every process holds whole (they are small);
    `vectors` may be a global array split by batch (`speech_vectors`).
    """
    llm_cfg = run.model.config.llm
    module = LLM(llm_cfg)
    kw = dict(
        attention_mask=prompts.attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tuple(stop_ids),
        pad_token_id=run.layout.pad_id,
        mesh=run.mesh,
    )
    if vectors is None:
        new = generate(module, run.llm_params, input_ids=prompts.input_ids, **kw)
        return multihost.to_host(new)
    embeds = _splice(run, module, prompts.input_ids, prompts.speech_mask, vectors)
    lora_mask = prompts.speech_mask if lora and llm_cfg.lora_rank else None
    new = generate(module, run.llm_params, inputs_embeds=embeds, lora_mask=lora_mask, **kw)
    return multihost.to_host(new)


def stop_ids_for(run, instructions: Sequence[str | None]) -> tuple[int, ...]:
    """Every id that ends the assistant turn under any of these instructions (the template's
    end-of-turn token, the tokenizer's and the LLM config's eos), as `labels` uses."""
    ids: set[int] = set()
    for ins in set(instructions) or {None}:
        ids.update(
            stop_token_ids(run.model.config.llm.eos_token_id, run.tokenizer, run.layout, ins)
        )
    return tuple(sorted(ids))


def _instructions(rows, instruction: str | None) -> list[str | None]:
    """`instruction` overrides every row's; else the row's own; else None (the run's default)."""
    return [instruction if instruction is not None else r.instruction for r in rows]


def frame_bucket(run, frames: int) -> int:
    """Mel frames to pad a batch to: the encoder's full window in 30 s mode, else the smallest
    of the run's frame buckets that fits (else the encoder's window)."""
    enc = run.model.config.encoder
    window = 2 * enc.max_source_positions
    if frames > window:
        raise ValueError(
            f"{frames} mel frames ({frames / 100:.2f} s) exceed the encoder's window of "
            f"{window} frames (model.encoder.max_source_positions={enc.max_source_positions})"
        )
    if enc.pad_to_30s:
        return window
    return next((int(f) for f in run.data.frame_buckets if f >= frames), window)


def _decode(run, rows, rule="offline") -> list[np.ndarray]:
    """Each row's log-mel `[n_mels, F_i]` (audio in any format, resampled to 16 kHz mono; the
    causal log-mel under the "stream" rule); a DataError names the row whose audio can't be read
    or is beyond the encoder's window."""
    n_mels = run.model.config.encoder.num_mel_bins
    feats = []
    for r in rows:
        try:
            wave = audio_lib.load(r.audio, r.offset, r.duration)
            f = log_mel(wave, n_mels, causal=rule == "stream")
            frame_bucket(run, f.shape[1])  # raises for audio beyond the encoder's window
        except ValueError as e:  # AudioError, too short for one STFT window, or too long
            raise DataError(f"line {r.line} (id {r.id!r}): {e}") from None
        feats.append(f)
    return feats


def load_features(run, rows, rule="offline") -> tuple[np.ndarray, np.ndarray]:
    """Decode rows' audio (any format, resampled to 16 kHz mono) to padded log-mels
    `([B, n_mels, F], mask [B, F])`, as the training pipeline pads them (`rule="stream"`: the
    causal log-mel)."""
    feats = _decode(run, rows, rule)
    longest = max(f.shape[1] for f in feats)
    return pad_features(feats, frame_bucket(run, longest))


def _round_batch(run, batch_size: int) -> int:
    """`batch_size` rounded up to split evenly over the mesh's batch devices (filler rows)."""
    n = multihost.batch_divisor(run.mesh)
    return -(-batch_size // n) * n


def audio_lengths(rows) -> list[int]:
    """16 kHz samples of each row's audio from the file headers (cheap: nothing is decoded);
    a DataError names the first row whose file is missing or unreadable."""
    lengths = []
    for r in rows:
        try:
            lengths.append(audio_lib.probe(r.audio, r.offset, r.duration).num_samples_16k)
        except audio_lib.AudioError as e:
            raise DataError(f"line {r.line} (id {r.id!r}): {e}") from None
    return lengths


def usable_rows(run, rows, manifest: str) -> tuple[list, list[BadRow]]:
    """(rows the run can answer, the others as `MANIFEST:LINE: reason`): the audio must exist,
    decode, hold more than one STFT window and fit the encoder's window. Read from the file
    headers only (nothing is decoded)."""
    window = 2 * run.model.config.encoder.max_source_positions
    good, bad = [], []
    for r in rows:
        try:
            n = audio_lib.probe(r.audio, r.offset, r.duration).num_samples_16k
        except audio_lib.AudioError as e:
            bad.append(BadRow(manifest, r.line, str(e), r.audio))
            continue
        frames = audio_lib.num_frames(n)
        if n <= audio_lib.MIN_SAMPLES:
            bad.append(BadRow(manifest, r.line, f"audio has {n} samples, too short", r.audio))
        elif frames > window:
            reason = f"audio is {n / 16000:.2f} s, longer than the encoder's {window / 100:g} s"
            bad.append(BadRow(manifest, r.line, reason, r.audio))
        else:
            good.append(r)
    return good, bad


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length, so padding and compiled shapes stay few."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _respond(
    run,
    rows: list,
    instruction: str | None,
    lengths: Callable[[list], Sequence[int]],
    batch_inputs: Callable[[list[int]], tuple[list, jax.Array | None]],
    desc: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> list[str]:
    """The batch loop that `speech_responses` and `text_responses` share (their arguments, in
    their order; `desc` names the progress bar): rows in batches of similar `lengths(rows)`, each
    batch's prompts (filler rows complete the last), greedy decoding, each row's response decoded
    up to its first stop id, returned in the rows' order.

    `batch_inputs(idx)` gives the batch's transcript slots (per row of `idx`: token ids, or a count
    of speech slots) and the speech vectors `[batch_size, N, H]` to splice there (None: text).
    """
    instructions = _instructions(rows, instruction)
    stops = stop_ids_for(run, instructions)
    out: list[str | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not progress)
    for idx in _by_length(lengths(rows), batch_size):
        slots, vectors = batch_inputs(idx)
        prompts = build_prompts(
            run.layout, slots, [instructions[i] for i in idx], batch_size=batch_size
        )
        new = generate_from_prompts(
            run, prompts, vectors, max_new_tokens=max_new_tokens, stop_ids=stops
        )
        for j, i in enumerate(idx):
            out[i] = decode_response(run.tokenizer, new[j], stops)
        bar.update(len(idx))
    bar.close()
    return out


def speech_responses(
    run,
    rows,
    *,
    instruction: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    rule: str = "offline",
) -> list[str]:
    """Greedy responses to each row's speech (manifest `Row`s, in their order), its vectors
    made by `rule` (`RULES`).

    Per batch (rows sorted by audio length, filler rows completing the last): log-mel ->
    encoder + CFormer in inference mode (N_b vectors) -> a prompt with N_b speech slots where the
    transcript would be -> spliced embeddings, PLoRA on at those slots during the prefill ->
    greedy decoding until an end-of-turn token.
    """
    rows = list(rows)
    rule_model(run.model, rule)  # an unknown rule fails before any audio is read
    batch_size = _round_batch(run, batch_size)
    n_mels = run.model.config.encoder.num_mel_bins

    def speech(idx):
        # Each process decodes only the rows its devices hold (filler rows repeat the batch's
        # first row's audio; their prompt is empty); the batch's frame bucket is agreed on.
        target = multihost.batch_spec(run.mesh, (batch_size, n_mels, 1))
        mine = multihost.local_rows(target, (batch_size, n_mels, 1))
        take = sorted({b if b < len(idx) else 0 for b in mine})
        decoded = _decode(run, [rows[idx[b]] for b in take], rule)
        F = frame_bucket(run, multihost.allmax(max(f.shape[1] for f in decoded)))
        host_feats, masks = pad_features(decoded, F)
        at = {b: k for k, b in enumerate(take)}
        pick = lambda a, b: a[at[b if b < len(idx) else 0]]  # noqa: E731
        feats = multihost.global_from_rows(
            (batch_size, n_mels, F), np.float32, target, lambda b: pick(host_feats, b)
        )
        mask_target = multihost.batch_spec(run.mesh, (batch_size, F))
        mask = multihost.global_from_rows(
            (batch_size, F), bool, mask_target, lambda b: pick(masks, b)
        )
        vectors, counts = speech_vectors(run, feats, mask, rule)
        return [int(n) for n in counts[: len(idx)]], vectors

    args = (max_new_tokens, batch_size, progress)
    return _respond(run, rows, instruction, audio_lengths, speech, "speech", *args)


def text_responses(
    run,
    rows,
    *,
    instruction: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy responses to each row's transcript (`Row.text`) in the same prompt: what the
    frozen LLM (PLoRA off) says when it reads the text. Speech and text responses that agree
    are the exact-match metric (docs/method.md §7)."""
    rows = list(rows)
    batch_size = _round_batch(run, batch_size)
    spans = text_ids(run.tokenizer, [r.text for r in rows]) if rows else []
    lengths = lambda _rows: [len(s) for s in spans]  # tokenized once, above
    text = lambda idx: ([spans[i] for i in idx], None)
    args = (max_new_tokens, batch_size, progress)
    return _respond(run, rows, instruction, lengths, text, "text", *args)
