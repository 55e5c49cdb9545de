"""benchmarks/step_parts.py --attention: the shapes it times are the presets' own, and the three
attention kernels it compares compute the same gradients before they are timed."""

from tiny import load_benchmark


def test_attention_comparison_times_the_presets_layers():
    bench = load_benchmark("step_parts")
    shapes = bench.attention_shapes("tiny", quick=True)
    p = bench.preset("tiny", True)
    B, T, N, K, Dh, causal = shapes["encoder"]
    assert (B, T, N, K, causal) == (p.batch.batch, p.batch.frames // 2, 4, 4, False)
    assert N * Dh == p.model.encoder.d_model
    B, T, N, K, Dh, causal = shapes["LLM"]
    assert (T, N, K, causal) == (
        p.batch.tokens,
        p.model.llm.num_heads,
        p.model.llm.num_kv_heads,
        True,
    )
    # time_attention asserts that ours, jax.nn.dot_product_attention's and PyTorch's dq agree.
    times = bench.time_attention("tiny", quick=True, repeats=1, log=lambda *a: None)
    assert set(times) == {(layer, v) for layer in shapes for v in bench.ATTENTION_VARIANTS}
    assert all(t > 0 for t in times.values())
    assert "| encoder |" in bench.report_attention("tiny", times)
