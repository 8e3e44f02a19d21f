#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice (SPMD: the same command on all workers;
# jax.distributed.initialize() finds the pod's topology by itself).
#
#   ACCELERATOR_TYPE=v5litepod-64 launch/tpu_pod.sh my-pod us-west4-a \
#       --config configs/llama_1b.py --workdir /mnt/gcs/runs/llama1b
#
# 1. Reuses the queued resource (or plain TPU VM) named TPU_NAME, or creates a queued resource
#    (needs ACCELERATOR_TYPE; SPOT=1 for spot capacity) and waits until it is ACTIVE. One that
#    was preempted (SUSPENDED / FAILED) is deleted and created again.
# 2. Copies this checkout (tracked and untracked files, not runs/) to every worker and installs
#    it with jax[tpu].
# 3. Starts the trainer on all workers (--worker=all), detached from the ssh session: the log of
#    each worker is ~/ctxext_jax/train.log, its pid ~/ctxext_jax/train.pid.
# 4. Streams host 0's log until the run ends (Ctrl-C stops the streaming only, not the run).
#
# The workdir must be a path every worker sees (a bucket mounted with gcsfuse, a shared disk):
# checkpoints and metrics.jsonl go there. Rerunning the same command after a preemption
# recreates the slice if needed and resumes from the latest checkpoint.
# Options (environment): ACCELERATOR_TYPE, RUNTIME_VERSION (default v2-alpha-tpuv5-lite),
# PROJECT, SPOT=1, POLL_SECONDS (default 30), JAX_SPEC (default 'jax[tpu]>=0.10,<0.12').
set -euo pipefail
usage="usage: [ACCELERATOR_TYPE=v5litepod-64] launch/tpu_pod.sh TPU_NAME ZONE TRAIN_ARGS..."
tpu=${1:?$usage}
zone=${2:?$usage}
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
project=(${PROJECT:+--project "$PROJECT"})
poll=${POLL_SECONDS:-30}

qr_state() {
  gcloud compute tpus queued-resources describe "$tpu" --zone "$zone" "${project[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

# ----------------------------------------------------------------------- 1. the slice
state=$(qr_state)
if [[ -z "$state" ]] && gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" \
  "${project[@]}" >/dev/null 2>&1; then
  state=VM
fi
case "$state" in
  SUSPENDED | FAILED | SUSPENDING)
    echo "queued resource $tpu is $state (preempted?): deleting it and creating it again"
    gcloud compute tpus queued-resources delete "$tpu" --zone "$zone" "${project[@]}" \
      --force --quiet
    state="" ;;
esac
if [[ -z "$state" ]]; then
  if [[ -z "${ACCELERATOR_TYPE:-}" ]]; then
    echo "error: no TPU or queued resource named $tpu in $zone; set ACCELERATOR_TYPE" \
      "(e.g. ACCELERATOR_TYPE=v5litepod-64) to create one." >&2
    exit 2
  fi
  echo "creating queued resource $tpu ($ACCELERATOR_TYPE) in $zone"
  gcloud compute tpus queued-resources create "$tpu" --node-id "$tpu" --zone "$zone" \
    "${project[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
    --runtime-version "${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}" ${SPOT:+--spot}
  state=$(qr_state)
fi
while [[ "$state" != ACTIVE && "$state" != VM ]]; do
  case "$state" in
    FAILED | SUSPENDED) echo "error: queued resource $tpu is $state." >&2; exit 1 ;;
  esac
  echo "waiting for $tpu: ${state:-not visible yet}"
  sleep "$poll"
  state=$(qr_state)
done

ssh_tpu() {  # ssh_tpu WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker="$1" \
    --command "$2"
}

# ----------------------------------------------------------------------- 2. copy and install
archive=$(mktemp -t ctxext_jax.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
if git -C "$repo" rev-parse >/dev/null 2>&1; then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | tar -czf "$archive" --null -T -)
else
  tar -czf "$archive" -C "$repo" --exclude=./runs --exclude=./.git .
fi
gcloud compute tpus tpu-vm scp "$archive" "$tpu":ctxext_jax.tar.gz --zone "$zone" \
  "${project[@]}" --worker=all
ssh_tpu all "mkdir -p ~/ctxext_jax && tar -xzf ~/ctxext_jax.tar.gz -C ~/ctxext_jax && \
cd ~/ctxext_jax && pip install -q -e . '${JAX_SPEC:-jax[tpu]>=0.10,<0.12}'"

# ----------------------------------------------------------------------- 3. start on all hosts
args=$(printf '%q ' "$@")
ssh_tpu all "cd ~/ctxext_jax && nohup python -m ctxext_jax.train --distributed=yes $args \
> ~/ctxext_jax/train.log 2>&1 < /dev/null & echo \$! > ~/ctxext_jax/train.pid"

if [[ "$state" == VM ]]; then
  cleanup="gcloud compute tpus tpu-vm delete $tpu --zone $zone --quiet"
else
  cleanup="gcloud compute tpus queued-resources delete $tpu --zone $zone --force --quiet"
fi
cat <<EOF
Started on every worker of $tpu. Host 0's log follows until the run ends (Ctrl-C stops
following, not the run).
  log of worker N:  gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=N --command 'tail -F ~/ctxext_jax/train.log'
  stop (saves a checkpoint, exits 0 on every host; rerun this command to resume):
    gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=all --command 'kill -TERM \$(cat ~/ctxext_jax/train.pid)'
  clean up (deletes the slice; checkpoints in the workdir stay):
    $cleanup
EOF

# ----------------------------------------------------------------------- 4. follow host 0
# `--pid`: the stream ends when the run does, so lines of this script can run points in turn.
ssh_tpu 0 "tail -n +1 -F --pid=\$(cat ~/ctxext_jax/train.pid) ~/ctxext_jax/train.log" || true
