#!/usr/bin/env bash
# One device call: correctness on the GPU first, then every benchmark with its baseline in the same run.
# Prepare on the CPU machine:  mkdir -p .bench && cp ../shared/bench/*.py .bench/ && cp ../shared/qwen/Qwen-7B/qwen.tiktoken .bench/
# Then two device calls on the same warm machine, carry [".bench"], timeout_s 400 each:
#   bash benchmarks/gpu_check.sh kernels    (GPU tests, ceilings, attention kernels, GPTQ matmuls: about 5 minutes)
#   bash benchmarks/gpu_check.sh engine     (ceilings again, decode, int8 KV, throughput vs HF: about 5 minutes)
# ("all" runs both). The golden data does not travel (over 64 MiB), so golden tests run on the CPU only.
# Everything lands in $OUT (logs + JSON); the last lines of the log are the summary tables.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NANOQWEN_HOME=/tmp/nanoqwen_home
LOG="$OUT/gpu_check_${1:-all}.log"
t0=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - t0 ))s)" | tee -a "$LOG"; }
run() { local limit=$1; shift; timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$LOG"; }

export PYTHONPATH=$PWD  # the device image has torch, triton, tiktoken, safetensors, transformers, pytest; no network
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

PART=${1:-all}
if [ "$PART" = kernels ] || [ "$PART" = all ]; then
step "kernel tests on the GPU (bf16 included)"
run 120 python3 -m pytest -q -x tests/test_kernels.py tests/test_gptq_kernels.py tests/test_kv_int8_kernels.py
step "ceilings"
run 45 env BUDGET_S=40 python3 .bench/ceilings.py
step "attention kernels vs SDPA and copy bandwidth"
run 75 python3 benchmarks/kernels.py
step "GPTQ matmul vs bf16 and torch int4 (tinygemm anchor)"
run 50 python3 benchmarks/gptq_bench.py
run 30 env M=16 python3 .bench/gemv_anchor.py
fi
if [ "$PART" = engine ] || [ "$PART" = all ]; then
[ "$PART" = engine ] && { step "ceilings (same call as the engine numbers)"; run 45 env BUDGET_S=40 python3 .bench/ceilings.py; }
step "batch-1 decode: bf16, int4, int8 vs roofline and fastref"
run 110 python3 benchmarks/decode.py --variants bf16,int4,int8 --new-tokens 128
step "int8 KV"
run 45 python3 benchmarks/kv_int8.py
step "throughput, 256 requests vs HF static batches"
run 130 python3 benchmarks/throughput.py --num-requests 256 --output-len 32 256 --prompt-len 32 512
fi
step "done"
