"""Stable name of the Whisper log-mel features: `blspkd_jax.features.log_mel(audio_16k, n_mels=80)`
equals transformers' WhisperFeatureExtractor. The code is `blspkd_jax.data.features`."""

from blspkd_jax.data.features import (
    HOP,
    N_SAMPLES_30S,
    SAMPLE_RATE,
    log_mel,
    mel_filters,
    num_frames,
    pad_features,
    silence_value,
)

__all__ = [
    "HOP",
    "N_SAMPLES_30S",
    "SAMPLE_RATE",
    "log_mel",
    "mel_filters",
    "num_frames",
    "pad_features",
    "silence_value",
]
