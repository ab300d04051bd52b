#!/usr/bin/env bash
# Issue 20's GPU run: ratios against the strongest dense (eager / compiled layers / Liger-Kernel), one call.
#
#   bash benchmarks/run_liger.sh OUT_DIR
#
# Needs python3 with torch, transformers, liger-kernel (carried as a wheel), pytest; PYTHONPATH with src.
# Writes OUT_DIR/{headline,repeat2,repeat3,seq16k,llama7b}.json (centrifuge bench results.json; redraw tables
# and plots with `centrifuge bench --replot`), gpu_tests.txt, and prints every table.
set -uo pipefail
OUT=${1:?usage: run_liger.sh OUT_DIR}
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
bench() {  # name, args...
  local name=$1; shift
  echo "### $name: centrifuge bench $*"
  timeout 200 "$PY" -m centrifuge bench --no-plot --reps 10 --warmup 3 --out "$TMP/$name" "$@" 2>&1 \
    | grep -v "could not be imported" | sed -n '/^== /,$p'
  cp "$TMP/$name/results.json" "$OUT/$name.json" 2>/dev/null
}
HERE=$(cd "$(dirname "$0")/.." && pwd)
timeout 120 "$PY" -m pytest -q -p no:cacheprovider "$HERE/tests/integrations/test_liger_gpu.py" 2>&1 | tail -5 \
  | tee "$OUT/gpu_tests.txt"
# headline, then two more processes of the same ratios (the spread), 8×2048 TinyLlama shape
bench headline --preset tinyllama-1.1b --batch 8 --seq 2048 --keep 0.25 0.5 1.0 \
  --variants dense,dense_compiled,dense_liger,centrifuge --time-limit 170
for r in 2 3; do
  bench repeat$r --preset tinyllama-1.1b --batch 8 --seq 2048 --keep 0.25 0.5 1.0 \
    --variants dense,dense_liger,centrifuge --time-limit 150
done
bench seq16k --preset tinyllama-1.1b --batch 1 --seq 16384 --keep 0.5 1.0 \
  --variants dense,dense_compiled,dense_compiled_model,dense_liger,centrifuge --time-limit 170
bench llama7b --preset llama2-7b --layers llama2-7b=8 --batch 8 --seq 2048 --keep 0.5 \
  --variants dense,dense_liger,centrifuge --time-limit 120
