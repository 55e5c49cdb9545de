"""Manifests: JSON Lines, one utterance a line (docs/method.md §6), parsed and validated row by row.

A row is `{"audio": path, "text": transcript}` plus optional `"response"`, `"instruction"`, `"id"`,
and `"offset"`/`"duration"` (seconds) to cut a segment from a long recording. Relative audio paths
are relative to the manifest's folder. Manifests and recordings may be local or URLs (`gs://...`,
see `storage`). Blank lines are ignored; line numbers count them (1-based),
so `MANIFEST:LINE` points at the line an editor shows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator

from blspkd_jax.data import storage
from blspkd_jax.errors import UserError

REQUIRED = ("audio", "text")

# Defaults shared by the pipeline's DataConfig and the check command.
MIN_SECONDS = 0.1
MAX_SECONDS = 30.0
MAX_TEXT_TOKENS = 128
OPTIONAL_STR = ("response", "instruction", "id")


class DataError(UserError):
    """A bad manifest row in strict mode; the message is `MANIFEST:LINE: reason`."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One parsed manifest line. `audio` is absolute; `response`/`instruction` None when absent."""

    line: int
    audio: str
    text: str
    response: str | None = None
    instruction: str | None = None
    id: str = ""
    offset: float = 0.0
    duration: float | None = None
    # The line's JSON object as written (every key, the audio path as given): tools that copy rows
    # to a new manifest start from it.
    fields: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def audio_from(self, folder: str | os.PathLike) -> str:
        """The audio path to write in a manifest in `folder`: absolute if the row's was, else
        relative to `folder`, so that it still resolves there."""
        given = self.fields.get("audio", "")
        if storage.is_url(given) or os.path.isabs(os.path.expanduser(given)):
            return self.audio
        if storage.is_url(self.audio) or storage.is_url(folder):
            return self.audio  # no relative path between local disk and a bucket
        return os.path.relpath(self.audio, os.path.abspath(folder))


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that can't be used, and why. `str()` is the `MANIFEST:LINE: reason` report line."""

    manifest: str
    line: int
    reason: str
    audio: str | None = None

    def __str__(self) -> str:
        return f"{self.manifest}:{self.line}: {self.reason}"

    def to_json(self) -> dict:
        """The `skipped.jsonl` record."""
        return {
            "manifest": self.manifest,
            "line": self.line,
            "file": self.audio,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: dict) -> BadRow:
        return cls(d["manifest"], d["line"], d["reason"], d.get("file"))


def parse_line(text: str, line: int, base_dir: str) -> Row:
    """One manifest line -> Row. Raises ValueError whose message is the reason (no location)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED:
        if key not in obj:
            raise ValueError(f"missing key {key!r} (every row needs 'audio' and 'text')")
        if not isinstance(obj[key], str):
            raise ValueError(f"key {key!r} must be a string, got {type(obj[key]).__name__}")
    for key in OPTIONAL_STR:
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ValueError(f"key {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["audio"]:
        raise ValueError("key 'audio' is empty")
    offset = _seconds(obj, "offset", 0.0)
    duration = _seconds(obj, "duration", None)
    if offset < 0:
        raise ValueError(f"'offset' must be >= 0 seconds, got {offset:g}")
    if duration is not None and duration <= 0:
        raise ValueError(f"'duration' must be > 0 seconds, got {duration:g}")
    audio = storage.join(base_dir, obj["audio"])
    row_id = obj.get("id")
    if row_id is None:  # default id: the audio as written, plus the segment start if any
        row_id = obj["audio"] + (f"@{offset:g}" if "offset" in obj else "")
    return Row(
        line=line,
        audio=audio,
        text=obj["text"],
        response=obj.get("response"),
        instruction=obj.get("instruction"),
        id=row_id,
        offset=offset,
        duration=duration,
        fields=obj,
    )


def _seconds(obj: dict, key: str, default):
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"key {key!r} must be a finite number of seconds, got {value!r}")
    return float(value)


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) for every non-blank line; offsets let workers re-read it."""
    with storage.open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace")
            if text.strip():
                yield number, offset, text
            offset += len(raw)


def read_line_at(path: str | os.PathLike, offset: int) -> str:
    """The manifest line starting at byte `offset` (what `iter_lines` reported)."""
    with storage.open(path, "rb") as f:
        f.seek(offset)
        return f.readline().decode("utf-8", errors="replace")


def read_manifest(path: str | os.PathLike) -> tuple[list[Row], list[BadRow]]:
    """All rows of a manifest that parse, and the ones that don't (malformed JSON, missing key)."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = storage.parent(path)
    rows, bad = [], []
    for number, _, text in iter_lines(path):
        try:
            rows.append(parse_line(text, number, base))
        except ValueError as e:
            bad.append(BadRow(path, number, str(e)))
    return rows, bad


def read_rows(path: str | os.PathLike) -> list[Row]:
    """A manifest's rows, for tools that need every one of them; a DataError lists each malformed
    line as `MANIFEST:LINE: reason`."""
    rows, bad = read_manifest(path)
    if bad:
        raise DataError("\n".join(str(b) for b in bad))
    return rows


def write_jsonl(path: str | os.PathLike, records) -> None:
    """One JSON object a line, written to a temporary file and renamed into place, so a reader
    never sees half a file (an object store's upload is whole or absent by itself)."""
    path = os.fspath(path)
    if storage.is_url(path):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        storage.as_path(path).write_text(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def check_text(row: Row, num_text_tokens: int | None, max_text_tokens: int | None) -> None:
    """Transcript rules: non-empty, and (given a token count) at most `max_text_tokens` tokens.

    Raises ValueError with the reason.
    """
    if not row.text.strip():
        raise ValueError("transcript is empty")
    if num_text_tokens is not None and num_text_tokens == 0:
        raise ValueError("transcript tokenises to 0 tokens")
    if num_text_tokens is not None and max_text_tokens and num_text_tokens > max_text_tokens:
        raise ValueError(
            f"transcript has {num_text_tokens} tokens, more than max_text_tokens={max_text_tokens}"
        )


def check_seconds(seconds: float, min_seconds: float | None, max_seconds: float | None) -> None:
    """Audio length rules; raises ValueError with the reason."""
    if min_seconds is not None and seconds < min_seconds:
        raise ValueError(f"audio is {seconds:.3f} s, shorter than min_seconds={min_seconds:g}")
    if max_seconds is not None and seconds > max_seconds:
        raise ValueError(f"audio is {seconds:.3f} s, longer than max_seconds={max_seconds:g}")
