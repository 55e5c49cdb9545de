"""The teacher/student token layout (docs/method.md §4): one sequence and one set of masks.

The LLM's own chat template is rendered once with placeholders, split at them, and each piece is
tokenised on its own, so the transcript span is exact:

    prefix (system turn, user header, instruction) | transcript | middle (end of user turn,
    assistant header) | response | suffix (end-of-turn token)

The teacher reads the transcript's tokens at the `speech_mask` positions; the student puts its N CIF
vectors there instead. `response_mask` marks the response tokens and the end-of-turn token: the
tokens the model must predict (the loss shifts by one itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from blspkd_jax.data.features import silence_value
from blspkd_jax.errors import UserError

TRANSCRIPT_MARK = "<<TRANSCRIPT>>"
RESPONSE_MARK = "<<RESPONSE>>"

# A ChatML template (Qwen's turn format) for tokenizers that ship none; pass it as `chat_template`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_SYSTEM = "You are a helpful assistant."


class LayoutError(UserError):
    """The tokenizer or its chat template can't produce the layout; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Template:
    """Token ids of the fixed pieces around the transcript and the response, for one instruction."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]  # ends with the end-of-turn token; nothing after it is kept

    def length(self, num_text: int, num_response: int) -> int:
        return len(self.prefix) + num_text + len(self.middle) + num_response + len(self.suffix)


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def text_ids(tokenizer, text: str | Sequence[str]):
    """Ids of free text with no special tokens added, and none parsed from the text itself (a
    transcript that reads "<|im_end|>" must not end the turn)."""
    out = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    return out["input_ids"]


def _markup_ids(tokenizer, text: str) -> tuple[int, ...]:
    # Template markup is trusted: its special-token text ("<|im_start|>") must become those tokens.
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()


def render_template(
    tokenizer,
    instruction: str = "",
    system: str | None = DEFAULT_SYSTEM,
    chat_template: str | None = None,
) -> Template:
    """Render the chat template around the placeholders and tokenise the fixed pieces.

    `system=None` sends no system message (the template's own default, if any, applies);
    `chat_template` overrides the tokenizer's (e.g. `CHATML_TEMPLATE` for a tokenizer without one).
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise LayoutError(
            f"tokenizer {_name(tokenizer)!r} has no chat template: add a 'chat_template' to its "
            "tokenizer_config.json, or set data.chat_template (e.g. to "
            "blspkd_jax.data.layout.CHATML_TEMPLATE)"
        )
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [
        {"role": "user", "content": f"{instruction}{TRANSCRIPT_MARK}"},
        {"role": "assistant", "content": RESPONSE_MARK},
    ]
    try:
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception as e:  # jinja errors (e.g. a template that rejects system turns)
        raise LayoutError(
            f"chat template of {_name(tokenizer)!r} failed to render system/user/assistant "
            f"turns: {e}"
        ) from e
    if rendered.count(TRANSCRIPT_MARK) != 1 or rendered.count(RESPONSE_MARK) != 1:
        raise LayoutError(
            f"chat template of {_name(tokenizer)!r} does not render the user and assistant "
            f"content verbatim exactly once (got {rendered!r})"
        )
    prefix, rest = rendered.split(TRANSCRIPT_MARK)
    middle, suffix = rest.split(RESPONSE_MARK)
    return Template(
        prefix=_markup_ids(tokenizer, prefix),
        middle=_markup_ids(tokenizer, middle),
        suffix=_end_of_turn(tokenizer, _markup_ids(tokenizer, suffix), suffix),
    )


def _end_of_turn(tokenizer, ids: tuple[int, ...], text: str) -> tuple[int, ...]:
    """The suffix up to and including the end-of-turn token: eos if it occurs, else the first
    special token. Trailing text after it (ChatML's newline) is no target and is dropped, so
    sequences end where generation stops. A template with no special token after the response
    gets the eos token appended."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    special = set(tokenizer.all_special_ids) - {tokenizer.pad_token_id, tokenizer.bos_token_id}
    for i, t in enumerate(ids):
        if t in special:
            return ids[: i + 1]
    if eos is None:
        raise LayoutError(
            f"chat template of {_name(tokenizer)!r} puts no special token after the assistant "
            f"turn (suffix {text!r}) and the tokenizer has no eos token to end the turn with"
        )
    return ids + (eos,)


class ChatLayout:
    """Builds layouts for one tokenizer and system prompt, caching the rendered template per
    instruction (rendering Jinja costs more than tokenising a transcript)."""

    def __init__(
        self,
        tokenizer,
        system: str | None = DEFAULT_SYSTEM,
        chat_template: str | None = None,
        default_instruction: str = "",
    ):
        self.tokenizer = tokenizer
        self.system = system
        self.chat_template = chat_template or None
        self.default_instruction = default_instruction
        self._templates: dict[str, Template] = {}
        self.template(default_instruction)  # fail early on a tokenizer without a usable template

    @property
    def pad_id(self) -> int:
        """Id that fills padded positions: pad, else eos, else 0 (masked either way)."""
        for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if t is not None:
                return int(t)
        return 0

    def template(self, instruction: str | None = None) -> Template:
        instruction = self.default_instruction if instruction is None else instruction
        if instruction not in self._templates:
            if len(self._templates) >= 4096:  # per-row instructions: bound the cache
                self._templates.clear()
            self._templates[instruction] = render_template(
                self.tokenizer, instruction, self.system, self.chat_template
            )
        return self._templates[instruction]

    def __call__(
        self, transcript: str, response: str | None = None, instruction: str | None = None
    ) -> dict[str, np.ndarray]:
        """One row's layout: `input_ids` int32 [L], `speech_mask` bool [L], `response_mask` bool
        [L], `prompt_length` int32 (tokens before the response: the generation prompt)."""
        t = self.template(instruction)
        text = text_ids(self.tokenizer, transcript) if transcript else []
        resp = text_ids(self.tokenizer, response) if response else []
        pieces = (t.prefix, text, t.middle, resp, t.suffix)
        ids = np.fromiter((i for p in pieces for i in p), dtype=np.int32)
        kinds = np.repeat(np.arange(5, dtype=np.int8), [len(p) for p in pieces])
        return {
            "input_ids": ids,
            "speech_mask": kinds == 1,
            "response_mask": kinds >= 3,
            "prompt_length": np.int32(len(t.prefix) + len(text) + len(t.middle)),
        }

    def lengths(
        self,
        transcripts: Sequence[str],
        responses: Sequence[str | None],
        instructions: Sequence[str | None],
        chunk: int = 4096,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(transcript tokens, full sequence length) per row, tokenised in batched calls."""
        num_text, total = [], []
        for s in range(0, len(transcripts), chunk):
            texts = list(transcripts[s : s + chunk])
            resps = list(responses[s : s + chunk])
            n = len(texts)
            ids = text_ids(self.tokenizer, texts + [r for r in resps if r]) if n else []
            resp_len = iter(len(x) for x in ids[n:])
            for x, r, ins in zip(ids[:n], resps, instructions[s : s + chunk], strict=True):
                num_text.append(len(x))
                total.append(self.template(ins).length(len(x), next(resp_len) if r else 0))
        return np.array(num_text, np.int64), np.array(total, np.int64)


def build_layout(
    tokenizer,
    transcript: str,
    response: str | None = None,
    instruction: str = "",
    system: str | None = DEFAULT_SYSTEM,
    *,
    chat_template: str | None = None,
) -> dict[str, np.ndarray]:
    """The layout of one example (see `ChatLayout.__call__`); `response=None` or "" leaves only the
    end-of-turn token as a response target (ASR-only data before labels exist)."""
    return ChatLayout(tokenizer, system, chat_template, instruction)(transcript, response)


# Host-side keys the pipeline adds to a batch (which manifest line and which source each example
# came from): not model inputs, so the training and evaluation loops drop them before sending.
HOST_KEYS = ("line", "source")


def make_batch(
    examples: Sequence[dict | None],
    *,
    batch_size: int,
    frames: int,
    tokens: int,
    n_mels: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Pad examples into one static bucket `[B, n_mels, F]` / `[B, L]`.

    Each example is a layout plus `features` float32 [n_mels, T] (T <= F); None is a padding row
    (`example_mask` False, all zeros). Pad frames hold the utterance's own log-mel floor
    (`features.silence_value`: its maximum - 2), which is what WhisperFeatureExtractor gives
    digital silence after its normalisation. So a 3000-frame bucket reproduces Whisper's 30 s
    padded input up to the frames whose window straddles the end, and a variable-length encoder
    masks the padding anyway via `feature_mask`.
    """
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
    b = {
        "features": np.zeros((batch_size, n_mels, frames), np.float32),
        "feature_mask": np.zeros((batch_size, frames), bool),
        "input_ids": np.full((batch_size, tokens), pad_id, np.int32),
        "attention_mask": np.zeros((batch_size, tokens), bool),
        "speech_mask": np.zeros((batch_size, tokens), bool),
        "response_mask": np.zeros((batch_size, tokens), bool),
        "text_lengths": np.zeros((batch_size,), np.int32),
        "example_mask": np.zeros((batch_size,), bool),
    }
    for i, ex in enumerate(examples):
        if ex is None:
            continue
        feats = ex["features"]
        n, t = len(ex["input_ids"]), feats.shape[-1]
        if feats.shape[0] != n_mels or t > frames or n > tokens:
            raise ValueError(
                f"example {i} (features {feats.shape}, {n} tokens) does not fit the bucket "
                f"({n_mels} mels, {frames} frames, {tokens} tokens)"
            )
        b["features"][i, :, :t] = feats
        b["features"][i, :, t:] = silence_value(feats) if t else 0.0
        b["feature_mask"][i, :t] = True
        b["input_ids"][i, :n] = ex["input_ids"]
        b["attention_mask"][i, :n] = True
        b["speech_mask"][i, :n] = ex["speech_mask"]
        b["response_mask"][i, :n] = ex["response_mask"]
        b["text_lengths"][i] = ex["speech_mask"].sum()
        b["example_mask"][i] = True
    return b
