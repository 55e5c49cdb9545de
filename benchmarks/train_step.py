"""The full BLSP-KD train step (teacher and student forward, losses, backward, AdamW update) in JAX
against the same model exported to PyTorch (`python -m blspkd_jax.export`'s modeling code), eager
and under `torch.compile`, on the same random weights and the same synthetic batch.

JAX runs the project's own step (`train_state.make_train_step`, AOT-compiled with the state
donated). PyTorch runs the exported `BLSPKDModel` in train mode: the teacher (LLM on the text ids)
under no_grad, the student (encoder -> CFormer -> CIF cut to the transcript lengths -> spliced into
the text embeddings -> LLM with PLoRA at the speech positions), the losses of
`training.objective.compute_losses` written out as formulas, backward, global-norm clipping and
torch.optim.AdamW over the same trainable tensors with the same decay mask and learning rates
(benchmarks/torch_step.py). `tests/test_train_step_bench.py` holds the two steps equal (loss
terms, gradients, updates).

    .venv/bin/python benchmarks/train_step.py                  # presets tiny, 100m, smollm2
    .venv/bin/python benchmarks/train_step.py --quick          # their shrunken forms, ~1 min
    .venv/bin/python benchmarks/train_step.py --ablate         # + each saving taken back/given
    .venv/bin/python benchmarks/train_step.py --preset gpu     # JAX only, bf16, on an accelerator
    .venv/bin/python benchmarks/train_step.py --preset gpu --quick   # its CPU smoke form

`--quick` leaves torch.compile out (its inductor build takes minutes on 2 cores; `--compile`
puts it back); `--threads N` pins both frameworks to N cores (use 1 on a busy machine: torch's
OpenMP threads stall when cores are oversubscribed). The gpu preset needs a JAX with CUDA.

Times are the median of `--repeats` steps after warm-up, the frameworks interleaved step by step
so that machine noise hits all alike. MFU = analytic model FLOPs per step / step time / the
matmul peak measured in the same run (fp32 on CPU; bf16 on an accelerator, and also against the
nominal H100 dense bf16 peak). XLA's own count for the compiled JAX step is shown beside it.
The last line printed is one JSON object: {"PRESET": {"jax_ms", "eager_ms", "compile_ms"}, ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET_NAMES = ("tiny", "100m", "smollm2", "gpu")
H100_BF16_PEAK = 989e12  # NVIDIA H100 SXM dense bf16 FLOP/s (nominal, no sparsity)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        action="append",
        help="repeatable (default: tiny, 100m, smollm2)",
    )
    ap.add_argument("--quick", action="store_true", help="shrunken presets, few steps")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 5, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="cores for both (default: all)")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile too (default: yes, but not with --quick: it compiles for minutes)",
    )
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="also time the JAX step with the student recomputing the prompt prefix, the JAX step "
        "with PLoRA on every row, and PyTorch eager with PLoRA on the speech rows only",
    )
    return ap.parse_args(argv)


# Parsed before jax is imported: the core pinning must precede XLA's thread-pool creation.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # forward.cpu_model

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from forward import cpu_model  # noqa: E402
from torch_step import (  # noqa: E402
    TorchTrainStep,
    export_torch,
    torch_batch,
    torch_param_paths,
)

from blspkd_jax.data.layout import make_batch  # noqa: E402
from blspkd_jax.models import llm, sharding  # noqa: E402
from blspkd_jax.models.blspkd import BLSPKD, BLSPKDConfig, param_shapes  # noqa: E402
from blspkd_jax.training import build, optim, train_state, weights  # noqa: E402
from blspkd_jax.training import config as config_lib  # noqa: E402
from blspkd_jax.training.flops import measure_matmul_peak  # noqa: E402
from blspkd_jax.training.objective import LOSS_NAMES, LossConfig  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Presets


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """A bucket [B, n_mels, frames] / [B, tokens] and the ranges examples are drawn from.

    Each example: `prefix` tokens (system turn, user header), a transcript of n in `text`
    tokens, `middle` tokens (end of user turn, assistant header), a response of r in `response`
    tokens, one end-of-turn token, padding; audio of a random length in [frames/2, frames].
    """

    batch: int
    frames: int
    tokens: int
    prefix: int
    middle: int
    text: tuple[int, int]
    response: tuple[int, int]

    def __post_init__(self):
        longest = self.prefix + self.text[1] + self.middle + self.response[1] + 1
        if longest > self.tokens:
            raise ValueError(f"BatchShape: the longest example ({longest}) exceeds {self.tokens}")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    model: BLSPKDConfig
    loss: LossConfig
    trainable: tuple[str, ...]
    optim: dict  # make_optimizer's keywords
    batch: BatchShape
    torch: bool  # also time the exported PyTorch model
    peak_dtype: str  # the matmul peak MFU is measured against
    note: str


def _optim_kwargs(c) -> dict:
    o = c.optim
    keys = ("learning_rate", "warmup_steps", "decay", "end_factor", "weight_decay", "b1", "b2")
    return {**{k: o[k] for k in keys}, "eps": o.eps, "grad_clip_norm": o.grad_clip_norm,
            "total_steps": c.total_steps}  # fmt: skip


def _preset_from_config(name, c, batch, torch_too, peak_dtype, note, **llm_changes) -> Preset:
    model_cfg = build.model_config(c)
    if llm_changes:
        model_cfg = dataclasses.replace(model_cfg, llm=model_cfg.llm.replace(**llm_changes))
    return Preset(
        name=name,
        model=model_cfg,
        loss=build.loss_config(c),
        trainable=tuple(c.train.trainable),
        optim=_optim_kwargs(c),
        batch=batch,
        torch=torch_too,
        peak_dtype=peak_dtype,
        note=note,
    )


def _set(c, **kv):
    for k, v in kv.items():
        config_lib.set_key(c, k, v, parse=False)


def preset(name: str, quick: bool = False) -> Preset:
    """A named benchmark setting; `quick` shrinks it to a seconds-long smoke run (same parts)."""
    if name == "tiny":
        # configs/tiny.py stage 2 exactly (sizes, trainable set, optimizer, losses); batch 16 in
        # its middle buckets (500 frames = 5 s, 80 tokens).
        c = config_lib.load_config(f"{REPO / 'configs/tiny.py'}:stage2")
        batch = BatchShape(16, 500, 80, prefix=3, middle=5, text=(10, 30), response=(10, 35))
        if quick:
            batch = BatchShape(4, 300, 48, prefix=3, middle=5, text=(5, 15), response=(5, 20))
        note = "configs/tiny.py:stage2 (encoder, CFormer and PLoRA trained)"
        return _preset_from_config("tiny", c, batch, True, "float32", note)
    if name == "100m":
        # whisper-base encoder, a 2+2-layer CFormer and a Llama-style LLM (~75M, 32k vocab):
        # ~108M parameters; stage 2 (CFormer and PLoRA trained, encoder and LLM frozen).
        c = config_lib.base_config()
        layers = dict(enc=6, llm=8) if not quick else dict(enc=1, llm=2)
        _set(
            c,
            **{
                "model.encoder.encoder_layers": layers["enc"],
                "model.adapter.n_pre": 2,
                "model.adapter.n_post": 2,
                "model.adapter.max_tokens": 48,
                "model.llm.model_type": "llama",
                "model.llm.vocab_size": 32000,
                "model.llm.hidden_size": 768,
                "model.llm.intermediate_size": 2048,
                "model.llm.num_layers": layers["llm"],
                "model.llm.num_heads": 12,
                "model.llm.num_kv_heads": 4,
                "model.llm.tie_word_embeddings": True,
                "model.llm.lora_rank": 16,
                "train.trainable": ("^adapter/", "lora_"),
                "optim.warmup_steps": 100,
            },
        )
        batch = BatchShape(4, 800, 128, prefix=12, middle=5, text=(20, 48), response=(20, 60))
        if quick:
            batch = BatchShape(1, 400, 64, prefix=12, middle=5, text=(10, 20), response=(10, 25))
        note = "whisper-base encoder + Llama-style LLM (stage 2: CFormer and PLoRA trained)"
        if quick:
            note += "; quick: 1 encoder and 2 LLM layers"
        return _preset_from_config("100m", c, batch, True, "float32", note)
    if name == "gpu":
        # configs/qwen2_5_0_5b_small.py stage 2 with random weights: whisper-small encoder,
        # Qwen2.5-0.5B-Instruct's shapes, bf16 compute, batch 32 of 10 s / 128 tokens.
        c = config_lib.load_config(f"{REPO / 'configs/qwen2_5_0_5b_small.py'}:stage2")
        enc = dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072)
        llm = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24)
        batch = BatchShape(32, 1000, 128, prefix=20, middle=5, text=(15, 45), response=(20, 55))
        if quick:
            enc = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
            llm = dict(vocab_size=4096, hidden_size=112, intermediate_size=256, num_layers=2)
            batch = BatchShape(2, 300, 64, prefix=20, middle=5, text=(5, 15), response=(5, 20))
        _set(
            c,
            **{
                "model.encoder.hf_path": "",
                "model.llm.hf_path": "",
                "model.adapter.max_tokens": 48,
            },
            **{f"model.encoder.{k}": v for k, v in enc.items()},
            **{f"model.llm.{k}": v for k, v in llm.items()},
        )
        note = "whisper-small + Qwen2.5-0.5B shapes, bf16 compute (stage 2: CFormer and PLoRA)"
        if quick:
            note = "CPU smoke form of the gpu preset (same parts, tiny widths), bf16 compute"
        return _preset_from_config(
            "gpu", c, batch, False, "bfloat16", note, qkv_bias=True, rope_theta=1e6
        )
    if name == "smollm2":
        # The real recipe at small scale (`make demo-smollm2`'s shapes): Whisper tiny.en's encoder
        # (frozen, variable length), configs/tiny.py's CFormer, SmolLM2-135M-Instruct's LLM
        # (30 layers, H=576, 9/3 heads, V=49152, tied); stage 2, batch 16 of 5 s / 128 tokens.
        # The prompt prefix is the demo's: the system turn, user header and instruction (~28
        # tokens with SmolLM2's tokenizer); transcripts and continuations as in its corpus.
        c = config_lib.load_config(f"{REPO / 'configs/tiny.py'}:stage2")
        enc = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536)
        llm = dict(
            model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=30, num_heads=9, num_kv_heads=3, tie_word_embeddings=True,
        )  # fmt: skip
        batch = BatchShape(16, 500, 128, prefix=28, middle=5, text=(8, 30), response=(15, 60))
        if quick:
            enc = dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128)
            llm = {**llm, "num_layers": 2, "vocab_size": 4096}
            batch = BatchShape(2, 300, 64, prefix=20, middle=5, text=(5, 15), response=(5, 20))
        _set(
            c,
            **{"model.encoder.hf_path": "", "model.llm.hf_path": "", "model.llm.lora_rank": 16},
            **{"train.trainable": ("^adapter/", "lora_")},
            **{f"model.encoder.{k}": v for k, v in enc.items()},
            **{f"model.llm.{k}": v for k, v in llm.items()},
        )
        note = "Whisper tiny.en encoder + SmolLM2-135M LLM (stage 2: CFormer and PLoRA trained)"
        return _preset_from_config("smollm2", c, batch, True, "float32", note, rope_theta=100000.0)
    raise ValueError(f"--preset: expected one of {PRESET_NAMES}, got {name!r}")


# ----------------------------------------------------------------------------------------------
# Inputs: a layout-valid synthetic batch and random weights at scales where every part matters


def synthetic_batch(shape: BatchShape, vocab: int, n_mels: int, seed: int = 0) -> dict:
    """A batch as the data pipeline makes it (`data.layout.make_batch`): random log-mel features
    (padded with each utterance's silence value), the chat layout around a transcript and a
    response, right padding. The transcript is longer for longer audio, as speech is."""
    rs = np.random.RandomState(seed)
    examples = []
    for _ in range(shape.batch):
        t = rs.randint(shape.frames // 2, shape.frames + 1)
        lo, hi = shape.text
        n = int(round(lo + (hi - lo) * (t - shape.frames / 2) / (shape.frames / 2)))
        r = rs.randint(shape.response[0], shape.response[1] + 1)
        pieces = [(shape.prefix, 0), (n, 1), (shape.middle, 0), (r, 2), (1, 2)]
        kind = np.concatenate([np.full(k, v) for k, v in pieces])
        examples.append(
            {
                "features": rs.randn(n_mels, t).astype(np.float32),
                "input_ids": rs.randint(1, vocab, kind.size).astype(np.int32),
                "speech_mask": kind == 1,
                "response_mask": kind == 2,
            }
        )
    return make_batch(
        examples,
        batch_size=shape.batch,
        frames=shape.frames,
        tokens=shape.tokens,
        n_mels=n_mels,
        pad_id=0,
    )


def preset_inputs(p: Preset) -> tuple[dict, dict[str, np.ndarray]]:
    """(synthetic batch, random fp32 parameters) of preset `p`: what every benchmark times."""
    batch = synthetic_batch(p.batch, p.model.llm.vocab_size, p.model.encoder.num_mel_bins)
    return batch, random_params(p.model, seed=0)


def random_params(
    model_cfg: BLSPKDConfig, seed: int = 0, lora_b_scale: float = 0.0
) -> dict[str, np.ndarray]:
    """Flat fp32 parameters drawn with numpy: kernels ~ N(0, 1/fan_in) (activations stay O(1)),
    token embeddings ~ N(0, 4/H) (logits of a few units, so KL and CE are O(1) and the loss
    comparison means something), norms near 1, biases small. PLoRA's B is `lora_b_scale / sqrt(r)`
    times N(0, 1): 0 (as training starts) keeps the first step's losses free of LoRA dropout."""
    rs = np.random.RandomState(seed)
    flat = {}
    for path, leaf in optim.flatten(param_shapes(model_cfg)).items():
        shape = leaf.shape
        x = rs.standard_normal(shape).astype(np.float32)
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            x = 1.0 + 0.1 * x
        elif name == "bias":
            x = 0.1 * x
        elif name == "lora_b":
            x = x * (lora_b_scale / math.sqrt(shape[0]))
        elif name in ("kernel", "lora_a"):
            x = x / math.sqrt(math.prod(shape[:-1]))
        elif name == "embedding":
            x = x * (2.0 / math.sqrt(shape[-1]))
        else:  # the encoder's position table
            x = 0.1 * x
        flat[path] = x
    return flat


# ----------------------------------------------------------------------------------------------
# JAX: the project's train step


def jax_step(
    p: Preset, flat_params, batch, mesh=None, shared_prefix: bool = True, plora_rows: bool = True
):
    """(compiled step, state, global batch, XLA stats, compile seconds) for preset `p`, its
    parameters set to `flat_params` (host arrays) and the state donated to each step. With
    `shared_prefix` the student reuses the teacher's prompt prefix, and with `plora_rows` PLoRA's
    branch runs on the speech rows only, as the trainer does; otherwise on every row (the
    capacity `llm.lora_rows` gets is ignored while the step is traced)."""
    mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = BLSPKD(p.model)
    step_cfg = train_state.StepConfig(
        trainable=p.trainable, loss=p.loss, shared_prefix=p.batch.prefix if shared_prefix else 0
    )
    tx, _ = optim.make_optimizer(**p.optim)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    params = weights.place_params(model, mesh, flat_params)
    state, shardings = train_state.create_state(params, mesh, step_cfg, tx)
    fn = train_state.make_train_step(model, step_cfg, tx)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    t0 = time.perf_counter()
    own = llm.lora_rows
    if not plora_rows:
        llm.lora_rows = lambda mask, capacity=None: own(mask)
    try:
        compiled, stats = train_state.compile_train_step(
            fn, shardings, mesh, abstract_state, abstract, log=lambda *a: None
        )
    finally:
        llm.lora_rows = own
    compile_s = time.perf_counter() - t0
    return compiled, state, sharding.global_batch(mesh, batch), stats, compile_s


# ----------------------------------------------------------------------------------------------
# FLOPs and peak


def analytic_flops(model_cfg: BLSPKDConfig, batch, trainable: set[str]) -> float:
    """Model FLOPs of one step, counted per matmul: 2 * weights * tokens forward, the same again
    for input gradients where anything before it trains, and again for weight gradients where it
    trains; attention scores and values (full L x L, forward 4 L^2 d, backward twice that); the
    output head at the loss rows only (teacher forward; student forward + input gradients).
    Tokens are the batch's static shapes (padding included, as both frameworks compute it);
    the CFormer's post layers run over the longest transcript's N tokens."""
    enc, ad, llm = model_cfg.encoder, model_cfg.adapter, model_cfg.llm
    B, _, frames = batch["features"].shape
    L = batch["input_ids"].shape[1]
    T = (frames + 1) // 2
    N = int(batch["text_lengths"].max())
    ex = batch["example_mask"][:, None]
    nxt = np.pad(batch["response_mask"][:, 1:], ((0, 0), (0, 1)))
    rows = int(((batch["speech_mask"] & ex) | (nxt & ex & batch["attention_mask"])).sum())
    trains = lambda prefix: any(k.startswith(prefix) for k in trainable)  # noqa: E731
    enc_t, ad_t = trains("encoder/"), trains("adapter/")
    lora_t = any("lora_" in k for k in trainable)
    base_t = any(k.startswith("llm/") and "lora_" not in k for k in trainable)

    def whisper(n_layers, d, ffn):  # forward FLOPs (per token of linears, per key x query)
        return n_layers * 2 * (4 * d * d + 2 * d * ffn), n_layers * 4 * d

    def cost(linear, attn, weights_train, inputs_need_grad):
        mult_lin = 1 + inputs_need_grad + weights_train
        mult_attn = 1 + 2 * (inputs_need_grad or weights_train)
        return linear * mult_lin + attn * mult_attn

    D = enc.d_model
    # Encoder: convs, then layers over T frames.
    lin, att = whisper(enc.encoder_layers, D, enc.encoder_ffn_dim)
    enc_lin = B * (2 * frames * enc.num_mel_bins * 3 * D + 2 * T * 3 * D * D + T * lin)
    total = cost(enc_lin, B * att * T * T, enc_t, False)
    # CFormer: pre layers over T frames, CIF (dense N x T weights), cif_proj, post layers over N
    # tokens, out_proj.
    lin, att = whisper(ad.n_pre, D, ad.ffn_dim)
    lin2, att2 = whisper(ad.n_post, D, ad.ffn_dim)
    ad_lin = B * (T * lin + 2 * N * T * (D - 1) + 2 * N * (D - 1) * D + N * lin2)
    ad_lin += B * 2 * N * D * llm.hidden_size
    total += cost(ad_lin, B * (att * T * T + att2 * N * N), ad_t, enc_t)
    # LLM: teacher forward; student forward and backward (inputs need gradients: the CFormer).
    H, hd = llm.hidden_size, llm.head_dim
    q, kv = llm.num_heads * hd, llm.num_kv_heads * hd
    dims = {"q": (H, q), "k": (H, kv), "v": (H, kv), "o": (q, H)}
    dims.update(gate=(H, llm.intermediate_size), up=(H, llm.intermediate_size))
    dims["down"] = (llm.intermediate_size, H)
    per_layer = sum(a * b for a, b in dims.values())
    lora = sum(llm.lora_rank * (a + b) for t, (a, b) in dims.items() if t in llm.lora_targets)
    tokens = B * L
    lin = 2 * llm.num_layers * per_layer * tokens
    lora_lin = 2 * llm.num_layers * lora * tokens
    att = B * llm.num_layers * 4 * L * L * q
    total += lin + att  # teacher
    total += cost(lin, att, base_t, True) + cost(lora_lin, 0, lora_t, True)  # student
    head = 2 * H * llm.vocab_size * rows
    total += head + cost(head, 0, base_t, True)  # teacher and student heads
    return float(total)


# ----------------------------------------------------------------------------------------------
# Running a preset


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The --ablate rows: each takes back one of the JAX step's savings, or gives PyTorch one.
NO_PREFIX = "JAX (jit), prefix recomputed"
ALL_ROWS = "JAX (jit), PLoRA on every row"
TORCH_ROWS = "PyTorch eager, PLoRA on speech rows"
ABLATIONS = (NO_PREFIX, ALL_ROWS, TORCH_ROWS)


def run_preset(
    p: Preset,
    repeats: int,
    warmup: int,
    compile_torch: bool = True,
    ablate=False,
    keep_jax=False,
    log=print,
):
    """Time every framework on preset `p`; returns a dict of results for `report`. `ablate` adds
    `ABLATIONS`: the JAX step without the shared prompt prefix, the JAX step with PLoRA's branch
    on every row, and PyTorch eager with it on the speech rows only (`_PLoRASwitch.rows`);
    `keep_jax` adds the compiled JAX step and a call running it on its latest (donated) state as
    `res["jax"]`."""
    batch, flat = preset_inputs(p)
    shapes = {k: v.shape for k, v in optim.flatten(param_shapes(p.model)).items()}
    trainable, _ = optim.split_trainable(flat, p.trainable)
    n_params = sum(math.prod(s) for s in shapes.values())
    n_train = sum(v.size for v in trainable.values())
    res = dict(preset=p, params=n_params, trainable=n_train, rows={}, losses={})
    log(f"[{p.name}] {n_params / 1e6:.1f}M parameters ({n_train / 1e6:.2f}M trained); compiling")

    compiled, state, gbatch, stats, compile_s = jax_step(p, flat, batch)
    rng = jax.random.PRNGKey(0)
    res["xla_flops"] = stats["xla_flops"]
    res["flops"] = analytic_flops(p.model, batch, set(trainable))
    jax_box = {"state": state}

    def jax_fn():
        jax_box["state"], m = compiled(jax_box["state"], gbatch, rng)
        jax.block_until_ready((jax_box["state"], m))
        return m

    runners = {"JAX (jit)": jax_fn}
    first = {}
    firsts = {"JAX (jit)": compile_s}
    if ablate:
        for label, kw in (
            (NO_PREFIX, dict(shared_prefix=False)),
            (ALL_ROWS, dict(plora_rows=False)),
        ):
            compiled0, state0, _, _, compile0 = jax_step(p, flat, batch, **kw)
            box0 = {"state": state0}

            def jax_ablated_fn(box0=box0, compiled0=compiled0):
                box0["state"], m = compiled0(box0["state"], gbatch, rng)
                jax.block_until_ready((box0["state"], m))
                return m

            runners[label] = jax_ablated_fn
            firsts[label] = compile0
    tmp = contextlib.ExitStack()
    if p.torch:
        torch_dir = tmp.enter_context(tempfile.TemporaryDirectory())
        paths = torch_param_paths(p.model, shapes)
        tb = torch_batch(batch)
        kinds = {"PyTorch eager": (False, False)}  # (torch.compile, PLoRA rows)
        if compile_torch:
            kinds["PyTorch torch.compile"] = (True, False)
        if ablate:
            kinds[TORCH_ROWS] = (False, True)
        for i, (label, (comp, rows)) in enumerate(kinds.items()):
            model = export_torch(p.model, flat, Path(torch_dir) / str(i))
            model._plora.rows = rows
            step = TorchTrainStep(model, paths, set(trainable), p.loss, **p.optim, compile=comp)
            runners[label] = lambda step=step: step(tb)
    del flat, trainable

    # First steps (compilation for JAX's AOT step happened above; torch.compile's happens here).
    for label, fn in list(runners.items()):
        t0 = time.perf_counter()
        try:
            m = fn()
        except Exception as e:  # an honest table: a framework that fails is reported, not hidden
            res["rows"][label] = {"error": _first_line(e)}
            log(f"[{p.name}] {label} failed: {_first_line(e)}")
            del runners[label]
            continue
        dt = time.perf_counter() - t0
        firsts[label] = firsts.get(label, 0.0) + dt if label.startswith("JAX") else dt
        first[label] = {k: float(m[k]) for k in ("loss", *LOSS_NAMES) if k in m}
        log(f"[{p.name}] {label}: first step {dt:.2f} s, loss {first[label]['loss']:.6f}")
    for _ in range(warmup - 1):
        for fn in runners.values():
            fn()
    times = {label: [] for label in runners}
    for _ in range(repeats):
        for label, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    tmp.close()
    for label, ts in times.items():
        res["rows"][label] = {"time": statistics.median(ts), "first": firsts[label]}
    res["losses"] = first
    if keep_jax:
        res["jax"] = (compiled, jax_fn)
    return res


def step_ms(res: dict) -> dict[str, float]:
    """{"jax_ms", "eager_ms", "compile_ms", and with --ablate "jax_prefix_recomputed_ms",
    "jax_plora_every_row_ms", "eager_plora_speech_rows_ms"}: the median step times of
    `run_preset`'s result, for the frameworks that ran."""
    labels = {
        "jax_ms": "JAX (jit)",
        "eager_ms": "PyTorch eager",
        "compile_ms": "PyTorch torch.compile",
        "jax_prefix_recomputed_ms": NO_PREFIX,
        "jax_plora_every_row_ms": ALL_ROWS,
        "eager_plora_speech_rows_ms": TORCH_ROWS,
    }
    rows = res["rows"]
    return {k: rows[v]["time"] * 1e3 for k, v in labels.items() if "time" in rows.get(v, {})}


def report(res: dict, peak: float, peak_label: str, nominal: float | None = None) -> str:
    """The markdown for one preset's results."""
    p = res["preset"]
    b, m = p.batch, p.model
    rows = res["rows"]
    jax_t = rows["JAX (jit)"]["time"]
    flops = res["flops"]
    lines = [
        f"### {p.name}: {p.note}",
        "",
        f"{res['params'] / 1e6:.1f}M parameters ({res['trainable'] / 1e6:.2f}M trained: "
        f"{', '.join(p.trainable)}); encoder d={m.encoder.d_model} x {m.encoder.encoder_layers}, "
        f"CFormer {m.adapter.n_pre}+{m.adapter.n_post}, LLM {m.llm.model_type} "
        f"H={m.llm.hidden_size} x {m.llm.num_layers} V={m.llm.vocab_size} PLoRA r="
        f"{m.llm.lora_rank}; compute {m.llm.dtype}. Batch {b.batch} x {b.frames} mel frames, "
        f"{b.tokens} tokens. Model FLOPs/step: analytic {flops / 1e9:.1f} G (used for MFU), "
        f"XLA cost analysis of the JAX step {res['xla_flops'] / 1e9:.1f} G. Peak: {peak_label}.",
        "",
    ]
    head = "| framework | ms/step | steps/s | time / JAX | MFU |"
    if nominal:
        head += " MFU vs 989 TFLOP/s |"
    head += " compile + first step (s) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, r in rows.items():
        if "error" in r:
            cells = ["failed: " + r["error"].replace("|", "/")] + ["-"] * (head.count("|") - 3)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            continue
        t = r["time"]
        cells = [f"{t * 1e3:.1f}", f"{1 / t:.2f}", f"{t / jax_t:.2f}", f"{flops / t / peak:.1%}"]
        if nominal:
            cells.append(f"{flops / t / nominal:.1%}")
        cells.append(f"{r['first']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    losses = res["losses"]
    if len(losses) > 1:
        names = [k for k in losses["JAX (jit)"]]
        others = [k for k in losses if k != "JAX (jit)"]
        # The ablation rows compute the same losses; the table compares frameworks.
        losses = {k: v for k, v in losses.items() if k not in ABLATIONS}
        others = [k for k in others if k not in ABLATIONS]
        lines += ["", "| first-step loss | " + " | ".join(losses) + " | max abs diff |"]
        lines.append("|---|" + "---|" * (len(losses) + 1))
        for name in names:
            ref = losses["JAX (jit)"][name]
            vals = [losses[k].get(name, math.nan) for k in losses]
            diff = max(abs(losses[k][name] - ref) for k in others)
            lines.append(f"| {name} | " + " | ".join(f"{v:.6f}" for v in vals) + f" | {diff:.1e} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    names = args.preset or ["tiny", "100m", "smollm2"]
    accelerator = jax.default_backend() != "cpu"
    if "gpu" in names and not accelerator and not args.quick:
        print(
            "--preset gpu needs an accelerator (JAX sees only the CPU); add --quick for its "
            "CPU smoke form",
            file=sys.stderr,
        )
        return 2
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup or 1
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    load_before = os.getloadavg()
    peaks = {}
    out = []
    summary = {}
    for name in names:
        p = preset(name, args.quick)
        if p.peak_dtype not in peaks:
            n = (8192 if accelerator else 2048) if not args.quick else 1024
            peaks[p.peak_dtype] = measure_matmul_peak(n, dtype=p.peak_dtype)
        peak = peaks[p.peak_dtype]
        compile_torch = args.compile if args.compile is not None else not args.quick
        res = run_preset(p, repeats, warmup, compile_torch=compile_torch, ablate=args.ablate)
        summary[name] = {key: round(ms, 1) for key, ms in step_ms(res).items()}
        label = f"measured {p.peak_dtype} matmul {peak / 1e9:.1f} GFLOP/s"
        nominal = H100_BF16_PEAK if name == "gpu" else None
        out.append(report(res, peak, label, nominal))
    load_after = os.getloadavg()
    device = jax.devices()[0]
    where = cpu_model() if not accelerator else getattr(device, "device_kind", str(device))
    print()
    print(
        f"Machine: {where}, {os.cpu_count()} logical cores ({cores} used); jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads). Median of {repeats} steps after {warmup} warm-up step(s), frameworks "
        f"interleaved. Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n"
    )
    if max(load_before[0], load_after[0]) > cores - 0.5 and torch.get_num_threads() > 1:
        print(
            "Note: the machine was busy (load average above the cores used); PyTorch's OpenMP "
            "threads stall when cores are oversubscribed, so its times may be inflated: rerun "
            "on a quiet machine or with --threads 1.\n"
        )
    print("\n".join(out))
    print(json.dumps(summary))  # the last line: {"PRESET": {"jax_ms", "eager_ms", ...}, ...}
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
