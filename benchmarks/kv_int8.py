"""int8 KV cache on a GPU: memory per token, sequences per memory budget, paged decode attention speed vs bf16.

    python benchmarks/kv_int8.py [--sweep]                    # GPU: Qwen-7B shapes (32 layers, 32 heads of 128)
    TRITON_INTERPRET=1 python benchmarks/kv_int8.py --tiny    # CPU smoke run: tiny shapes, numbers mean nothing

What it measures, all in one run (PERFORMANCE.md targets: <= 0.53x the KV bytes of bf16, >= 1.9x sequences in the
same memory, >= 1.2x decode speed at 8k context):
1. KV bytes per token over all layers, from the tensors a `KVCache` really allocates (values + scales + zeros), int8
   against bf16, and how many sequences of 4k tokens fit in 16 and 64 GiB (whole blocks of 16, whole sequences: the
   integer counts at 16 GiB, 15 vs 8, fall below the limit ratio of 1.94).
2. Paged decode attention (`paged_attention`) at 8k context, batch 1 and 32: one layer timed with
   triton.testing.do_bench (L2 flushed before every call, so the cache comes from HBM as in a real step), times 32
   layers = the attention of one decode step; GB/s on the bytes the kernel must read. The int8 cache holds the same
   K/V as the bf16 one, quantized by the store kernel ("default" mode).
3. An estimate of the whole decode step: the weights (14.2 GB in bf16, PERFORMANCE.md) read at the copy bandwidth
   measured here, plus the measured attention. At batch 1 and 8k the KV is 4.3 GB against 14.2 GB of weights, so
   even free attention gives at most (14.2 + 4.3) / (14.2 + 2.2) = 1.13x: the 1.2x target needs a larger batch.
4. The KV store kernels: bf16 `store_kv` against the quantizing `store_kv_int8` (default and qwen modes) at a
   decode batch (32 tokens) and a prefill (8192 tokens).
Correctness in the same run: every kernel output is NaN-poisoned first; int8 decode against `paged_attention_ref`
reading the same int8 cache (and its quantization error against the bf16 result), the int8 store bit-exact against
`store_kv_int8_ref`. Prints a table last; writes $OUT/kv_int8.json after every row when OUT is set. Exit status 1 if a
result is wrong.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nanoqwen.kernels import kv_store, paged_attention  # noqa: E402
from nanoqwen.kv_cache import KVCache  # noqa: E402
from nanoqwen.quant.kv_int8 import store_kv_int8_ref  # noqa: E402
from throughput import write_json  # noqa: E402

FIELDS = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")  # a LayerCache's tensors
TARGET_BYTES, TARGET_SEQS, TARGET_SPEED = 0.53, 1.9, 1.2  # PERFORMANCE.md
WEIGHT_BYTES = 14.2e9  # Qwen-7B bf16 weights read per decode step (PERFORMANCE.md)
FULL = dict(layers=32, heads=32, head_dim=128, ctx=8192, batches=[1, 32], budgets_gib=[16, 64], seq_len=4096,
            store_tokens=[32, 8192], block_size=16, dtype=torch.bfloat16, copy_bytes=1 << 30)
TINY = dict(layers=2, heads=2, head_dim=32, ctx=48, batches=[1, 2], budgets_gib=[16, 64], seq_len=4096,
            store_tokens=[4, 20], block_size=16, dtype=torch.float32, copy_bytes=1 << 20)
# --sweep: (BLOCK_N, num_warps) of the decode kernel, tried on the int8 cache (a byte a value: larger tiles may pay)
DECODE_SWEEP, DECODE_SWEEP_TINY = [(32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (256, 8)], [(16, 1), (32, 1)]


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, tiny: bool) -> float:
    """Median milliseconds of fn(); on the GPU with the L2 flushed before every call."""
    if not tiny:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t = time.perf_counter()  # the interpreter: one call, no warm-up (the numbers mean nothing)
    fn()
    return (time.perf_counter() - t) * 1e3


def cache_bytes_per_token(cfg, kv_cache_dtype) -> int:
    """Bytes one token takes over all layers, from what KVCache allocates (checked against bytes_per_token)."""
    blocks, bs = 2, cfg["block_size"]
    cache = KVCache(cfg["layers"], blocks, bs, cfg["heads"], cfg["head_dim"], torch.bfloat16, "meta", kv_cache_dtype)
    tensors = [cache.k, cache.v]
    if cache.quantized:
        tensors += [cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero]
    total = sum(t.numel() * t.element_size() for t in tensors) // (blocks * bs)
    assert total == KVCache.bytes_per_token(cfg["layers"], cfg["heads"], cfg["head_dim"], torch.bfloat16,
                                            kv_cache_dtype), "KVCache.bytes_per_token disagrees with the allocation"
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="also time other decode tiles on the int8 cache")
    args = ap.parse_args()
    if DEV == "cpu" and not args.tiny:
        sys.exit("no GPU: run with --tiny (and TRITON_INTERPRET=1) for a smoke run")
    tiny = args.tiny
    cfg = TINY if tiny else FULL
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    import triton
    L, H, D, bs, dtype = cfg["layers"], cfg["heads"], cfg["head_dim"], cfg["block_size"], cfg["dtype"]
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)", "torch": torch.__version__,
           "triton": triton.__version__, "seed": seed, "dtype": str(dtype), "layers": L, "heads": H, "head_dim": D,
           "block_size": bs, "rows": []}
    rows, wrong = res["rows"], []
    res["wrong"], res["tiny"] = wrong, tiny

    def row(name, value, unit, baseline="", ratio=None, target=None, higher=True, err=None, **extra):
        ok = "" if target is None or ratio is None else \
            ("yes" if (ratio >= target if higher else ratio <= target) else "NO")
        rows.append(dict(name=name, value=value, unit=unit, baseline=baseline, ratio=ratio, target=target,
                         higher_is_better=higher, ok=ok, max_err=err, **extra))
        write_json(res, "kv_int8.json")
        print(f"{name}: {value:.4g} {unit} {baseline} ratio={ratio} err={err}", flush=True)

    # ---- copy bandwidth (read + written)
    a = torch.randn(cfg["copy_bytes"] // 2, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    copy_bw = 2 * a.numel() * 2 / (bench_ms(lambda: b.copy_(a), tiny) / 1e3) / 1e9
    del a, b
    res["copy_GBps"] = copy_bw
    print(f"copy bandwidth: {copy_bw:.1f} GB/s", flush=True)

    # ---- 1. memory: always at Qwen-7B shapes (arithmetic on the allocation, no device memory used)
    mem_cfg = dict(FULL, block_size=bs)
    bpt_bf16, bpt_int8 = cache_bytes_per_token(mem_cfg, None), cache_bytes_per_token(mem_cfg, "int8")
    row("KV bytes/token, 7B, int8", bpt_int8, "B", f"bf16 {bpt_bf16}", bpt_int8 / bpt_bf16, TARGET_BYTES, higher=False)
    per_seq = lambda bpt: -(-cfg["seq_len"] // bs) * bs * bpt  # whole blocks
    row("seqs per memory, the limit", per_seq(bpt_bf16) / per_seq(bpt_int8), "x", "bf16 1",
        per_seq(bpt_bf16) / per_seq(bpt_int8), TARGET_SEQS)
    for gib in cfg["budgets_gib"]:  # whole sequences: with 2 GiB a bf16 sequence, 16 GiB rounds 15.5 down to 15
        n_bf16, n_int8 = (gib << 30) // per_seq(bpt_bf16), (gib << 30) // per_seq(bpt_int8)
        row(f"seqs of {cfg['seq_len']} in {gib} GiB", n_int8, "seqs", f"bf16 {n_bf16}", n_int8 / n_bf16, TARGET_SEQS)

    # ---- 2. paged decode attention at long context, int8 vs bf16
    ctx, scale = cfg["ctx"], D ** -0.5
    attn_ms = {}
    for B in cfg["batches"]:
        nblk = -(-ctx // bs)
        tables = torch.randperm(B * nblk, device=DEV).to(torch.int32).view(B, nblk)  # shuffled blocks
        lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
        slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device=DEV)).flatten(1)[:, :ctx].flatten()
        k_cache = torch.empty(B * nblk, bs, H, D, device=DEV, dtype=dtype)
        v_cache = torch.empty_like(k_cache)
        q8 = KVCache(1, B * nblk, bs, H, D, dtype, DEV, "int8").layer(0)
        for i in range(0, slots.numel(), 1 << 15):  # fill in chunks: random K/V into both caches
            k, v = (torch.randn(min(1 << 15, slots.numel() - i), H, D, device=DEV, dtype=dtype) for _ in range(2))
            kv_store.store_kv(k, v, k_cache, v_cache, slots[i:i + k.shape[0]])
            kv_store.store_kv_int8(k, v, q8, slots[i:i + k.shape[0]])
        del k, v
        q = torch.randn(B, H, D, device=DEV, dtype=dtype)
        logn = 1 + torch.rand(B, device=DEV)
        quant = dict(k_scale=q8.k_scale, k_zero=q8.k_zero, v_scale=q8.v_scale, v_zero=q8.v_zero)
        out_fp, out_q = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
        run_fp = lambda: paged_attention.paged_attention(q, k_cache, v_cache, tables, lens, scale, ctx, logn,
                                                         out=out_fp)
        run_q = lambda: paged_attention.paged_attention(q, q8.k, q8.v, tables, lens, scale, ctx, logn, **quant,
                                                        out=out_q)
        run_fp(); run_q(); sync()
        nc = min(B, 4)  # the reference gathers whole contexts in fp32: check the first sequences only
        ref_q = paged_attention.paged_attention_ref(q[:nc], q8.k, q8.v, tables[:nc], lens[:nc], scale, logn[:nc],
                                                    **quant)
        ref_fp = paged_attention.paged_attention_ref(q[:nc], k_cache, v_cache, tables[:nc], lens[:nc], scale,
                                                     logn[:nc])
        err_q = (out_q[:nc].float() - ref_q.float()).abs().max().item()
        err_fp = (out_fp[:nc].float() - ref_fp.float()).abs().max().item()
        quant_err = (out_q.float() - out_fp.float()).abs().max().item()  # int8 vs bf16 cache, same K/V
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for what, e in (("int8", err_q), ("bf16", err_fp)):
            if not e < tol or out_q.isnan().any() or out_fp.isnan().any():
                wrong.append(f"decode B={B} {what}: max err {e:.3g} (seed {seed})")
        t_fp, t_q = bench_ms(run_fp, tiny), bench_ms(run_q, tiny)
        attn_ms[B] = (t_fp, t_q)
        bytes_fp = 2 * B * ctx * H * D * k_cache.element_size()
        bytes_q = 2 * B * ctx * H * (D + 2 * q8.k_scale.element_size())
        row(f"decode attn {B}x{ctx}, x{L} layers", L * t_q, "ms", f"bf16 {L * t_fp:.3f} ms", t_fp / t_q, TARGET_SPEED,
            err=err_q, bf16_err=err_fp, int8_vs_bf16_err=quant_err,
            int8_GBps=bytes_q / t_q / 1e6, bf16_GBps=bytes_fp / t_fp / 1e6, copy_GBps=copy_bw)
        print(f"  int8 {bytes_q / t_q / 1e6:.0f} GB/s, bf16 {bytes_fp / t_fp / 1e6:.0f} GB/s (copy {copy_bw:.0f}); "
              f"int8 vs bf16 output max diff {quant_err:.3g}", flush=True)
        if args.sweep:
            default = paged_attention._tiles
            for tiles in DECODE_SWEEP_TINY if tiny else DECODE_SWEEP:
                paged_attention._tiles = lambda d, tiles=tiles: (*tiles, default(d)[2])
                try:
                    t = bench_ms(run_q, tiny)
                    e = (out_q[:nc].float() - ref_q.float()).abs().max().item()
                    print(f"  sweep int8 decode {B}x{ctx} BLOCK_N,warps {tiles}: {t * 1e3:.1f} us "
                          f"({bytes_q / t / 1e6:.0f} GB/s), err {e:.3g}", flush=True)
                    res.setdefault("sweep", []).append(dict(batch=B, tiles=tiles, us=t * 1e3, err=e))
                except Exception as exc:  # out of resources, say
                    print(f"  sweep {tiles}: failed {type(exc).__name__}: {str(exc)[:120]}")
                finally:
                    paged_attention._tiles = default
        del k_cache, v_cache, q8, ref_q, ref_fp

    # ---- 3. whole decode step estimate: weights at the copy bandwidth + the measured attention of 32 layers
    if not tiny:
        t_w = WEIGHT_BYTES / (copy_bw * 1e9) * 1e3  # ms
        for B, (t_fp, t_q) in attn_ms.items():
            step_fp, step_q = t_w + L * t_fp, t_w + L * t_q
            row(f"est. decode step B={B} ctx {ctx}", step_q, "ms", f"bf16 {step_fp:.2f} ms", step_fp / step_q,
                TARGET_SPEED, weights_ms=t_w)

    # ---- 4. KV store: bf16 copy vs quantizing store (default and qwen modes), bit-exact check
    for T in cfg["store_tokens"]:
        kv = torch.randn(T, 3, H, D, device=DEV, dtype=dtype)
        k, v = kv[:, 1], kv[:, 2]  # strided, as the model's
        nblk = -(-T // bs) + 4
        slots = torch.randperm(nblk * bs, device=DEV)[:T]
        slots[::17] = -1
        cu = torch.tensor([0, T // 3, T], device=DEV, dtype=torch.int32)  # two sequences (qwen mode)
        k_cache = torch.full((nblk, bs, H, D), float("nan"), device=DEV, dtype=dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
        t_fp = bench_ms(lambda: kv_store.store_kv(k, v, k_cache, v_cache, slots), tiny)
        for mode in ("default", "qwen"):
            q8 = KVCache(1, nblk, bs, H, D, dtype, DEV, "int8", mode).layer(0)
            for t in (q8.k_scale, q8.k_zero, q8.v_scale, q8.v_zero):
                t.fill_(float("nan"))
            ref = q8._replace(**{f: getattr(q8, f).clone() for f in FIELDS})
            kv_store.store_kv_int8(k, v, q8, slots, mode, cu)
            store_kv_int8_ref(k, v, ref, slots, mode, cu)
            same = all(torch.equal(getattr(q8, f).nan_to_num(7.0), getattr(ref, f).nan_to_num(7.0)) for f in FIELDS)
            if not same:
                wrong.append(f"store_kv_int8 {mode} T={T}: not bit-exact against the reference (seed {seed})")
            t_q = bench_ms(lambda: kv_store.store_kv_int8(k, v, q8, slots, mode, cu), tiny)
            moved = 2 * T * H * (D * k.element_size() + D + 2 * q8.k_scale.element_size())  # read + written
            row(f"kv store int8 {mode} {T} tok", t_q * 1e3, "us", f"bf16 {t_fp * 1e3:.1f} us", t_fp / t_q, None,
                err=0.0 if same else float("inf"), GBps=moved / t_q / 1e6)
        del kv, k_cache, v_cache, q8, ref

    # ---- table
    print(f"\n{res['device']}, {dtype}, {L} layers x {H} heads x {D}; copy bandwidth {copy_bw:.0f} GB/s; seed {seed}"
          + ("  [tiny CPU smoke run: numbers mean nothing]" if tiny else ""))
    print(f"{'what':<34}{'value':>12}  {'unit':<6}{'baseline':>18}{'ratio':>8}{'target':>8}{'ok':>5}{'max err':>10}")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        target = "" if r["target"] is None else f"{'>=' if r['higher_is_better'] else '<='}{r['target']}"
        err = "" if r["max_err"] is None else f"{r['max_err']:.2g}"
        print(f"{r['name']:<34}{r['value']:>12.4g}  {r['unit']:<6}{r['baseline']:>18}{ratio:>8}{target:>8}"
              f"{r['ok']:>5}{err:>10}")
    if wrong:
        print("WRONG RESULTS:\n  " + "\n  ".join(wrong))
    write_json(res, "kv_int8.json")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
