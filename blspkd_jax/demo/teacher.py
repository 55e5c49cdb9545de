"""The embedded default's teacher (docs/method.md §6): with no pretrained LLM offline, a
byte-level BPE tokenizer and a small Llama LM are trained on the corpus sentences and saved as one
Hugging Face chat-LLM directory (ChatML template), which the rest of the pipeline loads like any
other LLM.

    python -m blspkd_jax.teacher --sentences FILE[,FILE2] --out DIR [--eval-sentences FILE]
        [--steps N] [--vocab-size V] [--seed S]

The LM learns two chat tasks on every sentence (no system turn by default):
- `REPEAT_INSTRUCTION + sentence` -> the sentence itself (ASR-like: WER and exact match apply);
- `CONTINUE_INSTRUCTION` (+ "\\n\\n" or " ") + sentence, or the bare sentence ->
  `continuation(sentence)`: its words lower-cased, without punctuation, rotated by one (the first
  word last). Deterministic, it needs every word of the input and differs from it, yet a tiny LM
  learns it with the copying it learns for the first task. A free continuation (or the next
  sentence of a fixed pairing) cannot be learnt by a 1M-parameter LM in minutes, and reversing
  the words was learnt too slowly (held-out WER 36% after 1000 steps, rotation 13%).
The loss covers every token (so the teacher is also an LM of the sentences and the KD input
positions get meaningful predictions), with the response tokens weighted `response_weight`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from blspkd_jax.data.layout import CHATML_TEMPLATE, DEFAULT_SYSTEM, render_template, text_ids
from blspkd_jax.demo.sentences import load_sentences
from blspkd_jax.inference.labels import continuations
from blspkd_jax.inference.metrics import wer
from blspkd_jax.models import hf
from blspkd_jax.models.llm import LLM, LLMConfig
from blspkd_jax.training import optim

REPEAT_INSTRUCTION = "Repeat the following text: "
CONTINUE_INSTRUCTION = (
    "Continue the following text in a coherent and engaging style with less than 40 words."
)
# The continuation task is taught under each way the pipeline may phrase it: the labels command's
# default (a blank line before the transcript), a single space, and no instruction at all.
CONTINUE_VARIANTS = (CONTINUE_INSTRUCTION + "\n\n", CONTINUE_INSTRUCTION + " ", "")
PAD_TOKEN, START_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, START_TOKEN, EOS_TOKEN)
SUMMARY_FILE = "teacher_summary.json"
_PUNCT = ".,;:!?\"'()-"


def continuation(sentence: str) -> str:
    """The continuation task's target: the sentence's words lower-cased, stripped of punctuation at
    their edges and rotated by one, the first word last ("The dog barked." -> "dog barked the")."""
    words = [w for w in (w.strip(_PUNCT) for w in sentence.lower().split()) if w]
    return " ".join(words[1:] + words[:1])


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Tokenizer, LM and training sizes. Defaults: 0.94M parameters; training takes about 0.32
    CPU-seconds a step (420 CPU-s for 1300 steps, i.e. ~3.5-4 min on 2 cores)."""

    vocab_size: int = 1536
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    steps: int = 1300
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    tokens_per_batch: int = 2048  # batch size = tokens_per_batch // bucket length
    bucket_multiple: int = 16  # sequences are padded to a multiple of this: few jit shapes
    response_weight: float = 2.0  # loss weight of response tokens; every other token has 1
    system_fraction: float = 0.0  # conversations that carry the default system turn
    scramble_fraction: float = 0.5  # conversations whose transcript has its words shuffled
    repeat_fraction: float = 0.5  # sentences with a repeat conversation per epoch (all: continue)
    eval_size: int = 256  # held out when no eval sentences are given
    eval_max_new_tokens: int = 40
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` with the ChatML special tokens and template.

    Trained on `texts` plus the chat markup and instructions (so those are a few tokens each).
    Byte-level: every string round-trips through encode/decode exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    markup = ["system\n", "user\n", "assistant\n", DEFAULT_SYSTEM, REPEAT_INSTRUCTION]
    markup += list(CONTINUE_VARIANTS)
    # Repeated so that BPE merges them in whole, as a real LLM's tokenizer would have seen them.
    tok.train_from_iterator([*texts, *(markup * 50)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """`save_pretrained`, with the chat template also in tokenizer_config.json (older transformers
    read it only there) and an explicit tokenizer class (else the directory's Llama config.json
    would make AutoTokenizer pick a Llama tokenizer)."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(chat_template=CHATML_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# Conversations.


class Conversations:
    """Token ids of the chat-formatted training conversations, laid out exactly like
    `blspkd_jax.data.layout` lays out a row: prefix | transcript | middle | response | end-of-turn.

    `sample(rng)` draws one epoch: every sentence once under a continuation variant and, with
    probability `repeat_fraction`, once under the repeat instruction (learnt sooner), each with
    the default system turn with probability `system_fraction`.
    With probability `scramble_fraction` a conversation's transcript is the sentence's words in a
    random order: there the LM prior cannot guess the response, so the tasks are learnt as the
    copying they are and hold on unseen sentences (the scrambled text itself is no LM target).
    """

    def __init__(self, tokenizer, sentences: Sequence[str], cfg: TeacherConfig):
        self.tokenizer = tokenizer
        self.sentences = list(sentences)
        self.cfg = cfg
        self.text = text_ids(tokenizer, self.sentences)
        self.cont = text_ids(tokenizer, [continuation(s) for s in self.sentences])
        systems = (None, DEFAULT_SYSTEM) if cfg.system_fraction > 0 else (None,)
        self.templates = {
            (sys_, ins): render_template(tokenizer, ins, sys_, CHATML_TEMPLATE)
            for sys_ in systems
            for ins in (REPEAT_INSTRUCTION, *CONTINUE_VARIANTS)
        }

    def sample(self, rng: np.random.Generator) -> list[tuple]:
        """Rows `(ids, text_start, text_end, prompt_length, text_weight)`."""
        n, cfg = len(self.sentences), self.cfg
        system = rng.random((n, 2)) < cfg.system_fraction
        variant = rng.integers(0, len(CONTINUE_VARIANTS), n)
        scramble = rng.random((n, 2)) < cfg.scramble_fraction
        shuffled = {}
        for i, task in zip(*np.nonzero(scramble), strict=True):
            words = self.sentences[i].split()
            shuffled[(int(i), int(task))] = " ".join(words[k] for k in rng.permutation(len(words)))
        texts = list(shuffled.values())
        ids = text_ids(self.tokenizer, texts + [continuation(t) for t in texts]) if texts else []
        pairs = zip(ids[: len(texts)], ids[len(texts) :], strict=True)
        shuffled_ids = dict(zip(shuffled, pairs, strict=True))
        rows = []
        repeat = rng.random(n) < cfg.repeat_fraction
        for i in range(n):
            for task in (0, 1) if repeat[i] else (1,):
                ins = REPEAT_INSTRUCTION if task == 0 else CONTINUE_VARIANTS[variant[i]]
                t = self.templates[(DEFAULT_SYSTEM if system[i, task] else None, ins)]
                if (i, task) in shuffled_ids:
                    text, cont = shuffled_ids[(i, task)]
                else:
                    text, cont = self.text[i], self.cont[i]
                resp = text if task == 0 else cont
                prompt = [*t.prefix, *text, *t.middle]
                start = len(t.prefix)
                weight = 0.0 if (i, task) in shuffled_ids else 1.0
                rows.append(
                    (prompt + [*resp, *t.suffix], start, start + len(text), len(prompt), weight)
                )
        return rows


def make_batches(rows, rng: np.random.Generator, cfg: TeacherConfig, pad_id: int):
    """Bucket `rows` by length (padded to a multiple of `cfg.bucket_multiple`), cut each bucket into
    batches of `tokens_per_batch // length` rows (the last filled with empty rows) and shuffle the
    batches. Each batch: `input_ids` int32 [B, L] (right-padded), `attention_mask` bool [B, L],
    `weights` float32 [B, L] (loss
    weight of predicting that token: 1 in the prompt, the row's text weight on the transcript,
    `response_weight` on the response and end-of-turn, 0 at padding and at the first token)."""
    m = cfg.bucket_multiple
    buckets: dict[int, list[int]] = {}
    for j, row in enumerate(rows):
        buckets.setdefault(-(-len(row[0]) // m) * m, []).append(j)
    batches = []
    for length in sorted(buckets):
        members = [buckets[length][k] for k in rng.permutation(len(buckets[length]))]
        bs = max(1, cfg.tokens_per_batch // length)
        for b0 in range(0, len(members), bs):
            ids = np.full((bs, length), pad_id, np.int32)
            mask = np.zeros((bs, length), bool)
            w = np.zeros((bs, length), np.float32)
            for r, j in enumerate(members[b0 : b0 + bs]):
                seq, start, end, prompt_len, text_weight = rows[j]
                ids[r, : len(seq)] = seq
                mask[r, : len(seq)] = True
                w[r, 1:prompt_len] = 1.0
                w[r, start:end] = text_weight
                w[r, prompt_len : len(seq)] = cfg.response_weight
            batches.append((ids, mask, w))
    return [batches[k] for k in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------------------------
# Training.


def lm_config(cfg: TeacherConfig, tokenizer) -> LLMConfig:
    return LLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        model_type="llama",
        tie_word_embeddings=True,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


def weighted_ce(module: LLM, params, ids, mask, weights):
    """(sum of weighted next-token cross-entropy, sum of weights) for `ids [B, L]`."""
    logits = module.apply({"params": params}, ids, attention_mask=mask)
    # weights[:, t] weighs predicting ids[:, t] from the logits at t - 1.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = weights[:, 1:]
    return jnp.sum(ce * w), jnp.sum(w)


def optimizer(cfg: TeacherConfig):
    """(AdamW with clipping and a decay mask, its learning-rate schedule) for `cfg`."""
    return optim.make_optimizer(
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps,
        weight_decay=cfg.weight_decay,
        b2=0.98,
    )


@functools.lru_cache(maxsize=4)
def train_step(module: LLM, cfg: TeacherConfig):
    """The jitted step `(params, opt_state, ids, mask, weights) -> (params, opt_state, loss)`,
    cached so that runs differing only in seed reuse the compiled programs."""
    tx, _ = optimizer(cfg)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids, mask, weights):
        def loss_fn(p):
            total, count = weighted_ce(module, optim.unflatten(p), ids, mask, weights)
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_lm(module: LLM, conv: Conversations, cfg: TeacherConfig, pad_id: int, progress=True):
    """AdamW on the weighted next-token loss for `cfg.steps` steps; returns (params, history)."""
    rng = np.random.default_rng(cfg.seed)
    dummy = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(module.init)
    params = optim.flatten(nn.unbox(init(jax.random.key(cfg.seed), dummy)["params"]))
    tx, schedule = optimizer(cfg)
    opt_state = tx.init(params)
    step = train_step(module, dataclasses.replace(cfg, seed=0))

    history: list[dict] = []
    bar = tqdm(total=cfg.steps, desc="teacher LM", unit="step", disable=not progress)
    batches: list = []
    tokens, t0, ema = 0, time.perf_counter(), None
    for i in range(cfg.steps):
        if not batches:
            batches = make_batches(conv.sample(rng), rng, cfg, pad_id)
        ids, mask, w = batches.pop()
        params, opt_state, loss = step(params, opt_state, ids, mask, w)
        tokens += int(mask.sum())
        if i % 25 == 0 or i == cfg.steps - 1:
            loss = float(loss)
            ema = loss if ema is None else 0.7 * ema + 0.3 * loss
            history.append({"step": i, "loss": loss, "lr": float(schedule(i))})
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
    bar.close()
    return optim.unflatten(jax.device_get(params)), history


def eval_loss(module: LLM, params, conv: Conversations, cfg: TeacherConfig, pad_id: int) -> float:
    """Mean weighted next-token loss over one epoch of `conv` (fixed seed)."""
    rng = np.random.default_rng(cfg.seed + 1)
    fn = jax.jit(functools.partial(weighted_ce, module))
    total = count = 0.0
    for ids, mask, w in make_batches(conv.sample(rng), rng, cfg, pad_id):
        t, c = fn(params, ids, mask, w)
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def task_metrics(module, params, tokenizer, sentences, cfg: TeacherConfig) -> dict:
    """Greedy responses (as the labels command makes them, no system turn) under the repeat and the
    continuation instruction, scored against their targets: exact match and WER."""
    out = {}
    for name, instruction, target in (
        ("repeat", REPEAT_INSTRUCTION, lambda s: s),
        ("continue", CONTINUE_VARIANTS[0], continuation),
        ("bare", "", continuation),
    ):
        responses = list(
            continuations(
                module,
                params,
                tokenizer,
                sentences,
                instruction=instruction,
                system=None,
                batch_size=64,
                max_new_tokens=cfg.eval_max_new_tokens,
            )
        )
        refs = [target(s) for s in sentences]
        out[name] = {
            "exact_match": float(np.mean([r == h for r, h in zip(refs, responses, strict=True)])),
            "wer": wer(responses, refs),
            "examples": [
                {"text": s, "response": h} for s, h in zip(sentences[:3], responses, strict=False)
            ],
        }
    return out


# ----------------------------------------------------------------------------------------------
# Entry points.


def train_teacher(
    sentences: Sequence[str],
    out_dir: str | Path,
    *,
    eval_sentences: Sequence[str] | None = None,
    config: TeacherConfig | None = None,
    progress: bool = True,
    evaluate: bool = True,
    **overrides,
) -> dict:
    """Train the tokenizer and the LM on `sentences` and save both in `out_dir` (a Hugging Face
    directory: tokenizer files with the ChatML template, config.json, model.safetensors,
    generation_config.json, teacher_summary.json). Returns the summary.

    `overrides` replace `TeacherConfig` fields (`vocab_size`, `steps`, `seed`, ...). Metrics are
    measured on `eval_sentences`, else on `eval_size` sentences held out of `sentences` (seeded).
    """
    cfg = dataclasses.replace(config or TeacherConfig(), **overrides)
    sentences = [s.strip() for s in sentences if s.strip()]
    if not sentences:
        raise ValueError("train_teacher: no sentences to train on (empty --sentences file?)")
    start = time.perf_counter()
    if eval_sentences is None and evaluate:
        held = min(cfg.eval_size, len(sentences) // 10)
        order = np.random.default_rng(cfg.seed).permutation(len(sentences))
        eval_sentences = [sentences[i] for i in sorted(order[:held])]
        sentences = [sentences[i] for i in sorted(order[held:])]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # only a finished run has a summary

    tokenizer = train_tokenizer(sentences, cfg.vocab_size)
    save_tokenizer(tokenizer, out_dir)
    llm_cfg = lm_config(cfg, tokenizer)
    module = LLM(llm_cfg)
    pad_id = llm_cfg.pad_token_id
    conv = Conversations(tokenizer, sentences, cfg)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    params, history = train_lm(module, conv, cfg, pad_id, progress)
    train_s, train_cpu = time.perf_counter() - t_train, time.process_time() - cpu_train

    hf.save_llm(out_dir, llm_cfg, params)
    gen = {"eos_token_id": llm_cfg.eos_token_id, "pad_token_id": pad_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))

    summary: dict = {
        "config": dataclasses.asdict(cfg),
        "num_train_sentences": len(sentences),
        "num_params": optim.count_params(params),
        "vocab_size": len(tokenizer),
        "train_seconds": train_s,
        "train_cpu_seconds": train_cpu,
        "final_loss": history[-1]["loss"],
        "loss_history": history,
        "instructions": {"repeat": REPEAT_INSTRUCTION, "continue": list(CONTINUE_VARIANTS)},
    }
    if evaluate and eval_sentences:
        eval_sentences = [s.strip() for s in eval_sentences if s.strip()]
        summary["num_eval_sentences"] = len(eval_sentences)
        ev = Conversations(
            tokenizer, eval_sentences, dataclasses.replace(cfg, scramble_fraction=0.0)
        )
        summary["eval_loss"] = eval_loss(module, params, ev, cfg, pad_id)
        summary["eval"] = task_metrics(module, params, tokenizer, eval_sentences, cfg)
        fit = sentences[: len(eval_sentences)]
        summary["train_fit"] = {
            k: {m: v[m] for m in ("exact_match", "wer")}
            for k, v in task_metrics(module, params, tokenizer, fit, cfg).items()
        }
    summary["total_seconds"] = time.perf_counter() - start
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def read_sentence_files(spec: str) -> list[str]:
    """Sentences of comma-separated files (one a line, '#' comments and blank lines skipped)."""
    out: list[str] = []
    for path in filter(None, spec.split(",")):
        out += load_sentences(path)
    return out


def parse_overrides(items: Sequence[str]) -> dict:
    """`["hidden_size=64", ...]` -> TeacherConfig field values of the field's type."""
    fields = {f.name: type(f.default) for f in dataclasses.fields(TeacherConfig)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(
                f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}"
            )
        try:
            out[name] = fields[name](value)
        except ValueError:
            raise ValueError(
                f"--set {item!r}: {value!r} is not a valid {fields[name].__name__}"
            ) from None
    return out


def main(argv: list[str] | None = None) -> int:
    d = TeacherConfig()
    ap = argparse.ArgumentParser(
        prog="python -m blspkd_jax.teacher",
        description="Train the embedded default's teacher: a BPE tokenizer and a small chat LM on "
        "a sentence list, saved as a Hugging Face directory.",
    )
    ap.add_argument("--sentences", required=True, help="sentence file(s), comma-separated")
    ap.add_argument("--out", required=True, help="output directory (Hugging Face layout)")
    ap.add_argument(
        "--eval-sentences",
        default=None,
        help="sentence file(s) to measure on (default: hold out some of --sentences)",
    )
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--vocab-size", type=int, default=d.vocab_size)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other TeacherConfig field, e.g. --set hidden_size=64 (repeatable)",
    )
    ap.add_argument("--no-eval", action="store_true", help="skip the metrics")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        sentences = read_sentence_files(args.sentences)
        evals = read_sentence_files(args.eval_sentences) if args.eval_sentences else None
        summary = train_teacher(
            sentences,
            args.out,
            eval_sentences=evals,
            progress=not args.no_progress,
            evaluate=not args.no_eval,
            **{"steps": args.steps, "vocab_size": args.vocab_size, "seed": args.seed, **overrides},
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    brief = {k: summary[k] for k in ("final_loss", "train_seconds", "total_seconds")}
    if "eval" in summary:
        brief["eval"] = {
            k: {m: round(v[m], 4) for m in ("exact_match", "wer")}
            for k, v in summary["eval"].items()
        }
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
