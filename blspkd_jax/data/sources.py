"""Data sources: `data.train_manifest` (and `data.eval_manifest`) name one manifest or a weighted
mixture, `PATH:WEIGHT,PATH:WEIGHT,...` (a bare PATH weighs 1). Each source is named after its
file (without the extension); metrics and `peek` report examples by that name.

A comma always separates sources and a trailing `:NUMBER` is always a weight, so paths holding a
comma, or ending in a colon and a number, cannot be named here (`gs://` URLs can).
"""

from __future__ import annotations

import dataclasses
import math
import os


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float = 1.0


def _split_weight(entry: str) -> tuple[str, str | None]:
    """'PATH:W' -> ('PATH', 'W') when the text after the last colon reads as a number."""
    head, sep, tail = entry.rpartition(":")
    if not sep or not head or "/" in tail:
        return entry, None
    try:
        float(tail)
    except ValueError:
        return entry, None
    return head, tail


def _name(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) or path
    stem, ext = os.path.splitext(base)
    return stem if ext in (".jsonl", ".json") else base


def parse_sources(spec: str, key: str = "data.train_manifest") -> list[Source]:
    """`spec` -> its sources; a ValueError names `key` and the entry that is wrong."""
    entries = [e.strip() for e in str(spec).split(",")]
    if not any(entries):
        raise ValueError(f"{key} is empty: expected PATH or PATH:WEIGHT,PATH:WEIGHT,...")
    sources, names = [], set()
    for entry in entries:
        if not entry:
            raise ValueError(f"{key}={spec!r}: an empty entry between commas")
        path, weight = _split_weight(entry)
        w = 1.0 if weight is None else float(weight)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"{key}: {entry!r}: the weight must be a positive number")
        if any(s.path == path for s in sources):
            raise ValueError(f"{key}: {path} is named twice")
        name = _name(path)
        if name in names:  # two files of one name (train.jsonl in two folders): the full path
            name = path
        names.add(name)
        sources.append(Source(name, path, w))
    return sources
