"""The server against the in-process engine: the same N concurrent streaming requests through `python -m
nanoqwen.serve` (N clients over HTTP) and straight through `LLM.add_request` / `step()` in this process.

    python benchmarks/serve.py --tiny --threads 1                    # CPU smoke run on the golden tiny checkpoint
    python benchmarks/serve.py --ckpt qwen-7b-chat --concurrency 1 8 32 64 --max-tokens 256

Reports requests/s, output tokens/s, time to first token and inter-token latency (p50, p99) for both, and the
server's share of the in-process tokens/s (the goal: at least 80% at 32 concurrent streams). Every request is a
token-id prompt of --prompt-len random ids, greedy, ignore_eos, exactly --max-tokens new tokens, sent to
/v1/completions with stream: true. The in-process run goes first and frees its model before the server loads its
own. Writes JSON to $OUT when set.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = ROOT.parent / "shared" / "golden" / "qwen-tiny" / "checkpoint"


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(name, n, elapsed, records):
    """records: per request (ttft, [inter-token gaps], tokens)."""
    tokens = sum(r[2] for r in records)
    ttft = [r[0] for r in records]
    itl = [g for r in records for g in r[1]]
    return {"mode": name, "concurrency": n, "requests_per_s": len(records) / elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99), "tokens": tokens}


def prompts(n, length, seed):
    rng = random.Random(seed)
    return [[rng.randrange(151643) for _ in range(length)] for _ in range(n)]  # ordinary tokens only


# ------------------------------------------------------------------------------------------------ in-process
def run_engine(llm, work, max_tokens):
    from nanoqwen import SamplingParams
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = {llm.add_request(p, params): i for i, p in enumerate(work)}
    last, records = {}, {}
    while llm.has_unfinished():
        for out in llm.step():
            now = time.perf_counter()
            rid = out.request_id
            if rid not in ids or not out.new_token_ids:
                continue
            if rid not in last:
                records[rid] = [now - start, [], 0]
            else:
                records[rid][1].append(now - last[rid])
            records[rid][2] += len(out.new_token_ids)
            last[rid] = now
    return time.perf_counter() - start, list(records.values())


# ------------------------------------------------------------------------------------------------ server
async def one_stream(client, url, prompt, max_tokens, start):
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "repetition_penalty": 1.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], tokens


async def run_clients(url, work, max_tokens):
    import httpx
    limits = httpx.Limits(max_connections=len(work) + 8, max_keepalive_connections=len(work) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(one_stream(client, url, p, max_tokens, start) for p in work))
        return time.perf_counter() - start, records


def start_server(args, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanoqwen.serve", "--ckpt", args.ckpt, "--port", str(port), "--served-model-name",
           "bench", "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--log-level", "warning"] + (["--device", args.device] if args.device else []) + \
        (["--dtype", args.dtype] if args.dtype else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("the server did not come up in 600 s")
        time.sleep(0.2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a checkpoint name or folder (default with --tiny: the golden tiny checkpoint)")
    p.add_argument("--tiny", action="store_true", help="the golden tiny checkpoint on the CPU, float32")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--threads", type=int, help="torch CPU threads on both sides (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts (a shared "
                   "machine's noise only ever slows a run down)")
    args = p.parse_args()
    if args.tiny:
        if not TINY.is_dir():
            sys.exit(f"--tiny needs the golden data at {TINY}")
        args.ckpt, args.device, args.dtype = args.ckpt or str(TINY), args.device or "cpu", args.dtype or "float32"
    if not args.ckpt:
        sys.exit("give --ckpt NAME_OR_PATH, or --tiny")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    import torch
    from nanoqwen import LLM

    results = []
    dtype = getattr(torch, args.dtype) if args.dtype else None
    llm = LLM(args.ckpt, device=args.device, dtype=dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, progress=False)
    run_engine(llm, prompts(2, args.prompt_len, 99), 4)  # warm-up
    for n in args.concurrency:
        runs = [run_engine(llm, prompts(n, args.prompt_len, args.seed + n), args.max_tokens)
                for _ in range(args.repeat)]
        results.append(summary("in-process", n, *min(runs, key=lambda r: r[0])))
    llm.close()
    del llm

    proc, url = start_server(args, env)
    try:
        asyncio.run(run_clients(url, prompts(2, args.prompt_len, 99), 4))  # warm-up
        for n in args.concurrency:
            runs = [asyncio.run(run_clients(url, prompts(n, args.prompt_len, args.seed + n), args.max_tokens))
                    for _ in range(args.repeat)]
            results.append(summary("server", n, *min(runs, key=lambda r: r[0])))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    engine = {r["concurrency"]: r["tokens_per_s"] for r in results if r["mode"] == "in-process"}
    print(f"\n{args.ckpt}: prompt {args.prompt_len} tokens, {args.max_tokens} new tokens per request, greedy\n")
    print(f"{'mode':<11} {'N':>4} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
          f"{'vs engine':>9}")
    for r in sorted(results, key=lambda r: (r["concurrency"], r["mode"])):
        r["share_of_engine"] = r["tokens_per_s"] / engine[r["concurrency"]]
        print(f"{r['mode']:<11} {r['concurrency']:>4} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>6.1f}ms {r['itl_p50_ms']:>6.1f}ms "
              f"{r['itl_p99_ms']:>6.1f}ms {100 * r['share_of_engine']:>8.0f}%")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "serve.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
