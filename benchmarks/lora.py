"""Decode speed with unmerged LoRA: a batch of 32 sequences with 0, 1 and 4 distinct adapters, against the base model
without LoRA layers, through the model directly (one decode step, replayed).

    python benchmarks/lora.py                       # Qwen-7B shapes, random weights, bf16, rank 16, CUDA graphs
    python benchmarks/lora.py --bits 4 --rank 64    # a GPTQ int4 base (Q-LoRA), rank 64
    python benchmarks/lora.py --tiny                # CPU smoke run (tiny model, torch reference path)

On CUDA the step is captured once per model in a CUDA graph and replayed; for the LoRA rows the graph is captured with
no adapter in the batch and then replayed with 1 and 4 adapters (set_token_indices only fills a static buffer), and
its output is checked against an eager step. "merged" LoRA costs what "base" costs. Writes JSON to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nanoqwen import QwenConfig  # noqa: E402
from nanoqwen.attention import AttentionMetadata  # noqa: E402
from nanoqwen.kv_cache import KVCache  # noqa: E402
from nanoqwen.lora import LINEARS, LoraAdapter, LoraManager, linear_dims  # noqa: E402
from decode import random_model  # noqa: E402
from throughput import QWEN_7B, TINY  # noqa: E402


def random_adapter(cfg: QwenConfig, rank: int, seed: int) -> LoraAdapter:
    """A rank-`rank` adapter on every linear peft adapts in Qwen (as finetune.py targets), random weights."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(cfg.num_hidden_layers):
        for module, (d_in, d_out) in linear_dims(cfg).items():
            weights[f"transformer.h.{i}.{module}"] = (torch.randn(rank, d_in, generator=g) / d_in ** 0.5,
                                                      torch.randn(d_out, rank, generator=g) * 0.01)
    assert {n.split(".", 3)[3] for n in weights} == set(LINEARS)
    return LoraAdapter(weights, {n: 2.0 for n in weights})


def decode_step(model, batch: int, context: int, block_size: int = 16):
    """A function running one decode step of `batch` sequences at `context` tokens (static inputs, cache of the
    right size; its contents do not change the time)."""
    cfg, dev = model.config, model.device
    per_seq = -(-(context + 1) // block_size)
    cache = KVCache(cfg.num_hidden_layers, batch * per_seq, block_size, cfg.num_attention_heads, cfg.head_dim,
                    model.dtype, dev)
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=dev), max_seqlen_q=1,
        positions=torch.full((batch,), context, device=dev), ntk_index=torch.zeros(batch, dtype=torch.long, device=dev),
        slot_mapping=(tables[:, context // block_size] * block_size + context % block_size).long(),
        block_tables=tables, context_lens=torch.full((batch,), context + 1, dtype=torch.int32, device=dev),
        max_context_len=context + 1, is_decode=True, logits_indices=None)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device=dev)
    return lambda: model(tokens, meta, cache)


def timed(run, steps: int, device) -> float:
    """Seconds per call of run() (after 2 warm-up calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return (time.perf_counter() - t0) / steps


def graphed(step, device):
    """(replay, output) of a CUDA graph of step() on CUDA; (step, None) elsewhere."""
    if device.type != "cuda":
        return step, None
    step()  # compile every kernel before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512, help="tokens in the cache of every sequence")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bits", type=int, choices=[4, 8], help="a GPTQ base with these bits (default: bf16 base)")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per timing")
    ap.add_argument("--rounds", type=int, default=3, help="timings per case (the best is kept)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = QwenConfig.from_dict(TINY if args.tiny else QWEN_7B)
    dtype = (torch.float16 if args.bits else torch.bfloat16) if device.type == "cuda" else torch.float32
    steps = 5 if args.tiny else args.steps
    context = min(args.context, 64) if args.tiny else args.context
    model = random_model(cfg, dtype, device, args.bits, group_size=32 if args.tiny else 128)
    B = args.batch

    with torch.no_grad():
        base_s = timed(graphed(decode_step(model, B, context), device)[0], steps, device)
        manager = LoraManager(model, max_loras=4, max_lora_rank=args.rank, max_num_tokens=max(B, 16))
        for i in range(4):
            manager.add(f"a{i}", random_adapter(cfg, args.rank, seed=i))
        cases = {"0 adapters": [-1] * B, "1 adapter": [0] * B, "4 adapters": [i % 4 for i in range(B)]}
        manager.set_token_indices(cases["0 adapters"])
        step = decode_step(model, B, context)
        replay, out = graphed(step, device)
        best, graph_err = {}, 0.0
        for _ in range(args.rounds):  # cases interleaved, best round kept: a shared machine's noise hits all alike
            for case, idx in cases.items():
                manager.set_token_indices(idx)
                best[case] = min(best.get(case, float("inf")), timed(replay, steps, device))
                if out is not None:  # the graph captured with no adapter serves every mix: compare with eager
                    replay()
                    graph_err = max(graph_err, (out.float() - step().float()).abs().max().item())
        manager.close()
        del replay, out, step
        base_s = min(base_s, timed(graphed(decode_step(model, B, context), device)[0], steps, device))
    rows = [{"case": "base (no LoRA layers)", "s_per_step": base_s}] + \
        [{"case": case, "s_per_step": s} for case, s in best.items()]
    for r in rows:
        r.update(tok_s=B / r["s_per_step"], overhead_pct=100 * (r["s_per_step"] / base_s - 1))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    base = f"GPTQ int{args.bits}" if args.bits else str(dtype).removeprefix("torch.")
    print(f"\n{name}  {'tiny' if args.tiny else 'Qwen-7B shapes'}  {base} base  batch {B}  context {context}  "
          f"rank {args.rank}  {'CUDA graphs' if device.type == 'cuda' else 'eager, torch reference path'}")
    print(f"{'case':<24}{'tok/s':>10}{'ms/step':>10}{'overhead':>10}")
    for r in rows:
        print(f"{r['case']:<24}{r['tok_s']:>10.1f}{1e3 * r['s_per_step']:>10.2f}{r['overhead_pct']:>9.1f}%")
    if device.type == "cuda":
        print(f"graph (captured with 0 adapters) vs eager step, largest |logit difference|: {graph_err:.3g}")
    if os.environ.get("OUT"):
        res = {"device": name, "base": base, "batch": B, "context": context, "rank": args.rank, "rows": rows,
               "graph_vs_eager_max_abs": graph_err}
        Path(os.environ["OUT"], f"lora_bs{B}_r{args.rank}_{base.replace(' ', '')}.json").write_text(
            json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
