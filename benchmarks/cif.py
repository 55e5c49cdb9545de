"""CIF speed (issue 3): our methods vs a plain PyTorch frame loop vs the memory floor, forward and
forward+backward, one run on one machine; prints a markdown table of times and ratios.

    .venv/bin/python benchmarks/cif.py            # B=8, T=1500 (30 s), N=128, C=1279
    .venv/bin/python benchmarks/cif.py --quick    # a small smoke run

The memory floor is one plain elementwise pass that reads the inputs and writes the outputs (and,
for forward+backward, reads the output cotangent and writes the input gradients) once.
The PyTorch baseline builds the weight matrix with a Python loop over frames, one column per frame
(the way the authors' PyTorch code integrates), then applies it with one batched matmul.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

# PyTorch runs interleaved with JAX: its OpenMP workers must sleep, not spin, between its ops, or
# they would take the cores from the JAX call that follows.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

from blspkd_jax.models import cif as cif_lib
from blspkd_jax.models.cif import PARALLEL, cif


def _time_all(fns, repeats):
    """{name: fn} -> {name: best time in seconds}, the candidates interleaved round-robin so that a
    noisy neighbour slows them all alike; best of `repeats` after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def _block(tree):
    return jax.tree.map(lambda x: x.block_until_ready(), tree)


def scatter_cif(x, a, m, n, max_tokens):
    """The segment form with XLA's scatter-add (jax.ops.segment_sum) instead of chunked matmuls:
    measured here as the alternative the library does not ship (slower on CPU)."""
    N = max_tokens
    B, T, C = x.shape
    a = cif_lib._scaled_alphas(a, m, n)
    first_tok, first_w, end_tok, end_w = cif_lib._frame_plan(a, n)
    # Each frame's part in its first token: a sorted segment sum (dump segment N for overflow).
    seg = jnp.where((first_tok >= 0) & (first_tok < N), first_tok, N)
    seg = seg + (N + 1) * jnp.arange(B, dtype=jnp.int32)[:, None]
    data = (first_w[..., None] * x).reshape(B * T, C)
    tokens = jax.ops.segment_sum(
        data, seg.reshape(-1), num_segments=B * (N + 1), indices_are_sorted=True
    ).reshape(B, N + 1, C)[:, :N]
    # Token k >= 1 also gets the frame that crosses into it: weight 1 or that frame's end weight.
    k = jnp.arange(N, dtype=jnp.int32)
    t_in = jax.vmap(lambda e: jnp.searchsorted(e, k, side="left"))(end_tok)
    entered = (k >= 1) & (t_in < T)
    t_in = jnp.minimum(t_in, T - 1)
    e_at = jnp.take_along_axis(end_tok, t_in, axis=1)
    w_at = jnp.take_along_axis(end_w, t_in, axis=1)
    w_in = jnp.where(entered, jnp.where(k < e_at, 1.0, w_at), 0.0)
    tokens = tokens + w_in[..., None] * jnp.take_along_axis(x, t_in[..., None], axis=1)
    mask = k[None, :] < n[:, None]
    return jnp.where(mask[..., None], tokens, 0.0), mask


# The segment method's earlier windows (1 s of frames into 16 tokens): the same work per token rate
# as today's 0.5 s x 8, twice the matmul work.
ONE_SECOND_WINDOWS = (50, 16)


@contextlib.contextmanager
def _windows(frames_tokens):
    """The segment method traced with other chunk windows (read when a function is traced)."""
    saved = cif_lib.CHUNK_FRAMES, cif_lib.CHUNK_TOKENS
    cif_lib.CHUNK_FRAMES, cif_lib.CHUNK_TOKENS = frames_tokens or saved
    try:
        yield
    finally:
        cif_lib.CHUNK_FRAMES, cif_lib.CHUNK_TOKENS = saved


def jax_fns(method, max_tokens):
    windows = ONE_SECOND_WINDOWS if method == "segment-1s" else None
    cif_method = "segment" if windows else method

    def fwd(x, a, m, n):
        if method == "scatter":
            return scatter_cif(x, a, m, n, max_tokens)
        with _windows(windows):
            return cif(x, a, m, max_tokens=max_tokens, target_lengths=n, method=cif_method)

    def fwd_bwd(x, a, m, n, dtok):
        with _windows(windows):  # the backward is traced here, outside `fwd`
            (tok, mask), vjp = jax.vjp(lambda x, a: fwd(x, a, m, n), x, a)
            dx, da = vjp((dtok, jnp.zeros(mask.shape, jax.dtypes.float0)))
        return tok, dx, da

    return jax.jit(fwd), jax.jit(fwd_bwd)


def floor_fns(max_tokens):
    """Read every input once and write every output once, nothing else: elementwise passes and
    plain reductions only (no dot, whose kernel choice would make it more than a memory pass)."""

    def fwd(x, a, m, n):
        del m, n
        s = jnp.sum(x * a[..., None], axis=1)  # one read of x
        return jnp.broadcast_to(s[:, None, :], (x.shape[0], max_tokens, x.shape[2]))

    def fwd_bwd(x, a, m, n, dtok):
        tok = fwd(x, a, m, n)
        g = dtok.sum(1)  # one read of the cotangent
        dx = x * g[:, None, :]  # one write of dx
        return tok, dx, jnp.sum(dx, axis=-1) * a

    return jax.jit(fwd), jax.jit(fwd_bwd)


def torch_fns(max_tokens):
    import torch

    def cif_loop(x, a, n):
        """x [B, T, C], a [B, T] (already masked), n [B] target lengths."""
        B, T, _ = x.shape
        a = a * (n / a.sum(1)).unsqueeze(1)
        k = torch.arange(max_tokens, dtype=x.dtype).unsqueeze(0)  # [1, N]
        upper = torch.where(k == (n - 1).unsqueeze(1), torch.inf, k + 1)  # last token: +inf
        c_prev = torch.zeros(B, dtype=x.dtype)
        columns = []
        for t in range(T):  # one column of W per frame
            c = c_prev + a[:, t]
            w = torch.minimum(c.unsqueeze(1), upper) - torch.maximum(c_prev.unsqueeze(1), k)
            columns.append(torch.clamp(w, min=0))
            c_prev = c
        w = torch.stack(columns, dim=2)  # [B, N, T]
        return torch.bmm(w, x)

    def fwd(x, a, n):
        with torch.no_grad():
            return cif_loop(x, a, n)

    def fwd_bwd(x, a, n, dtok):
        x = x.detach().requires_grad_(True)
        a = a.detach().requires_grad_(True)
        tok = cif_loop(x, a, n)
        tok.backward(dtok)
        return tok, x.grad, a.grad

    return fwd, fwd_bwd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=1500)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--channels", type=int, default=1279)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-scan", action="store_true", help="leave out the lax.scan walk")
    args = p.parse_args()
    if args.quick:
        args.batch, args.frames, args.tokens, args.channels, args.repeats = 2, 200, 24, 63, 2
    B, T, N, C = args.batch, args.frames, args.tokens, args.channels

    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, C)).astype(np.float32)
    a = rng.uniform(0.02, 0.3, size=(B, T)).astype(np.float32)
    m = np.ones((B, T), bool)
    n = np.linspace(0.75 * N, N, B).round().astype(np.int32)
    dtok = rng.normal(size=(B, N, C)).astype(np.float32)
    jargs = [jnp.asarray(v) for v in (x, a, m, n)]
    jd = jnp.asarray(dtok)

    methods = ["segment", "segment-1s", "scatter", "dense"] + ([] if args.skip_scan else ["scan"])
    names = {m: f"jax {m}" + (" (default)" if m == PARALLEL else "") for m in methods}
    names["scatter"] = "jax segment via scatter-add (not shipped)"
    names["segment-1s"] = "jax segment, 1 s windows of 16 tokens (before)"
    fns, slow, errs, ref = {}, {}, {}, None
    for method in methods:
        f, fb = jax_fns(method, N)
        tok = np.asarray(f(*jargs)[0])
        ref = tok if ref is None else ref
        errs[names[method]] = float(np.abs(tok - ref).max())
        # The scan runs on its own: a second-long call interleaved with the rest would leave them
        # its freed memory to fault back in.
        group = slow if method == "scan" else fns
        group[(names[method], "fwd")] = lambda f=f: _block(f(*jargs))
        group[(names[method], "fwd+bwd")] = lambda fb=fb: _block(fb(*jargs, jd))
    f, fb = floor_fns(N)
    fns[("memory floor", "fwd")] = lambda: _block(f(*jargs))
    fns[("memory floor", "fwd+bwd")] = lambda: _block(fb(*jargs, jd))

    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    tx, ta, tn, td = (torch.from_numpy(v).to(dev) for v in (x, a, n.astype(np.float32), dtok))
    torch_fwd, torch_fwd_bwd = torch_fns(N)
    torch_name = f"pytorch frame loop + bmm ({dev})"
    errs[torch_name] = float(np.abs(torch_fwd(tx, ta, tn).cpu().numpy() - ref).max())
    fns[(torch_name, "fwd")] = lambda: (torch_fwd(tx, ta, tn), sync())
    fns[(torch_name, "fwd+bwd")] = lambda: (torch_fwd_bwd(tx, ta, tn, td), sync())
    t = _time_all(fns, args.repeats)
    if slow:
        t.update(_time_all(slow, max(1, args.repeats // 2)))
    floor = (t[("memory floor", "fwd")], t[("memory floor", "fwd+bwd")])
    rows = [(k, t[(k, "fwd")], t[(k, "fwd+bwd")], errs[k]) for k in errs]

    print(
        f"CIF at B={B}, T={T}, N={N}, C={C}, float32, jax on {jax.devices()[0].platform}, "
        f"{threads} threads, best of {args.repeats} interleaved runs\n"
    )
    print("| method | fwd ms | fwd / floor | fwd+bwd ms | fwd+bwd / floor | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| memory floor | {floor[0] * 1e3:.1f} | 1.0 | {floor[1] * 1e3:.1f} | 1.0 | |")
    for name, tf, tfb, err in rows:
        print(
            f"| {name} | {tf * 1e3:.1f} | {tf / floor[0]:.1f} | {tfb * 1e3:.1f} | "
            f"{tfb / floor[1]:.1f} | {err:.1e} |"
        )
    print(
        "\nmemory floor: one pass that reads the inputs and writes the outputs (fwd+bwd: also reads"
        " the token cotangent and writes the input gradients). max abs diff: tokens vs the"
        " default (the PyTorch loop's is its plain float32 cumsum drifting at c ~ N)."
    )
    default = next(r for r in rows if "(default)" in r[0])
    torch_row = next(r for r in rows if r[0] == torch_name)
    print(
        f"\ndefault vs PyTorch loop: {torch_row[1] / default[1]:.0f}x faster forward, "
        f"{torch_row[2] / default[2]:.0f}x faster forward+backward"
    )
    for name, tf, tfb, _ in rows:
        if name.startswith("jax") and name != default[0]:
            print(
                f"default vs {name}: {tf / default[1]:.1f}x forward, "
                f"{tfb / default[2]:.1f}x forward+backward"
            )


if __name__ == "__main__":
    main()
