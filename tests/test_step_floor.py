"""benchmarks/step_floor.py: every matrix product a compiled program ran, read from its HLO as a
GEMM and counted as often as it ran, checked on programs whose products are known by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import load_benchmark


@pytest.fixture(scope="module")
def sf():
    return load_benchmark("step_floor")


def test_dot_and_convolution_read_as_gemms(sf):
    hlo = "\n".join(
        [
            "%fused_computation.3 (param_0: f32[2,8,4,16], param_1: f32[2,8,32,16]) -> f32[2,8,4,32] {",  # noqa: E501
            "  %param_0 = f32[2,8,4,16]{3,2,1,0} parameter(0)",
            "  %param_1 = f32[2,8,32,16]{3,2,1,0} parameter(1)",
            "  ROOT %dot.1 = f32[2,8,4,32]{3,2,1,0} dot(f32[2,8,4,16]{3,2,1,0} %param_0, f32[2,8,32,16]{3,2,1,0} %param_1), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={3}",  # noqa: E501
            "}",
            "",
            "ENTRY %main.9 (a: f32[2,8,4,16], b: f32[2,8,32,16], x: f32[4,100,80], k: f32[3,80,384]) -> f32[4,50,384] {",  # noqa: E501
            "  %a = f32[2,8,4,16]{3,2,1,0} parameter(0)",
            "  %b = f32[2,8,32,16]{3,2,1,0} parameter(1)",
            "  %x = f32[4,100,80]{2,1,0} parameter(2)",
            "  %k = f32[3,80,384]{2,1,0} parameter(3)",
            "  %ynn_fusion.2 = f32[2,8,4,32]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.3",  # noqa: E501
            "  ROOT %convolution.4 = f32[4,50,384]{2,1,0} convolution(%x, %k), window={size=3 stride=2 pad=1_1}, dim_labels=b0f_0io->b0f",  # noqa: E501
            "}",
        ]
    )
    gemms = sf.executed_gemms(hlo, {"ynn_fusion.2": 3, "convolution.4": 2, "a": 1})
    # The dot: batch 2 x 8, 4 rows, 16 contracted, 32 columns; the convolution: every output
    # position (4 x 50) a dot of the window's 3 x 80 inputs with 384 filters.
    assert dict(gemms) == {(16, 4, 16, 32): 3, (1, 200, 240, 384): 2}


def _traced_gemms(sf, fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()

    def run():
        jax.block_until_ready(compiled(*args))

    run()
    counts, _, _ = sf.trace_step(run, repeats=1)
    return dict(sf.executed_gemms(compiled.as_text(), counts))


@pytest.mark.parametrize("take", [True, False])
def test_products_in_loops_and_branches_are_counted_as_often_as_they_ran(sf, take):
    rs = np.random.RandomState(0)
    x, ws, v = (jnp.asarray(rs.standard_normal(s), jnp.float32)
                for s in ((8, 16), (3, 16, 16), (16, 32)))  # fmt: skip
    q, kk = (jnp.asarray(rs.standard_normal(s), jnp.float32) for s in ((4, 8, 16), (4, 16, 8)))

    def fn(x, ws, v, q, kk, take):
        h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)  # 3 layers
        out = jax.lax.cond(take, lambda h: jnp.sum(h @ v), lambda h: jnp.sum(h), h)
        return out + jnp.sum(jnp.einsum("bij,bjk->bik", q, kk))

    got = _traced_gemms(sf, fn, x, ws, v, q, kk, jnp.asarray(take))
    want = {(1, 8, 16, 16): 3, (4, 8, 16, 8): 1}
    if take:
        want[(1, 8, 16, 32)] = 1
    assert got == want


def test_gemms_are_timed_in_both_libraries_plain_and_batched(sf):
    gemms = [(1, 64, 48, 32), (3, 8, 16, 4)]
    times = sf.time_gemms(gemms, repeats=2, log=lambda *_: None)
    assert set(times) == set(gemms)
    for t in times.values():  # seconds, less the cost of a call: never negative
        assert set(t) == {"xla", "torch", "torch, 1 core"} and all(
            0.0 <= s < 1.0 for s in t.values()
        )
