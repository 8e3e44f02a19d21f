#!/usr/bin/env bash
# Run one training job on every host of a Cloud TPU pod slice (SPMD: same command everywhere;
# jax.distributed.initialize() finds the pod's topology by itself).
#   launch/tpu_pod.sh my-v5p-64 us-east5-a --config configs/llama_1b.py --workdir /mnt/bucket/llama1b
# First run copies this checkout to every worker and installs it. The workdir must be a path
# every worker sees (a bucket mounted with gcsfuse, a shared disk): gs:// URLs are refused.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE TRAIN_ARGS...}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE TRAIN_ARGS...}
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }
gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu":~/ctxext_jax --zone "$zone" --worker=all
ssh_all "cd ~/ctxext_jax && pip install -q -e . 'jax[tpu]>=0.10,<0.12'"
args=$(printf '%q ' "$@")
ssh_all "cd ~/ctxext_jax && python -m ctxext_jax.train --distributed=yes $args"
