"""Config files and overrides: a key that `base_config()` does not have is refused by name, in a
config file as on the command line, and a saved config reads back as it was."""

from pathlib import Path

import pytest

from blspkd_jax import sweep
from blspkd_jax.training import config as config_lib

REPO = Path(__file__).parent.parent


def _config_file(tmp_path, body: str) -> Path:
    path = tmp_path / "c.py"
    path.write_text(
        "from blspkd_jax.config import base_config\n"
        "def get_config(arg=None):\n    c = base_config()\n" + body + "    return c\n"
        "def get_sweep(arg=None):\n    return [{'seed': 1}]\n"
    )
    return path


def test_a_typo_inside_a_config_file_is_refused_with_the_closest_key(tmp_path):
    path = _config_file(tmp_path, "    c.optim.learning_rat = 1e-3\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load_config(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'optim.learning_rat'" in msg and "'optim.learning_rate'" in msg


def test_a_config_file_missing_a_key_is_refused(tmp_path):
    path = _config_file(tmp_path, "    del c.loss['temperature']\n")
    with pytest.raises(config_lib.ConfigError, match="loss.temperature"):
        config_lib.load_config(str(path))


def test_overrides_parse_to_the_default_type_and_refuse_unknown_keys():
    config = config_lib.load_config(str(REPO / "configs/tiny.py"))
    config_lib.apply_overrides(config, ["--config.optim.learning_rate=3", "seed=7"])
    assert config.optim.learning_rate == 3.0 and isinstance(config.optim.learning_rate, float)
    assert config.seed == 7
    with pytest.raises(config_lib.ConfigError, match="learning_rat"):
        config_lib.apply_overrides(config, ["--config.optim.learning_rat=1"])
    with pytest.raises(config_lib.ConfigError, match="expected int"):
        config_lib.apply_overrides(config, ["--config.seed=1.5"])


def test_shipped_configs_load():
    for spec in [
        "configs/tiny.py:stage1",
        "configs/tiny.py:stage2",
        "configs/qwen2_5_7b_large_v2.py:stage1",
        "configs/qwen2_5_7b_large_v2.py:stage2",
        "configs/qwen2_5_0_5b_small.py",
        "configs/llama3_1_8b_large_v3.py",
    ]:
        config_lib.load_config(str(REPO / spec))


def test_saved_config_reads_back(tmp_path):
    config = config_lib.load_config(str(REPO / "configs/tiny.py:stage2"))
    config_lib.save_config(config, tmp_path / "config.json")
    back = config_lib.read_saved_config(tmp_path / "config.json")
    assert back.to_dict() == config.to_dict()  # tuples come back as tuples


def test_sweep_print_refuses_an_unknown_command_line_key(tmp_path, capsys):
    path = _config_file(tmp_path, "")
    code = sweep.main(
        ["--config", str(path), "--workdir", str(tmp_path / "w"), "--print",
         "--config.optim.learning_rat=1"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "learning_rat" in captured.err and captured.out == ""
