#!/usr/bin/env bash
# The GPU benchmark runs behind the committed results (one H100/H200, bf16, SDPA, AdamW fused).
#
#   bash benchmarks/run_gpu.sh OUT_DIR [STAGE ...]          (default stage: headline)
#
# Needs only python3 with torch, transformers (and optionally matplotlib for bench.png; without it
# run `centrifuge bench --replot OUT_DIR/STAGE` later on a machine that has it). The package is used from
# the source tree (PYTHONPATH=src), nothing is installed or downloaded. Each stage writes 5 files to
# OUT_DIR/STAGE (results.json, results.csv, table.txt, bench.png, bench_secondary.png), prints its ratio table last, and
# stops measuring after its --time-limit so that one stage fits a 10-minute command with room to spare.
#
# Stages:
#   smoke     tiny model, 2 repetitions: checks the GPU code paths in ~1 minute
#   headline  TinyLlama-1.1B shape, 8×2048: every variant, keep sweep κ ∈ {1/4 … 7/8} (κ·8 whole, so the
#             ideal's backward batch is κ·B sequences), narrow shapes, activation checkpointing
#   seq       TinyLlama-1.1B shape, 2048 / 4096 / 16384 tokens per sequence at 16384 tokens per step, κ = 0.5
#   shapes    Llama-2-7B width (first 8 layers) and Qwen3-0.6B shape, 8×2048, κ = 0.5
#
# DEVICE=cpu runs a stage on the CPU (only `smoke` is small enough).
# Suggested calls (≤ 8 files each, so one stage per call): `... run_gpu.sh $OUT headline`,
# `... run_gpu.sh $OUT seq`, `... run_gpu.sh $OUT shapes`.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR [smoke|headline|seq|shapes ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(headline)

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-python3}

# Centrifuge's own variants run where `centrifuge.apply` exists (skipped with a note otherwise).
# Order matters under --time-limit: the baseline and the ceilings are measured first.
CEILINGS="dense,dense_compiled,dense_liger,loss_only,ideal,dense+ckpt,ideal+ckpt"
OURS="centrifuge,centrifuge_select,centrifuge_sdpa,centrifuge_eager,centrifuge+ckpt"
SHAPES="narrow,narrow_heads,ideal+narrow_heads"

rc=0
for stage in "${STAGES[@]}"; do
  case "$stage" in
    smoke)
      args=(--preset tiny --batch 4 --seq 256 --keep 0.5 --reps 2 --warmup 1
            --variants "$CEILINGS,$OURS,$SHAPES" --time-limit 120) ;;
    headline)
      args=(--preset tinyllama-1.1b --batch 8 --seq 2048 --keep 0.25 0.375 0.5 0.625 0.75 0.875
            --reps 10 --warmup 3 --variants "$CEILINGS,$OURS,$SHAPES"
            --time-limit 480) ;;
    seq)
      args=(--preset tinyllama-1.1b --seq 2048 4096 16384 --tokens 16384 --keep 0.5 --reps 10 --warmup 3
            --variants "$CEILINGS,$OURS,narrow_heads" --time-limit 480) ;;
    shapes)
      args=(--preset llama2-7b qwen3-0.6b --layers llama2-7b=8 --batch 8 --seq 2048 --keep 0.5 --reps 10
            --warmup 3 --variants "$CEILINGS,$OURS,$SHAPES" --time-limit 480) ;;
    *)
      echo "run_gpu.sh: unknown stage '$stage' (smoke, headline, seq, shapes)" >&2
      exit 2 ;;
  esac
  echo "### stage $stage: centrifuge bench ${args[*]} --out $OUT_DIR/$stage"
  "$PY" -m centrifuge bench --device "${DEVICE:-cuda}" "${args[@]}" --out "$OUT_DIR/$stage" || rc=$?
done
exit $rc
