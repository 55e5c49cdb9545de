"""Where the JAX train step's time goes, op by op: an XLA profile of the compiled step of
`train_step.py`, each HLO op's time attributed to the model part and pass that emitted it.

    .venv/bin/python benchmarks/step_profile.py                  # preset tiny
    .venv/bin/python benchmarks/step_profile.py --preset smollm2 --repeats 2
    .venv/bin/python benchmarks/step_profile.py --preset smollm2 --top 12   # + the costliest ops
    .venv/bin/python benchmarks/step_profile.py --quick          # a smoke run

The step runs under `jax.profiler.trace`; every op the XLA:CPU runtime executes is one trace event
named after its HLO instruction. An op's time is its self time (nested events subtracted) summed
over one step, the minimum over the `--repeats` traced steps (a core taken by another process
inflates single events, never shrinks them). The op is mapped to the `op_name` metadata XLA kept
from JAX's name stack (`jvp(BLSPKD)/BLSPKD.student/llm/...` forward, `transpose(jvp(...))`
backward) and to a kind: matmul (dots, convolutions and XNNPACK dot fusions), random bits
(PLoRA's dropout masks: threefry), copies and transposes (layout changes), the rest (fused
elementwise, reductions, softmax). Op times add up across the runtime's threads, so their sum
can exceed the step's wall time; shares are of that sum.

The last line printed is one JSON object: {"PRESET": {"step_ms": ..., "parts": {PART: ms},
"kinds": {KIND: ms}}}.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
from forward import cpu_model  # noqa: E402
from train_step import PRESET_NAMES, jax_step, preset, preset_inputs  # noqa: E402

# (part, pattern on the op_name), first match wins; the pass is read separately.
PARTS = (
    ("teacher LLM", "BLSPKD.teacher"),
    ("encoder", "BLSPKD.speech/encoder"),
    ("CFormer + CIF", "BLSPKD.speech/adapter"),
    ("student LLM", "BLSPKD.student/llm"),
    ("student (splice)", "BLSPKD.student"),
    ("loss terms", "jvp()"),
)
KINDS = ("matmul", "random bits", "copy / transpose", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Threefry's counter hashing lowers to a while loop whose body ops keep only the caller's path: a
# while loop inside one of the LLM's projections is PLoRA's dropout mask being drawn.
_RANDOM = re.compile(r"threefry|random_bits|iota_2x32|_proj/while")
_CONTAINERS = {"while", "conditional", "call"}  # their bodies' ops are traced on their own


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (opcode, op_name metadata or "")} of every instruction in the module."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            meta = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
    return out


def classify(name: str, opcode: str, op_name: str) -> tuple[str, str]:
    """(part and pass, kind) of one HLO op."""
    if "transpose(jvp(" in op_name:
        direction = "backward"
    elif "jvp(" in op_name:
        direction = "forward"
    else:
        direction = ""
    part = next((p for p, pat in PARTS if pat in op_name), None)
    if not op_name:
        where = "unnamed (layout copies XLA added)"
    elif part is None:
        where = "clip + AdamW + metrics" if not direction else f"other {direction}"
    elif part == "teacher LLM":
        where = part
    else:
        where = f"{part} {direction}".strip()
    if opcode in ("dot", "convolution") or name.startswith("ynn_fusion"):
        kind = "matmul"
    elif _RANDOM.search(op_name):
        kind = "random bits"
    elif opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        kind = "copy / transpose"
    else:
        kind = "other"
    return where, kind


def self_times(events: list[dict]) -> dict[str, dict[str, float]]:
    """{run_id: {hlo op: self time in microseconds}}: each event's duration less the durations of
    the events nested in it on the same thread."""
    out = collections.defaultdict(lambda: collections.defaultdict(float))
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)

    def close(end, run, op, dur, nested):
        if op is not None:
            out[run][op] += dur - nested

    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # open events: [end, run_id, op, duration, nested time]
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                close(*stack.pop())
            if stack:
                stack[-1][4] += e["dur"]
            args = e.get("args", {})
            op = args.get("hlo_op") if args.get("hlo_module") else None
            stack.append([e["ts"] + e["dur"], args.get("run_id"), op, e["dur"], 0.0])
        while stack:
            close(*stack.pop())
    return out


def op_counts(events: list[dict]) -> dict[str, collections.Counter]:
    """{run_id: {hlo op: how many times it ran}} (a loop body's ops run once per iteration)."""
    out = collections.defaultdict(collections.Counter)
    for e in events:
        args = e.get("args", {})
        if args.get("hlo_module") and args.get("hlo_op") and args.get("run_id") is not None:
            out[args["run_id"]][args["hlo_op"]] += 1
    return out


def trace_step(run, repeats: int) -> tuple[dict, dict, list[float]]:
    """Call `run()` (one compiled step, blocking until it is done) `repeats` times under
    `jax.profiler.trace`: ({hlo op: runs in one call}, {hlo op: self ms, the least over the
    calls}, [wall s of each call])."""
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                walls.append(time.perf_counter() - t0)
        (trace,) = Path(tmp).rglob("*.trace.json.gz")
        with gzip.open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    runs = {r: ops for r, ops in self_times(events).items() if r is not None}
    if len(runs) != repeats:
        raise RuntimeError(f"expected {repeats} traced runs of the step, found {len(runs)}")
    names = set().union(*runs.values())
    ops = {op: min(r.get(op, 0.0) for r in runs.values()) / 1e3 for op in names}
    counts = next(iter(op_counts(events).values()))
    return dict(counts), ops, walls


def profile(name: str, quick: bool, repeats: int, log=print) -> dict:
    """{"step_ms", "ops": {hlo op: ms}, "hlo": hlo_ops(...)} for preset `name`."""
    p = preset(name, quick)
    batch, flat = preset_inputs(p)
    log(f"[{name}] compiling the step")
    compiled, state, gbatch, _, _ = jax_step(p, flat, batch)
    box, rng = {"state": state}, jax.random.PRNGKey(0)

    def run():  # the state is donated to each step
        box["state"], m = compiled(box["state"], gbatch, rng)
        jax.block_until_ready((box["state"], m))

    run()  # warm-up
    _, ops, walls = trace_step(run, repeats)
    return {
        "step_ms": statistics.median(walls) * 1e3,
        "ops": ops,
        "hlo": hlo_ops(compiled.as_text()),
    }


def summarise(prof: dict) -> tuple[dict, dict, dict]:
    """({part: ms}, {kind: ms}, {(part, kind): ms}) over the profiled ops (containers left out)."""
    parts, kinds, both = (collections.defaultdict(float) for _ in range(3))
    for op, ms in prof["ops"].items():
        opcode, op_name = prof["hlo"].get(op, ("", ""))
        if opcode in _CONTAINERS:
            continue
        part, kind = classify(op, opcode, op_name)
        parts[part] += ms
        kinds[kind] += ms
        both[(part, kind)] += ms
    return dict(parts), dict(kinds), dict(both)


_LAYER = re.compile(r"layers_\d+")


def top_ops(prof: dict, n: int) -> tuple[list, list]:
    """The `n` costliest op names summed over the layers (`layers_3` read as `layers_#`) and the
    `n` costliest single ops: ([(ms, instances, part, kind, op name)], [(ms, part, kind, op
    name)]); containers left out, as in `summarise`."""
    groups: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
    single = []
    for op, ms in prof["ops"].items():
        opcode, op_name = prof["hlo"].get(op, ("", ""))
        if opcode in _CONTAINERS:
            continue
        part, kind = classify(op, opcode, op_name)
        g = groups[(part, kind, _LAYER.sub("layers_#", op_name) or op)]
        g[0] += ms
        g[1] += 1
        single.append((ms, part, kind, op_name or op))
    summed = sorted(((ms, k, *key) for key, (ms, k) in groups.items()), reverse=True)
    return summed[:n], sorted(single, reverse=True)[:n]


def report_top(name: str, prof: dict, n: int) -> str:
    summed, single = top_ops(prof, n)
    short = lambda op_name: op_name.removeprefix("jit(train_step)/")  # noqa: E731
    lines = [f"#### {name}: the {n} costliest ops, summed over layers", "",
             "| ms | instances | part | kind | op |", "|---:|---:|---|---|---|"]  # fmt: skip
    lines += [f"| {ms:.0f} | {k} | {p} | {kind} | `{short(o)}` |" for ms, k, p, kind, o in summed]
    lines += ["", f"#### {name}: the {n} costliest single ops", "",
              "| ms | part | kind | op |", "|---:|---|---|---|"]  # fmt: skip
    lines += [f"| {ms:.1f} | {p} | {kind} | `{short(o)}` |" for ms, p, kind, o in single]
    return "\n".join(lines) + "\n"


def report(name: str, prof: dict) -> str:
    parts, kinds, both = summarise(prof)
    total = sum(parts.values())
    lines = [
        f"### {name}: step {prof['step_ms']:.0f} ms wall; ops {total:.0f} ms summed over threads",
        "",
        "| part | ms | share | " + " | ".join(KINDS) + " |",
        "|---|---:|---:|" + "---:|" * len(KINDS),
    ]
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        if ms < 0.5:
            continue
        cells = " | ".join(f"{both.get((part, k), 0.0):.0f}" for k in KINDS)
        lines.append(f"| {part} | {ms:.0f} | {ms / total:.0%} | {cells} |")
    cells = " | ".join(f"{kinds.get(k, 0.0):.0f} ({kinds.get(k, 0.0) / total:.0%})" for k in KINDS)
    lines.append(f"| **all** | **{total:.0f}** | 100% | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESET_NAMES[:3], action="append",
                    help="repeatable (default: tiny)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="shrunken presets (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3, help="traced steps (default 3)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also list the N costliest ops (summed over layers; single)")  # fmt: skip
    args = ap.parse_args(argv)
    names = args.preset or ["tiny"]
    load = os.getloadavg()[0]
    profiles = {name: profile(name, args.quick, args.repeats) for name in names}
    print(
        f"\nMachine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; jax {jax.__version__}. "
        f"Each op's time: the least of {args.repeats} traced steps. Load average {load:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after.\n"
    )
    summary = {}
    for name, prof in profiles.items():
        print(report(name, prof))
        if args.top:
            print(report_top(name, prof, args.top))
        parts, kinds, _ = summarise(prof)
        summary[name] = {
            "step_ms": round(prof["step_ms"], 1),
            "parts": {k: round(v, 1) for k, v in parts.items()},
            "kinds": {k: round(v, 1) for k, v in kinds.items()},
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
