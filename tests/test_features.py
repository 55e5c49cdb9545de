"""Whisper log-mel features against transformers' WhisperFeatureExtractor and librosa."""

import librosa
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from blspkd_jax.data import features

SR = features.SAMPLE_RATE


@pytest.fixture(scope="module", params=[80, 128])
def extractor(request):
    return WhisperFeatureExtractor(feature_size=request.param)


def _signals(n, seed):
    rs = np.random.RandomState(seed)
    t = np.arange(n) / SR
    noise = 0.1 * rs.randn(n)
    # A loud tone over faint noise: most mel bins sit near the (max - 8) clamp, the hard case.
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * rs.randn(n)
    chirp = 0.3 * np.sin(2 * np.pi * (100 + 3000 * t) * t)
    return [s.astype(np.float32) for s in (noise, tone, chirp)]


def test_mel_filters_match_extractor_and_librosa(extractor):
    n_mels = extractor.feature_size
    ours = features.mel_filters(n_mels)
    assert ours.shape == (features.N_FFT // 2 + 1, n_mels)
    np.testing.assert_allclose(ours, extractor.mel_filters, rtol=0, atol=1e-8)
    ref = librosa.filters.mel(sr=SR, n_fft=features.N_FFT, n_mels=n_mels, norm="slaney", htk=False)
    np.testing.assert_allclose(ours, ref.T, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n", [16000, 16001, 12345, 3207])
def test_log_mel_matches_extractor(extractor, n):
    for i, audio in enumerate(_signals(n, seed=n)):
        ref = extractor(audio, sampling_rate=SR, padding="do_not_pad", return_tensors="np")
        ref = ref["input_features"][0]
        ours = features.log_mel(audio, extractor.feature_size)
        assert ours.shape == ref.shape == (extractor.feature_size, n // features.HOP)
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-4, (n, i)


def test_log_mel_pad_to_samples_matches_padded_extractor(extractor):
    audio = _signals(9000, seed=3)[1]
    # The extractor's default: zero-pad to 30 s, 3000 frames.
    ref = extractor(audio, sampling_rate=SR, return_tensors="np")["input_features"][0]
    ours = features.log_mel(audio, extractor.feature_size, pad_to_samples=features.N_SAMPLES_30S)
    assert ours.shape == ref.shape == (extractor.feature_size, 3000)
    assert np.abs(ours - ref).max() <= 1e-4
    # Longer audio is cut, as the extractor truncates.
    long = _signals(20000, seed=4)[0]
    ref = extractor(long, sampling_rate=SR, max_length=16000, return_tensors="np")
    ours = features.log_mel(long, extractor.feature_size, pad_to_samples=16000)
    assert np.abs(ours - ref["input_features"][0]).max() <= 1e-4


def test_pad_features_silence_value_matches_extractor_padding():
    n_mels = 80
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    t = np.arange(8000) / SR
    # Fade out so that the frames straddling the end do not hold the utterance's maximum.
    a = (0.4 * np.sin(2 * np.pi * 300 * t) * np.clip((0.5 - t) * 10, 0, 1)).astype(np.float32)
    b = _signals(4321, seed=5)[0] * np.clip((4321 - np.arange(4321)) / 800, 0, 1)
    feats = [features.log_mel(a), features.log_mel(b.astype(np.float32))]
    x, mask = features.pad_features(feats, frames=120)
    assert x.shape == (2, n_mels, 120) and mask.shape == (2, 120)
    assert mask.sum(1).tolist() == [50, 27]
    np.testing.assert_array_equal(x[0, :, :50], feats[0])
    np.testing.assert_array_equal(x[1, :, :27], feats[1])
    for i, audio in enumerate([a, b]):
        ref = extractor(audio, sampling_rate=SR, max_length=120 * features.HOP, return_tensors="np")
        ref = ref["input_features"][0]
        # Frames whose 400-sample window lies wholly in the zero padding.
        first_silent = -(-(audio.size + features.N_FFT // 2) // features.HOP)
        assert np.abs(x[i, :, first_silent:] - ref[:, first_silent:]).max() <= 1e-4
    with pytest.raises(ValueError, match="more than 40"):
        features.pad_features(feats, frames=40)


def test_log_mel_errors():
    with pytest.raises(ValueError, match="1-D"):
        features.log_mel(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="needs more than 200"):
        features.log_mel(np.zeros(150, np.float32))
