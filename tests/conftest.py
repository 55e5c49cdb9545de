"""Shared test setup: JAX on CPU in float32 with full matmul precision, so parity tests against
PyTorch measure our code, not XLA's default reduced-precision CPU dots; one compilation cache for
the session and the subprocesses it starts (the same programs are compiled by many tests and
training runs; the cache is keyed on the program, so it changes no result), removed at exit."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="blspkd-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """(workdir, assets dir, final params) of one tiny trained run (`tiny.build_tiny_run`), shared
    by every test file that needs a trained workdir (tests only read it). Under pytest-xdist the
    first worker to ask builds it in the session's shared temporary folder and the others wait
    for it and load it, instead of training it once per worker."""
    import numpy as np
    from filelock import FileLock
    from tiny import build_tiny_run

    from blspkd_jax.training import optim

    if worker_id == "master":  # no xdist: this process is the whole session
        return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))
    root = tmp_path_factory.getbasetemp().parent / "tiny_run"
    params = root.with_suffix(".params.npz")  # written last: its presence means "built"
    with FileLock(str(root) + ".lock"):
        if not params.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed in another worker
            root.mkdir()
            workdir, _, final = build_tiny_run(root)
            np.savez(str(params) + ".tmp.npz", **optim.flatten(final))
            os.replace(str(params) + ".tmp.npz", params)
    with np.load(params) as data:
        final = optim.unflatten({k: data[k] for k in data.files})
    return root / "workdir", root, final
