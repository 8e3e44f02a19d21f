#!/usr/bin/env bash
# N processes of one job on this machine, joined by jax.distributed over 127.0.0.1:
# the same SPMD program a pod runs, for trying multi-host code on one box.
#   launch/local.sh 2 --config configs/tiny.py --workdir runs/tiny-2proc
# On CPU each process gets DEVICES_PER_PROCESS fake devices (default 4); on a GPU box, set
# CUDA_VISIBLE_DEVICES per process instead by exporting GPUS_PER_PROCESS.
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES TRAIN_ARGS...}
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    first=$((i * GPUS_PER_PROCESS))
    export CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))
  else
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
  fi
  python -m ctxext_jax.train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" &
  pids+=($!)
done
# A preemption notice (SIGTERM) or Ctrl-C reaches every process: they agree on a step, save
# it and exit 0; the same command resumes.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid" && break
    code=$?
    kill -0 "$pid" 2>/dev/null && continue  # `wait` returned for the trap; the process runs on
    status=$code
    break
  done
done
exit $status
