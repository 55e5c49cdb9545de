"""Sweeps expand into runs with their own workdirs and launch commands, reject unknown keys,
and summarise final metrics."""

import json
from pathlib import Path

import pytest

from blspkd_jax import sweep
from blspkd_jax.training.config import ConfigError

REPO = Path(__file__).parent.parent


def test_product_and_names():
    runs = sweep.product({"optim.learning_rate": [1e-3, 2e-3], "seed": [0, 1, 2]})
    assert len(runs) == 6 and runs[0] == {"optim.learning_rate": 1e-3, "seed": 0}
    assert sweep.run_name(runs[-1]) == "learning_rate=0.002,seed=2"


def test_print_lists_one_command_per_run(tmp_path, capsys):
    code = sweep.main(
        ["--config", str(REPO / "configs/tiny.py"), "--workdir", str(tmp_path), "--print",
         "--config.total_steps=3"]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert all("-m blspkd_jax.train" in x and "--config.total_steps=3" in x for x in lines)
    workdirs = {x.split("--workdir ")[1].split()[0] for x in lines}
    assert len(workdirs) == 4  # each run its own workdir
    assert any("--config.optim.learning_rate=0.002" in x for x in lines)


def test_unknown_sweep_key_fails_before_running(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text(
        "from blspkd_jax.config import base_config\n"
        "def get_config(arg=None):\n    return base_config()\n"
        "def get_sweep(arg=None):\n    return [{'optim.learning_rat': 1.0}]\n"
    )
    with pytest.raises(ConfigError, match="learning_rat"):
        sweep.expand(str(cfg))
    assert sweep.main(["--config", str(cfg), "--workdir", str(tmp_path / "w")]) == 2


def test_summary_table_from_final_metrics(tmp_path):
    runs = [("a", {}), ("b", {})]
    for name, loss in (("a", 1.5), ("b", 0.25)):
        (tmp_path / name).mkdir()
        rows = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": loss, "input_kl": loss / 2}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sweep.summarize(tmp_path, runs)
    assert "| a | 2 | 1.5 | 0.75 |" in table and "| b | 2 | 0.25 | 0.125 |" in table
    assert json.loads((tmp_path / "summary.json").read_text())["b"]["loss"] == 0.25
