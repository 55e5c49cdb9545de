"""The demo's record of what each stage was built with: a stage built with other settings (or
downstream of a rebuilt one) is rebuilt, the same settings resume, and --quick has its own
default workdir; a change to the config file itself rebuilds a training stage; results.json has
the shape README documents."""

from pathlib import Path

from blspkd_jax.demo.stages import STAGES, Stamps, default_workdir, fingerprint, results_markdown
from blspkd_jax.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]


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
    assert str(default_workdir(None, quick=False, teacher_name="smollm2")) == "runs/demo-smollm2"
    assert str(default_workdir(None, True, "smollm2")) == "runs/demo-smollm2-quick"


def test_a_change_to_the_config_file_changes_the_fingerprint():
    config = config_lib.load_config(f"{REPO / 'configs/tiny.py'}:stage1")
    before = fingerprint(config)
    assert fingerprint(config_lib.load_config(f"{REPO / 'configs/tiny.py'}:stage1")) == before
    config.model.adapter.n_pre += 1  # what an edit to configs/tiny.py does to the resolved config
    assert fingerprint(config) != before


def test_results_table_reads_every_stage_and_whisper():
    keys = (
        "input_kl",
        "response_kl",
        "exact_match_repeat",
        "wer_repeat",
        "exact_match_continuation",
    )
    stages = {n: {k: i / 10 for k in keys} | {"rows": 12} for i, n in enumerate(STAGES)}
    recordings = [
        {"words": "Front Left", "asr": {"student_hears": "front | left", "teacher_reads": "x"},
         "continuation": {"student_hears": "a\nb", "teacher_reads": "y"}},
    ]  # fmt: skip
    table = results_markdown(
        {"stages": stages, "asr_wer": 0.32, "asr_exact_match": 0.3, "export": "runs/demo/hf",
         "export_agreement": "4/4", "recordings": recordings}
    )  # fmt: skip
    assert "| WER of 'repeat' from speech | 0.000 | 0.100 | 0.200 |" in table
    assert "same 12 held-out utterances: WER 0.320, exact match 0.300" in table
    assert "| Front Left | front / left | x | a b | y |" in table


def test_results_table_of_a_chunk_causal_run_has_the_stream_rule_column():
    keys = ("input_kl", "wer_repeat")
    names = (*STAGES, "stage2_stream")
    stages = {n: {k: i / 10 for k in keys} | {"rows": 12} for i, n in enumerate(names)}
    table = results_markdown(
        {"stages": stages, "asr_wer": 0.32, "asr_exact_match": 0.3, "export": None,
         "export_agreement": None, "recordings": []}
    )  # fmt: skip
    assert "| metric | untrained | stage 1 | stage 2 | stage 2, stream rule |" in table
    assert "| WER of 'repeat' from speech | 0.000 | 0.100 | 0.200 | 0.300 |" in table
    assert "Export skipped: chunk-causal runs" in table
