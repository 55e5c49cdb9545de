"""Real English sentences for the embedded speech corpus: the usage examples of WordNet 3.0 (Debian
package `wordnet-base`), cleaned so espeak-ng reads them as written, kept to a modest vocabulary.

The selected sentences ship as `sentences_en.txt` beside this file, so building the corpus needs no
extra package; `python -m blspkd_jax.data.sentences` regenerates that file from the Debian package.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
SENTENCES_FILE = Path(__file__).with_name("sentences_en.txt")
# Verb and adverb examples illustrate a verb in use, so they are nearly always clauses; noun and
# adjective examples are often bare phrases ("a disorderly pile of clothes") and need a clause cue.
POS_FILES = ("verb", "adv", "noun", "adj")
VOCAB_SIZE = 3000
MIN_WORDS = 5
MAX_WORDS = 16

SOURCE = (
    "Usage examples from WordNet 3.0 (Princeton University), as shipped by the Debian package "
    "wordnet-base, files data.verb, data.adv, data.noun and data.adj"
)
LICENCE = """\
WordNet Release 3.0. This software and database is being provided to you, the LICENSEE, by Princeton
University under the following license. By obtaining, using and/or copying this software and
database, you agree that you have read, understood, and will comply with these terms and
conditions.:
Permission to use, copy, modify and distribute this software and database and its documentation for
any purpose and without fee or royalty is hereby granted, provided that you agree to comply with the
following copyright notice and statements, including the disclaimer, and that the same appear on ALL
copies of the software, database and documentation, including modifications that you make for
internal use or for distribution.
WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE
USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
The name of Princeton University or Princeton may not be used in advertising or publicity pertaining
to distribution of the software and/or database. Title to copyright in this software, database and
any associated documentation shall at all times remain with Princeton University and LICENSEE agrees
to preserve same."""

_CLAUSE_CUES = frozenset(
    " ".join(
        [
            "i he she we they you it there is are was were has have had will would can could",
            "should must may might do does did don't didn't won't can't i'm it's he's she's",
        ]
    ).split()
)
_ALLOWED = re.compile(r"[A-Za-z][A-Za-z ,;:'!?.\-]*")
# Each of these makes espeak-ng read something other than the words (acronyms spelled out,
# abbreviations, quoted or bracketed asides) or marks a fragment rather than a sentence.
_REJECT = re.compile(
    r"[A-Z]{2}"  # acronyms: NATO, US
    r"|[.!?](?!$)"  # sentence punctuation before the end: abbreviations, two sentences
    r"|(?<![A-Za-z])'|'(?![A-Za-z])"  # quotation marks, plural possessives
    r"|(?<![A-Za-z])-|-(?![A-Za-z])"  # dashes, dangling hyphens
    r"|[,;:]\s*[,;:]"
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(sentence: str) -> list[str]:
    """Lower-cased words of `sentence` (hyphenated compounds split, contractions kept whole)."""
    return _WORD.findall(sentence.lower())


def clean_sentence(
    raw: str, *, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS
) -> str | None:
    """Normalise one example to a sentence espeak-ng speaks as written, or None to drop it.

    Keeps ASCII letters, inner apostrophes and hyphens, and , ; : ! ? . as punctuation; rejects
    digits, acronyms, abbreviations, quotes and brackets. The result starts with a capital letter
    and ends with . ! or ?.
    """
    s = re.sub(r"\s+", " ", raw.replace("`", "'")).strip()
    s = re.sub(r"\s+([,;:!?.])", r"\1", s).rstrip(" ,;:")
    if not s or not _ALLOWED.fullmatch(s) or _REJECT.search(s):
        return None
    if not min_words <= len(words(s)) <= max_words:
        return None
    if s[-1] not in ".!?":
        s += "."
    return s[0].upper() + s[1:]


def wordnet_examples(wordnet_dir: str | Path = WORDNET_DIR) -> list[tuple[str, str]]:
    """(part of speech, example) for every quoted usage example in WordNet's data.* files, in file
    order. A data line is `offset ... | gloss; "example one"; "example two"`."""
    wordnet_dir = Path(wordnet_dir)
    missing = [p for p in POS_FILES if not (wordnet_dir / f"data.{p}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{wordnet_dir}: no WordNet data.{missing[0]}; install the Debian package wordnet-base "
            "('apt-get install wordnet-base') or pass --wordnet-dir to a WordNet 3.0 dict folder"
        )
    examples = []
    for pos in POS_FILES:
        with open(wordnet_dir / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                # Lines starting with two spaces are the licence header of the data file.
                if line.startswith("  ") or " | " not in line:
                    continue
                gloss = line.split(" | ", 1)[1]
                examples.extend((pos, m.strip()) for m in re.findall(r'"([^"]+)"', gloss))
    return examples


def select_sentences(
    examples: list[tuple[str, str]],
    *,
    vocab_size: int = VOCAB_SIZE,
    min_words: int = MIN_WORDS,
    max_words: int = MAX_WORDS,
) -> list[str]:
    """Clean, deduplicate and keep the sentences whose every word is among the `vocab_size` most
    frequent words of all cleaned sentences (a small text LM learns such a vocabulary from a few
    thousand sentences). Order follows `examples`."""
    kept, seen = [], set()
    for pos, raw in examples:
        s = clean_sentence(raw, min_words=min_words, max_words=max_words)
        if s is None:
            continue
        w = words(s)
        if pos in ("noun", "adj") and not _CLAUSE_CUES.intersection(w):
            continue
        key = tuple(w)
        if key in seen:
            continue
        seen.add(key)
        kept.append((s, w))
    counts = collections.Counter(x for _, w in kept for x in w)
    ranked = sorted(counts, key=lambda x: (-counts[x], x))
    common = set(ranked[:vocab_size])
    return [s for s, w in kept if common.issuperset(w)]


def write_sentences(sentences: list[str], path: str | Path) -> None:
    header = [f"# {SOURCE}.", "# Regenerate: python -m blspkd_jax.data.sentences", "#"]
    header += [f"# {line}" if line else "#" for line in LICENCE.splitlines()]
    Path(path).write_text("\n".join(header + list(sentences)) + "\n", encoding="ascii")


def load_sentences(path: str | Path = SENTENCES_FILE) -> list[str]:
    """Sentences of a text file, one a line; lines starting with '#' and blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sentence file not found (one sentence a line expected)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blspkd_jax.data.sentences",
        description="Regenerate the embedded corpus's sentence list from WordNet 3.0.",
    )
    parser.add_argument("--wordnet-dir", default=str(WORDNET_DIR), help="WordNet dict folder")
    parser.add_argument("--out", default=str(SENTENCES_FILE), help="sentence file to write")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    examples = wordnet_examples(args.wordnet_dir)
    sentences = select_sentences(examples, vocab_size=args.vocab_size)
    write_sentences(sentences, args.out)
    vocab = {x for s in sentences for x in words(s)}
    print(
        f"{args.out}: {len(sentences)} sentences, {len(vocab)} distinct words "
        f"(from {len(examples)} WordNet examples)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
