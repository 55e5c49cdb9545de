#!/usr/bin/env bash
# Train on every worker of a TPU pod slice. JAX finds the other hosts itself (TPU metadata), so
# each worker runs the same command; each loads its own slice of every global batch.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/qwen2_5_7b_large_v2.py:stage1 \
#       --workdir /mnt/shared/runs/stage1
# The workdir must be a folder every worker sees (gs:// paths are not supported yet). The
# repository (with hf/ and data/ reachable from every worker) is expected at ~/blspkd-jax.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
REPO=${REPO:-'~/blspkd-jax'}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO
  make venv
  .venv/bin/pip install -q 'jax[tpu]==0.10.2'
  .venv/bin/python -m blspkd_jax.train $ARGS"
