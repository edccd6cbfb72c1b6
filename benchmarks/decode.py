"""Batch-1 (or batch-B) decode speed through the whole engine in its default configuration, Qwen-7B shapes with
random weights, against the memory-bandwidth roofline and the gpt-fast-style anchor (fastref), in the same run.

    python benchmarks/decode.py                                   # bf16, int4 and int8 GPTQ weights, bf16 KV
    python benchmarks/decode.py --variants bf16 --kv-cache int8 --context 8192
    python benchmarks/decode.py --tiny                            # CPU smoke run, seconds

The engine is built as a user builds it, `LLM(model, tokenizer=...)`: max_model_len 32768 (so decode attention is
launched for that static length), the KV cache sized from free GPU memory, CUDA graphs. Each weight variant is timed
greedy and with Qwen's chat sampling defaults (top_p 0.8, repetition_penalty 1.1: Qwen-7B-Chat's
generation_config.json), ignore_eos so every run makes exactly --new-tokens tokens; the random head is scaled so that
the logits are peaked as a language model's (a top-p 0.8 nucleus of a few to ~50 tokens; before 2026-11-30 they were
flat, and the chat rows measured the sampler's rare exact-search path instead). tok/s counts the tokens after the
first one, from the first token's time to the last one's. At batch 1, per weight variant: time to first token of a
fresh --ttft-prompt-token prompt (2048) against decoding that many tokens one by one at the greedy speed.
roofline tok/s = batch x copy bandwidth (measured here) / bytes read per step (every weight once, one embedding row,
and the KV cache at the middle of the run). fastref: .bench/fastref.py at the same batch, cache 1024, greedy.
Correctness in the same run: every greedy token must be the argmax (up to rounding) of a cache-free forward over the
tokens before it; every run must make exactly its token count. Writes $OUT/decode_*.json after every row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nanoqwen import LLM, Qwen, QwenConfig, SamplingParams, Tokenizer  # noqa: E402
from nanoqwen.kv_cache import KVCache  # noqa: E402
from throughput import QWEN_7B, TINY, find_vocab, greedy_gap, greedy_tolerance, run_fastref, write_json  # noqa: E402

# the sampling keys of Qwen-7B-Chat's generation_config.json (the base model's has no repetition penalty)
QWEN_CHAT_SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}
MODES = ("greedy", "chat")
LOGIT_SCALE = 4.0  # random_model's lm_head scale: language-model-like (peaked) next-token distributions
BITS = {"bf16": None, "int4": 4, "int8": 8}  # weight variants: bf16, GPTQ int4 and int8 (group 128)


def random_model(cfg: QwenConfig, dtype, device, bits: int | None, group_size: int = 128, seed: int = 0) -> Qwen:
    """Random weights; for GPTQ the quantized linears are swapped in and filled with random packed words."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device), torch.no_grad():
        model = Qwen(cfg).init_weights()
        # The reference init gives flat logits (std 0.02 * sqrt(hidden) = 1.3: a top-p 0.8 nucleus of ~50k tokens, which
        # no language model has, and which sends every chat row through the sampler's exact search). A head 4x larger
        # gives logits of std ~5: a nucleus of a few to ~50 tokens, as a language model's. Greedy tokens are the same.
        model.lm_head.weight.mul_(LOGIT_SCALE)
    torch.set_default_dtype(prev)
    model.rotary.float()
    if bits is not None:
        from nanoqwen.quant.gptq import swap_linears
        swap_linears(model, bits, group_size, device=device)
        for m in model.modules():
            if hasattr(m, "qweight_planar"):
                m.qweight_planar.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, m.qweight_planar.shape, dtype=torch.int32))
                m.scales.copy_(torch.rand_like(m.scales, dtype=torch.float32) * 2e-3)
                m.zeros.fill_(2 ** (bits - 1))
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return model.eval().requires_grad_(False)


def step_bytes(model: Qwen, context: int, kv_cache_dtype) -> int:
    cfg = model.config
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rotary."):
            continue
        total += (t[0].numel() * t.element_size()) if name == "transformer.wte.weight" else t.numel() * t.element_size()
    kv = KVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, model.dtype,
                                 kv_cache_dtype)
    return total + kv * context


def copy_bandwidth(device) -> float:
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 29, dtype=torch.uint8, device=device)  # 512 MiB, far beyond L2
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (s.elapsed_time(e) / 1e3)


def sampling(mode: str, new_tokens: int) -> SamplingParams:
    if mode == "greedy":
        return SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    return SamplingParams.from_generation_config(QWEN_CHAT_SAMPLING, max_new_tokens=new_tokens, ignore_eos=True,
                                                 seed=0)


def decode_speed(llm: LLM, prompts, new_tokens: int, mode: str) -> tuple[dict, list]:
    outs = llm.generate(prompts, sampling(mode, new_tokens))
    first = max(o.metrics["first_token"] for o in outs)
    last = max(o.metrics["finished"] for o in outs)
    wrong = sum(len(o.token_ids) != new_tokens for o in outs)
    return {"tok_s": len(prompts) * (new_tokens - 1) / (last - first), "wrong_token_counts": wrong}, outs


def time_to_first_token(llm: LLM, cfg: QwenConfig, length: int, decode_tok_s: float) -> dict:
    """Seconds from `generate` to the first token of a fresh `length`-token prompt (another one of that length first,
    for the prefill kernels and the cache), against length / decode tok/s (PERFORMANCE.md: under 10%)."""
    g = torch.Generator().manual_seed(2)
    warm, timed = (torch.randint(0, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(2))
    one = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    llm.generate(warm, one)
    t0 = time.perf_counter()
    out = llm.generate(timed, one)
    ttft = out.metrics["first_token"] - t0
    decode = length / decode_tok_s
    return {"prompt": length, "ttft_s": ttft, "decode_s": decode, "ratio": ttft / decode}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", default="bf16,int4,int8", help="comma list of bf16, int4, int8 (GPTQ weights)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of greedy, chat")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128, help="prompt length before decoding")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "int8"])
    ap.add_argument("--max-model-len", type=int, help="default: the engine's own (32768)")
    ap.add_argument("--ttft-prompt", type=int, default=2048, help="prompt length of the time-to-first-token row "
                    "(0: none)")
    ap.add_argument("--no-fastref", action="store_true")
    ap.add_argument("--fastref-timeout", type=float, default=75, help="seconds for fastref (it compiles first)")
    args = ap.parse_args()
    variants, modes = args.variants.split(","), args.modes.split(",")
    if not set(variants) <= set(BITS) or not set(modes) <= set(MODES):
        ap.error(f"--variants takes {', '.join(BITS)}; --modes takes {', '.join(MODES)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = QwenConfig.from_dict(TINY if args.tiny else QWEN_7B)
    tok = Tokenizer.from_pretrained(find_vocab())
    kv = None if args.kv_cache == "auto" else args.kv_cache
    new = 8 if args.tiny else args.new_tokens
    context = 16 if args.tiny else args.context
    engine_args = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    if args.tiny:
        engine_args["num_kv_blocks"] = 64  # the CPU default would zero 0.5 GiB per variant
    name = f"decode_bs{args.batch}_ctx{context}_{args.kv_cache}.json"
    bw = copy_bandwidth(device)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": args.tiny,
           "copy_bandwidth_B_s": bw, "batch": args.batch, "context": context, "new_tokens": new,
           "kv_cache": args.kv_cache, "engine_args": engine_args, "chat_sampling": QWEN_CHAT_SAMPLING, "rows": [],
           "ttft": []}
    ttft_len = min(args.ttft_prompt, 64) if args.tiny else args.ttft_prompt
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (context,), generator=g).tolist() for _ in range(args.batch)]
    for variant in variants:
        bits = BITS[variant]
        dtype = (torch.float16 if bits else torch.bfloat16) if device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        model = random_model(cfg, dtype, device, bits, group_size=128 if not args.tiny else 32)
        llm = LLM(model, tokenizer=tok, kv_cache_dtype=kv, progress=False, **engine_args)
        for mode in modes:  # warm: prefill kernels, the decode graph of this batch, the sampler's path
            llm.generate([p[:32] for p in prompts], sampling(mode, 4))
        setup_s = time.perf_counter() - t0
        nbytes = step_bytes(model, context + new // 2, kv)
        for mode in modes:
            row, outs = decode_speed(llm, prompts, new, mode)
            row.update(variant=variant, mode=mode, step_GB=nbytes / 1e9, setup_s=setup_s,
                       roofline_tok_s=args.batch * bw / nbytes if bw == bw else None)
            tol = greedy_tolerance(model, kv)
            gap = greedy_gap(model, prompts[0], outs[0].token_ids) if mode == "greedy" else 0.0
            row.update(greedy_gap=gap, tolerance=tol, ok=gap <= tol and not row["wrong_token_counts"])
            res["rows"].append(row)
            write_json(res, name)
            print(f"{variant} {mode}: {row['tok_s']:.1f} tok/s (setup {setup_s:.0f} s), greedy gap {gap:.3g}, "
                  f"{'ok' if row['ok'] else 'WRONG'}", flush=True)
        greedy_row = next((r for r in res["rows"] if r["variant"] == variant and r["mode"] == "greedy"), None)
        if ttft_len and greedy_row and args.batch == 1:
            res["ttft"].append(dict(variant=variant, **time_to_first_token(llm, cfg, ttft_len, greedy_row["tok_s"])))
            write_json(res, name)
            t = res["ttft"][-1]
            print(f"{variant} time to first token, {ttft_len}-token prompt: {1e3 * t['ttft_s']:.1f} ms = "
                  f"{100 * t['ratio']:.1f}% of decoding its tokens one by one", flush=True)
        llm.close()
        del model, llm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_fastref:
        res["fastref"] = run_fastref(args.batch, 64 if args.tiny else 1024, args.fastref_timeout, args.tiny)
        write_json(res, name)
    ref = (res.get("fastref") or {}).get(f"fastref_bs{args.batch}_tok_s")
    print(f"\ndevice {res['device']}  copy bandwidth {bw / 1e12:.2f} TB/s  batch {args.batch}  context {context}"
          f"  KV {args.kv_cache}  engine {engine_args or 'defaults'}"
          + ("  [tiny CPU smoke run: numbers mean nothing]" if args.tiny else ""))
    print(f"{'variant':<8}{'mode':<8}{'tok/s':>9}{'GB/step':>9}{'roofline':>10}{'% roof':>8}{'x bf16':>8}"
          f"{'x fastref':>10}  check")
    for r in res["rows"]:
        roof = r["roofline_tok_s"]
        base = next((b["tok_s"] for b in res["rows"] if b["variant"] == "bf16" and b["mode"] == r["mode"]), None)
        print(f"{r['variant']:<8}{r['mode']:<8}{r['tok_s']:>9.1f}{r['step_GB']:>9.2f}{(roof or float('nan')):>10.1f}"
              f"{(100 * r['tok_s'] / roof if roof else float('nan')):>7.0f}%"
              f"{(r['tok_s'] / base if base else float('nan')):>8.2f}{(r['tok_s'] / ref if ref else float('nan')):>10.2f}"
              f"  {'ok' if r['ok'] else 'WRONG'}")
    for t in res["ttft"]:
        print(f"{t['variant']:<8}time to first token ({t['prompt']} tokens) {1e3 * t['ttft_s']:.1f} ms = "
              f"{100 * t['ratio']:.1f}% of decoding them one by one ({1e3 * t['decode_s']:.0f} ms)")
    if res.get("fastref", {}).get("error"):
        print("fastref:", res["fastref"]["error"])
    print("targets (PERFORMANCE.md): bf16 >= 85% of roofline and >= 1.3x fastref; int4 >= 2.5x bf16; time to first "
          "token (2k prompt) < 10% of decoding the prompt's tokens one by one")
    sys.exit(0 if all(r["ok"] for r in res["rows"]) else 1)


if __name__ == "__main__":
    main()
