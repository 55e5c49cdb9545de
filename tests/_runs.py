"""Assets for the tests that train on a few recordings (test_host_loop.py, test_storage.py): a
random tiny LLM saved as a Hugging Face directory, eight noise recordings with real transcripts,
and their manifest."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import jax
import numpy as np
import soundfile as sf
from tiny import SENTENCES, tiny_chat_tokenizer, tiny_llm_config

from blspkd_jax.models import hf
from blspkd_jax.models.llm import LLM


def build_assets(root: Path) -> Path:
    """`root/llm` (tokenizer and weights), `root/audio/u{i}.wav` and `root/train.jsonl` (audio
    paths relative to the manifest)."""
    tok = tiny_chat_tokenizer(root / "llm")
    cfg = tiny_llm_config(len(tok), num_layers=1, tie_word_embeddings=True)
    params = LLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    import flax.linen as nn

    hf.save_llm(root / "llm", cfg, jax.tree.map(np.asarray, nn.unbox(params)))
    rs = np.random.RandomState(0)
    (root / "audio").mkdir()
    rows = []
    for i in range(8):
        n = int((0.5 + 0.12 * i) * 16000)
        x = (0.1 * rs.randn(n) * (0.2 + 0.8 * np.abs(np.sin(np.linspace(0, 6, n))))).astype(
            np.float32
        )
        sf.write(root / "audio" / f"u{i}.wav", x, 16000)
        rows.append({"audio": f"audio/u{i}.wav", "text": SENTENCES[i % len(SENTENCES)]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def upload_assets(root: Path, url: str) -> None:
    """Add a row whose recording is missing to `root/train.jsonl`, then copy the manifest and
    the recordings to `url` (a gs:// prefix), keeping their relative paths."""
    from blspkd_jax.data import storage

    lines = (root / "train.jsonl").read_text().splitlines()
    lines.append(json.dumps({"audio": "audio/missing.wav", "text": "gone"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    for f in [root / "train.jsonl", *sorted((root / "audio").iterdir())]:
        storage.as_path(f"{url}/{f.relative_to(root)}").write_bytes(f.read_bytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
