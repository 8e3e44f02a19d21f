#!/usr/bin/env bash
# One prepared accelerator session: the figures the README quotes for a GPU, in one command.
#
#   bash benchmarks/gpu.sh                 # on a GPU: ~6 min on one H200
#   SMOKE=1 bash benchmarks/gpu.sh         # the same sections at toy sizes on a CPU (~2 min)
#
# Sections (each under its own time limit; a failing one is reported and the rest still run):
#   env        devices and package versions
#   attention  benchmarks/attention.py: blockwise and cuDNN (and dense xla where it fits), bf16,
#              the 336M shape's heads (16 query / 4 KV heads of 64), causal and sliding window
#   train      benchmarks/train_step.py --shape 336m: step time, tokens/s, MFU and peak bytes
#              per kernel and length; transformers' Llama of the same shape beside it
#   decode     benchmarks/decode.py --shape 336m: prefill tok/s and decode ms/token against
#              context, transformers' generate (sdpa) beside it
#   trainer    the first README command's run (configs/tiny.py) end to end on the device, short
#   extra      any command in $EXTRA (e.g. benchmarks/gpu_cp.sh), run last
# Output: $OUT/gpu.log (everything) and $OUT/*.jsonl (machine-readable rows); OUT defaults to
# runs/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# JAX and torch share the GPU in the comparison rows: allocate on demand, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec > >(tee -a "$OUT/gpu.log") 2>&1

section() { # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: rc=$? in $((SECONDS - t0))s"
}

if [[ ${SMOKE:-0} == 1 ]]; then
  shape=tiny; att_lengths=256; xla_lengths=256; heads=(--heads 4 --kv-heads 2 --head-dim 32)
  train_runs=("256:blockwise"); compare_length=256; dec_lengths=64; new_tokens=8; window=64
  trainer_steps=20
else
  shape=336m; att_lengths=4096,16384,65536; xla_lengths=4096,16384
  heads=(--heads 16 --kv-heads 4 --head-dim 64)
  train_runs=("4096,32768:cudnn" "32768:blockwise"); compare_length=4096
  dec_lengths=4096,32768; new_tokens=128; window=4096
  trainer_steps=300
fi

section env 60 bash -c 'nvidia-smi -L 2>/dev/null; python3 -c "
import jax, flax, optax, orbax.checkpoint as ocp
print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"'

att=(python3 benchmarks/attention.py --dtype bfloat16 "${heads[@]}" --repeats 3)
section attention_causal 150 "${att[@]}" --lengths "$att_lengths" --impls blockwise,cudnn
section attention_xla 60 "${att[@]}" --lengths "$xla_lengths" --impls xla
section attention_window 90 "${att[@]}" --lengths "$att_lengths" --impls blockwise,cudnn \
  --window "$window"

for run in "${train_runs[@]}"; do
  section "train_${run#*:}" 240 python3 benchmarks/train_step.py --shape "$shape" \
    --lengths "${run%%:*}" --attention_impl "${run#*:}" --remat full --steps 3 --json \
    | tee -a "$OUT/train.jsonl"
done
section train_vs_hf 150 python3 benchmarks/train_step.py --shape "$shape" \
  --lengths "$compare_length" --attention_impl auto --remat full --steps 3 --json --compare hf \
  | tee -a "$OUT/train.jsonl"

section decode 240 python3 benchmarks/decode.py --shape "$shape" --lengths "$dec_lengths" \
  --new_tokens "$new_tokens" --repeats 3 --torch

section trainer 150 python3 -m ctxext_jax.train --config configs/tiny.py \
  --workdir "${TMPDIR:-/tmp}/gpu_tiny_run" --config.train.steps="$trainer_steps"

if [[ -n ${EXTRA:-} ]]; then
  section extra 300 bash -c "$EXTRA"
fi
echo "=== done in ${SECONDS}s"
