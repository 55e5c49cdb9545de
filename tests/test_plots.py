"""Pictures of a run: the fire points CIF would emit (against a hand-worked example), the loss
curves of the tiny trained run, and the CIF picture and the plot command's errors."""

import json
from pathlib import Path

import pytest

from blspkd_jax import plot
from blspkd_jax.data.manifest import DataError, read_rows
from blspkd_jax.inference.plots import fire_points, plot_cif, plot_curves
from blspkd_jax.inference.workdir import load_run


def test_fire_points_by_hand():
    # Sum 3.0 -> 3 tokens; cumulative 0.5, 1.1, 1.3, 2.2, 3.0: fires at frames 1, 3 and 4.
    assert fire_points([0.5, 0.6, 0.2, 0.9, 0.8]).tolist() == [1, 3, 4]
    # Sum 1.6 -> 2 tokens, weights scaled by 2 / 1.6: cumulative 0.5, 1.25, 2.0.
    assert fire_points([0.4, 0.6, 0.6, 0.0]).tolist() == [1, 2]
    # Too little weight for one whole token: still one, at the last frame with weight.
    assert fire_points([0.0, 0.1, 0.05, 0.0]).tolist() == [2]
    assert fire_points([0.0, 0.0]).tolist() == []


def _png(path):
    path = Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_curves_and_cif_pictures_of_a_trained_run(tiny_run, tmp_path, capsys):
    workdir, root, _ = tiny_run
    _png(plot_curves(workdir, tmp_path / "curves.png"))
    run = load_run(workdir)
    row = read_rows(root / "eval.jsonl")[1]
    _png(plot_cif(run, row, tmp_path / "cif.png"))
    # The command writes to WORKDIR/plots by default and names what is wrong in one line.
    assert plot.main(["curves", "--workdir", str(workdir), "--out", str(tmp_path / "c.png")]) == 0
    _png(tmp_path / "c.png")
    assert plot.main(["curves", "--workdir", str(tmp_path)]) == 1
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    args = ["cif", "--workdir", str(workdir), "--manifest", str(root / "eval.jsonl")]
    assert plot.main([*args, "--row", "99", "--out", str(tmp_path / "x.png")]) == 1
    assert "--row 99 not in 1..5" in capsys.readouterr().err


def test_curves_skip_a_line_cut_by_a_kill(tmp_path):
    rows = [{"step": 1, "loss": 2.0, "input_kl": 1.0}, {"step": 2, "loss": 1.5, "input_kl": 0.7}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    _png(plot_curves(tmp_path, tmp_path / "c.png"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(DataError, match="no logged losses"):
        plot_curves(tmp_path, tmp_path / "d.png")
