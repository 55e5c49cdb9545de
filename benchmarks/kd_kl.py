"""Memory and time of `kd_kl` value-and-grad, tiled vs naive full logits, at Qwen2.5 shapes.

Memory is XLA's compiled memory analysis (temporary buffers, i.e. what the computation allocates
beyond its inputs and outputs); time is the median wall time of a few runs after a warm-up. The full
run sweeps tile sizes and names the fastest one whose temporary memory is <= 15% of naive. A second
table times the training loss's vocabulary terms (input_kl + response_kl, and + response_ce) as one
call per term vs all terms in one pass (`kd_kl` with weight columns, `kd_kl_and_cross_entropy`).

    .venv/bin/python benchmarks/kd_kl.py            # V=151936, H=896, M=4x512 (Qwen2.5-0.5B head)
    .venv/bin/python benchmarks/kd_kl.py --quick    # small shapes, seconds
    .venv/bin/python benchmarks/kd_kl.py --devices 8 [--quick]

`--devices N` instead runs the KL + cross-entropy value-and-grad on N virtual CPU devices
(mesh fsdp=N, rows and the head's H split over it) twice: tiles over the global rows (no mesh in
context: what the loss did before it tiled per device) and tiles over each device's rows (under
`jax.set_mesh`, as the trainer traces its step). It reports, per device, the tile loop's trip
count (each trip reads the whole [H, V] head), all-gathers inside the loop, temporary memory and
time, and checks that both give the same loss and gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time


def _devices_flag() -> int:
    for i, a in enumerate(sys.argv):
        if a == "--devices" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return 0


# Virtual CPU devices must be asked for before jax is imported.
if __name__ == "__main__" and _devices_flag() > 1:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_devices_flag()}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from blspkd_jax.models.sharding import make_mesh  # noqa: E402
from blspkd_jax.training.losses import (  # noqa: E402
    default_tile_rows,
    kd_kl,
    kd_kl_and_cross_entropy,
    tiled_cross_entropy,
)

MEMORY_GOAL = 0.15  # tiled temporary memory as a fraction of naive (issue 4)


def naive_kd_kl(s, t, lm_head, w, temperature):
    """The full-logits formula: [M, V] logits for both passes, autodiff for the gradient."""
    log_q = jax.nn.log_softmax(
        jnp.dot(s, lm_head, preferred_element_type=jnp.float32) / temperature
    )
    t = jax.lax.stop_gradient(t)
    log_p = jax.nn.log_softmax(
        jnp.dot(t, lm_head, preferred_element_type=jnp.float32) / temperature
    )
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.sum(w * kl) / jnp.maximum(jnp.sum(w), 1e-9)


def measure(loss_fn, args, repeats):
    """(compiled temp bytes, median seconds, (loss, grad)) of jit(value_and_grad(loss_fn))."""
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return temp, statistics.median(times), out


def measure_interleaved(loss_fns, args, repeats):
    """`measure` for several loss functions, their timed runs interleaved (A B A B ...), so that
    load from other processes on a shared machine falls on all of them alike."""
    compiled = [jax.jit(jax.value_and_grad(f)).lower(*args).compile() for f in loss_fns]
    outs = [jax.block_until_ready(c(*args)) for c in compiled]  # warm-up
    times = [[] for _ in compiled]
    for _ in range(repeats):
        for c, t in zip(compiled, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(c(*args))
            t.append(time.perf_counter() - start)
    return [
        (c.memory_analysis().temp_size_in_bytes, statistics.median(t), out)
        for c, t, out in zip(compiled, times, outs, strict=True)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    parser.add_argument("--rows", type=int, help="M (default 2048; 512 with --quick)")
    parser.add_argument("--vocab", type=int, help="V (default 151936; 16384 with --quick)")
    parser.add_argument("--width", type=int, help="H (default 896; 256 with --quick)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiles", type=int, nargs="*", help="tile sizes to sweep")
    parser.add_argument("--repeats", type=int, help="timed runs per variant (median reported)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--pass-tile", type=int, help="tile_rows for the several-terms table (default: library's)"
    )
    parser.add_argument("--devices", type=int, default=0, help="per-device tiles on N CPU devices")
    args = parser.parse_args()
    if args.devices > 1:
        return per_device(args)

    m = args.rows or (512 if args.quick else 2048)
    v = args.vocab or (16384 if args.quick else 151936)
    h = args.width or (256 if args.quick else 896)
    tiles = args.tiles or ([64, 256] if args.quick else [64, 128, 256, 512])
    repeats = args.repeats or (2 if args.quick else 3)
    dtype = jnp.dtype(args.dtype)

    ks, kt, kw, km = jax.random.split(jax.random.key(0), 4)
    student = jax.random.normal(ks, (m, h), dtype)
    teacher = (student + 0.5 * jax.random.normal(kt, (m, h))).astype(dtype)
    lm_head = (jax.random.normal(kw, (h, v)) * h**-0.5 * 4).astype(dtype)
    weights = (jax.random.uniform(km, (m,)) < 0.8).astype(jnp.float32)
    inputs = (student, teacher, lm_head, weights)
    temp_t = args.temperature

    print(
        f"kd_kl value-and-grad wrt student, M={m}, H={h}, V={v}, {dtype.name}, T={temp_t}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, median of {repeats} runs\n"
    )
    print("| variant | tile_rows | temp memory (MiB) | vs naive | time (s) | vs naive |")
    print("|---|---|---|---|---|---|", flush=True)
    naive_temp, naive_time, (naive_loss, naive_grad) = measure(
        lambda s, t, w_, x: naive_kd_kl(s, t, w_, x, temp_t), inputs, repeats
    )

    def row(name, tile, temp, sec):
        print(
            f"| {name} | {tile} | {temp / 2**20:.1f} | {temp / naive_temp:.1%} | {sec:.3f} | "
            f"{sec / naive_time:.2f}x |",
            flush=True,
        )

    row("naive (full logits)", "-", naive_temp, naive_time)
    results = {}
    for tile in tiles:
        temp, sec, (loss, grad) = measure(
            lambda s, t, w_, x, tile=tile: kd_kl(s, t, w_, x, temperature=temp_t, tile_rows=tile),
            inputs,
            repeats,
        )
        # The two must agree, or the timing comparison means nothing.
        scale = float(jnp.max(jnp.abs(naive_grad.astype(jnp.float32))))
        err = float(jnp.max(jnp.abs((grad - naive_grad).astype(jnp.float32)))) / scale
        tol = 1e-3 if dtype == jnp.float32 else 5e-2
        if abs(float(loss) - float(naive_loss)) > tol * abs(float(naive_loss)) or err > tol:
            raise SystemExit(f"tile {tile}: tiled and naive disagree (loss {loss} vs {naive_loss})")
        row("tiled (kd_kl)", tile, temp, sec)
        results[tile] = (temp, sec)

    ok = {t: r for t, r in results.items() if r[0] <= MEMORY_GOAL * naive_temp}
    if ok:
        best = min(ok, key=lambda t: ok[t][1])
        temp, sec = ok[best]
        print(
            f"\nFastest tile within the memory goal (<= {MEMORY_GOAL:.0%} of naive): {best} rows "
            f"({temp / naive_temp:.1%} of naive memory, {sec / naive_time:.2f}x naive time). "
            f"Library default on {jax.default_backend()}: {default_tile_rows()}."
        )
    else:
        print(f"\nNo tile size met the memory goal (<= {MEMORY_GOAL:.0%} of naive).")
    several_terms(inputs, temp_t, args.pass_tile or default_tile_rows(), repeats)


def several_terms(inputs, temperature, tile, repeats):
    """input_kl + response_kl (+ response_ce): one call per term vs one pass for all of them."""
    student, teacher, lm_head, _ = inputs
    m, v = student.shape[0], lm_head.shape[1]
    ki, kl_ = jax.random.split(jax.random.key(1))
    # Disjoint row selections like the layout's: transcript positions, then response positions.
    u = jax.random.uniform(ki, (m,))
    w_in, w_resp = (u < 0.4).astype(jnp.float32), (u > 0.6).astype(jnp.float32)
    labels = jax.random.randint(kl_, (m,), 0, v)
    kw = {"temperature": temperature, "tile_rows": tile}
    both = jnp.stack([w_in, w_resp], axis=-1)

    def kl_two_calls(s, t, head):
        return kd_kl(s, t, head, w_in, **kw) + kd_kl(s, t, head, w_resp, **kw)

    def kl_one_call(s, t, head):
        return jnp.sum(kd_kl(s, t, head, both, **kw))

    def all_three_calls(s, t, head):
        ce = tiled_cross_entropy(s, head, labels, w_resp, tile_rows=tile)
        return kl_two_calls(s, t, head) + ce

    def all_one_call(s, t, head):
        kl, ce = kd_kl_and_cross_entropy(s, t, head, both, labels, w_resp, **kw)
        return jnp.sum(kl) + ce

    print(
        f"\nSeveral loss terms, value-and-grad wrt student, tile_rows={tile}: one call per term "
        f"vs one pass over the vocabulary\n"
    )
    print("| terms | calls | temp memory (MiB) | time (s) | vs one call per term |")
    print("|---|---|---|---|---|", flush=True)
    args = (student, teacher, lm_head)
    for terms, separate, together in (
        ("input_kl + response_kl", kl_two_calls, kl_one_call),
        ("input_kl + response_kl + response_ce", all_three_calls, all_one_call),
    ):
        (temp_a, sec_a, (loss_a, grad_a)), (temp_b, sec_b, (loss_b, grad_b)) = measure_interleaved(
            (separate, together), args, repeats
        )
        scale = float(jnp.max(jnp.abs(grad_a.astype(jnp.float32))))
        err = float(jnp.max(jnp.abs((grad_a - grad_b).astype(jnp.float32)))) / scale
        tol = 1e-4 if student.dtype == jnp.float32 else 5e-2
        if abs(float(loss_a) - float(loss_b)) > tol * abs(float(loss_a)) or err > tol:
            raise SystemExit(
                f"{terms}: one pass and separate calls disagree ({loss_b} vs {loss_a})"
            )
        n = terms.count("+") + 1
        for calls, temp, sec in ((f"{n} (one per term)", temp_a, sec_a), ("1", temp_b, sec_b)):
            print(
                f"| {terms} | {calls} | {temp / 2**20:.1f} | {sec:.3f} | {sec / sec_a:.2f}x |",
                flush=True,
            )


def _loop_stats(hlo: str) -> tuple[list[int], list[str]]:
    """(trip counts of the while loops, output shapes of the all-gathers inside loop bodies) in
    compiled HLO text."""
    blocks = {}
    for block in re.split(r"\n\n+", hlo):
        name = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s", block)
        if name:
            blocks[name.group(1)] = block
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)]
    gathers = [
        re.search(r"=\s*(\S+\[[\d,]*\])", line).group(1)
        for b in bodies
        for line in blocks.get(b, "").splitlines()
        if "all-gather(" in line and re.search(r"=\s*(\S+\[[\d,]*\])", line)
    ]
    return trips, gathers


def per_device(args):
    """Global-row tiles vs per-device tiles of KL + CE value-and-grad on `args.devices` devices."""
    n = jax.device_count()
    m = args.rows or (1024 if args.quick else 2048)
    v = args.vocab or (16384 if args.quick else 151936)
    h = args.width or (256 if args.quick else 896)
    tile = (args.tiles or [default_tile_rows()])[0]
    repeats = args.repeats or (2 if args.quick else 3)
    dtype = jnp.dtype(args.dtype)
    ks, kt, kw, km, kl = jax.random.split(jax.random.key(0), 5)
    student = jax.random.normal(ks, (m, h), dtype)
    teacher = (student + 0.5 * jax.random.normal(kt, (m, h))).astype(dtype)
    head = (jax.random.normal(kw, (h, v)) * h**-0.5 * 4).astype(jnp.float32)  # fp32 master
    weights = (jax.random.uniform(km, (m,)) < 0.8).astype(jnp.float32)
    labels = jax.random.randint(kl, (m,), 0, v)

    def loss(s, t, head, w, labels):
        kl_, ce = kd_kl_and_cross_entropy(
            s, t, head, w, labels, w, temperature=args.temperature, tile_rows=tile
        )
        return kl_ + ce

    mesh = make_mesh(fsdp=n)
    rows2, rows1 = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P("fsdp"))
    shardings = (rows2, rows2, rows2, rows1, rows1)  # the head [H, V]: H over fsdp, as trained
    inputs = jax.device_put((student, teacher, head, weights, labels), shardings)
    step = jax.jit(jax.value_and_grad(loss), in_shardings=shardings)
    print(
        f"kd_kl + cross-entropy value-and-grad, M={m} rows over {n} CPU devices (fsdp={n}), "
        f"H={h}, V={v}, hidden {dtype.name}, head float32, tile_rows={tile}, median of {repeats}\n"
    )
    print(
        "| tiles over | loop trips per device | all-gathers in the loop (shape) "
        "| temp memory per device (MiB) | time (s) |"
    )
    print("|---|---:|---:|---:|---:|", flush=True)
    results = {}
    for name, ctx in (("global rows (before)", None), ("each device's rows", mesh)):
        with jax.set_mesh(ctx) if ctx is not None else contextlib.nullcontext():
            compiled = step.lower(*inputs).compile()
        trips, gathers = _loop_stats(compiled.as_text())
        temp = compiled.memory_analysis().temp_size_in_bytes
        out = jax.block_until_ready(compiled(*inputs))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - start)
        results[name] = out
        print(
            f"| {name} | {max(trips, default=0)} | {', '.join(gathers) or 'none'} "
            f"| {temp / 2**20:.1f} "
            f"| {statistics.median(times):.3f} |",
            flush=True,
        )
    (la, ga), (lb, gb) = results.values()
    scale = float(jnp.max(jnp.abs(ga.astype(jnp.float32))))
    err = float(jnp.max(jnp.abs((ga - gb).astype(jnp.float32)))) / scale
    if abs(float(la) - float(lb)) > 1e-5 * abs(float(la)) or err > 1e-4:
        raise SystemExit(f"global and per-device tiles disagree: {la} vs {lb}, grad {err:.1e}")
    print(f"\nSame loss ({float(lb):.6f}) and gradient (max rel. diff {err:.1e}) both ways.")


if __name__ == "__main__":
    main()
