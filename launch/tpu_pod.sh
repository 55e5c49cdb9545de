#!/usr/bin/env bash
# Train on every worker of a TPU pod slice. JAX finds the other hosts itself (TPU metadata), so
# each worker runs the same command; each loads its own slice of every global batch.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/qwen2_5_7b_large_v2.py:stage1 \
#       --workdir gs://my-bucket/runs/stage1
# The workdir must be a folder every worker sees: a bucket (gs://, the workers' service account
# needs write access) or a shared mount. Manifests and recordings may be in a bucket too. The
# repository (with the hf_path model folders on every worker) is expected at ~/blspkd-jax.
# SIGTERM (a preemption notice) on any worker makes all of them save one agreed step and exit;
# running this command again resumes there.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
REPO=${REPO:-'~/blspkd-jax'}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO
  make venv
  .venv/bin/pip install -q 'jax[tpu]==0.10.2'
  .venv/bin/python -m blspkd_jax.train $ARGS"
