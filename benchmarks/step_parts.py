"""Where the train step's time goes: the BLSP-KD step of `train_step.py` cut into its parts, in JAX
and in PyTorch eager, on the same preset, weights and batch.

Each framework runs five programs, each one the previous plus one part: the teacher's forward;
+ the student's forward (encoder, CFormer, CIF, the LLM on the speech); + the loss terms (the
vocabulary at the weighted rows); + the backward; + clipping and the AdamW update (the whole step).
A part's time is the difference between its program and the one before; the speech path's
forward (encoder, CFormer, CIF) is also timed on its own. JAX compiles each program whole, so a
difference also holds what XLA could no longer fuse across the cut: the parts add up to the step,
but each is an estimate, not a trace.

    .venv/bin/python benchmarks/step_parts.py                    # presets tiny, 100m, smollm2
    .venv/bin/python benchmarks/step_parts.py --preset 100m --quick
    .venv/bin/python benchmarks/step_parts.py --matmuls   # one linear layer's three products
    .venv/bin/python benchmarks/step_parts.py --dropout --preset tiny   # PLoRA dropout's cost
    .venv/bin/python benchmarks/step_parts.py --attention   # one attention layer, three ways

Times are medians of `--repeats` calls after one warm-up, all programs of both frameworks
interleaved. The last line printed is one JSON object: {"PRESET": {"jax": {PART: ms}, "eager":
{PART: ms}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from forward import cpu_model, jax_nn_attention  # noqa: E402
from torch_step import (  # noqa: E402
    TorchTrainStep,
    export_torch,
    torch_batch,
    torch_hidden,
    torch_losses,
    torch_param_paths,
)
from train_step import (  # noqa: E402
    PRESET_NAMES,
    jax_step,
    preset,
    preset_inputs,
)

from blspkd_jax.models import layers, llm  # noqa: E402
from blspkd_jax.models.blspkd import BLSPKD  # noqa: E402
from blspkd_jax.training import optim, train_state  # noqa: E402
from blspkd_jax.training.objective import compute_losses  # noqa: E402

# The cumulative programs, in order; each part is the difference to the one before.
STAGES = ("teacher forward", "student forward", "loss terms", "backward", "clip + AdamW update")
SPEECH = "of the student: speech path forward"


def jax_programs(p, flat, batch) -> dict:
    """{stage: zero-argument callable} running the cumulative JAX programs on preset `p`."""
    model = BLSPKD(p.model)
    P = p.batch.prefix
    step_cfg = train_state.StepConfig(trainable=p.trainable, loss=p.loss, shared_prefix=P)
    trainable, frozen = optim.split_trainable(dict(flat), p.trainable)
    trainable, frozen = jax.device_put((trainable, frozen))
    params = optim.unflatten({**trainable, **frozen})
    compiled, state, gbatch, _, _ = jax_step(p, flat, batch)
    rng = jax.random.PRNGKey(0)  # the step's raw uint32 key
    rngs = {"dropout": rng}

    def teacher(params, b):
        return model.apply({"params": params}, b, keep_kv=P, method=BLSPKD.teacher)

    def forward(params, b):  # the shared-prefix forward of the step (`BLSPKD.__call__`)
        return model.apply({"params": params}, b, False, shared_prefix=P, rngs=rngs)

    def speech(params, b):
        feats = (b["features"], b["feature_mask"], b["text_lengths"], False)
        return model.apply({"params": params}, *feats, method=BLSPKD.speech, rngs=rngs)

    def losses(params, b):
        return compute_losses(
            model, params, b, p.loss, rng=rng, deterministic=False, shared_prefix=P
        )

    grad_fn = jax.jit(train_state.make_grad_fn(model, step_cfg))
    box = {"state": state}

    def whole_step():
        box["state"], m = compiled(box["state"], gbatch, rng)
        return jax.block_until_ready((box["state"], m))

    def on_batch(f):  # f(params, batch), jitted, run on this preset's batch
        f = jax.jit(f)
        return lambda: jax.block_until_ready(f(params, gbatch))

    return {
        STAGES[0]: on_batch(teacher),
        STAGES[1]: on_batch(forward),
        STAGES[2]: on_batch(losses),
        STAGES[3]: lambda: jax.block_until_ready(grad_fn(trainable, frozen, gbatch, rng)),
        STAGES[4]: whole_step,
        SPEECH: on_batch(speech),
    }


def torch_programs(p, flat, batch, workdir) -> dict:
    """{stage: zero-argument callable} running the same cumulative programs on the exported
    PyTorch model (eager)."""
    shapes = {k: v.shape for k, v in flat.items()}
    model = export_torch(p.model, flat, Path(workdir) / "eager")
    trainable, _ = optim.split_trainable(dict(flat), p.trainable)
    step = TorchTrainStep(model, torch_param_paths(p.model, shapes), set(trainable), p.loss,
                          **p.optim)  # fmt: skip
    b = torch_batch(batch)
    ids, am = b["input_ids"], b["attention_mask"]
    positions = (am.long().cumsum(-1) - 1).clamp_min(0)

    def teacher():
        with torch.no_grad():
            return model.run_llm(
                hidden_only=True, input_ids=ids, attention_mask=am, position_ids=positions,
                use_cache=False,
            )  # fmt: skip

    def backward():
        step.opt.zero_grad(set_to_none=True)
        total, _ = torch_losses(model, b, p.loss)
        total.backward()

    return {
        STAGES[0]: teacher,
        STAGES[1]: lambda: torch_hidden(model, b),
        STAGES[2]: lambda: torch_losses(model, b, p.loss),
        STAGES[3]: backward,
        STAGES[4]: lambda: step(b),
        SPEECH: lambda: model.encode_speech(b["features"], b["feature_mask"], b["text_lengths"]),
    }


def time_parts(name: str, quick: bool, repeats: int, log=print) -> dict:
    """{"jax": {part: seconds}, "eager": {part: seconds}} for one preset."""
    p = preset(name, quick)
    batch, flat = preset_inputs(p)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"[{name}] compiling the JAX programs")
        programs = {
            "jax": jax_programs(p, flat, batch),
            "eager": torch_programs(p, flat, batch, tmp),
        }
        runs = [(fw, stage, fn) for fw, fns in programs.items() for stage, fn in fns.items()]
        for fw, stage, fn in runs:  # warm-up (JAX: compilation)
            t0 = time.perf_counter()
            fn()
            log(f"[{name}] {fw} {stage}: first call {time.perf_counter() - t0:.1f} s")
        times = {(fw, stage): [] for fw, stage, _ in runs}
        for _ in range(repeats):
            for fw, stage, fn in runs:
                t0 = time.perf_counter()
                fn()
                times[(fw, stage)].append(time.perf_counter() - t0)
    out = {}
    for fw in programs:
        cumulative = [statistics.median(times[(fw, s)]) for s in STAGES]
        parts = dict(zip(STAGES, np.diff([0.0, *cumulative]).tolist(), strict=True))
        parts[SPEECH] = statistics.median(times[(fw, SPEECH)])
        parts["whole step"] = cumulative[-1]
        out[fw] = parts
    return out


def time_matmuls(rows: int, d_in: int, d_out: int, repeats: int = 10) -> dict:
    """{(framework, product): seconds}: one linear layer's three float32 products at the given
    sizes, as a forward and backward run them: y = x W, dx = g W^T (the backward into a frozen
    layer's input), dW = x^T g (a trained weight); each jitted alone in JAX, plain torch ops."""
    rs = np.random.RandomState(0)
    x, w, g = (rs.standard_normal(s).astype(np.float32)
               for s in ((rows, d_in), (d_in, d_out), (rows, d_out)))  # fmt: skip
    jx, jw, jg = jax.device_put((x, w, g))
    tx, tw, tg = (torch.from_numpy(a) for a in (x, w, g))
    hi = jax.lax.Precision.HIGHEST
    products = {
        ("JAX", "y = x W"): (jax.jit(lambda x, w: jnp.dot(x, w, precision=hi)), (jx, jw)),
        ("JAX", "dx = g W^T"): (jax.jit(lambda g, w: jnp.dot(g, w.T, precision=hi)), (jg, jw)),
        ("JAX", "dW = x^T g"): (jax.jit(lambda x, g: jnp.dot(x.T, g, precision=hi)), (jx, jg)),
        ("PyTorch", "y = x W"): (torch.mm, (tx, tw)),
        ("PyTorch", "dx = g W^T"): (lambda g, w: torch.mm(g, w.T), (tg, tw)),
        ("PyTorch", "dW = x^T g"): (lambda x, g: torch.mm(x.T, g), (tx, tg)),
    }
    times = {k: [] for k in products}
    for _ in range(repeats + 1):  # the first round warms up (and compiles)
        for k, (fn, args) in products.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def _bernoulli_dropout(x, rate, rng, rows=None):
    """`flax.linen.Dropout`'s mask: one `jax.random.bernoulli` draw (32 random bits) an element."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


# PLoRA's dropout, three ways: the project's (a counter hash), flax's (threefry bits), and none.
DROPOUTS = {
    "counter hash (ours)": llm.dropout,
    "bernoulli (flax)": _bernoulli_dropout,
    "none": lambda x, rate, rng, rows=None: x,
}


def time_dropout(name: str, quick: bool, repeats: int, log=print) -> dict:
    """{variant: seconds}: the whole JAX step of preset `name` with each of `DROPOUTS` in PLoRA
    (swapped in for `llm.dropout` while that variant's step is traced); steps interleaved."""
    p = preset(name, quick)
    batch, flat = preset_inputs(p)
    steps, own = {}, llm.dropout
    try:
        for variant, fn in DROPOUTS.items():
            llm.dropout = fn
            log(f"[{name}] compiling the step with {variant} dropout")
            compiled, state, gbatch, _, _ = jax_step(p, flat, batch)
            steps[variant] = [compiled, state, gbatch]
    finally:
        llm.dropout = own
    times = {v: [] for v in steps}
    rng = jax.random.PRNGKey(0)
    for i in range(repeats + 1):  # the first round warms up
        for variant, s in steps.items():
            t0 = time.perf_counter()
            s[1], m = s[0](s[1], s[2], rng)
            jax.block_until_ready((s[1], m))
            if i:
                times[variant].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def report_dropout(name: str, times: dict) -> str:
    none = times["none"]
    lines = [
        f"### {name}: PLoRA dropout in the whole JAX step",
        "",
        "| dropout | step ms | dropout's cost ms | share of the step |",
        "|---|---:|---:|---:|",
    ]
    for variant, t in times.items():
        lines.append(
            f"| {variant} | {t * 1e3:.0f} | {(t - none) * 1e3:.0f} | {(t - none) / t:.0%} |"
        )
    return "\n".join(lines) + "\n"


def report_matmuls(rows: int, d_in: int, d_out: int, times: dict) -> str:
    flops = 2 * rows * d_in * d_out
    lines = [
        f"### One linear layer's products: x [{rows}, {d_in}], W [{d_in}, {d_out}], float32",
        "",
        "| product | JAX ms | PyTorch ms | JAX / PyTorch | JAX GFLOP/s | PyTorch GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for product in ("y = x W", "dx = g W^T", "dW = x^T g"):
        j, t = times[("JAX", product)], times[("PyTorch", product)]
        lines.append(
            f"| {product} | {j * 1e3:.2f} | {t * 1e3:.2f} | {j / t:.2f} | {flops / j / 1e9:.0f} | "
            f"{flops / t / 1e9:.0f} |"
        )
    return "\n".join(lines) + "\n"


ATTENTION_VARIANTS = ("jax.nn.dot_product_attention", "ours", "PyTorch eager SDPA")


def attention_shapes(name: str, quick: bool) -> dict:
    """{layer: (B, T, heads, kv heads, Dh, causal)}: one attention layer of each kind in preset
    `name` at its batch (encoder and the CFormer's first layer over the encoder frames, the LLM
    over the longest token bucket)."""
    p = preset(name, quick)
    enc, ada, lm = p.model.encoder, p.model.adapter, p.model.llm
    B, frames, tokens = p.batch.batch, p.batch.frames // 2, p.batch.tokens
    lm_dh = lm.head_dim or lm.hidden_size // lm.num_heads
    heads = enc.encoder_attention_heads
    return {
        "encoder": (B, frames, heads, heads, enc.d_model // heads, False),
        "CFormer (before CIF)": (
            B,
            frames,
            ada.num_heads,
            ada.num_heads,
            ada.d_model // ada.num_heads,
            False,
        ),
        "LLM": (B, tokens, lm.num_heads, lm.num_kv_heads or lm.num_heads, lm_dh, True),
    }


def _attention_grad(attend, args):
    """A call of the jitted gradients of `sum(attend(q, k, v, mask) * g)` into q, k, v at
    `args = (q, k, v, mask, g)`. The value is returned too: in a model the output feeds the next
    layer, and without it XLA may fuse the output's product into the backward's consumers."""

    def loss(q, k, v, mask, g):
        return jnp.sum(attend(q, k, v, mask) * g)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return lambda: grad(*args)[1]


def time_attention(name: str, quick: bool, repeats: int, log=print) -> dict:
    """{(layer, variant): seconds}: forward and backward of one float32 attention layer of preset
    `name` (`attention_shapes`), gradients into q, k and v, with padded keys (lengths drawn in
    [T/2, T]) and, in the LLM, the causal mask: autodiff of `jax.nn.dot_product_attention`'s XLA
    path (the project's kernel before `layers._attend`), `layers.attention` (ours: `_attend` and
    its written-out VJP), and PyTorch eager's `scaled_dot_product_attention`. Calls interleaved."""
    rs = np.random.RandomState(0)
    programs = {}
    for layer, (B, T, N, K, Dh, causal) in attention_shapes(name, quick).items():
        q, g = (rs.standard_normal((B, T, N, Dh)).astype(np.float32) for _ in range(2))
        k, v = (rs.standard_normal((B, T, K, Dh)).astype(np.float32) for _ in range(2))
        valid = np.arange(T)[None, :] < rs.randint(T // 2, T + 1, B)[:, None]
        mask = valid[:, None, None, :]
        if causal:
            mask = mask & np.tril(np.ones((T, T), bool))
        jargs = jax.device_put((q, k, v, mask, g))

        tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).requires_grad_() for a in (q, k, v))
        tmask, tg = torch.from_numpy(mask), torch.from_numpy(g).transpose(1, 2)

        def torch_program(tq=tq, tk=tk, tv=tv, tmask=tmask, tg=tg, gqa=N != K):
            tq.grad = tk.grad = tv.grad = None
            o = torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=tmask, enable_gqa=gqa
            )
            (o * tg).sum().backward()
            return (tq.grad.detach().transpose(1, 2),)  # dq first, as the JAX programs

        programs[(layer, "jax.nn.dot_product_attention")] = _attention_grad(jax_nn_attention, jargs)
        programs[(layer, "ours")] = _attention_grad(layers.attention, jargs)
        programs[(layer, "PyTorch eager SDPA")] = torch_program
        log(f"[{name}] {layer}: B={B} T={T} heads={N}/{K} Dh={Dh}{' causal' if causal else ''}")
    times, dq = {k: [] for k in programs}, {}
    for i in range(repeats + 1):  # the first round warms up (and compiles)
        for k, fn in programs.items():
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            if i:
                times[k].append(time.perf_counter() - t0)
            else:
                dq[k] = np.asarray(out[0])
        if i == 0:  # before any is timed: the three agree on dq
            for (layer, variant), got in dq.items():
                ours = dq[(layer, "ours")]
                tol = 1e-4 * np.abs(ours).max()
                np.testing.assert_allclose(got, ours, atol=tol, err_msg=f"{layer}: {variant}")
    return {k: statistics.median(v) for k, v in times.items()}


def report_attention(name: str, times: dict) -> str:
    lines = [
        f"### {name}: one attention layer, forward and backward (float32)",
        "",
        "| layer | jax.nn.dot_product_attention ms | ours ms | PyTorch eager SDPA ms | "
        "jax.nn / ours | eager / ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for layer in dict.fromkeys(k[0] for k in times):
        a, o, t = (times[(layer, v)] for v in ATTENTION_VARIANTS)
        lines.append(
            f"| {layer} | {a * 1e3:.2f} | {o * 1e3:.2f} | {t * 1e3:.2f} | {a / o:.2f} | "
            f"{t / o:.2f} |"
        )
    return "\n".join(lines) + "\n"


def report(name: str, parts: dict) -> str:
    jx, eager = parts["jax"], parts["eager"]
    lines = [
        f"### {name}",
        "",
        "| part | JAX ms | PyTorch eager ms | JAX / eager | share of the JAX step |",
        "|---|---:|---:|---:|---:|",
    ]
    for part in (*STAGES[:2], SPEECH, *STAGES[2:], "whole step"):
        j, e = jx[part], eager[part]
        share = j / jx["whole step"]
        ratio = f"{j / e:.2f}" if e > 0 and j > 0 else "-"
        lines.append(f"| {part} | {j * 1e3:.1f} | {e * 1e3:.1f} | {ratio} | {share:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESET_NAMES[:3], action="append",
                    help="repeatable (default: tiny, 100m, smollm2)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="shrunken presets (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5, quick 2)")
    ap.add_argument(
        "--matmuls",
        action="store_true",
        help="only time one linear layer's forward and backward products (smollm2's MLP shape)",
    )
    ap.add_argument(
        "--dropout",
        action="store_true",
        help="only time the whole JAX step with PLoRA dropout three ways (ours, flax's, none)",
    )
    ap.add_argument(
        "--attention",
        action="store_true",
        help="only time one attention layer of each kind three ways (jax.nn, ours, PyTorch SDPA)",
    )
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    if args.matmuls:
        # smollm2's MLP up-projection over one batch's rows (16 x 128 tokens).
        shape = (2048, 576, 1536)
        print(report_matmuls(*shape, time_matmuls(*shape)))
        return 0
    names = args.preset or ["tiny", "100m", "smollm2"]
    repeats = args.repeats or (2 if args.quick else 5)
    load = os.getloadavg()[0]
    if args.dropout:
        results = {name: time_dropout(name, args.quick, repeats) for name in names}
        render, what = report_dropout, "steps, variants interleaved"
        summary = {n: {v: round(t * 1e3, 1) for v, t in d.items()} for n, d in results.items()}
    elif args.attention:
        results = {name: time_attention(name, args.quick, repeats) for name in names}
        render, what = report_attention, "calls, all layers and variants interleaved"
        summary = {
            n: {f"{layer} / {v}": round(t * 1e3, 2) for (layer, v), t in d.items()}
            for n, d in results.items()
        }
    else:
        results = {name: time_parts(name, args.quick, repeats) for name in names}
        render, what = report, "calls, all programs interleaved"
        summary = {
            name: {fw: {k: round(v * 1e3, 1) for k, v in d.items()} for fw, d in parts.items()}
            for name, parts in results.items()
        }
    print(
        f"\nMachine: {cpu_model()}, {cores} cores used; jax {jax.__version__}, torch "
        f"{torch.__version__}. Median of {repeats} {what}. Load average "
        f"{load:.2f} before, {os.getloadavg()[0]:.2f} after.\n"
    )
    for name, result in results.items():
        print(render(name, result))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
