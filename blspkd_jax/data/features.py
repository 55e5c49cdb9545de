"""Whisper log-mel features in vectorised numpy (for data-loading workers), numerically equal to
transformers' WhisperFeatureExtractor, plus padding of a batch for the variable-length encoder.

Our own STFT rather than the extractor: one vectorised pass over all frames is ~3x faster, and it
returns an utterance's own length (the extractor pads every input to 30 s)."""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms hop: 100 mel frames per second
N_SAMPLES_30S = 30 * SAMPLE_RATE  # Whisper's fixed window, 3000 frames


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Whisper's mel filter bank `[n_fft // 2 + 1, n_mels]` (Slaney scale and area normalisation,
    from 0 Hz to sample_rate / 2): transformers' own, as WhisperFeatureExtractor builds it.
    Read-only, cached."""
    # Imported here: transformers takes seconds to import, and a worker needs this only once.
    from transformers.audio_utils import mel_filter_bank

    w = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=sample_rate / 2,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float32)
    w.flags.writeable = False
    return w


@functools.lru_cache(maxsize=2)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann (torch.hann_window's default), as Whisper's STFT uses.
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)
    w.flags.writeable = False
    return w


def num_frames(num_samples: int) -> int:
    """Mel frames `log_mel` returns for `num_samples` samples (Whisper drops the STFT's last)."""
    return num_samples // HOP


def log_mel(
    audio, n_mels: int = 80, *, pad_to_samples: int | None = None, causal: bool = False
) -> np.ndarray:
    """Whisper log-mel spectrogram `[n_mels, num_samples // 160]` of 16 kHz mono float audio.

    Equal to transformers' `WhisperFeatureExtractor(feature_size=n_mels)` on the same samples
    without its 30 s padding. With `pad_to_samples=N` the audio is first zero-padded (or cut) to N
    samples, which reproduces the extractor's default output exactly for N = `N_SAMPLES_30S`.
    Steps: centred STFT (reflect padding, periodic Hann 400, hop 160) -> power -> mel ->
    log10 (floor 1e-10) -> clamp to (max - 8) over the whole utterance -> (x + 4) / 4.

    `causal=True` clamps each frame to (max over the frames up to it - 8) instead: what a stream
    can compute before the utterance ends (`StreamingLogMel` gives the same frames bit for bit).
    """
    x = _mono(audio)
    if pad_to_samples is not None:
        x = x[:pad_to_samples]
        x = np.pad(x, (0, pad_to_samples - x.size))
    _check_length(x.size)
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    log = _log_mel_rows(padded, 0, num_frames(x.size), n_mels)
    floor = np.maximum.accumulate(log.max(-1))[:, None] if causal else log.max()
    return _normalise(log, floor)


def _mono(audio) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"audio must be 1-D mono samples, got shape {x.shape}")
    return x


def _check_length(num_samples: int) -> None:
    if num_samples <= N_FFT // 2:
        raise ValueError(
            f"audio has {num_samples} samples; log_mel needs more than {N_FFT // 2} "
            f"({N_FFT // 2 / SAMPLE_RATE * 1e3:.1f} ms at {SAMPLE_RATE} Hz)"
        )


def _log_mel_rows(padded: np.ndarray, start: int, stop: int, n_mels: int) -> np.ndarray:
    """log10 mel power `[stop - start, n_mels]` of frames start..stop-1 of the reflect-padded
    signal. Each row is computed on its own arithmetic path (numpy's rfft per row, a non-BLAS
    einsum for the projection: BLAS blocks rows differently by count), so a frame has the same
    bits whichever rows are computed with it; the stream relies on that."""
    frames = np.lib.stride_tricks.sliding_window_view(padded[start * HOP :], N_FFT)[::HOP]
    spec = np.fft.rfft(frames[: stop - start] * _hann(N_FFT), axis=-1)  # [F, N_FFT/2 + 1]
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    mel = np.einsum("tf,fm->tm", power, mel_filters(n_mels), optimize=False)  # [F, n_mels]
    return np.log10(np.maximum(mel, 1e-10))


def _normalise(log: np.ndarray, floor) -> np.ndarray:
    """Clamp to `floor - 8` and scale as Whisper does: `[F, n_mels]` -> `[n_mels, F]`."""
    log = np.maximum(log, floor - 8.0)
    return np.ascontiguousarray(((log + 4.0) / 4.0).T, dtype=np.float32)


class StreamingLogMel:
    """`log_mel(audio, causal=True)` computed as the audio arrives.

    `push(samples)` returns the frames `[n_mels, k]` that became final (a frame is final once its
    400-sample window lies inside the audio received: 12.5 ms after its hop ends); `finish()`
    returns the last frames, whose windows reach into the reflect padding of the utterance's end.
    Together they equal `log_mel(all samples, causal=True)` bit for bit. Only the samples that
    frames still to come read are kept (from the next frame's window on), so each push costs
    what its own samples cost.
    """

    def __init__(self, n_mels: int = 80):
        self.n_mels = n_mels
        self.frames_out = 0  # frames returned so far
        self._samples = 0  # samples received so far
        self._kept = np.zeros(0, np.float32)  # the samples from `_base` on
        self._base = 0
        self._max = -np.inf  # running per-frame maximum of log10 mel power

    def push(self, samples) -> np.ndarray:
        x = _mono(samples)
        self._kept = np.concatenate([self._kept, x])
        self._samples += x.size
        n = self._samples
        if n <= N_FFT // 2:  # the left reflection needs N_FFT // 2 + 1 samples
            return np.zeros((self.n_mels, 0), np.float32)
        # Frame t is final when its window [160 t - 200, 160 t + 200) lies inside the audio.
        return self._rows(min((n - N_FFT // 2) // HOP + 1, num_frames(n)), end=False)

    def finish(self) -> np.ndarray:
        """The remaining frames (the utterance has ended); an error for audio too short."""
        _check_length(self._samples)
        return self._rows(num_frames(self._samples), end=True)

    def _rows(self, stop: int, end: bool) -> np.ndarray:
        start = self.frames_out
        if stop <= start:
            return np.zeros((self.n_mels, 0), np.float32)
        # Reflect padding: at the start while frames 0 and 1 are to come (they read it; then
        # `_base` is still 0), at the end once the utterance has ended.
        left = N_FFT // 2 if self._base == 0 else 0
        padded = np.pad(self._kept, (left, N_FFT // 2 if end else 0), mode="reflect")
        first = start * HOP - N_FFT // 2 - self._base + left  # frame `start`'s window in `padded`
        log = _log_mel_rows(padded[first:], 0, stop - start, self.n_mels)
        floor = np.maximum.accumulate(np.maximum(log.max(-1), self._max))
        self._max = float(floor[-1])
        self.frames_out = stop
        base = max(0, stop * HOP - N_FFT // 2)  # where the next frame's window starts
        self._kept = self._kept[base - self._base :]
        self._base = base
        return _normalise(log, floor[:, None])


def silence_value(features: np.ndarray) -> float:
    """What WhisperFeatureExtractor writes for frames of pure (zero) padding after this utterance.

    Zero power hits the 1e-10 floor, below the clamp, so it becomes `(max_log - 8 + 4) / 4`, i.e.
    the utterance's feature maximum minus 2.
    """
    return float(np.max(features)) - 2.0


def pad_features(features, frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a list of `[n_mels, F_i]` log-mels into `([B, n_mels, frames], mask [B, frames])`.

    `frames` defaults to the longest; a longer utterance is an error (choose a bigger bucket).
    Padding frames hold each utterance's `silence_value`, the value WhisperFeatureExtractor gives
    frames of zero padding, so the batch is as close as possible to what Whisper saw in training.
    The variable-length encoder (`pad_to_30s=False`) ignores them anyway: with `feature_mask=mask`
    it zeroes them before its convolutions and masks them in attention.
    """
    if not len(features):
        raise ValueError("pad_features: empty list of features")
    n_mels = features[0].shape[0]
    longest = max(f.shape[1] for f in features)
    frames = longest if frames is None else frames
    if longest > frames:
        raise ValueError(f"pad_features: an utterance has {longest} frames, more than {frames}")
    out = np.empty((len(features), n_mels, frames), np.float32)
    mask = np.zeros((len(features), frames), bool)
    for i, f in enumerate(features):
        if f.shape[0] != n_mels:
            raise ValueError(f"pad_features: item {i} has {f.shape[0]} mel bins, item 0 {n_mels}")
        k = f.shape[1]
        out[i, :, :k] = f
        out[i, :, k:] = silence_value(f)
        mask[i, :k] = True
    return out, mask
