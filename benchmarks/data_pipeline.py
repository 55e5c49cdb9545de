"""Input pipeline throughput (utterances/s, batches/s) against the tiny train step's consumption.

Synthetic 16 kHz PCM WAVs of 1-6 s (what the embedded espeak corpus looks like) go through the
full pipeline: decode, Whisper log-mel, chat-template layout, bucketing, padding. Each worker
count is timed after its first batch (worker start-up is reported apart: it is paid once per
run). The tiny BLSP-KD train step (width 64, 2 layers everywhere) is then timed on the very same
batches, every bucket shape compiled beforehand; the goal is pipeline >= 3x the step's rate, so
training never waits on data. Last, both run together (the step consuming the live iterator) and
the time spent waiting for batches is reported: on a 2-core machine workers and step share cores.

    .venv/bin/python benchmarks/data_pipeline.py            # 384 utterances, workers 0/1/2
    .venv/bin/python benchmarks/data_pipeline.py --quick    # 64 utterances, seconds
    .venv/bin/python benchmarks/data_pipeline.py --startup 100000   # start-up, with/without index

`--startup ROWS` times only the start-up of ROWS rows on `--processes` (2) processes at once: the
manifest's index (every transcript tokenised, every audio header probed) built every time, built
and written once, or read from the file the first start wrote (`blspkd_jax.data.index`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from blspkd_jax.data.layout import CHATML_TEMPLATE  # noqa: E402
from blspkd_jax.data.pipeline import DataConfig, train_pipeline  # noqa: E402

GOAL = 3.0
TEXT = (
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet hills "
    "and distant rivers carry old stories to the sea every morning before the bells ring"
)
WORDS = TEXT.split()


def make_tokenizer(path: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(1)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 12)) for _ in range(2000)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[2:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def make_corpus(d: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        seconds = rng.uniform(1.0, 6.0)
        t = np.arange(int(seconds * 16000)) / 16000
        # A few drifting tones under noise: spectrally busy like speech, cheap to make.
        x = 0.05 * rng.standard_normal(t.size)
        for f in rng.uniform(100, 3000, 3):
            x += 0.1 * np.sin(2 * np.pi * f * t * (1 + 0.05 * np.sin(t)))
        sf.write(d / f"u{i}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        words = " ".join(rng.choice(WORDS, int(seconds * 2.5)))
        lines.append(json.dumps({"audio": f"u{i}.wav", "text": words}))
    path = d / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def time_pipeline(cfg: DataConfig, tok, batches: int):
    """(startup s, s per batch, real utterances per batch, the batches)."""
    p = train_pipeline(cfg, tok, process_index=0, process_count=1)
    it = iter(p)
    start = time.perf_counter()
    first = next(it)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    out = [next(it) for _ in range(batches)]
    elapsed = time.perf_counter() - start
    it.close()
    utts = np.mean([b["example_mask"].sum() for b in out])
    return startup, elapsed / batches, float(utts), [first, *out]


def tiny_step(vocab: int, cfg: DataConfig):
    """(jitted step, state) of the tiny model for this data config's largest shapes."""
    import jax

    from blspkd_jax.models import adapter, sharding
    from blspkd_jax.models.blspkd import BLSPKD, BLSPKDConfig
    from blspkd_jax.models.encoder import WhisperEncoderConfig
    from blspkd_jax.models.llm import LLMConfig
    from blspkd_jax.training import optim, train_state
    from blspkd_jax.training.objective import LossConfig

    width = 64
    model = BLSPKD(
        BLSPKDConfig(
            encoder=WhisperEncoderConfig(
                num_mel_bins=cfg.n_mels,
                d_model=width,
                encoder_layers=2,
                encoder_attention_heads=4,
                encoder_ffn_dim=4 * width,
                max_source_positions=cfg.frame_buckets[-1] // 2,
                pad_to_30s=False,
            ),
            adapter=adapter.CFormerConfig(
                d_model=width,
                num_heads=4,
                ffn_dim=4 * width,
                n_pre=2,
                n_post=2,
                llm_hidden=width,
                max_tokens=cfg.max_text_tokens,
            ),
            llm=LLMConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=4 * width,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                lora_rank=4,
            ),
        )
    )
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, _ = optim.make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=1000)
    step_cfg = train_state.StepConfig(trainable=("^adapter/",), loss=LossConfig())
    return model, mesh, tx, step_cfg


def time_step(vocab: int, cfg: DataConfig, batches: list[dict]):
    """(s per step over `batches`, the jitted step and state) after compiling every shape."""
    import jax

    from blspkd_jax.training import train_state, weights

    model, mesh, tx, step_cfg = tiny_step(vocab, cfg)
    params = weights.random_params(model, mesh, jax.random.key(0))
    state, _ = train_state.create_state(params, mesh, step_cfg, tx)
    step = jax.jit(train_state.make_train_step(model, step_cfg, tx), donate_argnums=0)
    rng = jax.random.key(1)
    shapes = {}
    for b in batches:
        shapes.setdefault((b["features"].shape, b["input_ids"].shape), b)
    for b in shapes.values():  # compile each bucket shape once
        state, m = step(state, b, rng)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for b in batches:
        state, m = step(state, b, rng)
    jax.block_until_ready(m)
    return (time.perf_counter() - start) / len(batches), step, state, len(shapes)


def _start(cfg: DataConfig, tok_dir: str, process: int, processes: int, out) -> None:
    """One process's pipeline start-up (index and plan), timed; its seconds go to `out`."""
    start = time.perf_counter()
    train_pipeline(cfg, tok_dir, process_index=process, process_count=processes)
    out.put((process, time.perf_counter() - start))


def time_startup(cfg: DataConfig, tok_dir: str, processes: int) -> float:
    """Seconds until every one of `processes` local processes has its pipeline (the slowest),
    each started at once as the processes of a multi-host run are; imports excluded."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the imports are done once, here
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_start, args=(cfg, tok_dir, i, processes, out)) for i in range(processes)
    ]
    for p in procs:
        p.start()
    times = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"start-up process failed with exit code {p.exitcode}")
    return max(times.values())


def time_startups(rows: int, processes: int) -> None:
    """`--startup ROWS`: a ROWS-row manifest (its rows cycle over 256 recordings, each with its own
    transcript) started by `processes` processes: without an index, the first start with one
    (it builds and writes it) and a later start (it reads it)."""
    d = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    make_tokenizer(d / "tok", 512)
    make_corpus(d, 256)
    rng = np.random.default_rng(2)
    lines = [
        json.dumps({"audio": f"u{i % 256}.wav", "text": " ".join(rng.choice(WORDS, 12))})
        for i in range(rows)
    ]
    manifest = d / "big.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(
        train_manifest=str(manifest),
        batch_size_per_process=8,
        frame_buckets=(200, 400, 600),
        token_buckets=(48, 64),
        min_seconds=0.5,
        max_seconds=6.0,
        max_text_tokens=32,
    )
    print(f"start-up of a {rows:,}-row manifest on {processes} processes, {os.cpu_count()} cores\n")
    print("| start-up | seconds (slowest process) |")
    print("|---|---|")
    without = time_startup(
        DataConfig(**{**cfg.__dict__, "cache_index": False}), str(d / "tok"), processes
    )
    print(f"| no index (data.cache_index=False) | {without:.2f} |")
    first = time_startup(cfg, str(d / "tok"), processes)
    print(f"| first start: builds and writes the index | {first:.2f} |")
    later = time_startup(cfg, str(d / "tok"), processes)
    print(f"| later start: reads the index | {later:.2f} |")
    print(f"\nindex / no index: {without / later:.1f}x faster (goal >= 10x)")
    print(json.dumps({"rows": rows, "processes": processes, "no_index_s": round(without, 3),
                      "first_s": round(first, 3), "indexed_s": round(later, 3)}))  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    ap.add_argument("--utterances", type=int, help="corpus size (default 384; 64 with --quick)")
    ap.add_argument("--batch", type=int, default=8, help="batch size per process")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--no-step", action="store_true", help="pipeline only, no train step")
    ap.add_argument(
        "--startup",
        type=int,
        metavar="ROWS",
        help="only time start-up (the index) of a ROWS-row manifest, e.g. 100000",
    )
    ap.add_argument("--processes", type=int, default=2, help="processes for --startup")
    args = ap.parse_args()
    if args.startup:
        return time_startups(args.startup, args.processes)
    n = args.utterances or (64 if args.quick else 384)
    d = Path(tempfile.mkdtemp(prefix="bench_data_"))
    tok = make_tokenizer(d / "tok", 512)
    manifest = make_corpus(d, n)
    cfg = DataConfig(
        train_manifest=str(manifest),
        batch_size_per_process=args.batch,
        frame_buckets=(200, 400, 600),
        token_buckets=(48, 64),
        min_seconds=0.5,
        max_seconds=6.0,
        max_text_tokens=32,
    )
    n_batches = max(4, n // args.batch)
    print(
        f"{n} utterances of 1-6 s, batch {args.batch}, buckets {cfg.frame_buckets} frames x "
        f"{cfg.token_buckets} tokens, {os.cpu_count()} cores\n"
    )
    print("| pipeline | start-up s | batches/s | utterances/s |")
    print("|---|---|---|---|")
    rates, sample = {}, None
    for w in args.workers:
        wc = DataConfig(**{**cfg.__dict__, "worker_count": w})
        startup, per_batch, utts, batches = time_pipeline(wc, tok, n_batches)
        rates[w] = 1 / per_batch
        sample = sample or batches
        print(
            f"| worker_count={w} | {startup:.2f} | {1 / per_batch:.1f} | {utts / per_batch:.0f} |"
        )
    # The same rows packed (python -m blspkd_jax.data.pack): records instead of audio files.
    from blspkd_jax.data import pack as pack_lib

    print("\n| packed | worker_count | batches/s | utterances/s | vs the manifest |")
    print("|---|---|---|---|---|")
    packed_rates = {}
    for store, n_mels in (("audio", 0), ("features", cfg.n_mels)):
        out = d / f"packed_{store}"
        pack_lib.pack(str(manifest), str(out), features=n_mels, progress=False)
        for w in args.workers:
            pc = DataConfig(**{**cfg.__dict__, "worker_count": w, "train_manifest": str(out)})
            _, per_batch, utts, _ = time_pipeline(pc, tok, n_batches)
            packed_rates[store, w] = 1 / per_batch
            print(
                f"| {store} | {w} | {1 / per_batch:.1f} | {utts / per_batch:.0f} | "
                f"{(1 / per_batch) / rates[w]:.2f}x (goal >= 2x) |"
            )
    print(
        json.dumps(
            {
                "manifest_batches_per_s": {w: round(r, 2) for w, r in rates.items()},
                "packed_batches_per_s": {
                    f"{k[0]}@{k[1]}": round(r, 2) for k, r in packed_rates.items()
                },
            }
        )
    )
    if args.no_step:
        return
    try:
        per_step, step, state, n_shapes = time_step(len(tok), cfg, sample)
    except ImportError as e:  # the model package is assembled by other issues
        print(f"\ntrain step unavailable ({e}); pipeline numbers only")
        return
    best = max(rates, key=rates.get)
    print(f"\n| tiny train step ({n_shapes} shapes compiled) | steps/s | pipeline / step |")
    print("|---|---|---|")
    print(
        f"| width 64, 2+2+2+2 layers, adapter trained | {1 / per_step:.1f} | "
        f"{rates[best] / (1 / per_step):.1f}x (worker_count={best}; goal >= {GOAL:g}x) |"
    )

    # Together: the step consumes the live iterator; how long does it wait for data?
    import jax

    wc = DataConfig(**{**cfg.__dict__, "worker_count": best})
    p = train_pipeline(wc, tok, process_index=0, process_count=1)
    it = iter(p)
    next(it)
    wait, start, rng = 0.0, time.perf_counter(), jax.random.key(1)
    for _ in range(n_batches):
        t0 = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - t0
        state, m = step(state, b, rng)
    jax.block_until_ready(m)
    total = time.perf_counter() - start
    it.close()
    print(
        f"\ntogether (worker_count={best}): {n_batches / total:.1f} steps/s, "
        f"{100 * wait / total:.0f}% of the time waiting for data"
    )


if __name__ == "__main__":
    main()
