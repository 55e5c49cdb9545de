"""Hugging Face export (README's Python API) and import back: the exported PyTorch model (loaded
offline with `AutoModel.from_pretrained(OUT, trust_remote_code=True)`) gives the JAX model's
logits on speech inputs and the same greedy text as `blspkd_jax.generate speech`; the LLM part
loads alone with transformers; JAX -> HF -> JAX is exact; training can start from an export.

Two tiny models: one trained-run workdir exported through the command line (variable-length
encoder, Llama, untied head), and one exported directly (30 s mode, Qwen2 with QKV biases, tied
embeddings, the CFormer's RMSNorm, scanned layers, a default instruction). Parameters are drawn
at scales where every part matters, PLoRA's B included (it starts at zero in training).
"""

import contextlib
import dataclasses
import io
import json
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch
from flax import traverse_util
from tiny import tiny_chat_tokenizer, tiny_llm_config
from transformers import AutoModel, AutoModelForCausalLM

from blspkd_jax import export as export_cli
from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data.features import log_mel, pad_features
from blspkd_jax.data.layout import ChatLayout
from blspkd_jax.data.manifest import Row
from blspkd_jax.data.pipeline import DataConfig
from blspkd_jax.inference import export, respond
from blspkd_jax.inference.workdir import Run, default_mesh, load_run
from blspkd_jax.models import blspkd_hf, hf
from blspkd_jax.models.adapter import CFormerConfig
from blspkd_jax.models.blspkd import BLSPKD, BLSPKDConfig, param_shapes
from blspkd_jax.models.encoder import WhisperEncoderConfig
from blspkd_jax.models.llm import LLM, lm_head_kernel, split_lora
from blspkd_jax.models.llm_hf import params_to_hf as llm_params_to_hf
from blspkd_jax.training import build, checkpoint, optim, train_state, weights
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.config import base_config

REPO = Path(__file__).parent.parent
MAX_NEW = 32  # as `export --verify-manifest` generates, so compiled programs are shared
SECONDS = (0.55, 0.8, 1.1)


def random_params(model_cfg: BLSPKDConfig, seed: int) -> dict:
    """Parameters of the model's shapes drawn with numpy (no compiled init): kernels ~ 1/sqrt(in),
    embeddings ~ 1 so that logits spread and greedy text varies, norms near 1, biases and both
    PLoRA factors nonzero."""
    rs = np.random.RandomState(seed)
    flat = {}
    for path, s in traverse_util.flatten_dict(param_shapes(model_cfg)).items():
        x = rs.randn(*s.shape).astype(np.float32)
        name = path[-1]
        if name == "scale":
            x = 1.0 + 0.1 * x
        elif name == "bias":
            x = 0.1 * x
        elif name in ("kernel", "lora_a", "lora_b"):
            x = x / np.sqrt(s.shape[-2])
        elif name == "embed_positions":
            x = 0.1 * x
        flat[path] = x.astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def write_audio(root) -> list[Row]:
    """Short synthetic utterances (harmonics and noise) as wav files, as manifest rows."""
    rs = np.random.RandomState(0)
    rows = []
    for i, secs in enumerate(SECONDS):
        t = np.arange(int(secs * 16000)) / 16000
        f0 = 120 + 60 * i + 40 * np.sin(2 * np.pi * 3 * t)
        wav = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 5))
        wav = (0.2 * wav * (1 + np.sin(2 * np.pi * 4 * t)) + 0.02 * rs.randn(t.size)).astype(
            np.float32
        )
        path = root / f"utt{i}.wav"
        sf.write(path, wav, 16000, subtype="FLOAT")
        rows.append(Row(line=i + 1, audio=str(path), text="the cat sat", id=f"utt{i}"))
    lines = [json.dumps({"audio": r.audio, "text": r.text, "id": r.id}) for r in rows]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return types.SimpleNamespace(
        root=root, tok=tiny_chat_tokenizer(root / "tok"), rows=write_audio(root)
    )


@pytest.fixture(scope="module")
def from_workdir(assets):
    """A run's workdir (config.json, a checkpoint of the trained parts, metrics.jsonl, the frozen
    LLM as an HF directory), exported with `python -m blspkd_jax.export` (sharded)."""
    root = assets.root / "run"
    llm_dir = root / "llm"
    llm_cfg = tiny_llm_config(len(assets.tok), eos_token_id=assets.tok.eos_token_id)
    config = config_lib.load_config(str(REPO / "configs/tiny.py:stage2"))
    config_lib.apply_overrides(
        config,
        [
            f"model.llm.hf_path={llm_dir}",
            "model.llm.lora_rank=4",
            "model.encoder.d_model=32",
            "model.encoder.encoder_layers=1",
            "model.encoder.encoder_attention_heads=2",
            "model.encoder.encoder_ffn_dim=64",
            "model.encoder.max_source_positions=100",
            "model.adapter.n_pre=1",
            "model.adapter.n_post=1",
            "model.adapter.max_tokens=40",
            "data.frame_buckets=(128,)",
            "data.max_seconds=1.2",
            "data.system_prompt=You are a helpful assistant.",
        ],
    )
    workdir = root / "workdir"
    workdir.mkdir(parents=True)
    config_lib.save_config(config, workdir / "config.json")
    # The frozen LLM comes from hf_path, the trained parts from the checkpoint (as in training).
    hf.write_config(llm_dir, llm_cfg.to_hf())
    model_cfg = build.model_config(config)
    flat = optim.flatten(random_params(model_cfg, 1))
    base, _ = split_lora(optim.unflatten(flat)["llm"])
    hf.save_llm(llm_dir, model_cfg.llm, base)
    assets.tok.save_pretrained(str(llm_dir))
    trainable, _ = optim.split_trainable(flat, config.train.trainable)
    state = train_state.TrainState(jnp.asarray(7, jnp.int32), trainable, {}, {})
    mngr = checkpoint.manager(workdir, async_save=False)
    checkpoint.save(mngr, state, {}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    rows = [
        {"step": 7, "loss": 1.25, "input_kl": 0.5, "response_kl": 0.5, "cif": 0.25},
        {"step": 7, "eval/input_kl": 0.75, "eval/top1_input": 0.625},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = root / "hf"
    argv = ["--workdir", str(workdir), "--out", str(out), "--max-shard-size", "40000"]
    argv += ["--verify-manifest", str(assets.root / "manifest.jsonl")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export_cli.main(argv)
    return types.SimpleNamespace(
        out=out, run=load_run(workdir), expected=flat, code=code, printed=printed.getvalue()
    )


@pytest.fixture(scope="module")
def direct(assets):
    """A model exported directly with `save_exported`: 30 s mode, Qwen2 (QKV biases), tied
    embeddings, the CFormer's RMSNorm, scanned layers, and a default instruction."""
    enc = WhisperEncoderConfig(
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        max_source_positions=64,
        pad_to_30s=True,
        scan_layers=True,
    )
    llm_cfg = tiny_llm_config(
        len(assets.tok),
        eos_token_id=assets.tok.eos_token_id,
        model_type="qwen2",
        qkv_bias=True,
        tie_word_embeddings=True,
        scan_layers=True,
        lora_rank=2,
        lora_alpha=8.0,
        lora_dropout=0.0,
        lora_targets=("q", "v", "down"),
    )
    adapter = CFormerConfig(
        d_model=32,
        num_heads=2,
        ffn_dim=40,
        n_pre=2,
        n_post=1,
        llm_hidden=32,
        max_tokens=20,
        out_norm=True,
        scan_layers=True,
    )
    model_cfg = BLSPKDConfig(enc, adapter, llm_cfg)
    params = random_params(model_cfg, 2)
    out = assets.root / "direct"
    export.save_exported(out, model_cfg, params, assets.tok, instruction="Repeat: ")
    conf = base_config()
    conf.data.instruction = "Repeat: "
    run = Run(
        workdir=out,
        step=0,
        config=conf,
        model=BLSPKD(model_cfg),
        params=params,
        tokenizer=assets.tok,
        layout=ChatLayout(assets.tok, None, None, "Repeat: "),
        mesh=default_mesh(),
        loss_cfg=None,
        data=DataConfig(frame_buckets=(128,), n_mels=16),  # 30 s mode: the window decides
    )
    return types.SimpleNamespace(out=out, run=run, expected=optim.flatten(params))


@pytest.fixture(scope="module", params=["from_workdir", "direct"])
def exported(request):
    ex = request.getfixturevalue(request.param)
    model = AutoModel.from_pretrained(str(ex.out), trust_remote_code=True, local_files_only=True)
    return types.SimpleNamespace(**vars(ex), torch=model.eval())


def _equal_trees(a, b) -> bool:
    fa, fb = optim.flatten(nn.unbox(a)), optim.flatten(nn.unbox(b))
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype
        and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
        for k in fa
    )


def test_export_directory_and_exact_round_trip(from_workdir, direct):
    """The command line's directory (with its PyTorch check), and JAX -> HF -> JAX, exactly."""
    assert from_workdir.code == 0
    assert "PyTorch greedy text equals JAX's on 3/3 utterances" in from_workdir.printed
    out = from_workdir.out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "blspkd" and cfg["auto_map"] == blspkd_hf.AUTO_MAP
    for name in (
        "configuration_blspkd.py",
        "modeling_blspkd.py",
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "generation_config.json",
        "llm/config.json",
        "llm/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded at 40 kB
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n.split(".")[0] for n in names} == {"encoder", "adapter", "llm", "llm_lora"}
    assert (
        "llm.lm_head.weight" in names and "llm_lora.layers.1.mlp.down_proj.lora_B.weight" in names
    )
    card = (out / "README.md").read_text()
    assert "| input_kl | 0.5 |" in card and "| top1_input | 0.625 |" in card and "step 7" in card
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    eos = from_workdir.run.tokenizer.eos_token_id
    assert eos in gen_cfg["eos_token_id"] and not gen_cfg["do_sample"]

    for ex in (from_workdir, direct):
        run_cfg = ex.run.model.config
        runtime = {"scan_layers": run_cfg.llm.scan_layers}
        model_cfg, params = blspkd_hf.load_exported(ex.out, **runtime)
        assert model_cfg == run_cfg
        assert _equal_trees(params, ex.run.params)
        assert _equal_trees(params, optim.unflatten(ex.expected))
        # And once more through HF: the state dicts written from the reloaded params are equal.
        a = blspkd_hf.params_to_hf(model_cfg, params)
        b = hf.read_state_dict(ex.out)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(blspkd_hf.ExportError, match="model_type is 'llama', expected 'blspkd'"):
        blspkd_hf.load_exported(out / "llm")


def test_streamed_weights_are_the_whole_state_dict_written_at_once(from_workdir, direct, tmp_path):
    """The export writes its weights one tensor at a time (what lets it run on parameters spread
    over many hosts); its files are byte for byte those `hf.write_state_dict` writes from the
    whole `params_to_hf` dict held at once, sharded (40 kB) and not, OUT/llm included."""
    for ex, shard in ((from_workdir, 40000), (direct, 5 << 30)):
        cfg, params = ex.run.model.config, ex.run.params
        ref = tmp_path / ex.out.name
        hf.write_state_dict(ref, blspkd_hf.params_to_hf(cfg, params), max_shard_bytes=shard)
        base = dataclasses.replace(cfg.llm, lora_rank=0, scan_layers=False)
        llm = blspkd_hf.looped_params(cfg, params)["llm"]
        hf.write_state_dict(ref / "llm", llm_params_to_hf(base, llm), max_shard_bytes=shard)
        for sub in ("", "llm"):
            files = sorted(p.name for p in (ref / sub).glob("model*.safetensors*"))
            assert files == sorted(p.name for p in (ex.out / sub).glob("model*.safetensors*")), sub
            assert len(files) > (3 if shard < 1e6 and not sub else 0)
            for name in files:
                assert (ref / sub / name).read_bytes() == (ex.out / sub / name).read_bytes()


def _batch(run, rows, *, response_tokens=(3, 5)):
    """A right-padded training-layout batch of the rows' audio: features as the pipeline makes
    them, transcripts of 2 and 3 tokens (so CIF cuts exactly that many speech vectors)."""
    enc = run.model.config.encoder
    feats = [log_mel(audio_lib.load(r.audio), enc.num_mel_bins) for r in rows]
    frames = 2 * enc.max_source_positions if enc.pad_to_30s else max(f.shape[1] for f in feats)
    features, feature_mask = pad_features(feats, frames)
    B, L = len(rows), 16
    rs = np.random.RandomState(5)
    b = {
        "input_ids": rs.randint(0, run.model.config.llm.vocab_size, (B, L)).astype(np.int32),
        "attention_mask": np.zeros((B, L), bool),
        "speech_mask": np.zeros((B, L), bool),
        "text_lengths": np.zeros((B,), np.int32),
    }
    for i in range(B):
        n = 2 + i % 2
        total = 4 + n + 2 + response_tokens[i % 2]
        b["attention_mask"][i, :total] = True
        b["speech_mask"][i, 4 : 4 + n] = True
        b["text_lengths"][i] = n
    return {**b, "features": features, "feature_mask": feature_mask}


def test_student_logits_equal_jax(exported, assets):
    """Training-layout student (CIF cut to the transcript lengths, PLoRA at the speech span) on
    a padded batch of two utterances of different lengths: fp32 logits within 1e-4."""
    run = exported.run
    b = _batch(run, assets.rows[:2])
    hidden, aux = jax.jit(lambda p, x: run.model.apply({"params": p}, x, method=BLSPKD.student))(
        run.params, {k: jnp.asarray(v) for k, v in b.items()}
    )
    want = np.asarray(hidden @ lm_head_kernel(run.model.config.llm, run.params["llm"]))
    with torch.no_grad():
        got = exported.torch(
            input_features=torch.tensor(b["features"]),
            feature_mask=torch.tensor(b["feature_mask"]),
            input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(b["attention_mask"]),
            speech_mask=torch.tensor(b["speech_mask"]),
            target_lengths=torch.tensor(b["text_lengths"]),
        )
    valid = b["attention_mask"]
    logits = got.logits.numpy()
    err = np.abs(logits - want)[valid].max()
    assert err <= 1e-4, err
    assert np.abs(want[valid]).max() > 1.0  # logits that spread, so the bound means something
    np.testing.assert_allclose(got.alphas.numpy(), np.asarray(aux["alphas"]), atol=1e-5)
    # PLoRA matters here: without it the speech positions' logits move by far more than 1e-4.
    with torch.no_grad():
        plain = exported.torch.run_llm(
            inputs_embeds=_spliced(exported.torch, got, b),
            attention_mask=torch.tensor(b["attention_mask"]),
        ).logits.numpy()
    assert np.abs(plain - logits)[b["speech_mask"]].max() > 1e-2


def _spliced(model, out, b):
    """The student's input embeddings again (the speech vectors at the speech span)."""
    text = model.llm.get_input_embeddings()(torch.tensor(b["input_ids"], dtype=torch.long))
    mask = torch.tensor(b["speech_mask"])
    rank = (torch.cumsum(mask.long(), -1) - 1).clamp_min(0)
    speech = torch.take_along_dim(out.speech_embeds, rank[..., None], dim=1)
    return torch.where(mask[..., None], speech, text)


@pytest.mark.parametrize("instruction", [None, "Say it: "])
def test_generate_from_audio_equals_generate_speech(exported, assets, instruction):
    """`generate_from_audio` on each utterance's 16 kHz samples gives the text the JAX speech
    generation gives (`generate.speech_responses`, what `generate speech` writes), from the same
    greedy token ids; the inference-mode speech vectors agree (same CIF length, within 1e-4).
    `instruction=None` is the run's default instruction on both sides."""
    run, model, rows = exported.run, exported.torch, assets.rows
    want = respond.speech_responses(
        run,
        rows,
        instruction=instruction,
        max_new_tokens=MAX_NEW,
        batch_size=len(rows),
        progress=False,
    )
    got = [
        model.generate_from_audio(
            audio_lib.load(r.audio), instruction=instruction, max_new_tokens=MAX_NEW
        )
        for r in rows
    ]
    assert got == want

    feats, mask = respond.load_features(run, rows)
    vectors, counts = respond.speech_vectors(run, feats, mask)
    instructions = [instruction] * len(rows)
    prompts = respond.build_prompts(run.layout, [int(n) for n in counts], instructions)
    stops = respond.stop_ids_for(run, instructions)
    new = respond.generate_from_prompts(
        run, prompts, vectors, max_new_tokens=MAX_NEW, stop_ids=stops
    )
    want_ids = [[int(t) for t in row[: _stop(row, stops)]] for row in new]
    got_ids = [
        model.greedy_ids_from_audio(
            audio_lib.load(r.audio), instruction=instruction, max_new_tokens=MAX_NEW
        )
        for r in rows
    ]
    assert got_ids == want_ids
    assert min(map(len, want_ids)) >= 2  # responses of several tokens: something to compare

    for i, r in enumerate(rows):
        f, m = model.audio_features(audio_lib.load(r.audio))
        np.testing.assert_allclose(f[0].numpy(), feats[i, :, : f.shape[-1]], atol=1e-5)
        with torch.no_grad():
            tokens, token_mask, _ = model.encode_speech(f, m)
        n = int(token_mask.sum())
        assert n == counts[i]
        np.testing.assert_allclose(tokens[0, :n].numpy(), np.asarray(vectors[i, :n]), atol=1e-4)


def _stop(row, stops) -> int:
    return next((k for k, t in enumerate(row) if int(t) in stops), len(row))


def test_llm_directory_loads_alone(from_workdir):
    """OUT/llm is a plain transformers causal LM: the JAX LLM's logits (PLoRA off), and the
    exported model's LLM part."""
    out, run = from_workdir.out, from_workdir.run
    lm = AutoModelForCausalLM.from_pretrained(str(out / "llm"), local_files_only=True).eval()
    ids = np.random.RandomState(0).randint(0, run.model.config.llm.vocab_size, (2, 9))
    want = LLM(run.model.config.llm).apply({"params": run.params["llm"]}, jnp.asarray(ids))
    with torch.no_grad():
        got = lm(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


def test_init_from_export_gives_the_runs_parameters(from_workdir):
    """What training's `train.init_from=OUT` would load: every parameter of the run, placed and
    typed like the run's; a run whose sizes differ is refused by config key."""
    run = from_workdir.run
    replicated = jax.sharding.NamedSharding(default_mesh(), jax.sharding.PartitionSpec())
    flat = optim.flatten(run.params)
    shardings = dict.fromkeys(flat, replicated)
    got = weights.init_from_params(from_workdir.out, run.model.config, shardings)
    assert got.keys() == flat.keys()
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(flat[k])) for k in flat)

    # A stage-1 run (no PLoRA) takes everything but the PLoRA weights.
    cfg = run.model.config
    stage1 = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora_rank=0))
    base = {k: replicated for k in flat if "lora" not in k}
    got = weights.init_from_params(from_workdir.out, stage1, base)
    assert got.keys() == base.keys()

    wide = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, n_post=2))
    with pytest.raises(blspkd_hf.ExportError, match="adapter.n_post"):
        weights.init_from_params(from_workdir.out, wide, shardings)


def test_export_refuses_foreign_folders_and_replaces_earlier_exports(
    from_workdir, tmp_path, capsys
):
    """OUT must be new, empty, an earlier export, or replaced on purpose (--force); an export
    replaces the earlier one whole (no stale llm/ left); a file as OUT is an error."""
    workdir = from_workdir.run.workdir
    run = from_workdir.run
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    argv = ["--workdir", str(workdir), "--no-llm-dir"]
    assert export_cli.main([*argv, "--out", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "holds other files and is not an earlier export" in err and "--force" in err
    assert (foreign / "notes.txt").read_text() == "mine"  # untouched
    assert export_cli.main([*argv, "--out", str(foreign), "--force"]) == 0
    assert not (foreign / "notes.txt").exists() and blspkd_hf.is_exported(foreign)

    # An earlier export with OUT/llm, exported again without it: nothing of the old one stays.
    out = tmp_path / "again"
    export.export_run(workdir, out, run=run)
    assert (out / "llm" / "config.json").is_file()
    assert export_cli.main([*argv, "--out", str(out)]) == 0
    assert not (out / "llm").exists() and blspkd_hf.is_exported(out)
    assert not list(tmp_path.glob(".again.*"))  # no partial or old copies left beside it

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert export_cli.main([*argv, "--out", str(a_file)]) == 1
    assert "is a file" in capsys.readouterr().err
