"""Tensor parallelism through the engine on CPU processes (gloo): LLM(tensor_parallel_size=N) against the golden
greedy generations and the single-process engine (stress with preemption and aborts, the int8 KV cache), a worker
killed or failing, no process left behind, the command line and torchrun.

Comparisons with the single-process engine run both in fp64: the two compute the same sums in other orders, so
their logits differ by fp64 rounding (about 1e-15 here, see test_distributed.py); in fp32 the difference (about 1e-5)
could flip a near-tie between two tokens somewhere in hundreds of steps, in fp64 it cannot in practice.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT
from nanoqwen import LLM, SamplingParams
from nanoqwen.checkpoint import convert
from nanoqwen.distributed import TensorParallelError
from nanoqwen.testing import tiny_config, write_official_checkpoint

GOLDEN = ("qwen-tiny", "qwen-tiny-int4", "qwen-tiny-int8")


@pytest.fixture(scope="module", autouse=True)
def one_thread_workers():
    """Workers are spawned processes: they take OMP_NUM_THREADS from the environment (2 CPUs for everyone here)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def conv(golden, tmp_path_factory):
    base = tmp_path_factory.mktemp("tp_engine")
    return {name: convert(golden / name / "checkpoint", base / name) for name in GOLDEN}


@pytest.fixture(scope="module")
def small(tmp_path_factory, qwen_tiktoken):
    """A random model with 4 heads and a 1024-token vocabulary, seq_length 32 (NTK and LogN switch on), converted."""
    cfg = tiny_config(vocab_size=1024, hidden_size=64, num_attention_heads=4, kv_channels=16, intermediate_size=128)
    base = tmp_path_factory.mktemp("tp_small")
    official = write_official_checkpoint(base / "official", cfg, seed=5, dtype=torch.float32, vocab_file=qwen_tiktoken)
    return convert(official, base / "converted")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


# ----------------------------------------------------------------------------------------------- golden

@pytest.mark.parametrize("name,world,static", [("qwen-tiny", 2, False), ("qwen-tiny", 4, True),
                                               ("qwen-tiny-int4", 2, True), ("qwen-tiny-int8", 2, False)],
                         ids=["fp-N2", "fp-N4-static-overlap", "int4-N2-static-overlap", "int8-N2"])
def test_greedy_generation_equals_golden(conv, golden, name, world, static):
    """`static`: decode steps through the padded decode path (the CUDA-graph path, eager on the CPU) with overlap
    scheduling: its per-bucket messages and the input tokens broadcast from rank 0's device."""
    ref = json.loads((golden / name / "reference.json").read_text())["cases"]
    cases = [c for k, c in ref.items() if c["kind"] == "greedy_generate" and not k.startswith("kv_int8")]
    llm = LLM(conv[name], device="cpu", num_kv_blocks=64, tensor_parallel_size=world, progress=False,
              cuda_graphs=static, overlap=static, max_model_len=160)  # (the padded path reads max_model_len keys)
    try:
        assert len(llm.tp.worker_pids) == world - 1 and llm.num_kv_heads == 4 // world
        outs = llm.generate([c["input_ids"] for c in cases],
                            [SamplingParams(temperature=0, repetition_penalty=c["repetition_penalty"],
                                            max_new_tokens=c["max_new_tokens"]) for c in cases])
        assert [o.token_ids for o in outs] == [c["output_ids"] for c in cases]
    finally:
        llm.close()
    assert wait_gone(llm.tp.worker_pids, 10) == []


def test_int8_kv_cache_per_rank(conv, golden):
    """The reference's int8 cache ("qwen" mode: one min/max per head over each written chunk) quantizes each head on
    its own, so each rank's cache of its heads gives the single-process tokens."""
    case = json.loads((golden / "qwen-tiny" / "reference.json").read_text())["cases"]["kv_int8/generate/text"]
    prompts = [case["input_ids"], case["input_ids"][:7], list(range(300, 340))]
    params = SamplingParams(temperature=0, max_new_tokens=30)
    kw = dict(device="cpu", dtype=torch.float64, num_kv_blocks=64, kv_cache_dtype="int8", kv_quant_mode="qwen",
              progress=False)
    single = [o.token_ids for o in LLM(conv["qwen-tiny"], **kw).generate(prompts, params)]
    llm = LLM(conv["qwen-tiny"], tensor_parallel_size=2, **kw)
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == single
    finally:
        llm.close()


# ----------------------------------------------------------------------------------------------- stress

def drive(llm, n: int, seed: int) -> dict:
    """Requests arriving over time with random lengths and sampling settings, random aborts; every output."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        kw = dict(max_new_tokens=rng.randint(1, 16), repetition_penalty=rng.choice([1.0, 1.1]), ignore_eos=True)
        if rng.random() < 0.5:
            kw.update(temperature=rng.choice([0.7, 1.0]), top_p=rng.choice([0.8, 1.0]), top_k=rng.choice([0, 20]),
                      seed=rng.randrange(1 << 30))
        else:
            kw.update(temperature=0)
        requests.append(([rng.randrange(1024) for _ in range(rng.randint(1, 40))], SamplingParams(**kw)))
    outputs, ids, pending = {}, {}, list(range(n))
    while pending or llm.has_unfinished():
        for _ in range(rng.randint(0, 5)):
            if pending:
                i = pending.pop(0)
                ids[llm.add_request(*requests[i])] = i
        if ids and rng.random() < 0.05:
            live = sorted(r for r in ids if r in llm.requests)
            if live:
                llm.abort(rng.choice(live))
        for out in llm.step():
            if out.finished:
                outputs[ids[out.request_id]] = (out.token_ids, out.finish_reason)
    return outputs


def test_stress_preemption_and_aborts(small):
    """Through a block pool too small for the load (preemption, recomputation), with aborts, overlap scheduling and
    the padded decode path: every request's tokens and finish reason as in one process."""
    kw = dict(device="cpu", dtype=torch.float64, num_kv_blocks=40, block_size=4, max_num_seqs=8,
              max_num_batched_tokens=48, max_model_len=64, overlap=True, cuda_graphs=True, progress=False)
    ref_llm = LLM(small, **kw)
    ref = drive(ref_llm, 100, seed=21)
    assert ref_llm.num_preemptions > 0
    llm = LLM(small, tensor_parallel_size=2, **kw)
    try:
        got = drive(llm, 100, seed=21)
        assert llm.num_preemptions == ref_llm.num_preemptions
        assert sum(r == "abort" for _, r in got.values()) > 0
        assert got == ref
        assert llm.blocks.num_free == llm.blocks.num_blocks
    finally:
        llm.close()


# ----------------------------------------------------------------------------------------------- failures

def test_worker_killed_mid_run(small):
    llm = LLM(small, device="cpu", num_kv_blocks=64, tensor_parallel_size=2, progress=False)
    try:
        for i in range(3):
            llm.add_request(list(range(10 + i, 30 + i)), SamplingParams(temperature=0, max_new_tokens=100,
                                                                        ignore_eos=True))
        for _ in range(4):
            llm.step()
        pid = llm.tp.worker_pids[0]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {pid}\) was killed by SIGKILL.*"
                                                       "close\\(\\) it and build a new LLM"):
            while llm.has_unfinished():
                llm.step()
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="SIGKILL"):  # and at once afterwards
            llm.step()
        assert time.monotonic() - t0 < 1
    finally:
        llm.close()
    assert wait_gone([pid], 5) == []


def test_worker_error_is_reported(small):
    """A worker that raises reports its error and exits; rank 0's next step names it."""
    llm = LLM(small, device="cpu", num_kv_blocks=64, tensor_parallel_size=2, progress=False)
    try:
        llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=20))
        llm.step()
        llm.tp.channel.send(("no-such-message", None))  # what a worker of another nanoqwen version would get
        with pytest.raises(TensorParallelError, match=r"rank 1 .* exited with code 1: .*unknown message "
                                                       r"'no-such-message' from rank 0"):
            while llm.has_unfinished():
                llm.step()
    finally:
        llm.close()


def test_refusals(small, conv):
    from nanoqwen import Qwen
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(small, device="cpu", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(small, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="LoRA adapters are not supported with tensor_parallel_size > 1"):
        LLM(small, device="cpu", tensor_parallel_size=2, enable_lora=True)
    model = Qwen.from_pretrained(small, device="cpu")
    with pytest.raises(ValueError, match="not a model already built"):
        LLM(model, tokenizer=small, tensor_parallel_size=2)
    import torch.distributed as dist
    assert not dist.is_initialized()  # nothing was started


# ----------------------------------------------------------------------------------------------- processes

SCRIPT = """
import os, sys
from nanoqwen import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], device="cpu", num_kv_blocks=256, tensor_parallel_size=2, progress=False)
    print("pids", *llm.tp.worker_pids, flush=True)
    mode = sys.argv[2]
    if mode == "raise":
        raise RuntimeError("an error escaping the script")
    n = 5 if mode == "exit" else 3000
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
    print("done", len(out.token_ids), flush=True)
"""


@pytest.mark.parametrize("mode", ["exit", "raise", "sigkill", "ctrl-c"])
def test_no_orphan_processes(small, tmp_path, mode):
    """Whatever way rank 0 ends (normal exit without close(), an exception, SIGKILL, Ctrl-C to the terminal's
    process group mid-generation), no worker stays behind."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(small), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("pids"), line + proc.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        if mode in ("sigkill", "ctrl-c"):
            time.sleep(2)  # mid-generation
            assert proc.poll() is None
            if mode == "sigkill":
                proc.kill()
            else:
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert wait_gone(pids, 10) == [], err
    if mode == "exit":
        assert proc.returncode == 0, err
    elif mode == "sigkill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode != 0 and ("KeyboardInterrupt" if mode == "ctrl-c" else "escaping the script") in err


def test_command_line(conv, tmp_path):
    """python -m nanoqwen.generate --tensor-parallel-size 2 prints what one process prints."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "nanoqwen.generate", "--ckpt", str(conv["qwen-tiny"]), "--device", "cpu",
            "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12"]
    runs = [subprocess.run(args + extra, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
            for extra in ([], ["--tensor-parallel-size", "2"])]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[1].stdout == runs[0].stdout and len(runs[0].stdout) > len("Hello there")


def test_server_flag():
    from nanoqwen.serve.__main__ import parse_args
    args = parse_args(["--ckpt", "x", "--tensor-parallel-size", "2", "--dist-port", "29999"])
    assert (args.tensor_parallel_size, args.dist_port, args.dist_addr) == (2, 29999, None)


def test_torchrun(conv, golden, tmp_path):
    """All ranks started by torchrun, running the same script: rank 0 gets the golden tokens, the other rank's
    LLM(...) serves it and exits the process."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys
        from nanoqwen import LLM, SamplingParams
        llm = LLM(sys.argv[1], device="cpu", num_kv_blocks=64, tensor_parallel_size=2, progress=False)
        ids, n = [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3])
        print("tokens", *llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=n)).token_ids)
    """))
    case = json.loads((golden / "qwen-tiny" / "reference.json").read_text())["cases"]["fp32/generate/text"]
    assert case["repetition_penalty"] == 1.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(port), str(script), str(conv["qwen-tiny"]), ",".join(map(str, case["input_ids"])),
                        str(case["max_new_tokens"])], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("tokens")]
    assert len(lines) == 1  # rank 0 only
    assert [int(t) for t in lines[0].split()[1:]] == case["output_ids"]


# ----------------------------------------------------------------------------------------------- GPU
# NCCL, CUDA graphs holding collectives, and aborting NCCL when a worker dies exist only there.

def golden_greedy(golden, name="qwen-tiny"):
    ref = json.loads((golden / name / "reference.json").read_text())["cases"]
    cases = [c for k, c in ref.items() if c["kind"] == "greedy_generate" and not k.startswith("kv_int8")]
    params = [SamplingParams(temperature=0, repetition_penalty=c["repetition_penalty"],
                             max_new_tokens=c["max_new_tokens"]) for c in cases]
    return [c["input_ids"] for c in cases], params, [c["output_ids"] for c in cases]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_collectives_captured_in_decode_graphs(conv, golden):
    """One GPU: a group of one NCCL rank runs the sharded model's code (the ids broadcast, vocab-parallel embedding
    and head, row-parallel all-reduces) with every collective captured in the decode CUDA graphs; its tokens are the
    plain engine's (a one-rank all-reduce is a copy)."""
    from nanoqwen.distributed import RowParallel, TensorParallel
    prompts, params, _ = golden_greedy(golden)
    kw = dict(num_kv_blocks=64, max_num_seqs=8, max_model_len=256, progress=False)
    plain = LLM(conv["qwen-tiny"], device="cuda", dtype=torch.float32, **kw)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    plain.close()
    tp = TensorParallel(1, torch.device("cuda", 0))
    try:
        model = tp.load(conv["qwen-tiny"], torch.float32)
        assert isinstance(model.transformer.h[0].mlp.c_proj, RowParallel)
        llm = LLM(model, tokenizer=conv["qwen-tiny"], **kw)
        assert llm.graphs is not None and llm.graphs.graphs  # captured with the collectives inside
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        llm.close()
    finally:
        tp.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", ["qwen-tiny", "qwen-tiny-int4"])
def test_cuda_two_gpus_golden(conv, golden, name):
    prompts, params, want = golden_greedy(golden, name)
    llm = LLM(conv[name], device="cuda", dtype=torch.float32 if name == "qwen-tiny" else torch.float16,
              tensor_parallel_size=2, num_kv_blocks=64, max_model_len=256, progress=False)
    try:
        assert llm.graphs is not None and llm.graphs.graphs
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        if name == "qwen-tiny":
            assert outs == want
        else:  # fp16 activations: the golden is fp32, so only the first tokens are certain
            assert [o[:4] for o in outs] == [w[:4] for w in want]
    finally:
        llm.close()
    assert wait_gone(llm.tp.worker_pids, 10) == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_worker_killed_releases_rank_0(conv):
    """A dead peer leaves NCCL kernels waiting forever: rank 0's monitor aborts the communicators."""
    llm = LLM(conv["qwen-tiny"], device="cuda", tensor_parallel_size=2, num_kv_blocks=256, max_model_len=512,
              progress=False)
    try:
        llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True))
        for _ in range(5):
            llm.step()
        os.kill(llm.tp.worker_pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="SIGKILL"):
            while llm.has_unfinished():
                llm.step()
        assert time.monotonic() - t0 < 30
    finally:
        llm.close()


def test_benchmark_tiny(tmp_path):
    """benchmarks/tp.py --tiny runs the whole path (random checkpoint, N = 1 and 2) and writes its JSON row by row."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OUT=str(tmp_path))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tp.py"), "--tiny", "--sizes", "1", "2",
                        "--workdir", str(tmp_path / "ckpt")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "tp_tiny.json").read_text())
    assert [row["tensor_parallel_size"] for row in res["rows"]] == [1, 2]
    for row in res["rows"]:
        assert row["decode_tok_s"] > 0 and row["throughput_tok_s"] > 0 and row["startup_s"] > 0
        assert 0 <= row["tokens_equal_to_first_size"] <= res["new_tokens"]
    assert [row["kv_heads_per_rank"] for row in res["rows"]] == [4, 2]
    one, two = res["rows"]  # the same memory per rank holds each rank's heads only: twice the tokens
    assert two["kv_tokens_per_rank"] == 2 * one["kv_tokens_per_rank"]
