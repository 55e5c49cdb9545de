"""Whisper tiny.en padded to 30 s, or at each utterance's own length: cost against quality.

The demo freezes Whisper and feeds its states to the CFormer. Whisper was trained on 30 s windows;
cutting the window to the utterance (`model.encoder.pad_to_30s=false`) costs a fraction of the
compute but shows the encoder inputs it never saw in training. Quality is measured by what the
states still carry: Whisper's own decoder (transformers, greedy) transcribes from our JAX
encoder's states in both modes, scored by WER and exact match against the transcripts. Cost is
the JAX encoder's time per utterance (batch 1, compiled once per shape beforehand).

    .venv/bin/python benchmarks/whisper_window.py --manifest runs/demo/corpus/eval.jsonl
    .venv/bin/python benchmarks/whisper_window.py --quick   # 8 utterances of the same manifest
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from blspkd_jax.convert import common, whisper_ct2  # noqa: E402
from blspkd_jax.data import audio, features  # noqa: E402
from blspkd_jax.data.manifest import read_rows  # noqa: E402
from blspkd_jax.inference.metrics import sentence_match, wer  # noqa: E402
from blspkd_jax.models import hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", default="runs/demo/corpus/eval.jsonl")
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = read_rows(args.manifest)[: 8 if args.quick else args.rows]
    with tempfile.TemporaryDirectory() as tmp:
        wdir = whisper_ct2.convert(common.packaged_path("whisper-tiny.en"), Path(tmp) / "w")
        proc = WhisperProcessor.from_pretrained(wdir)
        model = WhisperForConditionalGeneration.from_pretrained(wdir).eval()
        results = {}
        for mode, pad in (("padded to 30 s", True), ("own length", False)):
            module, params = hf.load_whisper_encoder(wdir, pad_to_30s=pad)
            encode = jax.jit(lambda x, m=module, p=params: m.apply({"params": p}, x))
            heard, seconds, speech_s = [], 0.0, 0.0
            for r in rows:
                x = audio.load(r.audio)
                speech_s += len(x) / audio.SAMPLE_RATE
                if pad:
                    mel = features.log_mel(x, 80, pad_to_samples=features.N_SAMPLES_30S)
                else:
                    mel = features.log_mel(x, 80)
                    mel = mel[:, : mel.shape[1] // 2 * 2]  # the conv stride halves the frames
                mel = mel[None]
                encode(mel).block_until_ready()  # compile this shape outside the timing
                t = time.perf_counter()
                states = np.asarray(encode(mel).block_until_ready())
                seconds += time.perf_counter() - t
                out = BaseModelOutput(last_hidden_state=torch.from_numpy(states))
                with torch.no_grad():
                    ids = model.generate(encoder_outputs=out, max_new_tokens=64, do_sample=False)
                heard.append(proc.tokenizer.decode(ids[0], skip_special_tokens=True).strip())
            refs = [r.text for r in rows]
            results[mode] = {
                "wer": wer(heard, refs),
                "exact_match": sentence_match(heard, refs),
                "encoder_ms_per_utterance": 1000 * seconds / len(rows),
                "examples": heard[:3],
            }
        ratio = (
            results["padded to 30 s"]["encoder_ms_per_utterance"]
            / results["own length"]["encoder_ms_per_utterance"]
        )
        mean_s = speech_s / len(rows)
        print(f"{len(rows)} utterances from {args.manifest}, mean {mean_s:.1f} s of speech")
        print("| window | WER | exact match | encoder ms / utterance |\n|---|---:|---:|---:|")
        for mode, r in results.items():
            print(
                f"| {mode} | {r['wer']:.3f} | {r['exact_match']:.3f} | "
                f"{r['encoder_ms_per_utterance']:.1f} |"
            )
        print(f"padded costs {ratio:.1f}x the encoder time of the utterance's own length")
        print(json.dumps({k: v["examples"] for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
