#!/usr/bin/env bash
# The one device call: every benchmark with its baselines and correctness checks in the same run, most valuable
# numbers first, inside a fixed time budget.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine: all steps
#   bash benchmarks/gpu_check.sh decode       # only the named steps (in this file's order)
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every step at --tiny sizes (tests/test_benchmarks.py)
#
# Prepare on the CPU machine first (the baselines and the vocabulary travel in .bench/, which git ignores):
#   mkdir -p .bench && cp ../shared/bench/*.py ../shared/qwen/Qwen-7B/qwen.tiktoken .bench/ && git rev-parse HEAD > .bench/COMMIT
# then one device call: command "bash benchmarks/gpu_check.sh", carry [".bench"], timeout_s 480.
#
# Budget: steps run in order, each under `timeout` with its cap; none starts after DEADLINE_S (default 420 s) and
# none runs past it (a step gets min(cap, time left), or is skipped when under MIN_STEP_S is left). Each benchmark's
# defaults are this check's sizes; --dry-run appends --tiny, only lists a pytest step's files, skips GPU-only steps.
# Results: $OUT/gpu_check.log (all output) and $OUT/results.json (every benchmark's JSON by file name, and each
# step's status), both rewritten after every step; every benchmark rewrites its own JSON after each variant, so a
# step killed at its cap keeps what it had measured. Two files: the device returns at most 8.
set -u
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
ONLY=" $* "
DEADLINE_S=${DEADLINE_S:-420}
MIN_STEP_S=${MIN_STEP_S:-20}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NANOQWEN_HOME=${NANOQWEN_HOME:-/tmp/nanoqwen_home}
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1  # the CPU paths, even where a GPU is; tiny ops: one thread
elif [ ! -f .bench/fastref.py ] || [ ! -f .bench/qwen.tiktoken ]; then
    echo "gpu_check: .bench/ lacks fastref.py or qwen.tiktoken: prepare it on the CPU machine (see the top of $0)" >&2
    exit 2
fi
JSON_DIR=$(mktemp -d)  # where the benchmarks write (their OUT); merged into $OUT/results.json
LOG=$OUT/gpu_check.log
: >"$LOG"
T0=$(date +%s)
FAILED=0
elapsed() { echo $(($(date +%s) - T0)); }
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || cat .bench/COMMIT 2>/dev/null || echo unknown)

merge() {  # $OUT/results.json <- the benchmarks' JSON files and the steps' status lines
    "$PY" - "$JSON_DIR" "$OUT/results.json" "$COMMIT" "$DRY" "$DEADLINE_S" <<'EOF'
import json, os, sys
from pathlib import Path
src, dst, commit, dry, deadline = sys.argv[1:]
res = {"commit": commit, "dry_run": dry == "1", "deadline_s": int(deadline), "steps": [], "results": {}}
for line in Path(src, "steps.tsv").read_text().splitlines() if Path(src, "steps.tsv").is_file() else []:
    name, cap, rc, seconds, status = line.split("\t")
    res["steps"].append({"name": name, "cap_s": int(cap), "rc": int(rc), "seconds": int(seconds), "status": status})
for f in sorted(Path(src).glob("*.json")):
    try:
        res["results"][f.stem] = json.loads(f.read_text())
    except ValueError as e:
        res["results"][f.stem] = {"unreadable": str(e)}
Path(dst + ".part").write_text(json.dumps(res, indent=1))
os.replace(dst + ".part", dst)
EOF
}

record() {  # record NAME CAP RC SECONDS STATUS
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$JSON_DIR/steps.tsv"
    echo "=== $1: $5 ($4 s)" | tee -a "$LOG"
    merge
}

step() {  # step NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less if the deadline is nearer)
    local name=$1 cap=$2
    shift 2
    [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
    local left=$((DEADLINE_S - $(elapsed)))
    [ "$cap" -le "$left" ] || cap=$left
    if [ "$cap" -lt "$MIN_STEP_S" ]; then record "$name" "$cap" 0 0 "skipped: deadline"; return 0; fi
    local args=("$@")
    if [ "$DRY" = 1 ]; then
        case " $* " in  # a pytest step: its test files must exist (the CPU suite runs them anyway)
            *" pytest "*) args=(ls); for a in "$@"; do [[ $a == *.py ]] && args+=("$a"); done ;;
            *) args+=(--tiny) ;;
        esac
    fi
    echo "=== $name (cap ${cap} s, at $(elapsed) s): ${args[*]}" | tee -a "$LOG"
    local t=$(date +%s)
    OUT=$JSON_DIR timeout -k 5 "$cap" "${args[@]}" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]} status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out"; elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
    [ "$status" = ok ] || FAILED=1
    record "$name" "$cap" "$rc" $(($(date +%s) - t)) "$status"
}

gpu_step() {  # a step that has no CPU mode: skipped in the dry run
    if [ "$DRY" = 1 ]; then record "$1" "$2" 0 0 "skipped: GPU only"; else step "$@"; fi
}

merge
echo "gpu_check commit $COMMIT, deadline ${DEADLINE_S} s$([ "$DRY" = 1 ] && echo ', dry run on the CPU')" | tee -a "$LOG"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# ---- the steps, most valuable first. One line each: step NAME CAP_SECONDS COMMAND... (caps from estimates:
# correct them from the step times in results.json after a real run)
step decode 160 "$PY" benchmarks/decode.py           # batch-1 bf16/int4/int8 x greedy/chat vs roofline, fastref
step gpu_tests 100 "$PY" -m pytest -q -x -p no:cacheprovider -k "bfloat16 or cuda or sampling_kernels" tests/test_gemv.py tests/test_gptq_kernels.py tests/test_kernels.py tests/test_kv_int8_kernels.py tests/test_sampling.py tests/test_sampling_kernels.py tests/test_lora_kernels.py  # bf16 kernels, GEMV pick, fused sampler vs torch, sampler graphs
step gptq 120 "$PY" benchmarks/gptq_bench.py         # int4/int8 GEMV (old vs magic-number) and bf16 GEMV vs cuBLAS
step kernels 45 "$PY" benchmarks/kernels.py          # prefill vs SDPA; paged decode engine launch vs ideal vs copy
step throughput 130 "$PY" benchmarks/throughput.py   # 256 requests vs HF and fastref static batches
step sampler 40 "$PY" benchmarks/sampler.py --batches 1 64 256 --candidates 1024 4096  # vs a sort-based sampler
step kv_int8 35 "$PY" benchmarks/kv_int8.py          # int8 KV: bytes, sequences per memory, decode attention
step lora 40 "$PY" benchmarks/lora.py                # unmerged LoRA: decode with 0, 1 and 4 adapters in a batch of 32
# ---- other benchmarks go here, one line each (serve: on a GPU later), with caps that fit
gpu_step ceilings 25 env BUDGET_S=20 "$PY" .bench/ceilings.py  # copy, bf16 matmul, SDPA ceilings
gpu_step gemv_anchor 25 env M=1 "$PY" .bench/gemv_anchor.py    # torch's int4 tinygemm at batch 1

echo "=== done at $(elapsed) s" | tee -a "$LOG"
"$PY" -c 'import json, sys
for s in json.load(open(sys.argv[1]))["steps"]:
    print("%-14s%-20s%5d s of %d" % (s["name"], s["status"], s["seconds"], s["cap_s"]))' "$OUT/results.json" | tee -a "$LOG"
rm -rf "$JSON_DIR"
exit $FAILED
