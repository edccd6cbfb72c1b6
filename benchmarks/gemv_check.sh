#!/usr/bin/env bash
# Device check of the decode GEMVs (issue 11 part 2: magic-number GPTQ GEMV, bf16 split-K GEMV, run-time choice), one
# call of about 6 minutes, most valuable first:
#   1. gptq_bench.py: every new kernel timed beside its baseline (old GPTQ kernel, cuBLAS), each checked in fp16 and
#      bf16 in the same run;
#   2. decode.py greedy bf16 and int4 twice: NANOQWEN_GEMV=cublas (the kernels before this work) and auto (the
#      run-time choice), so the end-to-end gain is a ratio of two rows measured in the same call;
#   3. the new kernels' tests compiled (bf16 too; the interpreter cannot check bf16 dots).
#
#   device: command "bash benchmarks/gemv_check.sh", carry [".bench"], timeout_s 420
#   (prepare .bench/ as for gpu_check.sh: mkdir -p .bench && cp ../shared/bench/*.py ../shared/qwen/Qwen-7B/qwen.tiktoken .bench/)
#   CPU rehearsal: bash benchmarks/gemv_check.sh --dry-run   (tiny sizes in the interpreter, no tests)
# Comes back in $OUT: gemv_check.log, bench/gptq_bench.json, decode_cublas/*.json, decode_auto/*.json.
set -u
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gemv_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NANOQWEN_HOME=${NANOQWEN_HOME:-/tmp/nanoqwen_home}
TINY=()
if [ "$DRY" = 1 ]; then export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1; TINY=(--tiny); fi
LOG=$OUT/gemv_check.log
: >"$LOG"
T0=$(date +%s)
FAILED=0

step() {  # step NAME CAP_S COMMAND...: output into the log, exit status and seconds after it
    local name=$1 cap=$2
    shift 2
    echo "=== $name (cap $cap s, at $(($(date +%s) - T0)) s): $*" | tee -a "$LOG"
    timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || FAILED=1
    echo "=== $name: exit $rc at $(($(date +%s) - T0)) s" | tee -a "$LOG"
}

echo "gemv_check commit $(git rev-parse --short HEAD 2>/dev/null || cat .bench/COMMIT 2>/dev/null)" | tee -a "$LOG"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
mkdir -p "$OUT/bench" "$OUT/decode_cublas" "$OUT/decode_auto"
OUT=$OUT/bench step gptq_bench 150 "$PY" benchmarks/gptq_bench.py ${TINY[@]+"${TINY[@]}"}
for mode in cublas auto; do
    OUT=$OUT/decode_$mode NANOQWEN_GEMV=$mode step "decode_$mode" 80 "$PY" benchmarks/decode.py --variants bf16,int4 \
        --modes greedy --no-fastref ${TINY[@]+"${TINY[@]}"}
done
[ "$DRY" = 1 ] || step gpu_tests 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gemv.py \
    tests/test_gptq_kernels.py -k "exactly or linear_gemv_vs or pick or rejects"
echo "=== done at $(($(date +%s) - T0)) s" | tee -a "$LOG"
exit $FAILED
