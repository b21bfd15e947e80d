#!/usr/bin/env bash
# detoxrl alone on a CUDA GPU: seconds per iteration at the benchmark's full settings, float32 vs
# bfloat16 base weights (model.dtype), PPO and RLOO, and the log-prob drift of bf16 (bf16_drift.py).
# One JSON line per run is appended to ${1:-benchmarks/results/gpu.jsonl}, stderr to the same name
# with .log. Needs detoxrl importable (installed, or PYTHONPATH=src).
#
#   bash benchmarks/gpu.sh [OUT_FILE] [WARMUP] [ITERATIONS]
set -u
out=${1:-benchmarks/results/gpu.jsonl}
warmup=${2:-1}
iterations=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
models=$(mktemp -d)
mkdir -p "$(dirname "$out")"
log=${out%.jsonl}.log
status=0
for setting in causal seq2seq; do
  python3 "$here/sides/_common.py" prepare --setting "$setting" --out "$models/$setting" >/dev/null 2>>"$log" || exit 1
  python3 "$here/bf16_drift.py" --setting "$setting" --model-dir "$models/$setting" --device cuda 2>>"$log" \
    | tail -n 1 | tee -a "$out"
  algorithms="ppo rloo"
  [ "$setting" = seq2seq ] && algorithms="ppo"
  for algorithm in $algorithms; do
    for dtype in float32 bfloat16; do
      python3 "$here/sides/detoxrl_side.py" --setting "$setting" --model-dir "$models/$setting" --device cuda \
        --dtype "$dtype" --algorithm "$algorithm" --warmup "$warmup" --iterations "$iterations" 2>>"$log" \
        | tail -n 1 | tee -a "$out" || status=1
    done
  done
done
rm -rf "$models"
exit $status
