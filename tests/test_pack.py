"""Packed datasets (`python -m blspkd_jax.data.pack`): the same batches as the manifest they were
packed from, mixtures included; bad rows left out and listed; resumable; a damaged shard named."""

import json
import shutil

import numpy as np
import pytest
from test_manifest import write_bad_kinds
from test_pipeline import (  # noqa: F401 - the module's fixtures, imported
    _assert_same,
    _cfg,
    _epoch,
    _lines,
    _mixed_manifest,
    corpus,
    tok,
    two_sources,
)

from blspkd_jax.data import pack as pack_lib
from blspkd_jax.data import packed, peek
from blspkd_jax.data.manifest import DataError
from blspkd_jax.data.pipeline import eval_pipeline, train_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LENGTHS_AND_TEXT = ("too_short", "too_long", "empty_transcript", "long_transcript")


def _pipelines(make, spec, tok, **kw):  # noqa: F811
    return make(_cfg(spec, **kw), tok, process_index=0, process_count=1)


@pytest.mark.parametrize("features", [0, 80], ids=["audio", "features"])
def test_a_pack_gives_the_manifests_batches(corpus, two_sources, tok, tmp_path, features):  # noqa: F811
    out = tmp_path / "packed"
    summary = pack_lib.pack(str(corpus), str(out), examples_per_shard=4, features=features)
    assert summary == {"rows": 15, "shards": 4, "skipped": 0}
    assert packed.Pack(str(out)).store == ("features" if features else "audio")
    for make in (train_pipeline, eval_pipeline):
        want = _pipelines(make, corpus, tok)
        got = _pipelines(make, out, tok)
        n = 2 * want.batches_per_epoch if make is train_pipeline else None
        _assert_same(_epoch(got, n), _epoch(want, n))
    # In a mixture: the pack in place of its manifest changes nothing.
    big, small = two_sources
    small_packed = tmp_path / "small"
    pack_lib.pack(str(small), str(small_packed), examples_per_shard=2, features=features)
    want = _pipelines(train_pipeline, f"{big}:1,{small}:3", tok)
    got = _pipelines(train_pipeline, f"{big}:1,{small_packed}:3", tok)
    assert got.source_names == ["big", "small"]
    _assert_same(_epoch(got, 12), _epoch(want, 12))
    assert list(peek.peek(got, 12)) == list(peek.peek(want, 12))  # ids from rows.jsonl
    if features:  # features for another encoder: refused by name
        with pytest.raises(DataError, match=f"{out}: packed with 80-bin .* reads 128"):
            _pipelines(eval_pipeline, out, tok, n_mels=128)


def test_bad_rows_are_left_out_and_listed(corpus, tok, tmp_path):  # noqa: F811
    kinds = write_bad_kinds(tmp_path)
    path, expect = _mixed_manifest(tmp_path, corpus, kinds)
    out = tmp_path / "packed"
    summary = pack_lib.pack(str(path), str(out), examples_per_shard=3)
    listed = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    # Left out: rows that are malformed or whose audio is missing or cannot be decoded. Lengths
    # and transcripts are the training config's business: those rows are packed (and skipped by
    # the pipeline below, as from the manifest).
    left_out = [k for k in kinds if k not in LENGTHS_AND_TEXT]
    line_of = {kind: 5 + i for i, kind in enumerate(kinds)}  # after the 4 good rows
    assert sorted(r["line"] for r in listed) == sorted(line_of[k] for k in left_out)
    assert summary == {"rows": 4 + len(LENGTHS_AND_TEXT), "shards": 5, "skipped": len(left_out)}
    for r in listed:
        assert r["manifest"] == str(path) and expect[r["line"]][0] in r["reason"]
    p = _pipelines(eval_pipeline, out, tok)
    assert sorted(_lines(_epoch(p))) == [1, 2, 3, 4]  # the manifest's own line numbers


def test_an_interrupted_pack_resumes_and_keeps_finished_shards(corpus, tok, tmp_path, monkeypatch):  # noqa: F811
    whole = tmp_path / "whole"
    pack_lib.pack(str(corpus), str(whole), examples_per_shard=4)
    out = tmp_path / "packed"
    real = pack_lib._write_shard
    written = []

    def write_shard(i, *args):
        if i == 2 and not written.count(2):
            written.append(2)
            raise KeyboardInterrupt
        written.append(i)
        return real(i, *args)

    monkeypatch.setattr(pack_lib, "_write_shard", write_shard)
    with pytest.raises(KeyboardInterrupt):
        pack_lib.pack(str(corpus), str(out), examples_per_shard=4)
    assert not (out / packed.META).exists()
    with pytest.raises(DataError, match=f"{out}: not a finished pack"):
        _pipelines(eval_pipeline, out, tok)
    pack_lib.pack(str(corpus), str(out), examples_per_shard=4)
    assert written == [0, 1, 2, 2, 3]  # shards 0 and 1 were kept, not written again
    assert (out / packed.ROWS).read_text() == (whole / packed.ROWS).read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for i in range(4):
        assert (out / packed.shard_name(i)).read_bytes() == (
            whole / packed.shard_name(i)
        ).read_bytes()


def test_a_damaged_shard_is_named_and_its_rows_skipped(corpus, tok, tmp_path):  # noqa: F811
    out = tmp_path / "packed"
    pack_lib.pack(str(corpus), str(out), examples_per_shard=4)
    shutil.copy(out / packed.shard_name(0), out / packed.shard_name(1))  # 4 records, not its own
    (out / packed.shard_name(2)).write_bytes(b"\0" * 70000)
    work = tmp_path / "work"
    p = eval_pipeline(_cfg(out), tok, workdir=str(work), process_index=0, process_count=1)
    it = iter(p)
    batches = list(it)
    listed = [json.loads(x) for x in (work / "skipped.jsonl").read_text().splitlines()]
    assert it.dropped_at_decode == len(listed) == 8  # shards 1 and 2: lines 5-12
    assert sorted(r["line"] for r in listed) == list(range(5, 13))
    for r in listed:
        if r["line"] <= 8:  # shard 1 holds shard 0's records
            assert (
                f"{out}: corrupt shard (record {r['line'] - 1} holds manifest line" in r["reason"]
            )
        else:
            assert f"{out / packed.shard_name(2)}: corrupt shard" in r["reason"]
    np.testing.assert_array_equal(sorted(_lines(batches)), [1, 2, 3, 4, 13, 14, 15])
