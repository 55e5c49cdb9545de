#!/usr/bin/env bash
# One process on this machine, all its devices in one mesh.
#   launch/local.sh --config configs/tiny.py --workdir runs/tiny [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m blspkd_jax.train "$@"
