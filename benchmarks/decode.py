"""Batch-1 (or batch-B) decode speed through the whole engine, Qwen-7B shapes with random weights, against the
memory-bandwidth roofline and the gpt-fast-style anchor (.bench/fastref.py), all measured in the same run.

    python benchmarks/decode.py                                   # bf16, int4 and int8 GPTQ, bf16 KV
    python benchmarks/decode.py --variants bf16 --kv-cache int8 --context 8192
    python benchmarks/decode.py --tiny                            # CPU smoke run

roofline tok/s = measured copy bandwidth / bytes read per step (all weights once, one embedding row, and the KV
cache of the context). Writes JSON to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nanoqwen import LLM, Qwen, QwenConfig, SamplingParams, Tokenizer  # noqa: E402
from nanoqwen.kv_cache import KVCache  # noqa: E402
from throughput import QWEN_7B, TINY, find_vocab  # noqa: E402


def random_model(cfg: QwenConfig, dtype, device, bits: int | None, group_size: int = 128, seed: int = 0) -> Qwen:
    """Random weights; for GPTQ the quantized linears are swapped in and filled with random packed words."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen(cfg).init_weights()
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


def decode_speed(model, tokenizer, batch: int, context: int, new_tokens: int, kv_cache_dtype) -> dict:
    max_len = context + new_tokens + 16
    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=max(batch, 1), kv_cache_dtype=kv_cache_dtype,
              max_model_len=max_len, num_kv_blocks=batch * -(-max_len // 16) + 8)  # what the run needs, no more
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 151000, (context,), generator=g).tolist() for _ in range(batch)]
    llm.generate([p[:32] for p in prompts], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))  # warm
    outs = llm.generate(prompts, params)
    first = max(o.metrics["first_token"] for o in outs)
    last = max(o.metrics["finished"] for o in outs)
    llm.close()
    return {"tok_s": batch * (new_tokens - 1) / (last - first), "batch": batch, "context": context}


def fastref(device) -> dict | None:
    script = ROOT / ".bench" / "fastref.py"
    if device.type != "cuda" or not script.is_file():
        return None
    out = Path(os.environ.get("OUT") or "/tmp")
    r = subprocess.run([sys.executable, str(script)], env={**os.environ, "BS": "1", "MAXS": "1024", "OUT": str(out)},
                       capture_output=True, text=True)
    print(r.stdout[-400:], r.stderr[-400:])
    f = out / "fastref_bs1_S1024.json"
    return json.loads(f.read_text()) if f.is_file() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", default="bf16,int4,int8", help="comma list of bf16, int4, int8 (GPTQ weights)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128, help="prompt length before decoding")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "int8"])
    ap.add_argument("--no-fastref", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = QwenConfig.from_dict(TINY if args.tiny else QWEN_7B)
    tok = Tokenizer.from_pretrained(find_vocab())
    kv = None if args.kv_cache == "auto" else args.kv_cache
    new = 16 if args.tiny else args.new_tokens
    bw = copy_bandwidth(device)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "copy_bandwidth_B_s": bw,
           "kv_cache": args.kv_cache, "rows": []}
    for variant in args.variants.split(","):
        bits = {"bf16": None, "int4": 4, "int8": 8}[variant]
        dtype = (torch.float16 if bits else torch.bfloat16) if device.type == "cuda" else torch.float32
        model = random_model(cfg, dtype, device, bits, group_size=128 if not args.tiny else 32)
        speed = decode_speed(model, tok, args.batch, args.context, new, kv)
        nbytes = step_bytes(model, args.context + new // 2, kv)
        speed.update(variant=variant, step_GB=nbytes / 1e9, roofline_tok_s=args.batch * bw / nbytes if bw == bw else None)
        res["rows"].append(speed)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_fastref:
        res["fastref"] = fastref(device)
    base = next((r["tok_s"] for r in res["rows"] if r["variant"] == "bf16"), None)
    ref = (res.get("fastref") or {}).get("fastref_bs1_tok_s")
    print(f"\ndevice {res['device']}  copy bandwidth {bw / 1e12:.2f} TB/s  batch {args.batch}  context {args.context}"
          f"  KV {args.kv_cache}")
    print(f"{'variant':<8}{'tok/s':>9}{'GB/step':>9}{'roofline':>10}{'% roof':>8}{'x bf16':>8}{'x fastref':>10}")
    for r in res["rows"]:
        roof = r["roofline_tok_s"]
        print(f"{r['variant']:<8}{r['tok_s']:>9.1f}{r['step_GB']:>9.2f}{(roof or float('nan')):>10.1f}"
              f"{(100 * r['tok_s'] / roof if roof else float('nan')):>7.0f}%"
              f"{(r['tok_s'] / base if base else float('nan')):>8.2f}{(r['tok_s'] / ref if ref else float('nan')):>10.2f}")
    print("targets (PERFORMANCE.md): bf16 >= 85% of roofline and >= 1.3x fastref; int4 >= 2.5x bf16")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"decode_bs{args.batch}_ctx{args.context}_{args.kv_cache}.json").write_text(
            json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
