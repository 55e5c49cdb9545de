"""Audio in: probe a file's length cheaply, decode it (or a segment of it) to 16 kHz mono float32.

Any format libsndfile reads (WAV, FLAC, OGG, MP3, ...) via soundfile (docs/method.md §6). Channels
are averaged to mono and any sample rate is resampled as `librosa.load(path, sr=16000)` does (soxr,
high quality), to the same samples. A recording may be a URL (`gs://...`): soundfile then reads
it through a file object from `storage`, fetching only the bytes it asks for."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import soundfile as sf
import soxr

from blspkd_jax.data import storage
from blspkd_jax.errors import UserError

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # Whisper's STFT hop: 100 mel frames per second
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
MIN_SAMPLES = 200  # log-mel needs more than half an STFT window of audio


class AudioError(UserError):
    """A file is missing, unreadable, or its samples are unusable; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What a file's header says about the (segment of the) recording, before decoding."""

    sample_rate: int
    channels: int
    num_samples: int  # in the segment, at the file's own rate

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def num_samples_16k(self) -> int:
        return resampled_length(self.num_samples, self.sample_rate)


def resampled_length(num_samples: int, sample_rate: int) -> int:
    """Samples after resampling to 16 kHz: librosa's `ceil(n * ratio)` (it pads/trims to this)."""
    if sample_rate == SAMPLE_RATE:
        return num_samples
    return int(np.ceil(num_samples * (float(SAMPLE_RATE) / sample_rate)))


def num_frames(num_samples_16k: int) -> int:
    """Log-mel frames for that many 16 kHz samples: WhisperFeatureExtractor drops the STFT's last
    (centred) frame, leaving `n // 160`."""
    return num_samples_16k // HOP_LENGTH


def _segment(total: int, sample_rate: int, offset: float, duration: float | None, path) -> tuple:
    """(start, frames) in samples for a segment; raises AudioError when it lies outside the file."""
    start = int(round(offset * sample_rate))
    if start > total:
        raise AudioError(
            f"segment offset {offset:g} s is past the end of {path} ({total / sample_rate:.3f} s)"
        )
    if duration is None:
        return start, total - start
    frames = int(round(duration * sample_rate))
    # Rounding two floats may overshoot the end by a sample; more than 10 ms is a real error.
    if start + frames > total + sample_rate // 100:
        raise AudioError(
            f"segment [{offset:g}, {offset + duration:g}] s exceeds the length of {path} "
            f"({total / sample_rate:.3f} s)"
        )
    return start, min(frames, total - start)


def probe(path: str | os.PathLike, offset: float = 0.0, duration: float | None = None) -> AudioInfo:
    """Header-only look at a file: rate, channels and segment length. Cheap (no decoding)."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        if storage.is_url(path):
            with storage.open(path, "rb") as f, sf.SoundFile(f) as s:
                rate, total, channels = int(s.samplerate), int(s.frames), int(s.channels)
        else:
            info = sf.info(path)
            rate, total, channels = int(info.samplerate), int(info.frames), int(info.channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot decode audio {path}: {_first_line(e)}") from None
    if rate <= 0:
        raise AudioError(f"cannot decode audio {path}: sample rate {rate}")
    _, frames = _segment(total, rate, offset, duration, path)
    return AudioInfo(sample_rate=rate, channels=channels, num_samples=frames)


def read(
    path: str | os.PathLike,
    offset: float = 0.0,
    duration: float | None = None,
    info: AudioInfo | None = None,
) -> tuple[np.ndarray, int]:
    """Decode (a segment of) a file as it is: float32 `[S, C]` at the file's rate, and the rate.

    Raises AudioError for a missing or undecodable file, an empty segment, a file shorter than its
    header says (truncated), or samples that are NaN or infinite. `info` (from `probe`) saves
    re-reading the header.
    """
    path = os.fspath(path)
    info = info or probe(path, offset, duration)
    if info.num_samples == 0:
        raise AudioError(f"audio is empty (0 samples): {path}")
    start = int(round(offset * info.sample_rate))
    try:
        if storage.is_url(path):
            with storage.open(path, "rb") as raw, sf.SoundFile(raw) as f:
                x = _read_frames(f, start, info.num_samples)
        else:
            with sf.SoundFile(path) as f:
                x = _read_frames(f, start, info.num_samples)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot decode audio {path}: {_first_line(e)}") from None
    if x.shape[0] < info.num_samples:
        raise AudioError(
            f"audio is truncated: {path} holds {x.shape[0]} of the {info.num_samples} samples "
            "its header promises"
        )
    if not np.isfinite(x).all():
        raise AudioError(f"audio contains NaN or infinite samples: {path}")
    return x, info.sample_rate


def _read_frames(f: sf.SoundFile, start: int, frames: int) -> np.ndarray:
    if start:
        f.seek(start)
    return f.read(frames, dtype="float32", always_2d=True)


def load(
    path: str | os.PathLike,
    offset: float = 0.0,
    duration: float | None = None,
    info: AudioInfo | None = None,
) -> np.ndarray:
    """Decode (a segment of) a file to 16 kHz mono float32 `[S]`; errors as `read`."""
    x, rate = read(path, offset, duration, info)
    y = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if rate != SAMPLE_RATE:
        # librosa.resample's default, done directly: soxr "HQ", then pad/trim to ceil(n * ratio).
        # (librosa itself would pull scipy.signal into every worker: seconds of import.)
        n = resampled_length(len(y), rate)
        y = soxr.resample(y, rate, SAMPLE_RATE, quality="soxr_hq")[:n]
        y = np.pad(y, (0, n - len(y)))
    return np.ascontiguousarray(y, dtype=np.float32)


def load_pinned(
    path: str | os.PathLike, offset: float, duration: float | None, info: AudioInfo
) -> np.ndarray:
    """`load`, padded or trimmed to exactly `info.num_samples_16k`: the length the index chose
    the row's bucket from (the resampler already gives it; pinning it means no decode path can
    ever overflow the bucket)."""
    wave = load(path, offset, duration, info)
    n = info.num_samples_16k
    return np.pad(wave[:n], (0, max(0, n - len(wave))))


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
