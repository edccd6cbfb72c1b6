"""The one-call GPU check cannot rot: `benchmarks/gpu_check.sh --dry-run` runs every step at --tiny sizes on the CPU,
and each benchmark's JSON must hold its keys, its correctness checks passed, and sane values. Speed is never asserted.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
# where the benchmarks look for the shared baselines (benchmarks/throughput.py BASELINE_DIRS)
HAVE_FASTREF = any((d / "fastref.py").is_file() for d in (ROOT / ".bench", ROOT.parent / "shared" / "bench"))
STEPS = ["decode", "gpu_tests", "gptq", "kernels", "throughput", "sampler", "kv_int8", "lora", "ceilings", "gemv_anchor"]


@pytest.fixture(scope="module")
def env(qwen_tiktoken, tmp_path_factory):
    """The benchmarks find qwen.tiktoken themselves (.bench/ or ../shared); the fixture skips when it is absent."""
    home = tmp_path_factory.mktemp("home")
    return {**os.environ, "PYTHON": sys.executable, "NANOQWEN_HOME": str(home), "OMP_NUM_THREADS": "1"}


def run_check(env, out: Path, *args, **extra_env):
    r = subprocess.run(["bash", str(CHECK), "--dry-run", *args], env={**env, "OUT": str(out), **extra_env},
                       capture_output=True, text=True, timeout=600)
    return r, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def dry_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r, results = run_check(env, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return out, results


def test_dry_run_runs_every_step_and_returns_two_files(dry_run):
    out, results = dry_run
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert [name for name in status if name in STEPS] == STEPS  # in the order of the plan
    assert all(s in ("ok", "skipped: GPU only") for s in status.values()), status
    assert status["decode"] == "ok" and status["gemv_anchor"] == "skipped: GPU only"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.json"]  # the device returns <= 8
    assert results["dry_run"] is True and 0 < results["deadline_s"] <= 450  # leaves room in a 480 s device call


def test_decode_json(dry_run):
    res = dry_run[1]["results"]["decode_bs1_ctx16_auto"]
    rows = {(r["variant"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {(v, m) for v in ("bf16", "int4", "int8") for m in ("greedy", "chat")}
    for r in rows.values():
        assert r["ok"] and r["wrong_token_counts"] == 0 and r["tok_s"] > 0 and r["step_GB"] > 0
        assert r["greedy_gap"] <= r["tolerance"]
    assert res["engine_args"] == {"num_kv_blocks": 64}  # otherwise the engine's defaults
    assert res["chat_sampling"]["repetition_penalty"] == 1.1 and res["chat_sampling"]["top_p"] == 0.8
    if HAVE_FASTREF:
        assert res["fastref"]["fastref_bs1_tok_s"] > 0


def test_throughput_json(dry_run):
    res = dry_run[1]["results"]["throughput"]
    nq = res["nanoqwen"]
    assert nq["output_tok_s"] > 0 and nq["output_tokens"] >= res["num_requests"] * res["output_len"][0]
    assert nq["wrong_output_lengths"] == 0 and nq["warm_up_s"] > 0
    assert nq["graph_captures_in_timed_window"] == 0 and nq["triton_compiles_in_timed_window"] == 0
    assert res["greedy_check"]["ok"] and len(res["greedy_check"]["requests"]) == 4
    assert res["hf"]["output_tok_s"] > 0 and res["ratio_vs_hf"] > 0
    if HAVE_FASTREF:
        assert res["fastref"]["output_tok_s"] > 0 and res["ratio_vs_fastref"] > 0
        assert res["fastref"]["max_seq"] >= res["prompt_len"][1] + res["output_len"][1]


def test_kernels_json(dry_run):
    res = dry_run[1]["results"]["kernels"]
    rows = {r["name"]: r for r in res["rows"]}
    assert res["wrong"] == [] and all(r["max_err"] < 1e-4 for r in rows.values())
    assert {"prefill S=64 1 seq", "prefill S=64 4x16", "kv store 64 tokens"} <= set(rows)
    for shape, ctx in (("1x40", 40), ("3x100", 100)):  # the engine's static length against the exact one
        assert rows[f"decode {shape} ideal"]["max_context_len"] == ctx
        assert rows[f"decode {shape} engine"]["max_context_len"] == res["engine_max_model_len"] == 32768
        assert rows[f"decode {shape} engine"]["value"] > 0


def test_gptq_and_kv_int8_json(dry_run):
    gptq = dry_run[1]["results"]["gptq_bench"]
    assert gptq["failures"] == [] and len(gptq["gemv"]) == 4 and len(gptq["decode"]) == 8
    assert all(r["int4_us"] > 0 and r["int8_us"] > 0 for r in gptq["decode"])
    kv = dry_run[1]["results"]["kv_int8"]
    rows = {r["name"]: r for r in kv["rows"]}
    assert kv["wrong"] == [] and rows["KV bytes/token, 7B, int8"]["ratio"] < 0.55
    assert sum(name.startswith("decode attn") for name in rows) == 2


def test_deadline_and_step_cap(env, tmp_path):
    """A step gets at most the time left: killed at its cap, reported, results still written; later steps skipped."""
    r, results = run_check(env, tmp_path, "decode", "kernels", DEADLINE_S="3", MIN_STEP_S="1")
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert r.returncode == 1 and status["decode"] == "timed out" and status["kernels"] == "skipped: deadline", status
    assert "throughput" not in status  # not named on the command line


def test_a_killed_benchmark_keeps_what_it_measured(env, tmp_path):
    """decode.py rewrites its JSON after every row: kill it after the first and the rows so far are there."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--tiny", "--variants", "bf16,int4,int8",
           "--modes", "greedy", "--no-fastref"]
    p = subprocess.Popen(cmd, env={**env, "OUT": str(tmp_path)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path, rows, deadline = tmp_path / "decode_bs1_ctx16_auto.json", [], time.time() + 120
    while not rows and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    running = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert rows and running, p.stderr.read()[-2000:]  # rows on disk while the later variants were still to come
    assert [r["variant"] for r in json.loads(path.read_text())["rows"]][:1] == ["bf16"]


def test_every_recorded_kernel_variant_builds_for_sm90():
    """Triton's interpreter runs the kernel tests but does not type-check a kernel (one type per name through loops
    and runtime branches, constexpr rules): the compiler does. benchmarks/compile_check.py records the launches of a
    model's prefill, chunk and decode steps (bf16, int8 KV in both modes, GPTQ int4/int8), of unmerged LoRA and of the fused sampler on
    the CUDA code path with the GPU's tile choices, and builds every distinct variant for sm_90, without a GPU."""
    pytest.importorskip("triton")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script), "--no-ptxas"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout[-4000:] + r.stderr[-3000:]
    built = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("ok ")]
    for kernel in ("flash_attention._flash_attn_kernel", "paged_attention._paged_attn_kernel",
                   "kv_store._store_qwen_kernel", "gptq_matmul._gptq_magic_kernel", "gemv._linear_gemv_kernel",
                   "rms_norm._rms_norm_kernel", "sampling._draw_kernel", "sampling._scores_kernel",
                   "lora._lora_shrink_kernel", "lora._lora_expand_kernel"):
        assert kernel in built, f"{kernel} was not launched by the recorded workloads:\n{r.stdout[-3000:]}"
