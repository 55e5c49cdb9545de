"""The data options (`data.*` keys of a training config) that the pipeline, its index and the
tools share."""

from __future__ import annotations

import dataclasses

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data.layout import DEFAULT_SYSTEM


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data options; the names match the `data.*` keys of the training config."""

    train_manifest: str = ""
    eval_manifest: str = ""
    batch_size_per_process: int = 8
    frame_buckets: tuple[int, ...] = (1000, 2000, 3000)  # mel frames, 100 per second; even
    token_buckets: tuple[int, ...] = (64, 128, 256)  # teacher sequence length L
    min_seconds: float = manifest_lib.MIN_SECONDS
    max_seconds: float = manifest_lib.MAX_SECONDS
    max_text_tokens: int = manifest_lib.MAX_TEXT_TOKENS  # transcript tokens N (CIF target length)
    n_mels: int = 80
    worker_count: int = 2  # decoding processes; 0 decodes in the calling thread
    worker_buffer_size: int = 2  # batches each worker keeps ready
    probe_threads: int = 8  # threads reading audio headers at startup
    cache_index: bool = True  # keep each manifest's index beside it for later starts (data.index)
    seed: int = 0
    shuffle: bool = True  # training order; eval never shuffles
    strict: bool = False  # raise at the first bad row instead of skipping it
    instruction: str = ""  # used where a row has no "instruction"
    system_prompt: str = DEFAULT_SYSTEM  # "" sends no system turn (the template's default applies)
    chat_template: str = ""  # overrides the tokenizer's own template when set

    @classmethod
    def from_config(cls, config, process_count: int) -> DataConfig:
        """This process's data options from a run's config (`data.*`, the global `batch_size`
        split over `process_count` processes, `seed`)."""
        if config.batch_size <= 0 or config.batch_size % process_count:
            raise ValueError(
                f"batch_size={config.batch_size}: expected a positive multiple of the "
                f"{process_count} processes (it is the global batch)"
            )
        d = config.data
        return cls(
            train_manifest=d.train_manifest,
            eval_manifest=d.eval_manifest,
            batch_size_per_process=config.batch_size // process_count,
            frame_buckets=tuple(d.frame_buckets),
            token_buckets=tuple(d.token_buckets),
            min_seconds=d.min_seconds,
            max_seconds=d.max_seconds,
            max_text_tokens=d.max_text_tokens,
            n_mels=d.n_mels,
            worker_count=d.worker_count,
            worker_buffer_size=d.worker_buffer_size,
            cache_index=d.cache_index,
            seed=config.seed,
            shuffle=d.shuffle,
            strict=d.strict,
            instruction=d.instruction,
            system_prompt=d.system_prompt,
            chat_template=d.chat_template,
        )

    def validate(self) -> None:
        """Raise ValueError naming the `data.*` key that is out of range."""
        fb, tb = self.frame_buckets, self.token_buckets
        if not fb or any(f <= 0 or f % 2 for f in fb) or list(fb) != sorted(set(fb)):
            raise ValueError(
                f"data.frame_buckets must be increasing positive even frame counts (the encoder "
                f"halves them), got {fb}"
            )
        if not tb or any(t <= 0 for t in tb) or list(tb) != sorted(set(tb)):
            raise ValueError(f"data.token_buckets must be increasing positive lengths, got {tb}")
        if self.batch_size_per_process <= 0:
            raise ValueError(
                f"data.batch_size_per_process must be positive, got {self.batch_size_per_process}"
            )
        # log_mel needs more than half an STFT window (200 samples) of audio.
        if not 0.02 <= self.min_seconds < self.max_seconds:
            raise ValueError(
                f"data.min_seconds ({self.min_seconds}) must be >= 0.02 and below "
                f"data.max_seconds ({self.max_seconds})"
            )
        if audio_lib.num_frames(int(self.max_seconds * audio_lib.SAMPLE_RATE)) > fb[-1]:
            raise ValueError(
                f"data.max_seconds={self.max_seconds} gives up to "
                f"{int(self.max_seconds * audio_lib.FRAMES_PER_SECOND)} mel frames, more than the "
                f"largest of data.frame_buckets={fb}"
            )
        if self.max_text_tokens <= 0:
            raise ValueError(f"data.max_text_tokens must be positive, got {self.max_text_tokens}")
        if self.worker_count < 0 or self.worker_buffer_size <= 0 or self.probe_threads <= 0:
            raise ValueError(
                "data.worker_count must be >= 0 and data.worker_buffer_size, data.probe_threads > 0"
            )
