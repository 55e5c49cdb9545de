"""The demo's record of what each stage was built with: a stage built with other settings (or
downstream of a rebuilt one) is rebuilt, the same settings resume, and --quick has its own
default workdir."""

from blspkd_jax.demo.stages import Stamps, default_workdir


def test_stages_built_with_other_settings_are_rebuilt(tmp_path, capsys):
    stamps = Stamps(tmp_path)
    teacher = stamps.begin("teacher", {"steps": 60})
    (teacher / "model.safetensors").write_text("a quick teacher")
    labels = stamps.begin("labels", {"teacher": stamps.key("teacher")})
    (labels / "train.jsonl").write_text("{}")

    # The same settings (a rerun, or a resume after an interruption): kept as they are.
    again = Stamps(tmp_path)
    assert again.begin("teacher", {"steps": 60}) == teacher
    assert (teacher / "model.safetensors").exists()
    assert again.begin("labels", {"teacher": again.key("teacher")}) == labels
    assert (labels / "train.jsonl").exists()

    # `make demo` after `--quick`: other steps; the teacher and, through its key, the labels
    # built from it are emptied and rebuilt.
    full = Stamps(tmp_path)
    full.begin("teacher", {"steps": 1300})
    assert not (teacher / "model.safetensors").exists()
    assert "built with other settings (steps): rebuilding" in capsys.readouterr().out
    full.begin("labels", {"teacher": full.key("teacher")})
    assert not (labels / "train.jsonl").exists()


def test_a_stage_without_a_record_is_rebuilt(tmp_path, capsys):
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "old.bin").write_text("from an earlier demo")
    Stamps(tmp_path).begin("encoder", {"steps": 20})
    assert not (tmp_path / "encoder" / "old.bin").exists()
    assert "without a record of its settings" in capsys.readouterr().out


def test_quick_has_its_own_workdir():
    assert str(default_workdir(None, quick=True)) == "runs/demo-quick"
    assert str(default_workdir(None, quick=False)) == "runs/demo"
    assert str(default_workdir("elsewhere", quick=True)) == "elsewhere"
