"""The scores of docs/method.md §7 on response strings: WER (jiwer), BLEU (sacrebleu) and exact
match, used by evaluation and by the demo's stand-in teacher alike."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import jiwer
import sacrebleu


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what WER is scored on."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(kept.split())


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER (total substitutions + deletions + insertions over total reference words) on
    `normalize_text`-ed strings. Pairs whose reference normalises to nothing are left out."""
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


def sentence_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of rows whose hypothesis equals its reference after `normalize_text` (one minus
    the sentence error rate of ASR)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"sentence_match: {len(hypotheses)} hypotheses, {len(references)} refs")
    if not hypotheses:
        return float("nan")
    pairs = zip(hypotheses, references, strict=True)
    return sum(normalize_text(h) == normalize_text(r) for h, r in pairs) / len(hypotheses)
