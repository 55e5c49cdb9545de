"""`python -m blspkd_jax.data.peek --config C [--config.key=value ...] --batches N`: the first N
batches a training run with this config would read, one JSON line each:
`{"ids": [...], "sources": [...], "frames": F, "tokens": L}`: each real example's row id and
source name (a mixture's), and the batch's bucket shape. `--eval` reads the eval manifest
instead; `--process P --processes N` shows process P's slice of a multi-host run. Reads
manifests and audio (to build the batches exactly as training does), no weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator

from blspkd_jax.data import packed
from blspkd_jax.data.manifest import read_manifest
from blspkd_jax.data.pipeline import DataPipeline


def peek(pipeline: DataPipeline, batches: int) -> Iterator[dict]:
    """The first `batches` batches of `pipeline`, described."""
    ids: dict[tuple[int, int], str] = {}
    for s, path in enumerate(pipeline.index.manifests):
        if packed.is_packed(path):  # rows.jsonl: one line per record, with the manifest's line
            rows, _ = read_manifest(packed.Pack(path).rows_file)
            ids.update({(s, int(r.fields["line"])): r.id for r in rows})
        else:
            rows, _ = read_manifest(path)
            ids.update({(s, r.line): r.id for r in rows})
    it = iter(pipeline)
    try:
        for batch in itertools.islice(it, batches):
            real = batch["example_mask"]
            pairs = zip(batch["source"][real], batch["line"][real], strict=True)
            pairs = [(int(s), int(x)) for s, x in pairs]
            yield {
                "ids": [ids[p] for p in pairs],
                "sources": [pipeline.source_names[s] for s, _ in pairs],
                "frames": int(batch["features"].shape[-1]),
                "tokens": int(batch["input_ids"].shape[-1]),
            }
    finally:
        it.close()


def main(argv=None) -> int:
    from blspkd_jax import cli

    # The data options are resolved from the training config exactly as training resolves them
    # (frame buckets and mel bins follow the encoder): the one place this layer reads the one above.
    from blspkd_jax.training import build
    from blspkd_jax.training import config as config_lib

    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = config_lib.split_argv(argv)
    ap = argparse.ArgumentParser(prog="python -m blspkd_jax.data.peek", description=__doc__)
    ap.add_argument("--config", required=True, help="config file, path.py[:arg]")
    ap.add_argument("--batches", type=int, default=4, help="how many batches (default 4)")
    ap.add_argument("--eval", action="store_true", help="the eval manifest, in its order")
    ap.add_argument("--process", type=int, default=0, help="this process's slice (default 0)")
    ap.add_argument("--processes", type=int, default=1, help="of this many (default 1)")
    args = ap.parse_args(rest)

    def body() -> int:
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, overrides)
        key = "data.eval_manifest" if args.eval else "data.train_manifest"
        if not config.data[key.split(".")[1]]:
            raise config_lib.ConfigError(f"{key} is empty: nothing to peek at")
        model_cfg = build.model_config(config)
        data_cfg = build.data_config(config, model_cfg, args.processes)
        pipeline = DataPipeline(
            data_cfg,
            build.tokenizer_path(config),
            data_cfg.eval_manifest if args.eval else data_cfg.train_manifest,
            train=not args.eval,
            process_index=args.process,
            process_count=args.processes,
            key=key,
        )
        for line in peek(pipeline, args.batches):
            print(json.dumps(line, ensure_ascii=False), flush=True)
        return 0

    return cli.run(body, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
