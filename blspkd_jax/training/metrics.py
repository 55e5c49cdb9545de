"""The run's metric log: metrics.jsonl and TensorBoard events, written by process 0 into a local or
remote workdir (`data.storage`)."""

from __future__ import annotations

import json
import logging
import math
import time

from blspkd_jax.data import storage

log = logging.getLogger("blspkd_jax.train")


class MetricWriter:
    """metrics.jsonl + TensorBoard, written by process 0 only, into a local or remote workdir.

    Locally every row is on disk at once. An object store cannot append, so there both files are
    uploaded whole, at most every `upload_seconds` and when the run ends or stops; TensorBoard
    writes gs:// and s3:// itself (tensorboardX, through google-cloud-storage or boto3)."""

    def __init__(self, workdir: str, enabled: bool, upload_seconds: float = 30.0):
        self.enabled = enabled
        self.tb = None
        self.remote = storage.is_url(workdir)
        self.upload_seconds, self._uploaded = upload_seconds, time.monotonic()
        if enabled:
            self.jsonl = storage.LineLog(f"{workdir}/metrics.jsonl", upload_seconds)
            tb_dir = f"{workdir}/tensorboard"
            try:
                from tensorboardX import SummaryWriter
                from tensorboardX.record_writer import REGISTERED_FACTORIES

                scheme = tb_dir.split("://", 1)[0] if self.remote else None
                if scheme is None or scheme in REGISTERED_FACTORIES:
                    self.tb = SummaryWriter(tb_dir)
                else:
                    log.warning(
                        "TensorBoard cannot write %s://: no events (metrics.jsonl has all)", scheme
                    )
            except ImportError:  # pragma: no cover - tensorboardX is a requirement
                log.warning("tensorboardX not installed: no TensorBoard logs")

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row))
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            # A remote events file is uploaded whole at each flush: not at every row.
            if not self.remote or time.monotonic() - self._uploaded >= self.upload_seconds:
                self.tb.flush()
                self._uploaded = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
