"""Decode-sized matmuls on a GPU: the GPTQ int4/int8 GEMVs (old split-K kernel and the magic-number GEMV) and the bf16
split-K GEMV, each against bf16 F.linear (cuBLAS) in the same run.

    python benchmarks/gptq_bench.py            # GPU (H100/H200): Qwen-7B shapes, group 128
    python benchmarks/gptq_bench.py --sweep    # also sweep the new kernels' launch configs (block_n x split_k)
    python benchmarks/gptq_bench.py --tiny     # CPU smoke test under TRITON_INTERPRET=1 (numbers mean nothing)

What it measures, all in one run (PERFORMANCE.md: ratios against baselines of the same run):
1. device copy bandwidth (bytes read + written of a 1 GiB device-to-device copy): the ceiling;
2. GEMV (1 row), int4 and int8, (K x N) = 4096x12288, 4096x11008, 11008x4096: the old split-K kernel and the
   magic-number GEMV, GB/s on the packed weight bytes (and on all bytes read: + scales, zeros, x, y), fraction of the
   copy bandwidth;
3. the decode-step matmuls (c_attn 4096->12288, attn.c_proj 4096->4096, w2+w1 fused 4096->22016, mlp.c_proj
   11008->4096) at M = 1, 16, 64 rows: bf16 F.linear (cuBLAS), the bf16 split-K GEMV (M <= 16), int4 / int8 GPTQ
   old and magic (fp16 activations, as the checkpoints run), and the 32-layer sums (each kernel, and the faster of
   each pair: what NANOQWEN_GEMV=auto picks);
4. bf16 GEMV: the split-K kernel vs cuBLAS at M = 1, 4, 16 on those shapes and lm_head (4096 -> 151936), TB/s on the
   weight bytes.
Every timed kernel is first checked on fresh random weights with a NaN-poisoned output: GPTQ against the fp32
reference in fp16 and bf16, the bf16 GEMV against an fp32 matmul. Times are medians of triton.testing.do_bench,
which flushes the L2 before every call, so weights come from HBM as in a real decode step. Prints tables last;
writes $OUT/gptq_bench.json after every row when OUT is set.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUP = 128
LAYERS = 32
FULL = dict(gemv=[(4096, 12288), (4096, 11008), (11008, 4096)],
            decode={"c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "w2+w1": (4096, 22016),
                    "mlp.c_proj": (11008, 4096)}, rows=[1, 16, 64], lm_head=(4096, 151936), linear_rows=[1, 4, 16],
            copy_bytes=1 << 30)
TINY = dict(gemv=[(256, 96), (384, 64)],
            decode={"c_attn": (128, 96), "attn.c_proj": (128, 32), "w2+w1": (128, 128), "mlp.c_proj": (256, 32)},
            rows=[1, 64], lm_head=(64, 160), linear_rows=[1, 4], copy_bytes=1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes; on a CPU-only machine runs the interpreter")
    ap.add_argument("--sweep", action="store_true", help="also sweep the new kernels' configs (block_n x split_k)")
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        if not args.tiny:
            sys.exit("gptq_bench.py needs a CUDA GPU; on the CPU run it with --tiny (a smoke test)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch.nn.functional as F
    import triton
    import triton.testing

    from nanoqwen.kernels import gemv as lg
    from nanoqwen.kernels import gptq_matmul as gm
    from throughput import write_json

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny else FULL
    seed = int(time.time())
    torch.manual_seed(seed)

    def bench_ms(fn) -> float:
        if dev.type == "cuda":
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        t = time.perf_counter()  # the interpreter: one call, no warm-up (the numbers mean nothing)
        fn()
        return (time.perf_counter() - t) * 1e3

    def random_layer(K: int, N: int, bits: int):
        """Random planar weights, group 128, symmetric zero points (as Qwen's checkpoints), with an fp16 bias."""
        q = torch.randint(0, 2**bits, (K, N), device=dev, dtype=torch.int32)
        n_groups = -(-K // GROUP)
        scales = (torch.rand(n_groups, N, device=dev) * 0.002 + 0.001).half()
        zeros = torch.full((n_groups, N), 2 ** (bits - 1), device=dev, dtype=torch.float16)
        bias = (torch.randn(N, device=dev) * 0.1).half()
        return gm.pack_planar(q, bits), scales, zeros, bias

    def gptq(kernel, x, layer, bits, **cfg):
        qweight, scales, zeros, bias = layer
        if kernel == "old":
            return gm.gptq_matmul(x, qweight, scales, zeros, bits, GROUP, bias, **cfg)
        return gm.gptq_gemv(x, qweight, scales, zeros, bits, GROUP, bias, sym=True, **cfg)

    def rel_err(layer, K: int, bits: int, M: int, dtype, kernel: str, **cfg) -> float:
        """Relative error against the fp32 reference on a fresh x, output poisoned first (NaN if any unwritten)."""
        qweight, scales, zeros, bias = layer
        x = torch.randn(M, K, device=dev).to(dtype)
        out = torch.full((M, qweight.shape[1]), float("nan"), device=dev, dtype=dtype)
        y = gptq(kernel, x, layer, bits, out=out, **cfg)
        W = gm.dequantize_planar(qweight, scales, zeros, None, bits, GROUP, K)
        ref = x.float() @ W.t() + bias.float()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        return float("nan") if torch.isnan(y).any() else err

    def linear_err(x, w, b, **cfg) -> float:
        out = torch.full((x.shape[0], w.shape[0]), float("nan"), device=dev, dtype=x.dtype)
        y = lg.linear_gemv(x, w, b, out=out, **cfg)
        ref = x.float() @ w.float().t() + b.float()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        return float("nan") if torch.isnan(y).any() else err

    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
                 "torch": torch.__version__, "triton": triton.__version__, "group_size": GROUP, "tiny": args.tiny,
                 "seed": seed}
    failures: list[str] = []
    res["failures"] = failures
    # relative to the norm: the output's rounding (fp16 ~5e-4, bf16 ~4e-3) with room; bf16 cuBLAS-level checks 1e-2
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
    check_dtypes = [torch.float16, torch.bfloat16] if dev.type == "cuda" else [torch.float16]
    # the bf16 GEMV's own check: bf16 in on a GPU, fp16 in the interpreter (its bf16 tl.dot is wrong)
    lin_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16

    def check(name, errs: dict) -> dict:
        for dname, e in errs.items():
            if not e < tol[getattr(torch, dname)]:
                failures.append(f"{name} {dname}: rel err {e}")
        return {k: float(f"{v:.3g}") for k, v in errs.items()}

    # 1. copy bandwidth
    src = torch.empty(sizes["copy_bytes"] // 4, device=dev)
    src.uniform_()
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * sizes["copy_bytes"] / t / 1e6
    res["copy_GBps"] = round(copy_gbs, 1)
    del src, dst

    # 2. GEMV bandwidth, old and magic
    gemv_rows = res["gemv"] = []
    for K, N in sizes["gemv"]:
        for bits in (4, 8):
            layer = random_layer(K, N, bits)
            x = torch.randn(1, K, device=dev, dtype=torch.float16)
            packed = K * N * bits / 8
            total = packed + 2 * layer[1].numel() * 2 + layer[3].numel() * 2 + (K + N) * 2
            row = dict(K=K, N=N, bits=bits)
            for kernel in ("old", "magic"):
                errs = check(f"GEMV {K}x{N} int{bits} {kernel}",
                             {str(d).split(".")[-1]: rel_err(layer, K, bits, 1, d, kernel) for d in check_dtypes})
                configs = [{}]
                if args.sweep:
                    configs += [dict(block_n=bn, split_k=sk) for bn in ((32, 64, 128) if kernel == "old" else
                                                                        (64, 128, 256)) for sk in (1, 2, 4, 8)]
                best = None
                for cfg in configs:
                    if cfg and not rel_err(layer, K, bits, 1, torch.float16, kernel, **cfg) < tol[torch.float16]:
                        failures.append(f"GEMV {K}x{N} int{bits} {kernel} {cfg}: wrong result")
                        continue
                    t = bench_ms(lambda: gptq(kernel, x, layer, bits, **cfg))
                    if best is None or t < best[0]:
                        best = (t, cfg)
                t, cfg = best
                pre = "" if kernel == "old" else "magic_"  # the old kernel keeps the first runs' key names
                row.update({f"{pre}us": round(t * 1e3, 2), f"{pre}packed_GBps": round(packed / t / 1e6, 1),
                            f"{pre}all_bytes_GBps": round(total / t / 1e6, 1),
                            f"{pre}frac_of_copy": round(packed / t / 1e6 / copy_gbs, 3),
                            f"{pre}best_config": cfg or "default", f"{pre}rel_err": errs})
            row["default_config"] = gm.gemv_config(1, N, K, bits, dev)
            row["magic_default_config"] = gm.magic_config(1, N, K, bits, GROUP, dev)
            row["magic_speedup"] = round(row["us"] / row["magic_us"], 2)
            gemv_rows.append(row)
            write_json(res, "gptq_bench.json")
            del layer

    # 3. decode-step matmuls
    decode_rows = res["decode"] = []
    totals: dict[tuple[int, str], float] = {}
    for name, (K, N) in sizes["decode"].items():
        w_bf16 = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        b_bf16 = (torch.randn(N, device=dev) * 0.1).to(torch.bfloat16)
        layers = {bits: random_layer(K, N, bits) for bits in (4, 8)}
        for M in sizes["rows"]:
            row = dict(layer=name, K=K, N=N, M=M)
            xb = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            times = {"bf16": bench_ms(lambda: F.linear(xb, w_bf16, b_bf16))}
            if M <= lg.GEMV_MAX_ROWS:
                row["bf16_gemv_rel_err"] = check(f"{name} M={M} bf16 GEMV",
                                                 {str(lin_dtype).split(".")[-1]: linear_err(xb.to(lin_dtype),
                                                                                            w_bf16.to(lin_dtype),
                                                                                            b_bf16.to(lin_dtype))})
                times["bf16_gemv"] = bench_ms(lambda: lg.linear_gemv(xb, w_bf16, b_bf16))
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            for bits, layer in layers.items():
                for kernel in ("old", "magic"):
                    if kernel == "magic" and M > gm.MAGIC_MAX_ROWS:
                        continue
                    key = f"int{bits}" + ("" if kernel == "old" else "_magic")
                    row[f"{key}_rel_err"] = check(f"{name} M={M} {key}", {
                        str(d).split(".")[-1]: rel_err(layer, K, bits, M, d, kernel) for d in check_dtypes})
                    times[key] = bench_ms(lambda: gptq(kernel, x, layer, bits))
            for key, t in times.items():
                row[f"{key}_us"] = round(t * 1e3, 2)
                totals[(M, key)] = totals.get((M, key), 0.0) + t
                if key != "bf16":
                    row[f"{key}_speedup"] = round(times["bf16"] / t, 2)
            for pair, (a, b) in {"bf16_auto": ("bf16", "bf16_gemv"), "int4_auto": ("int4", "int4_magic"),
                                 "int8_auto": ("int8", "int8_magic")}.items():
                totals[(M, pair)] = totals.get((M, pair), 0.0) + min(times.get(a, 1e9), times.get(b, 1e9))
            decode_rows.append(row)
            write_json(res, "gptq_bench.json")
        del w_bf16, layers
    res["decode_step_matmuls_ms"] = {f"M{M}_{kind}": round(t * LAYERS, 3) for (M, kind), t in totals.items()}
    write_json(res, "gptq_bench.json")

    # 4. bf16 GEMV vs cuBLAS, lm_head included
    linear_rows = res["linear_gemv"] = []
    shapes = dict(sizes["decode"], lm_head=sizes["lm_head"])
    for name, (K, N) in shapes.items():
        w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        b = None if name == "lm_head" else (torch.randn(N, device=dev) * 0.1).to(torch.bfloat16)
        for M in sizes["linear_rows"]:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            wc, bc = w.to(lin_dtype), (b if b is not None else torch.zeros(N, device=dev)).to(lin_dtype)
            errs = check(f"bf16 GEMV {name} M={M}", {str(lin_dtype).split(".")[-1]: linear_err(x.to(lin_dtype), wc, bc)})
            configs = [{}]
            if args.sweep:
                configs += [dict(block_n=bn, block_k=bk, split_k=sk) for bn in (64, 128) for bk in (64, 128)
                            for sk in (1, 4, 8)]
            t_cublas = bench_ms(lambda: F.linear(x, w, b))
            best = None
            for cfg in configs:
                t = bench_ms(lambda: lg.linear_gemv(x, w, b, **cfg))
                if best is None or t < best[0]:
                    best = (t, cfg)
            t, cfg = best
            nbytes = N * K * 2
            linear_rows.append(dict(layer=name, K=K, N=N, M=M, cublas_us=round(t_cublas * 1e3, 2),
                                    gemv_us=round(t * 1e3, 2), cublas_TBps=round(nbytes / t_cublas / 1e9, 3),
                                    gemv_TBps=round(nbytes / t / 1e9, 3), speedup=round(t_cublas / t, 2),
                                    gemv_frac_of_copy=round(nbytes / t / 1e6 / copy_gbs, 3),
                                    best_config=cfg or "default", config=lg.linear_gemv_config(M, N, K, dev),
                                    rel_err=errs))
            write_json(res, "gptq_bench.json")
        del w

    # tables
    print(f"device: {res['device']}   torch {res['torch']}   triton {res['triton']}   copy bandwidth "
          f"{copy_gbs:.0f} GB/s (read + write)")
    print("\nGEMV, 1 row, fp16 x, group 128     old: us  GB/s packed  of copy   magic: us  GB/s packed  of copy  "
          "speedup")
    for r in gemv_rows:
        print(f"  {r['K']:>5} x {r['N']:<5} int{r['bits']}          {r['us']:>9.2f}  {r['packed_GBps']:>11.1f}  "
              f"{r['frac_of_copy']:>6.1%}   {r['magic_us']:>9.2f}  {r['magic_packed_GBps']:>11.1f}  "
              f"{r['magic_frac_of_copy']:>6.1%}  {r['magic_speedup']:>6.2f}x")
    print("\ndecode-step matmuls (us; x bf16 cuBLAS)   M     bf16   bf16 GEMV        int4    int4 magic"
          "          int8    int8 magic")

    def cell(r, key):
        return f"{r[key + '_us']:>8.2f} ({r[key + '_speedup']:>4.2f}x)" if key + "_us" in r else " " * 16

    for r in decode_rows:
        print(f"  {r['layer']:<12} {r['K']:>5} x {r['N']:<5} {r['M']:>4} {r['bf16_us']:>8.2f} "
              f"{cell(r, 'bf16_gemv')} {cell(r, 'int4')} {cell(r, 'int4_magic')} {cell(r, 'int8')} "
              f"{cell(r, 'int8_magic')}")
    for M in sizes["rows"]:
        ms = {k: totals[(M, k)] * LAYERS for (m, k) in totals if m == M}
        b = ms["bf16"]
        parts = "   ".join(f"{k} {v:.3f} ms ({b / v:.2f}x)" for k, v in ms.items() if k != "bf16")
        print(f"  {LAYERS} layers, M={M:<3} bf16 {b:.3f} ms   {parts}")
    print("\nbf16 GEMV vs cuBLAS               M   cuBLAS us  TB/s   GEMV us  TB/s  of copy  speedup")
    for r in linear_rows:
        print(f"  {r['layer']:<12} {r['K']:>5} x {r['N']:<6} {r['M']:>3} {r['cublas_us']:>9.2f} "
              f"{r['cublas_TBps']:>5.2f} {r['gemv_us']:>9.2f} {r['gemv_TBps']:>5.2f}  {r['gemv_frac_of_copy']:>6.1%}  "
              f"{r['speedup']:>6.2f}x")
    print("\ncorrectness: " + ("all checks passed" if not failures else f"{len(failures)} FAILED:\n  "
                               + "\n  ".join(failures)))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
