#!/usr/bin/env bash
# One-shot check of the log-prob kernels on a lent GPU (no network needed).
#
#   OUT=/some/dir bash experiments/gpu_check.sh      # run from anywhere
#
# 1. environment (jax version, devices, nvidia-smi)        -> $OUT/env.txt
# 2. kernel tests COMPILED on the GPU (Pallas via Triton,
#    CPO_JAX_PALLAS_INTERPRET=0; sharding tests skip on
#    1 device, they run on the CPU mesh in CI)              -> $OUT/tests_gpu.txt
# 3. benchmark at the issue's accelerator shapes
#    (logits N=32768 V=128256; hidden N=8192 D=4096
#    V=128256; bf16; median of 20 runs)                     -> $OUT/bench_accel.{txt,json}
# 4. optional (SWEEP=1): Triton tile sweep, logits path     -> $OUT/sweep_*.txt
# Every step runs under `timeout`; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
# The naive reference at N=32768, V=128256 needs ~50 GB: let XLA use most of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# Overridable only for a dry run of this script on CPU:
#   JAX_PLATFORMS=cpu PRESET=cpu CPO_JAX_PALLAS_INTERPRET=1 bash experiments/gpu_check.sh
PRESET=${PRESET:-accel}
INTERPRET=${CPO_JAX_PALLAS_INTERPRET:-0}
: > "$OUT/status.txt"
status() { echo "$1 rc=$2" | tee -a "$OUT/status.txt"; }

{
  date -u
  python -c "import jax, sys; print('jax', jax.__version__, 'python', sys.version.split()[0]); print(jax.devices())"
  nvidia-smi || true
} > "$OUT/env.txt" 2>&1
status env $?

if python -c "import pytest" 2>/dev/null; then
  CPO_JAX_PALLAS_INTERPRET=$INTERPRET timeout 240 python -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_memory.py tests/test_kernels_lowering.py tests/test_kernels_sharding.py \
    > "$OUT/tests_gpu.txt" 2>&1
  status tests_gpu $?
else
  echo "pytest not installed: tests skipped" > "$OUT/tests_gpu.txt"
  status tests_gpu skipped
fi

timeout 330 python -m experiments.bench_logprobs --preset "$PRESET" --runs 20 \
  --out "$OUT/bench_accel.json" > "$OUT/bench_accel.txt" 2>&1
status bench_accel $?

if [ "${SWEEP:-0}" = "1" ]; then
  for bn in 1 4 16; do
    for bv in 1024 4096; do
      timeout 120 python -m experiments.bench_logprobs --preset "$PRESET" --paths logits \
        --impls pallas --block-n "$bn" --block-v "$bv" --out "$OUT/sweep_${bn}_${bv}.json" \
        > "$OUT/sweep_${bn}_${bv}.txt" 2>&1
      status "sweep_${bn}_${bv}" $?
    done
  done
fi
