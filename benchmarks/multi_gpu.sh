#!/usr/bin/env bash
# Multi-GPU run of `centrifuge train` (GitHub issues 11 and 23): the N-GPU gradient check against one GPU,
# a per-rank profiler summary, and throughput under torchrun for N GPUs.
#
#   bash benchmarks/multi_gpu.sh OUT_DIR [--ngpus "1 2 4 8"] [--shapes tinyllama,llama2-7b-8l]
#                                [--arms dense,tokens,tokens+neurons] [--steps 20] [--time-budget-s 540]
#                                [--stages grad,profile,train] [--profile-arms dense,tokens]
#                                [--run-timeout-s 300] [--no-gradcheck] [--smoke]
#
# Needs python3 with torch and transformers only (matplotlib optional); the package runs from the source
# tree (PYTHONPATH=src), nothing is installed or downloaded. Writes OUT_DIR/{results.json, results.csv,
# table.txt, log.txt} and OUT_DIR/multi_gpu.png where matplotlib imports, and prints the table last.
#
# 1. Gradient check (stage grad, first, so that it survives a short time budget): one torchrun job for N = 2
#    and one for the largest N; FSDP2 gradients of one train_step (gathered) against the same step on one
#    device over the same global batch, computed by rank 0 (TinyLlama shape cut to --grad-layers layers,
#    NCCL). Cases: dense, tokens (random mask known before the forward, bf16), tokens_after (self_loss top-k
#    chosen after the forward, fp32), tokens+neurons (bf16). Pass: every parameter's rel err < 2e-2 and
#    cosine > 0.999, the same kept count.
# 2. Profiler (stage profile): for --profile-arms at N = 2 and the largest N, `centrifuge train` with
#    torch.profiler over 3 steps after 4 warm-up ones; per rank: busy / idle ms per step, every collective's
#    kernel time, exposed time (not hidden behind compute) and count (all-gather, reduce-scatter, the
#    step's all-reduces), blocking host syncs; chrome traces under OUT_DIR/traces/ with --keep-traces.
# 3. Throughput (stage train): for every shape, every N of --ngpus, every arm, one `torchrun --standalone
#    --nproc-per-node N` job running `centrifuge train` (prepare_run + execute_run, built-in corpus,
#    --per-gpu-batch x --seq tokens per GPU, so the global batch is N x 8 x 2048 by default). Arms (all
#    FSDP2 unless named _ddp; benchmarks/multi_gpu.py arm_sets):
#      dense           tokens.keep_ratio=1.0
#      tokens          tokens.keep_ratio=0.5, random (mask before the forward), fast path
#      tokens_after    the same with self_loss selection (mask after the forward)
#      tokens+neurons  tokens + neurons.rate=0.5 constant (FSDP2 since issue 23)
#      *_tuned         train.fsdp_reshard_after_forward=false, train.fsdp_prefetch=1 (vs dense_tuned)
#      *_ddp           train.distributed=ddp (vs dense_ddp)
#    tokens/s: rank 0's metrics.jsonl (harmonic mean of the windows after the first); peak memory: every
#    rank's torch.cuda.max_memory_allocated after set-up. N=1 runs the same path as one process.
#    Shapes: tinyllama (TinyLlama-1.1B), llama2-7b-8l (Llama-2-7B width, 8 layers), any PRESET[-Kl].
#
# Every job has a timeout (min of --run-timeout-s and what is left of --time-budget-s); once the budget is
# spent the remaining jobs are skipped (marked in the table) and the report is written anyway.
# Exit status: 0, or 3 when a gradient check failed, 2 on bad arguments.
#
# --smoke: the whole path on the CPU (gloo): N in "1 2", the tiny preset, 4 steps of 2x64 tokens per rank
# (8 for the profiled tokens arm), gradient check on 2 ranks in fp32 (~1-2 minutes on 2 cores).
#
# Issue 23's device calls on an 8-GPU machine: see benchmarks/README.md, "Multi-GPU runs".
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; exit 2; fi
OUT_DIR=$1
shift
COMMAND="bash benchmarks/multi_gpu.sh $OUT_DIR $*"

NGPUS="" SHAPES="tinyllama,llama2-7b-8l" ARMS="dense,tokens,tokens+neurons" STEPS=20 LOG_EVERY=5 SEQ=2048
BATCH=8 KEEP=0.5 RATE=0.5 BUDGET=540 RUN_TIMEOUT=300 GRADCHECK=1 SMOKE=0 DEVICE=cuda
STAGES="grad,profile,train" PROFILE_ARMS="dense,tokens" PROFILE_STEPS=3 PROFILE_WAIT=3 KEEP_TRACES=0
GRAD_SHAPE=tinyllama GRAD_LAYERS=2 GRAD_SEQ=512 GRAD_ROWS=2 GRAD_TIMEOUT=240 MIN_RUN=45
while [ $# -gt 0 ]; do
  case "$1" in
    --ngpus) NGPUS=$2; shift ;;
    --shapes) SHAPES=$2; shift ;;
    --arms) ARMS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --log-every) LOG_EVERY=$2; shift ;;
    --seq) SEQ=$2; shift ;;
    --per-gpu-batch) BATCH=$2; shift ;;
    --keep) KEEP=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --time-budget-s) BUDGET=$2; shift ;;
    --run-timeout-s) RUN_TIMEOUT=$2; shift ;;
    --grad-layers) GRAD_LAYERS=$2; shift ;;
    --grad-seq) GRAD_SEQ=$2; shift ;;
    --no-gradcheck) GRADCHECK=0 ;;
    --stages) STAGES=$2; shift ;;
    --profile-arms) PROFILE_ARMS=$2; shift ;;
    --keep-traces) KEEP_TRACES=1 ;;
    --smoke) SMOKE=1 ;;
    *) echo "multi_gpu.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  [ -z "$NGPUS" ] && NGPUS="1 2"
  SHAPES=tiny STEPS=4 LOG_EVERY=1 SEQ=64 BATCH=2 GRAD_SHAPE=tiny GRAD_SEQ=32 MIN_RUN=10 RUN_TIMEOUT=300 GRAD_TIMEOUT=300
  PROFILE_ARMS=tokens
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
  AVAILABLE=2
else
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "multi_gpu.sh: nvidia-smi not found: this needs CUDA GPUs (use --smoke for the CPU path)" >&2; exit 2
  fi
  AVAILABLE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  if [ "$AVAILABLE" -lt 1 ]; then echo "multi_gpu.sh: nvidia-smi lists no GPU" >&2; exit 2; fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "multi_gpu.sh: torch sees no CUDA device (torch.cuda.is_available() is False)" >&2; exit 2
  fi
  if [ -z "$NGPUS" ]; then
    NGPUS=1
    for n in 2 4 8; do [ "$n" -le "$AVAILABLE" ] && NGPUS="$NGPUS $n"; done
  fi
fi
LIST=""
for n in $NGPUS; do
  if [ "$n" -gt "$AVAILABLE" ]; then echo "multi_gpu.sh: N=$n skipped: only $AVAILABLE GPU(s)" >&2
  else LIST="$LIST $n"; fi
done
NGPUS=${LIST# }
if [ -z "$NGPUS" ]; then echo "multi_gpu.sh: no N of --ngpus fits $AVAILABLE GPU(s)" >&2; exit 2; fi

mkdir -p "$OUT_DIR" || exit 2
LOG="$OUT_DIR/log.txt"
: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/multi_gpu.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
PARTS="$WORK/parts"
mkdir -p "$PARTS" "$WORK/runs" "$WORK/cache"
START=$SECONDS
REPORT_RESERVE=20

echo "### multi_gpu.sh: N in {$NGPUS}, shapes $SHAPES, arms $ARMS, $STEPS steps, ${BATCH}x$SEQ tokens per GPU," \
     "device $DEVICE, time budget ${BUDGET}s" | tee -a "$LOG"

# run_job KIND SHAPE ARM N ARGS...: one torchrun job with a timeout; one line in status.tsv.
run_job() {
  local kind=$1 shape=$2 arm=$3 n=$4 cap=$RUN_TIMEOUT
  shift 4
  [ "$kind" = grad ] && cap=$GRAD_TIMEOUT
  local left=$((BUDGET - (SECONDS - START) - REPORT_RESERVE))
  if [ "$left" -lt "$MIN_RUN" ]; then
    printf '%s\t%s\t%s\t%s\tskipped (time budget)\t0\n' "$kind" "$shape" "$arm" "$n" >>"$PARTS/status.tsv"
    echo "--- $kind $shape $arm N=$n: skipped (time budget: ${left}s left)" | tee -a "$LOG"
    return
  fi
  [ "$left" -lt "$cap" ] && cap=$left
  local job_log="$WORK/job.log" tic=$SECONDS rc status
  echo "--- $kind $shape $arm N=$n (timeout ${cap}s)" | tee -a "$LOG"
  timeout -k 20 "$cap" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" \
    benchmarks/multi_gpu.py "$@" --result "$PARTS/$kind-$shape-$arm-$n.json" >"$job_log" 2>&1
  rc=$?
  cat "$job_log" >>"$LOG"
  if [ "$rc" = 0 ]; then status=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timeout after ${cap}s"
  else status="failed (exit $rc)"; fi
  if [ "$rc" != 0 ] && [ -f "$PARTS/$kind-$shape-$arm-$n.json" ]; then status="$status, partial"; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$shape" "$arm" "$n" "$status" $((SECONDS - tic)) >>"$PARTS/status.tsv"
  grep '^\[multi_gpu\]' "$job_log"
  echo "    $status, $((SECONDS - tic)) s"
  if [ "$rc" != 0 ]; then echo "    last lines of its log:"; grep -v '^\[multi_gpu\]' "$job_log" | tail -n 15 | sed 's/^/    | /'; fi
}

stage() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# The N of the checks: 2 and the largest N the machine has (N=1 alone when it has one GPU).
MAXN=$(printf "%s\n" $NGPUS | sort -n | tail -1)
CHECK_NS=""
for n in 2 "$MAXN"; do
  if [ "$n" -le "$AVAILABLE" ] && [ "$n" -ge 2 ] && [[ " $CHECK_NS " != *" $n "* ]]; then CHECK_NS="$CHECK_NS $n"; fi
done
[ -z "$CHECK_NS" ] && CHECK_NS=1

if [ "$GRADCHECK" = 1 ] && stage grad; then
  for n in $CHECK_NS; do
    run_job grad "$GRAD_SHAPE" fsdp2 "$n" gradcheck --shape "$GRAD_SHAPE" --layers "$GRAD_LAYERS" \
      --seq "$GRAD_SEQ" --rows-per-rank "$GRAD_ROWS" --keep "$KEEP" --rate "$RATE" --device "$DEVICE"
  done
fi

if stage profile; then
  PSHAPE=${SHAPES%%,*}
  for n in $CHECK_NS; do
    for arm in ${PROFILE_ARMS//,/ }; do
      TRACE_ARGS=()
      [ "$KEEP_TRACES" = 1 ] && TRACE_ARGS=(--trace-dir "$OUT_DIR/traces/$PSHAPE-$arm-$n")
      run_job profile "$PSHAPE" "$arm" "$n" train --shape "$PSHAPE" --arm "$arm" \
        --steps $((PROFILE_WAIT + 1 + PROFILE_STEPS + 1)) --log-every 1 --seq "$SEQ" --per-gpu-batch "$BATCH" \
        --keep "$KEEP" --rate "$RATE" --device "$DEVICE" --run-dir "$WORK/runs/profile-$arm-$n" \
        --cache-dir "$WORK/cache" --profile-steps "$PROFILE_STEPS" --profile-wait "$PROFILE_WAIT" ${TRACE_ARGS[@]+"${TRACE_ARGS[@]}"}
      rm -rf "$WORK/runs/profile-$arm-$n"
    done
  done
fi

if stage train; then
  for shape in ${SHAPES//,/ }; do
    for n in $NGPUS; do
      for arm in ${ARMS//,/ }; do
        run_job train "$shape" "$arm" "$n" train --shape "$shape" --arm "$arm" --steps "$STEPS" \
          --log-every "$LOG_EVERY" --seq "$SEQ" --per-gpu-batch "$BATCH" --keep "$KEEP" --rate "$RATE" \
          --device "$DEVICE" --run-dir "$WORK/runs/$shape-$arm-$n" --cache-dir "$WORK/cache"
        rm -rf "$WORK/runs/$shape-$arm-$n"
      done
    done
  done
fi

echo "### report (all jobs took $((SECONDS - START)) s)" | tee -a "$LOG"
"$PY" benchmarks/multi_gpu.py report --parts "$PARTS" --out-dir "$OUT_DIR" --steps "$STEPS" --seq "$SEQ" \
  --per-gpu-batch "$BATCH" --keep "$KEEP" --rate "$RATE" --ngpus "$NGPUS" --shapes "$SHAPES" --arms "$ARMS" \
  --device-kind "$DEVICE" --command "$COMMAND"
exit $?
