"""From a run's config to its model and data, checked before anything compiles: what a pretrained
encoder decides (mel bins, frame buckets), the clashes named by key, and a resumed workdir."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from blspkd_jax.models import hf
from blspkd_jax.models.encoder import WhisperEncoder, WhisperEncoderConfig
from blspkd_jax.training import build, checkpoint
from blspkd_jax.training import config as config_lib
from blspkd_jax.training.config import ConfigError
from blspkd_jax.training.trainer import check_resume

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    """A tiny random Whisper encoder with 16 mel bins saved as a Hugging Face directory."""
    cfg = WhisperEncoderConfig(
        num_mel_bins=16,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        max_source_positions=150,
    )
    x = np.zeros((1, 16, 300), np.float32)
    params = jax.jit(WhisperEncoder(cfg).init)(jax.random.key(0), x)["params"]
    path = tmp_path_factory.mktemp("whisper")
    hf.save_whisper_encoder(path, cfg, jax.tree.map(np.asarray, params))
    return path


def _tiny(*overrides):
    config = config_lib.load_config(str(REPO / "configs/tiny.py"))
    config_lib.apply_overrides(config, list(overrides))
    return config


def test_a_pretrained_encoder_sets_the_mel_bins_and_its_padding_decides_the_buckets(whisper_dir):
    # tiny.py's short buckets with a pretrained Whisper (padded to 30 s by default): one error
    # naming both keys, before anything is built.
    config = _tiny(f"model.encoder.hf_path={whisper_dir}")
    model_cfg = build.model_config(config)
    assert model_cfg.encoder.pad_to_30s and model_cfg.encoder.num_mel_bins == 16
    with pytest.raises(ConfigError) as e:
        build.data_config(config, model_cfg, 1)
    msg = str(e.value)
    assert "model.encoder.pad_to_30s" in msg and "data.frame_buckets=(300, 500, 800)" in msg
    assert "(300,)" in msg and "\n" not in msg  # the window, in one line

    # Variable length: the buckets stand; the mel bins follow the checkpoint.
    config = _tiny(f"model.encoder.hf_path={whisper_dir}", "model.encoder.pad_to_30s=false",
                   "data.frame_buckets=(100, 300)", "data.max_seconds=3.0")  # fmt: skip
    data = build.data_config(config, build.model_config(config), 1)
    assert data.n_mels == 16 and data.frame_buckets == (100, 300)

    # Buckets left to the encoder: its window in 30 s mode.
    config = _tiny(f"model.encoder.hf_path={whisper_dir}", "data.frame_buckets=()",
                   "data.max_seconds=3.0")  # fmt: skip
    assert build.data_config(config, build.model_config(config), 1).frame_buckets == (300,)

    # An explicit mel count that the checkpoint contradicts is named.
    pad = "model.encoder.pad_to_30s=false"
    config = _tiny(f"model.encoder.hf_path={whisper_dir}", pad, "data.n_mels=80",
                   "data.frame_buckets=(300,)", "data.max_seconds=3.0")  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.n_mels=80 but the encoder reads 16"):
        build.data_config(config, build.model_config(config), 1)


def test_config_mistakes_are_named_by_key(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "hi"}\n')
    cases = {
        "batch_size": ("batch_size=-4", f"data.train_manifest={manifest}"),
        "data.train_manifest is empty": (),
        "data.train_manifest: nowhere.jsonl: no manifest or finished pack": (
            "data.train_manifest=nowhere.jsonl",
        ),
        "data.train_manifest: .*m.jsonl:0': the weight must be a positive number": (
            f"data.train_manifest={manifest}:0",
        ),
        "grad_accum_steps=3": ("grad_accum_steps=3", f"data.train_manifest={manifest}"),
        "nowhere/config.json: not found": (
            "model.llm.hf_path=nowhere",
            f"data.train_manifest={manifest}",
        ),
    }
    for key, overrides in cases.items():
        config = _tiny(*overrides)
        with pytest.raises((ConfigError, hf.CheckpointError), match=key) as e:
            model_cfg = build.model_config(config)
            build.check_config(config, model_cfg)
            build.data_config(config, model_cfg, 1)
        assert "\n" not in str(e.value)
    # A tuple written without its syntax gets a hint of it.
    for text in ("^adapter/", "'^adapter/'"):
        with pytest.raises(ConfigError, match="a tuple is written"):
            _tiny(f"train.trainable={text}")
    # A config file that sets a string where the patterns go is refused, naming the file.
    path = tmp_path / "c.py"
    path.write_text(
        "from blspkd_jax.config import base_config\n"
        "def get_config(arg=None):\n    c = base_config()\n"
        "    c.train.trainable = '^adapter/'\n    return c\n"
    )
    with pytest.raises(ConfigError, match=f"{path}: get_config"):
        config_lib.load_config(str(path))


def test_a_workdir_resumes_only_under_its_own_config(tmp_path):
    config = _tiny()
    config_lib.save_config(config, tmp_path / "config.json")
    check_resume(_tiny("optim.learning_rate=1e-3"), tmp_path)  # no checkpoint yet: a fresh start
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    assert checkpoint.steps(tmp_path) == [2]
    check_resume(_tiny("total_steps=5000", "mesh.fsdp=2", "log_every_steps=1"), tmp_path)
    with pytest.raises(ConfigError, match=r"optim.learning_rate=0.002 there, 0.001 now"):
        check_resume(_tiny("optim.learning_rate=1e-3"), tmp_path)
    # A run saved before a key existed resumes while that key keeps its default.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["loss"]["tile_rows"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume(_tiny(), tmp_path)
    with pytest.raises(ConfigError, match="loss.tile_rows=0 there, 32 now"):
        check_resume(_tiny("loss.tile_rows=32"), tmp_path)
