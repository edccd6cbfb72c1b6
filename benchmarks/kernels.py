"""Attention kernels on the GPU: check against the references, time, and compare with baselines of the same run.

- prefill: `flash_attn_varlen` TFLOP/s against torch SDPA (flash backend), causal, 32 heads of 128, bf16, 2k and 8k
  tokens, as one sequence and as 4 packed sequences (SDPA then runs them as a batch of 4).
- decode: `paged_attention` GB/s on the KV bytes read, 32 sequences x 4k context in blocks of 16 (and 4 sequences,
  where the split-KV path runs), against the device copy bandwidth measured here (read + written, as ceilings.py).
- KV store: `store_kv` GB/s (K and V read and written) against the same copy bandwidth.

    python benchmarks/kernels.py [--sweep]                    # GPU; --sweep also times other tile choices
    TRITON_INTERPRET=1 python benchmarks/kernels.py --tiny    # CPU smoke run: tiny shapes, numbers mean nothing

Prints a table last; writes everything to $OUT/kernels.json when OUT is set.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from nanoqwen.kernels import flash_attention, kv_store, paged_attention  # noqa: E402

TARGET_PREFILL = 0.8  # x SDPA TFLOP/s (PERFORMANCE.md)
TARGET_DECODE = 0.7  # x copy bandwidth on the KV bytes (PERFORMANCE.md)
# --sweep candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill, (BLOCK_N, num_warps) for decode; the
# hd-128 ones build without register spills for sm_90 except (128, 64, 4, 3), kept as a check of that claim
PREFILL_SWEEP = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]
DECODE_SWEEP = [(16, 4), (32, 4), (64, 4), (128, 4), (64, 8), (128, 8)]
PREFILL_SWEEP_TINY, DECODE_SWEEP_TINY = [(16, 16, 1, 1), (32, 16, 1, 1)], [(16, 1), (32, 1)]


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, iters=20, warm=3):
    """Median seconds of fn()."""
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def max_err(out, ref):
    return (out.float() - ref.float()).abs().max().item()


def paged_cache(B, ctx, block_size, H, D, dtype):
    """A cache with every sequence's blocks shuffled over the pool, and its block tables."""
    nblk = -(-ctx // block_size)
    perm = torch.randperm(B * nblk, device=DEV).to(torch.int32)
    k_cache = torch.randn(B * nblk, block_size, H, D, device=DEV, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    return k_cache, v_cache, perm.view(B, nblk)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--sweep", action="store_true", help="also time a few other tile and split choices")
    args = ap.parse_args()
    if DEV == "cpu" and not args.tiny:
        sys.exit("no GPU: run with --tiny (and TRITON_INTERPRET=1) for a smoke run")
    tiny = args.tiny
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    H, D = (2, 32) if tiny else (32, 128)
    dtype = torch.float32 if tiny else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    iters = 3 if tiny else 20
    import triton
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype), "heads": H, "head_dim": D,
           "rows": []}
    rows = res["rows"]

    def row(name, value, unit, baseline="", ratio=None, target=None, err=None, **extra):
        ok = "" if target is None or ratio is None else ("yes" if ratio >= target else "NO")
        rows.append(dict(name=name, value=value, unit=unit, baseline=baseline, ratio=ratio, target=target, ok=ok,
                         max_err=err, **extra))
        print(f"{name}: {value:.3f} {unit} {baseline} err={err}", flush=True)

    # ---- copy bandwidth (read + written), as ceilings.py
    n = (1 << 20) if tiny else (1 << 30)
    a = torch.randn(n, device=DEV, dtype=torch.bfloat16); b = torch.empty_like(a)
    copy_bw = 2 * a.numel() * 2 / bench(lambda: b.copy_(a), iters) / 1e9
    del a, b
    res["copy_GBps"] = copy_bw
    print(f"copy bandwidth: {copy_bw:.1f} GB/s", flush=True)

    # ---- prefill attention vs SDPA
    scale = D ** -0.5
    for S in ([64] if tiny else [2048, 8192]):
        for nseq in (1, 4):
            L = S // nseq
            q, k, v = (torch.randn(S, H, D, device=DEV, dtype=dtype) for _ in range(3))
            cu = torch.arange(0, S + 1, L, device=DEV, dtype=torch.int32)
            qb, kb, vb = (t.view(nseq, L, H, D).transpose(1, 2) for t in (q, k, v))
            flops = nseq * 4 * L * L * D * H / 2
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if DEV == "cuda" else contextlib.nullcontext():
                sdpa = lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
                t_sdpa = bench(sdpa, iters)
                sdpa_out = sdpa().transpose(1, 2).reshape(S, H, D)
            out = torch.full_like(q, float("nan"))
            kernel = lambda: flash_attention.flash_attn_varlen(q, k, v, cu, L, scale, out=out)
            kernel()
            # the torch reference (fp32 math) where it fits quickly, else the SDPA result
            ref = flash_attention.flash_attn_varlen_ref(q, k, v, cu, scale) if S <= 2048 else sdpa_out
            err = max_err(out, ref)
            t = bench(kernel, iters)
            name = f"prefill S={S} {'1 seq' if nseq == 1 else f'{nseq}x{L}'}"
            row(name, flops / t / 1e12, "TFLOP/s", f"SDPA {flops / t_sdpa / 1e12:.1f}", (flops / t) / (flops / t_sdpa),
                TARGET_PREFILL, err, ms=t * 1e3, sdpa_ms=t_sdpa * 1e3)
            if args.sweep and nseq == 1:
                default = flash_attention._tiles
                for cfg in PREFILL_SWEEP_TINY if tiny else PREFILL_SWEEP:
                    flash_attention._tiles = lambda d, dt, cfg=cfg: cfg
                    try:
                        t_cfg = bench(kernel, iters)
                        print(f"  sweep {name} tiles {cfg}: {flops / t_cfg / 1e12:.1f} TFLOP/s, err {max_err(out, ref):.3g}")
                        res.setdefault("sweep", []).append(dict(name=name, tiles=cfg, TFLOPs=flops / t_cfg / 1e12))
                    except Exception as e:  # out of shared memory, say
                        print(f"  sweep {name} tiles {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                    finally:
                        flash_attention._tiles = default
            del q, k, v, out, ref, sdpa_out

    # ---- paged decode vs copy bandwidth
    block_size = 16
    for B, ctx in ([(4, 100), (1, 200)] if tiny else [(32, 4096), (4, 4096)]):
        k_cache, v_cache, tables = paged_cache(B, ctx, block_size, H, D, dtype)
        q = torch.randn(B, H, D, device=DEV, dtype=dtype)
        lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
        logn = 1 + torch.rand(B, device=DEV)
        out = torch.full_like(q, float("nan"))
        kernel = lambda splits=None: paged_attention.paged_attention(q, k_cache, v_cache, tables, lens, scale, ctx,
                                                                     logn, num_splits=splits, out=out)
        kernel()
        ref = paged_attention.paged_attention_ref(q, k_cache, v_cache, tables, lens, scale, logn)
        err = max_err(out, ref)
        kv_bytes = 2 * B * ctx * H * D * k_cache.element_size()
        t = bench(kernel, iters)
        splits = paged_attention.num_kv_splits(B, H, ctx, paged_attention._tiles(D)[2], torch.device(DEV))
        gbps = kv_bytes / t / 1e9
        row(f"decode {B}x{ctx} (splits {splits})", gbps, "GB/s", f"copy {copy_bw:.0f}", gbps / copy_bw, TARGET_DECODE,
            err, us=t * 1e6)
        if args.sweep:
            default = paged_attention._tiles
            for cfg in DECODE_SWEEP_TINY if tiny else DECODE_SWEEP:
                for forced in (1, None):
                    paged_attention._tiles = lambda d, cfg=cfg: (*cfg, default(d)[2])
                    try:
                        t_cfg = bench(lambda: kernel(forced), iters)
                        print(f"  sweep decode {B}x{ctx} BLOCK_N,warps {cfg} splits {forced or 'auto'}: "
                              f"{kv_bytes / t_cfg / 1e9:.0f} GB/s, err {max_err(out, ref):.3g}")
                        res.setdefault("sweep", []).append(dict(name=f"decode {B}x{ctx}", tiles=cfg, splits=forced,
                                                                GBps=kv_bytes / t_cfg / 1e9))
                    finally:
                        paged_attention._tiles = default
        del k_cache, v_cache, q, out, ref

    # ---- KV store
    T = 64 if tiny else 16384
    kv = torch.randn(T, 3, H, D, device=DEV, dtype=dtype)
    k, v = kv[:, 1], kv[:, 2]  # strided, as the model's
    nblk = T // block_size + 4
    k_cache = torch.full((nblk, block_size, H, D), float("nan"), device=DEV, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(nblk * block_size, device=DEV)[:T]
    slots[::17] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_store.store_kv(k, v, k_cache, v_cache, slots)
    kv_store.store_kv_ref(k, v, k_ref, v_ref, slots)
    same = torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)) and \
        torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    t = bench(lambda: kv_store.store_kv(k, v, k_cache, v_cache, slots), iters)
    moved = 2 * 2 * T * H * D * k.element_size()  # K and V, read and written
    row(f"kv store {T} tokens", moved / t / 1e9, "GB/s", f"copy {copy_bw:.0f}", moved / t / 1e9 / copy_bw, None,
        0.0 if same else float("inf"), us=t * 1e6)

    # ---- table
    print(f"\n{res['device']}, {dtype}, {H} heads x {D}; copy bandwidth {copy_bw:.0f} GB/s"
          + ("  [tiny CPU smoke run: numbers mean nothing]" if tiny else ""))
    print(f"{'what':<28}{'value':>12}  {'unit':<8}{'baseline':>14}{'ratio':>8}{'target':>8}{'ok':>5}{'max err':>10}")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        target = "" if r["target"] is None else f">={r['target']}"
        print(f"{r['name']:<28}{r['value']:>12.2f}  {r['unit']:<8}{r['baseline']:>14}{ratio:>8}{target:>8}"
              f"{r['ok']:>5}{r['max_err']:>10.2g}")
    bad = [r["name"] for r in rows if not r["max_err"] < (1e-4 if dtype == torch.float32 else 5e-2)]
    if bad:
        print("WRONG RESULTS:", ", ".join(bad))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernels.json"), "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
