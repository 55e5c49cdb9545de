"""`python -m blspkd_jax.train ... --compile-only TOPOLOGY`: the architecture presets against the
published model sizes and transformers' own models, their check against a config.json, the FLOP
count against explicit formulas, the plan against the trainer's own state on a CPU mesh, and the
command on real TPU topologies through libtpu (installed by `make test` into .venv/libtpu)."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from blspkd_jax.models import presets
from blspkd_jax.models.encoder import WhisperEncoder, WhisperEncoderConfig
from blspkd_jax.models.hf import CheckpointError
from blspkd_jax.models.llm import LLM, LLMConfig
from blspkd_jax.training import flops, plan

REPO = Path(__file__).parent.parent

# Model cards' sizes (Hugging Face, each repository's README), to their printed precision.
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": (0.49e9, 0.01e9),
    "Qwen2.5-7B": (7.61e9, 0.01e9),
    "Qwen2.5-7B-Instruct": (7.61e9, 0.01e9),
    "Llama-3.1-8B": (8.03e9, 0.01e9),
    "Llama-3.1-8B-Instruct": (8.03e9, 0.01e9),
    # Whisper's card rounds loosely: "244 M", "1550 M".
    "whisper-small": (244e6, 3e6),
    "whisper-large-v2": (1550e6, 8e6),
    "whisper-large-v3": (1550e6, 8e6),
}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", presets.names())
def test_preset_has_the_published_size_and_our_model_has_transformers_parameters(name):
    hf_cfg = presets.read(name)
    cfg = transformers.AutoConfig.for_model(**hf_cfg)
    with torch.device("meta"):
        if cfg.model_type == "whisper":
            ref = transformers.WhisperForConditionalGeneration(cfg)
            ours_ref = sum(p.numel() for p in ref.model.encoder.parameters())
        else:
            ref = transformers.AutoModelForCausalLM.from_config(cfg)
            ours_ref = sum(p.numel() for p in ref.parameters())
    size, tol = PUBLISHED[name]
    assert abs(sum(p.numel() for p in ref.parameters()) - size) <= tol
    key = jax.random.key(0)
    if cfg.model_type == "whisper":
        enc = WhisperEncoderConfig.from_hf(hf_cfg)
        x = jax.ShapeDtypeStruct((1, enc.num_mel_bins, 2 * enc.max_source_positions), jnp.float32)
        ours = jax.eval_shape(WhisperEncoder(enc).init, key, x)
    else:
        ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
        ours = jax.eval_shape(LLM(LLMConfig.from_hf(hf_cfg)).init, key, ids)
    assert _count(ours) == ours_ref


def test_paper_presets_hold_the_published_architectures():
    # The numbers the configs depend on, written out (config.json of each repository).
    q, ll = presets.read("Qwen2.5-7B-Instruct"), presets.read("Llama-3.1-8B-Instruct")
    assert (q["num_hidden_layers"], q["hidden_size"], q["num_attention_heads"]) == (28, 3584, 28)
    assert (q["num_key_value_heads"], q["intermediate_size"], q["vocab_size"]) == (4, 18944, 152064)
    assert (q["rope_theta"], q["tie_word_embeddings"]) == (1e6, False)
    assert (ll["num_hidden_layers"], ll["hidden_size"], ll["num_key_value_heads"]) == (32, 4096, 8)
    assert (ll["intermediate_size"], ll["vocab_size"], ll["rope_theta"]) == (14336, 128256, 5e5)
    assert ll["rope_scaling"]["rope_type"] == "llama3" and not ll["tie_word_embeddings"]
    assert presets.read("whisper-large-v2")["num_mel_bins"] == 80
    assert presets.read("whisper-large-v3")["num_mel_bins"] == 128


def test_resolve_checks_a_directory_against_its_preset(tmp_path):
    # config.json as transformers writes it today (rope_parameters, not top-level rope_theta).
    d = tmp_path / "hf" / "Qwen2.5-7B-Instruct"
    transformers.Qwen2Config(**presets.read("Qwen2.5-7B-Instruct")).save_pretrained(d)
    assert presets.resolve(d) == str(d)
    wrong = {**presets.read("Qwen2.5-7B-Instruct"), "num_key_value_heads": 28}
    (d / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match=r"config.json: num_key_value_heads is 28 but preset"):
        presets.resolve(d, "model.llm.hf_path")
    # A missing directory is planned from the preset of its name; any other name is an error.
    assert presets.resolve("hf/whisper-large-v3") == str(presets.ROOT / "whisper-large-v3")
    with pytest.raises(CheckpointError, match=r"model.llm.hf_path=hf/nope: not a directory.*"):
        presets.resolve("hf/nope", "model.llm.hf_path")


def test_matmul_flops_counts_every_loop_iteration():
    w = jnp.zeros((5, 8, 16))
    x = jnp.zeros((4, 8))
    k = jnp.zeros((6, 3, 3))  # conv: 6 output channels, 3 input, width 3

    def f(w, x, k):
        def body(h, wi):
            return jnp.tanh(h @ wi[:, :8]), None

        h, _ = jax.lax.scan(body, x, w)
        y = jax.lax.conv_general_dilated(h[None, :3, :], k, (1,), "SAME")  # [1, 6, 8]
        return h.sum() + y.sum()

    dot = 2 * 4 * 8 * 8  # [4, 8] @ [8, 8]
    conv = 2 * (1 * 6 * 8) * 3 * 3  # every output: 3 channels x 3 taps
    assert flops.matmul_flops(jax.make_jaxpr(f)(w, x, k)) == 5 * dot + conv
    # The gradient wrt h's inputs: each dot twice more (dh and dw), each conv twice more.
    grads = jax.make_jaxpr(jax.grad(f, argnums=(0, 2)))(w, x, k)
    assert flops.matmul_flops(grads) == 3 * (5 * dot + conv)


def test_topology_names_are_checked_before_anything_compiles():
    with pytest.raises(plan.ConfigError, match=r"--compile-only v9x:2x2: expected cpu:N or a TPU"):
        plan.topology("v9x:2x2")
    with pytest.raises(plan.ConfigError, match=r"--compile-only cpu:99: expected cpu:N with"):
        plan.topology("cpu:99")
    # The suite's own venv keeps libtpu off the path (make test installs it beside, in
    # .venv/libtpu): there a TPU topology asks for the extra.
    if importlib.util.find_spec("libtpu") is None:
        with pytest.raises(plan.ConfigError, match=r"libtpu\) is not installed: pip install"):
            plan.topology("v5p:2x2x1")


def test_the_tpu_extra_pins_the_libtpu_jax_asks_for():
    pinned = (REPO / "requirements-tpu.txt").read_text().split()
    want = [
        r.split(";")[0].replace(" ", "")
        for r in importlib.metadata.requires("jax")
        if r.startswith("libtpu") and 'extra == "tpu"' in r
    ]
    assert [p for p in pinned if p.startswith("libtpu")] == want


# A tiny stage-2-like run: frozen encoder and LLM in bf16, the adapter and LoRA trained.
TINY = [
    "--config.batch_size=8",
    "--config.data.max_seconds=3.0",
    "--config.data.frame_buckets=(300,)",
    "--config.data.token_buckets=(48,)",
    "--config.model.encoder.encoder_layers=1",
    "--config.model.llm.num_layers=2",
    "--config.model.llm.lora_rank=4",
    "--config.train.trainable=('^adapter/', 'lora_')",
    "--config.train.frozen_dtype=bfloat16",
]


def _env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


@pytest.mark.slow
def test_compile_only_on_a_cpu_mesh_plans_the_trainers_state():
    out = subprocess.run(
        [sys.executable, "tests/_plan_check.py", *TINY],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["exit_code"] == 0 and got["devices"] == 4
    assert got["same_tree"] and got["mismatch"] == []
    assert got["frozen_dtypes"] == ["bfloat16"]
    s = got["summary"]
    assert (s["topology"], s["chips"], s["fits"]) == ("cpu:4", 4, True)
    assert s["memory"]["argument"] == got["expected_argument_bytes"]
    m = s["memory"]
    assert s["per_chip_bytes"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]
    assert s["flops_per_step"] > 0


def _libtpu() -> str:
    """The directory holding the libtpu package (`make test` sets BLSPKD_TEST_LIBTPU): unset
    skips, a directory without libtpu fails."""
    path = os.environ.get("BLSPKD_TEST_LIBTPU", "")
    if not path:
        pytest.skip("BLSPKD_TEST_LIBTPU unset: make test installs libtpu into .venv/libtpu")
    assert (Path(path) / "libtpu").is_dir(), f"BLSPKD_TEST_LIBTPU={path} holds no libtpu"
    return path


def _compile_only(topology, *extra):
    args = ["--config", "configs/tiny.py", "--workdir", "unused", "--compile-only", topology]
    return subprocess.run(
        [sys.executable, "-m", "blspkd_jax.train", *args, *TINY, *extra],
        cwd=REPO,
        env=_env(PYTHONPATH=_libtpu()),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_compile_only_on_a_tpu_topology_fits_and_reports():
    out = _compile_only("v5p:2x2x1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    s = json.loads(out.stdout.splitlines()[-1])
    assert (s["topology"], s["chips"], s["devices"], s["fits"]) == ("v5p:2x2x1", 4, 4, True)
    assert s["hbm_bytes"] == 95 * 2**30
    assert 0 < s["per_chip_bytes"] < s["hbm_bytes"]
    assert 0 < s["mfu_bound"] <= 1
    assert "TPU v5p: 95.00 GiB HBM, 459 TFLOP/s bf16" in out.stdout


@pytest.mark.slow
def test_compile_only_on_a_tpu_topology_that_is_too_small_says_what_to_change():
    # 2**16 examples of 3 s: activations far beyond a v5e chip's 16 GiB.
    out = _compile_only("v5e:2x2", "--config.batch_size=65536")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    s = json.loads(out.stdout.splitlines()[-1])
    assert (s["chips"], s["fits"]) == (4, False)
    assert s["per_chip_bytes"] > s["hbm_bytes"]
    assert "--config.grad_accum_steps=" in out.stdout


@pytest.mark.parametrize(
    "spec, llm, encoder",
    [
        ("configs/qwen2_5_7b_large_v2.py:stage2", "Qwen2.5-7B-Instruct", "whisper-large-v2"),
        ("configs/llama3_1_8b_large_v3.py:stage1", "Llama-3.1-8B-Instruct", "whisper-large-v3"),
    ],
)
def test_paper_configs_are_planned_from_presets_without_their_directories(spec, llm, encoder):
    from blspkd_jax.training import config as config_lib

    config = config_lib.load_config(str(REPO / spec))
    assert not Path(config.model.llm.hf_path).exists()  # nothing downloaded
    step = plan.prepare(config, plan.topology("cpu:1"))
    enc = step.model.config.encoder
    assert (enc.num_mel_bins, enc.pad_to_30s) == (presets.read(encoder)["num_mel_bins"], True)
    assert step.model.config.llm == LLMConfig.from_hf(
        presets.read(llm), **{f: getattr(step.model.config.llm, f) for f in RUNTIME_FIELDS}
    )
    frozen = {str(x.dtype) for x in jax.tree.leaves(step.state.frozen)}
    trained = {str(x.dtype) for x in jax.tree.leaves(step.state.trainable)}
    assert (frozen, trained) == ({"bfloat16"}, {"float32"})
    assert step.batch["features"].shape == (config.batch_size, enc.num_mel_bins, 3000)
    assert step.batch["features"].dtype == enc.dtype  # as the trainer sends them


RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "remat",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)


def test_matmul_flops_counts_a_shard_map_body_on_every_device():
    # The body's shapes are one device's shard; 4 devices together do the global product (an
    # abstract 2 x 2 mesh is enough to trace it).
    mesh = jax.sharding.AbstractMesh((2, 2), ("data", "fsdp"))
    rows = jax.sharding.PartitionSpec(("data", "fsdp"))

    def f(x, w):
        g = jax.shard_map(
            lambda x, w: x @ w,
            mesh=mesh,
            in_specs=(rows, jax.sharding.PartitionSpec()),
            out_specs=rows,
            check_vma=False,
        )
        return g(x, w).sum()

    jaxpr = jax.make_jaxpr(f)(jnp.zeros((8, 16)), jnp.zeros((16, 32)))
    assert flops.matmul_flops(jaxpr) == 2 * 8 * 16 * 32
