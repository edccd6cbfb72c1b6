"""Continuous-batching throughput: a seeded workload of N requests through nanoqwen's engine, and the same requests
through two static-batch baselines in the same run: Hugging Face `generate()` (eager, left-padded batches) and
fastref (../shared/bench/fastref.py, a gpt-fast-style compiled decoder, copied to .bench/).

    python benchmarks/throughput.py                         # a GPU: Qwen-7B shapes, random bf16 weights
    python benchmarks/throughput.py --num-requests 512 --hf-batch 64 --no-fastref
    python benchmarks/throughput.py --tiny                  # CPU smoke run, seconds

Greedy, ignore_eos: every request produces exactly its drawn output length. Before the clock the engine is warmed
on every shape the run can reach: each decode batch bucket (its CUDA graph and split-KV kernels), the largest
prefill step the token budget allows with a prompt chunked across two steps and a prefill mixed with decodes, and a
prefix-cache hit. The timed window then reports how many graphs were captured and Triton kernels compiled in it
(both should be 0). Correctness in the same run: for four requests, every generated token must be the argmax (up to
rounding) of a cache-free forward of the same model over the prompt and the tokens before it (`greedy_gap`).

Baselines on the same requests, in arrival order, in static batches of --hf-batch:
- HF: really run; only each request's own output tokens count (a batch runs until its longest output is done).
- fastref: its compiled decode step is timed at that batch size with a static cache long enough for the longest
  request; each batch then costs (its longest output) x (that step time). Its prefill is not counted (in its favour).
Reports output tokens/s, TTFT and latency (p50, p99), peak KV blocks, and the ratios (targets >= 20x HF, >= 1.5x
fastref, PERFORMANCE.md). Writes $OUT/throughput.json after each engine when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoqwen import LLM, Qwen, QwenConfig, SamplingParams, Tokenizer  # noqa: E402

QWEN_7B = dict(vocab_size=151936, hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, kv_channels=128,
               intermediate_size=22016, seq_length=8192)
TINY = dict(vocab_size=4096, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16,
            intermediate_size=256, seq_length=2048)
BASELINE_DIRS = (ROOT / ".bench", ROOT.parent / "shared" / "bench")  # .bench/ travels to a GPU machine


def find_vocab() -> Path:
    for d in (ROOT / ".bench", ROOT.parent / "shared" / "qwen" / "Qwen-7B", ROOT.parent / "shared" / "golden" /
              "qwen-tiny" / "checkpoint"):
        if (d / "qwen.tiktoken").is_file():
            return d
    sys.exit("qwen.tiktoken not found: copy it into .bench/ (e.g. from ../shared/qwen/Qwen-7B)")


def write_json(res: dict, name: str) -> None:
    """$OUT/name, replaced whole: call it after every measurement so a run killed later keeps what it measured."""
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"], name)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, path)


def run_fastref(batch: int, max_seq: int, timeout: float, tiny: bool) -> dict:
    """Run the fastref baseline (BS=batch, MAXS=max_seq) in a subprocess; its JSON, or {"error": why}."""
    script = next((d / "fastref.py" for d in BASELINE_DIRS if (d / "fastref.py").is_file()), None)
    if script is None:
        return {"error": "fastref.py not found: copy ../shared/bench/*.py into .bench/"}
    if not tiny and not torch.cuda.is_available():
        return {"error": "fastref needs a GPU (or --tiny)"}
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "BS": str(batch), "MAXS": str(max_seq), "OUT": out, "TINY": "1" if tiny else "0"}
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"fastref timed out after {timeout:.0f} s"}
        print(f"fastref BS={batch} MAXS={max_seq} ({time.perf_counter() - t0:.0f} s): {r.stdout.strip()[-300:]}",
              r.stderr[-300:] if r.returncode else "", flush=True)
        f = Path(out) / f"fastref_bs{batch}_S{max_seq}.json"
        return json.loads(f.read_text()) if f.is_file() else {"error": f"fastref exited {r.returncode}"}


def greedy_gap(model: Qwen, prompt: list[int], output: list[int]) -> float:
    """How far the engine's greedy tokens are from a cache-free forward of the model over prompt + output: the largest
    (max logit - logit of the chosen token), in standard deviations of the logits. 0 when every pick is the forward's
    argmax; a near-tie flipped by rounding costs a few hundredths (16-bit), a wrong token several units."""
    ids = torch.tensor([prompt + output[:-1]], device=model.device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:].float()
    chosen = logits.gather(1, torch.tensor(output, device=model.device)[:, None])[:, 0]
    return ((logits.max(1).values - chosen) / logits.std(1)).max().item()


def greedy_tolerance(model: Qwen, kv_cache_dtype=None) -> float:
    """Allowed gap: rounding between the engine's paged path and a plain forward (16-bit: measured about 0.05 std on
    an 8-layer model; flips cost up to twice that), or int8 K/V on top of it; fp32 (the CPU) is exact to 1e-5."""
    if kv_cache_dtype == "int8":
        return 0.5
    return 1e-4 if model.dtype == torch.float32 else 0.25


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def workload(n, prompt_range, output_range, vocab, seed):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
            for _ in range(n)]


# ---- engine internals, read-only (adapt here when nanoqwen/engine changes): decode graph buckets and captures, KV
# blocks in use, preemptions
def decode_buckets(llm: LLM) -> list[int]:
    """The batch sizes the engine pads decode steps to (one CUDA graph each)."""
    graphs = getattr(llm, "graphs", None)
    return list(getattr(graphs, "buckets", None) or [2 ** i for i in range(10)])


def captured_graphs(llm: LLM) -> int:
    graphs = getattr(llm, "graphs", None)
    return len(getattr(graphs, "graphs", None) or {})


def kv_blocks(llm: LLM) -> tuple[int, int]:
    """(blocks in use, blocks in the cache)."""
    return llm.blocks.num_blocks - llm.blocks.num_free, llm.blocks.num_blocks


def preemptions(llm: LLM) -> int:
    return llm.num_preemptions


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: grows when a kernel variant is compiled."""
    d = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for _ in d.iterdir()) if d.is_dir() else 0


def warm_up(llm: LLM, work, vocab: int, max_num_seqs: int, budget: int) -> None:
    """Run every shape the timed workload can reach (the module docstring lists them)."""
    greedy = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    rng = random.Random(12345)
    most = min(len(work), max_num_seqs)
    for b in [b for b in decode_buckets(llm) if b < most] + [most]:  # b 8-token prompts, then 2 decode steps of b
        llm.generate([[rng.randrange(vocab) for _ in range(8)] for _ in range(b)], greedy)
    length = max(len(p) for p, _ in work)
    if budget % length == 0 and length > 1:
        length -= 1  # so that one prompt straddles the step boundary
    n = min(budget // length + 2, max_num_seqs)  # a full-budget step, then a chunk's rest mixed with decodes
    prompts = [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]
    llm.generate(prompts, greedy)
    llm.generate(prompts[:1], greedy)  # its full blocks come from the prefix cache


def run_nanoqwen(llm: LLM, work, vocab: int, max_num_seqs: int, budget: int) -> tuple[dict, list]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t_warm = time.perf_counter()
    warm_up(llm, work, vocab, max_num_seqs, budget)
    sync()
    graphs0, compiled0 = captured_graphs(llm), triton_cache_entries()
    t0 = time.perf_counter()
    ids = [llm.add_request(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)) for p, n in work]
    done, peak_blocks, steps = {}, 0, 0
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        peak_blocks = max(peak_blocks, kv_blocks(llm)[0])
    sync()
    wall = time.perf_counter() - t0
    outs = [done[i] for i in ids]
    n_out = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics["first_token"] - t0 for o in outs]
    lat = [o.metrics["finished"] - t0 for o in outs]
    wrong_lengths = sum(len(o.token_ids) != n for o, (_, n) in zip(outs, work))
    return {"output_tok_s": n_out / wall, "wall_s": wall, "warm_up_s": t0 - t_warm, "output_tokens": n_out,
            "steps": steps, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
            "peak_kv_blocks": peak_blocks, "kv_blocks": kv_blocks(llm)[1], "preemptions": preemptions(llm),
            "graph_captures_in_timed_window": captured_graphs(llm) - graphs0,
            "triton_compiles_in_timed_window": triton_cache_entries() - compiled0,
            "wrong_output_lengths": wrong_lengths}, outs


def hf_from_nanoqwen(model: Qwen):
    """A transformers Qwen2ForCausalLM holding the same weights (its decoder math equals Qwen v1's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = model.config
    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_width,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=32768,
                     rms_norm_eps=cfg.layer_norm_epsilon, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    with torch.device(model.device):  # built in place (its RoPE buffer must be real), then given our tensors
        hf = Qwen2ForCausalLM(hc)
    torch.set_default_dtype(prev)
    sd, H, new = model.state_dict(), cfg.hidden_size, {}
    new["model.embed_tokens.weight"], new["model.norm.weight"] = sd["transformer.wte.weight"], sd["transformer.ln_f.weight"]
    new["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
            new[q + f"self_attn.{n}.weight"] = sd[p + "attn.c_attn.weight"][j * H:(j + 1) * H]
            new[q + f"self_attn.{n}.bias"] = sd[p + "attn.c_attn.bias"][j * H:(j + 1) * H]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        gate, up = sd[p + "mlp.w2_w1.weight"].chunk(2)
        new[q + "mlp.gate_proj.weight"], new[q + "mlp.up_proj.weight"] = gate, up
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
    hf.load_state_dict(new, strict=True, assign=True)
    return hf.eval()


def static_batches(work, batch_size):
    return [work[b:b + batch_size] for b in range(0, len(work), batch_size)]


def run_hf(hf, work, batch_size, device):
    pad = 0  # any id in the vocabulary: padded positions are masked out
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = torch.tensor([work[0][0][:8]], device=device)
    hf.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False,
                pad_token_id=pad, eos_token_id=None)
    sync()
    t0 = time.perf_counter()
    for chunk in static_batches(work, batch_size):
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - len(p) for p, _ in chunk],
                                                                          device=device)[:, None]).long()
        longest = max(n for _, n in chunk)
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                        do_sample=False, pad_token_id=pad, eos_token_id=None)
    sync()
    wall = time.perf_counter() - t0
    useful = sum(n for _, n in work)  # tokens past a request's own length are waste, not throughput
    return {"output_tok_s": useful / wall, "wall_s": wall, "batch_size": batch_size}


def fastref_static(work, batch_size, timeout, tiny) -> dict:
    max_seq = -(-max(len(p) + n for p, n in work) // 128) * 128
    ref = run_fastref(batch_size, max_seq, timeout, tiny)
    tok_s = ref.get(f"fastref_bs{batch_size}_tok_s")
    if tok_s is None:
        return {"batch_size": batch_size, "max_seq": max_seq, **ref}
    step_s = batch_size / tok_s
    wall = sum(max(n for _, n in chunk) * step_s for chunk in static_batches(work, batch_size))
    return {"output_tok_s": sum(n for _, n in work) / wall, "wall_s": wall, "step_ms": step_s * 1e3,
            "batch_size": batch_size, "max_seq": max_seq, "decode_tok_s_at_batch": tok_s,
            "note": "decode steps only (prefill not counted)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke run)")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch", type=int, default=None, help="static batch size of the baselines (default 64, tiny 6)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-fastref", action="store_true")
    ap.add_argument("--fastref-timeout", type=float, default=90, help="seconds for fastref (it compiles first)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, help="token budget of a step (default 8192, tiny 256)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = args.num_requests or (12 if args.tiny else 256)
    prompt_range = args.prompt_len or ((4, 40) if args.tiny else (32, 512))
    output_range = args.output_len or ((4, 12) if args.tiny else (32, 128))
    batch = args.hf_batch or (6 if args.tiny else 64)
    cfg = QwenConfig.from_dict(TINY if args.tiny else QWEN_7B)
    torch.manual_seed(args.seed)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen(cfg).init_weights().eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    model.rotary.float()
    budget = args.max_num_batched_tokens or (256 if args.tiny else 8192)
    llm = LLM(model, tokenizer=Tokenizer.from_pretrained(find_vocab()), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=budget, block_size=16, progress=False,
              num_kv_blocks=4096 if device.type == "cpu" else None)
    work = workload(n, prompt_range, output_range, cfg.vocab_size, args.seed)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": args.tiny,
           "num_requests": n, "prompt_len": prompt_range, "output_len": output_range}
    res["nanoqwen"], outs = run_nanoqwen(llm, work, cfg.vocab_size, args.max_num_seqs, budget)
    checked = range(0, n, max(1, n // 4))  # four requests spread over the workload
    gaps = [greedy_gap(model, work[i][0], outs[i].token_ids) for i in checked]
    res["greedy_check"] = {"requests": list(checked), "max_gap": max(gaps), "tolerance": greedy_tolerance(model),
                           "ok": max(gaps) <= greedy_tolerance(model) and not res["nanoqwen"]["wrong_output_lengths"]}
    write_json(res, "throughput.json")
    llm.close()  # give the KV cache's memory back before the baselines build theirs
    if not args.no_hf:
        try:
            res["hf"] = run_hf(hf_from_nanoqwen(model), work, batch, device)
            res["ratio_vs_hf"] = res["nanoqwen"]["output_tok_s"] / res["hf"]["output_tok_s"]
        except ImportError:
            print("transformers not installed: HF comparison skipped")
        write_json(res, "throughput.json")
    if not args.no_fastref:
        res["fastref"] = fastref_static(work, batch, args.fastref_timeout, args.tiny)
        if "output_tok_s" in res["fastref"]:
            res["ratio_vs_fastref"] = res["nanoqwen"]["output_tok_s"] / res["fastref"]["output_tok_s"]
        write_json(res, "throughput.json")

    nq = res["nanoqwen"]
    print(f"\ndevice {res['device']}  requests {n}  prompt {prompt_range}  output {output_range}"
          + ("  [tiny CPU smoke run: numbers mean nothing]" if args.tiny else ""))
    print(f"{'engine':<26}{'tok/s':>10}{'x base':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>10}{'lat p99':>10}")
    print(f"{'nanoqwen':<26}{nq['output_tok_s']:>10.1f}{'':>8}{nq['ttft_p50_s']:>10.3f}{nq['ttft_p99_s']:>10.3f}"
          f"{nq['latency_p50_s']:>10.3f}{nq['latency_p99_s']:>10.3f}")
    for key, name, target in (("hf", "HF generate", 20), ("fastref", "fastref static", 1.5)):
        if key in res:
            base = res[key]
            label = f"{name} (bs {base['batch_size']})"
            if "output_tok_s" in base:
                print(f"{label:<26}{base['output_tok_s']:>10.1f}{res['ratio_vs_' + key]:>7.2f}x   target >= {target}x")
            else:
                print(f"{label:<26}  {base['error']}")
    print(f"KV blocks: peak {nq['peak_kv_blocks']} of {nq['kv_blocks']}, preemptions {nq['preemptions']}, "
          f"steps {nq['steps']}, warm-up {nq['warm_up_s']:.1f} s; in the timed window: "
          f"{nq['graph_captures_in_timed_window']} graph captures, {nq['triton_compiles_in_timed_window']} compiles")
    check = res["greedy_check"]
    print(f"greedy check on requests {check['requests']}: max logit gap {check['max_gap']:.3g} "
          f"(tolerance {check['tolerance']}), wrong output lengths {nq['wrong_output_lengths']}: "
          + ("ok" if check["ok"] else "WRONG"))
    sys.exit(0 if check["ok"] else 1)


if __name__ == "__main__":
    main()
