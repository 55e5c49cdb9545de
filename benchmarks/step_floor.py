"""How fast could the train step be on this CPU? Its matrix products alone, each timed as a plain
GEMM, against the PyTorch steps that the speed goals of issue 16 compare with.

    .venv/bin/python benchmarks/step_floor.py                  # presets tiny, 100m, smollm2
    .venv/bin/python benchmarks/step_floor.py --preset 100m --no-compile
    .venv/bin/python benchmarks/step_floor.py --quick          # a smoke run

One run, on one machine:
1. `train_step.py`'s comparison: the JAX step, PyTorch eager and torch.compile (median of
   `--repeats` steps, interleaved).
2. The compiled JAX step traced once more (`step_profile.py`): how many times each HLO op ran.
3. Every matrix product the step executed (dots and convolutions, also those inside fusions and
   loops, each counted as often as it ran; a product in a `lax.cond` branch counts only when the
   branch ran) read from the HLO as a GEMM `[b, m, k] x [b, k, n]`; each distinct GEMM timed
   alone with its operands already laid out, in XLA (`jnp.matmul`, jitted) and in PyTorch
   (`torch.matmul`): the least of `--gemm-repeats` calls, less the framework's cost of calling a
   1 x 1 x 1 GEMM (dispatch, not arithmetic).

PyTorch's GEMM is also timed on one thread, divided by the cores (the cores each running their
own product side by side, as XLA's runtime may run independent ops). The floor is the sum over
executed products of the least of these times for that GEMM: what the step would take if
everything else it does (attention's softmax, norms, RoPE, dropout, the layout copies, the
optimizer) took no time and its products ran back to back at the best speed either library
reaches on this CPU at those shapes. A goal below the floor cannot be met on this
CPU by changing anything but the matmul kernels themselves.

The last line printed is one JSON object: {"PRESET": {"floor_ms", "floor_xla_ms",
"floor_torch_ms", "floor_torch_1core_ms", "jax_ms", "eager_ms", "compile_ms", "gemm_gflop"}, ...}.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from forward import cpu_model  # noqa: E402
from step_profile import trace_step  # noqa: E402
from train_step import PRESET_NAMES, preset, run_preset, step_ms  # noqa: E402

# Goals of issue 16: JAX at least this much faster than each PyTorch step.
GOALS = {"eager_ms": 1.5, "compile_ms": 1.1}

_COMP = re.compile(r"^\s*(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"calls=((?:%[\w.\-]+(?:, )?)+)")
_DIMS = re.compile(r"(lhs|rhs)_(batch|contracting)_dims=\{([\d,]*)\}")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _operands(args: str) -> list[str]:
    """Operand names of one instruction: the `%names` before the closing parenthesis."""
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return _OPERAND.findall(args[:end])


def parse_hlo(text: str) -> dict[str, dict[str, dict]]:
    """{computation: {instruction: {"shape", "opcode", "operands", "attrs"}}} of an HLO module's
    text; "shape" is the result's dims (None for a tuple)."""
    comps, current = {}, None
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m and current is not None:
            name, shape, opcode, rest = m.groups()
            s = _SHAPE.fullmatch(shape.split("{")[0]) if not shape.startswith("(") else None
            current[name] = {
                "shape": _dims(s.group(1)) if s else None,
                "opcode": opcode,
                "operands": _operands(rest),
                "attrs": rest,
            }
            continue
        m = _COMP.match(line)
        if m:
            current = comps.setdefault(m.group(1), {})
    return comps


def gemm_of(instr: dict, shapes: dict[str, tuple]) -> tuple[int, int, int, int] | None:
    """(b, m, k, n) of a dot or convolution: the batched GEMM that does its arithmetic. `shapes`
    maps the computation's instruction names to their result dims."""
    attrs, out = instr["attrs"], instr["shape"]
    lhs, rhs = (shapes.get(o) for o in instr["operands"][:2])
    if lhs is None or rhs is None or out is None:
        return None
    if instr["opcode"] == "dot":
        d = {(side, kind): _dims(v) for side, kind, v in _DIMS.findall(attrs)}
        lb, lc = d.get(("lhs", "batch"), ()), d.get(("lhs", "contracting"), ())
        rb, rc = d.get(("rhs", "batch"), ()), d.get(("rhs", "contracting"), ())
        b = math.prod(lhs[i] for i in lb)
        k = math.prod(lhs[i] for i in lc)
        m = math.prod(s for i, s in enumerate(lhs) if i not in lb + lc)
        n = math.prod(s for i, s in enumerate(rhs) if i not in rb + rc)
        return b, m, k, n
    # convolution: dim_labels=b0f_0io->b0f (input, kernel -> output); each output element is a
    # dot over the kernel's input features and window.
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    groups = int((re.search(r"feature_group_count=(\d+)", attrs) or [0, 1])[1])
    if labels is None:
        return None
    _, kern, outl = labels.groups()
    n = out[outl.index("f")]
    k = math.prod(s for s, c in zip(rhs, kern, strict=True) if c != "o")
    return groups, math.prod(out) // n, k, n // groups


def executed_gemms(hlo_text: str, counts: dict[str, int]) -> collections.Counter:
    """{(b, m, k, n): times run} over one step: every dot and convolution of the module, found in
    the op that ran (`counts`: HLO op -> runs in one step) or in the fusions it calls."""
    comps = parse_hlo(hlo_text)
    owner = {i: c for c, instrs in comps.items() for i in instrs}
    shapes = {c: {n: i["shape"] for n, i in instrs.items()} for c, instrs in comps.items()}
    out = collections.Counter()

    def visit(comp: str, name: str, times: int):
        instr = comps[comp][name]
        if instr["opcode"] in ("dot", "convolution"):
            g = gemm_of(instr, shapes[comp])
            if g is None:
                raise ValueError(f"step_floor: cannot read the GEMM of HLO op {name}")
            out[g] += times
        elif instr["opcode"] == "fusion":  # its body runs inside this one op's trace event
            for called in _CALLS.findall(instr["attrs"]):
                for sub in _OPERAND.findall(called):
                    for inner in comps.get(sub, {}):
                        visit(sub, inner, times)

    for name, times in counts.items():
        if name in owner:
            visit(owner[name], name, times)
    return out


def _best(fn, args, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def time_gemms(gemms, repeats: int, log=print) -> dict[tuple, dict[str, float]]:
    """{(b, m, k, n): {"xla": s, "torch": s, "torch, 1 core": s}}: each GEMM alone, fp32, the
    least of `repeats` calls after a warm-up, less the framework's cost of calling a 1 x 1 x 1
    GEMM. "torch, 1 core" is PyTorch on one thread, divided by the cores: the time per GEMM if
    the cores each ran their own product side by side (as XLA's runtime may do with
    independent ops), which small GEMMs reach more easily than one product split over cores."""
    rs = np.random.RandomState(0)
    hi = jax.lax.Precision.HIGHEST
    xla = jax.jit(lambda a, w: jnp.matmul(a, w, precision=hi))
    cores = torch.get_num_threads()

    def one(b, m, k, n):
        a = rs.standard_normal((b, m, k) if b > 1 else (m, k)).astype(np.float32)
        w = rs.standard_normal((b, k, n) if b > 1 else (k, n)).astype(np.float32)
        ja, jw = jax.device_put((a, w))
        ta, tw = torch.from_numpy(a), torch.from_numpy(w)
        xla(ja, jw)
        torch.matmul(ta, tw)
        t = {"xla": _best(xla, (ja, jw), repeats), "torch": _best(torch.matmul, (ta, tw), repeats)}
        torch.set_num_threads(1)
        try:
            t["torch, 1 core"] = _best(torch.matmul, (ta, tw), repeats) / cores
        finally:
            torch.set_num_threads(cores)
        return t

    call = one(1, 1, 1, 1)  # what a call costs with (almost) no arithmetic
    out = {}
    for i, g in enumerate(sorted(gemms, key=lambda g: -math.prod(g))):
        t = one(*g)
        out[g] = {f: max(t[f] - call[f], 0.0) for f in t}
        if (i + 1) % 25 == 0:
            log(f"  {i + 1}/{len(gemms)} GEMMs timed")
    return out


def floor(name: str, quick: bool, repeats: int, gemm_repeats: int, compile_torch: bool, log=print):
    """The step's times (train_step.run_preset), its executed GEMMs and their floor."""
    p = preset(name, quick)
    res = run_preset(p, repeats, 1, compile_torch=compile_torch, keep_jax=True, log=log)
    compiled, run = res.pop("jax")
    log(f"[{name}] tracing one step for the ops' run counts")
    counts, _, _ = trace_step(run, repeats=1)
    gemms = executed_gemms(compiled.as_text(), counts)
    log(f"[{name}] {sum(gemms.values())} products run, {len(gemms)} distinct GEMMs; timing them")
    times = time_gemms(gemms, gemm_repeats, log=log)
    ms = {
        f: 1e3 * sum(c * times[g][f] for g, c in gemms.items())
        for f in ("xla", "torch", "torch, 1 core")
    }
    ms["best"] = 1e3 * sum(c * min(times[g].values()) for g, c in gemms.items())
    step = step_ms(res)
    flop = sum(c * 2 * math.prod(g) for g, c in gemms.items())
    return {"floor": ms, "steps": step, "gemm_flop": flop, "n_gemms": sum(gemms.values()),
            "distinct": len(gemms), "gemms": gemms, "times": times}  # fmt: skip


def report(name: str, r: dict) -> str:
    f, s = r["floor"], r["steps"]
    lines = [
        f"### {name}: {r['n_gemms']} products a step ({r['distinct']} distinct GEMMs), "
        f"{r['gemm_flop'] / 1e9:.1f} GFLOP",
        "",
        "| | ms |",
        "|---|---:|",
        f"| floor: the products alone, the faster library's GEMM each | **{f['best']:.1f}** |",
        f"| (the products alone in XLA's GEMMs / in PyTorch's / PyTorch's on 1 core, cores "
        f"side by side) | {f['xla']:.1f} / {f['torch']:.1f} / {f['torch, 1 core']:.1f} |",
    ]
    for key, label in (("jax_ms", "JAX step"), ("eager_ms", "PyTorch eager step"),
                       ("compile_ms", "torch.compile step")):  # fmt: skip
        if key in s:
            lines.append(f"| {label} | {s[key]:.1f} |")
    for key, factor in GOALS.items():
        if key in s:
            goal = s[key] / factor
            verdict = "below the floor: cannot be met" if goal < f["best"] else "above the floor"
            lines.append(
                f"| goal: {factor}x faster than {key[:-3]} = {goal:.1f} ms | "
                f"{goal / f['best']:.2f} x floor ({verdict}) |"
            )
    top = sorted(r["gemms"].items(), key=lambda gc: -gc[1] * min(r["times"][gc[0]].values()))
    lines += ["", "| GEMM [b, m, k] x [b, k, n] | runs | XLA ms | PyTorch ms | PyTorch 1 core "
              "ms / cores | share of floor |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for g, c in top[:8]:
        t = r["times"][g]
        share = c * min(t.values()) * 1e3 / f["best"] if f["best"] else 0.0
        lines.append(
            f"| {g[0]} x [{g[1]}, {g[2]}] x [{g[2]}, {g[3]}] | {c} | {t['xla'] * 1e3:.2f} | "
            f"{t['torch'] * 1e3:.2f} | {t['torch, 1 core'] * 1e3:.2f} | {share:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESET_NAMES[:3], action="append",
                    help="repeatable (default: tiny, 100m, smollm2)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="shrunken presets (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 5, quick 2)")
    ap.add_argument("--gemm-repeats", type=int, default=5, help="calls per GEMM (default 5)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="time torch.compile too (default: yes, but not with --quick)")  # fmt: skip
    args = ap.parse_args(argv)
    names = args.preset or ["tiny", "100m", "smollm2"]
    repeats = args.repeats or (2 if args.quick else 5)
    compile_torch = args.compile if args.compile is not None else not args.quick
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load = os.getloadavg()[0]
    results = {n: floor(n, args.quick, repeats, args.gemm_repeats, compile_torch) for n in names}
    print(
        f"\nMachine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads). Steps: median of "
        f"{repeats}; GEMMs: the least of {args.gemm_repeats} calls. Load average {load:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after.\n"
    )
    summary = {}
    for n, r in results.items():
        print(report(n, r))
        summary[n] = {
            "floor_ms": round(r["floor"]["best"], 1),
            "floor_xla_ms": round(r["floor"]["xla"], 1),
            "floor_torch_ms": round(r["floor"]["torch"], 1),
            "floor_torch_1core_ms": round(r["floor"]["torch, 1 core"], 1),
            "gemm_gflop": round(r["gemm_flop"] / 1e9, 2),
            **{k: round(v, 1) for k, v in r["steps"].items()},
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
