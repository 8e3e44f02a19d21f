#!/usr/bin/env bash
# Issue 11 on one GPU, one script (<= 4 min on an H200): JSON lines in $OUT/cp.jsonl.
#   (a) cuDNN / blockwise / packed-document kernels against the dense reference, forward and
#       gradients, and the packed kernels timed (benchmarks/gpu_kernels.py);
#   (c) context_parallel.py --shards 1 rows (compile + timed steps) at a few lengths;
#   (b) the longest 336M training length on 1 GPU per kernel (blockwise, cudnn), remat
#       $REMAT, from compiled memory (benchmarks/context_parallel.py --find-max-length).
#       blockwise: compile only (a pure-JAX step at ~10^6 tokens would not fit the time);
#       cudnn: packed rows need its dense mask, refused above 8192, so its max is that, + 1 step.
# Time limits: a 55 s, c 60 s, b 75 + 40 s (230 s); every line is appended as it is printed.
# SMOKE=1 shrinks everything to run on a CPU in about a minute.
# Each section has its own time limit, prints a header and the script goes on when one fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_cp}
mkdir -p "$OUT"
J="$OUT/cp.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
REMAT=${REMAT:-residual}
if [ "${SMOKE:-0}" = 1 ]; then
    export SMOKE=1
    MODEL=small; MEM=(--device-memory 0.1); STEP=1024; PROBES=1024,2048; LENGTHS=1024
    T_A=120; T_B=150; T_C=90; CUDNN=(--probe-lengths 1024 --length-step 1024)
else
    MODEL=336m; MEM=(); STEP=32768; PROBES=65536,262144; LENGTHS=8192,32768
    T_A=55; T_B=75; T_C=60; CUDNN=(--probe-lengths 8192 --length-step 4096)
fi
section() { echo; echo "=== $* ($(date -u +%T))"; }
status() { if [ "$1" = 124 ]; then echo "--- timed out"; else echo "--- rc $1"; fi; }
collect() { grep --line-buffered '^{' | tee -a "$J"; }
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/devices.txt"

section "a: kernels vs the dense reference; packed-document kernels timed"
timeout "$T_A" python benchmarks/gpu_kernels.py --out "$J"
status $?

section "c: context_parallel.py --shards 1 rows (auto kernel), remat $REMAT"
timeout "$T_C" python benchmarks/context_parallel.py --model "$MODEL" --shards 1 --remat "$REMAT" \
    --lengths "$LENGTHS" --repeats 2 --json | collect
status "${PIPESTATUS[0]}"

section "b: longest $MODEL training length on 1 device, blockwise, remat $REMAT (compile only)"
timeout "$T_B" python benchmarks/context_parallel.py --model "$MODEL" --shards 1 --remat "$REMAT" \
    --attention-impl blockwise --find-max-length --no-run --json "${MEM[@]}" \
    --length-step "$STEP" --probe-lengths "$PROBES" | collect
status "${PIPESTATUS[0]}"

section "b: longest $MODEL training length on 1 device, cudnn (packed rows: dense-mask limit) + 1 step"
timeout 40 python benchmarks/context_parallel.py --model "$MODEL" --shards 1 --remat "$REMAT" \
    --attention-impl cudnn --find-max-length --repeats 1 --json "${MEM[@]}" "${CUDNN[@]}" | collect
status "${PIPESTATUS[0]}"

section "done: $(grep -c . "$J") JSON lines in $J"
