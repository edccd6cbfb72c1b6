"""GPTQ int4/int8 kernels on a GPU: GEMV bandwidth and the decode-step matmuls against bf16 F.linear.

    python benchmarks/gptq_bench.py            # GPU (H100/H200): Qwen-7B shapes, group 128
    python benchmarks/gptq_bench.py --sweep    # also sweep the GEMV launch config (block_n x split_k)
    python benchmarks/gptq_bench.py --tiny     # CPU smoke test under TRITON_INTERPRET=1 (numbers mean nothing)

What it measures, all in one run (PERFORMANCE.md: ratios against baselines of the same run):
1. device copy bandwidth (bytes read + written of a 1 GiB device-to-device copy): the ceiling;
2. GEMV (1 row), int4 and int8, (K x N) = 4096x12288, 4096x11008, 11008x4096: GB/s on the packed weight bytes
   (and on all bytes read: + scales, zeros, x, y) and their fraction of the copy bandwidth;
3. the decode-step matmuls (c_attn 4096->12288, attn.c_proj 4096->4096, w2+w1 fused 4096->22016,
   mlp.c_proj 11008->4096) at M = 1, 16, 64 rows: int4 / int8 GPTQ (fp16 activations, as the checkpoints run)
   vs bf16 F.linear (cuBLAS), and the 32-layer sum.
Every timed kernel is first checked against the fp32 torch reference on fresh random weights with a NaN-poisoned
output, in fp16 and bf16. Times are medians of triton.testing.do_bench, which flushes the L2 before every call, so
weights come from HBM as in a real decode step. Prints a table last; writes $OUT/gptq_bench.json after every row
when OUT is set.
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
                    "mlp.c_proj": (11008, 4096)}, rows=[1, 16, 64], copy_bytes=1 << 30)
TINY = dict(gemv=[(256, 96), (384, 64)],
            decode={"c_attn": (128, 96), "attn.c_proj": (128, 32), "w2+w1": (128, 128), "mlp.c_proj": (256, 32)},
            rows=[1, 64], copy_bytes=1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes; on a CPU-only machine runs the interpreter")
    ap.add_argument("--sweep", action="store_true", help="also sweep the GEMV config (block_n x split_k)")
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        if not args.tiny:
            sys.exit("gptq_bench.py needs a CUDA GPU; on the CPU run it with --tiny (a smoke test)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch.nn.functional as F
    import triton
    import triton.testing

    from nanoqwen.kernels import gptq_matmul as gm
    from throughput import write_json

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny else FULL
    torch.manual_seed(int(time.time()))

    def bench_ms(fn) -> float:
        if dev.type == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        t = time.perf_counter()  # the interpreter: one call, no warm-up (the numbers mean nothing)
        fn()
        return (time.perf_counter() - t) * 1e3

    def random_layer(K: int, N: int, bits: int):
        """Random planar weights, group 128, symmetric zero points, with an fp16 bias."""
        q = torch.randint(0, 2**bits, (K, N), device=dev, dtype=torch.int32)
        n_groups = -(-K // GROUP)
        scales = (torch.rand(n_groups, N, device=dev) * 0.002 + 0.001).half()
        zeros = torch.full((n_groups, N), 2 ** (bits - 1), device=dev, dtype=torch.float16)
        bias = (torch.randn(N, device=dev) * 0.1).half()
        return gm.pack_planar(q, bits), scales, zeros, bias

    def rel_err(layer, K: int, bits: int, M: int, dtype, **cfg) -> float:
        """Relative error against the fp32 reference on a fresh x, output poisoned first (NaN if any unwritten)."""
        qweight, scales, zeros, bias = layer
        x = torch.randn(M, K, device=dev).to(dtype)
        out = torch.full((M, qweight.shape[1]), float("nan"), device=dev, dtype=dtype)
        y = gm.gptq_matmul(x, qweight, scales, zeros, bits, GROUP, bias, out=out, **cfg)
        W = gm.dequantize_planar(qweight, scales, zeros, None, bits, GROUP, K)
        ref = x.float() @ W.t() + bias.float()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        return float("nan") if torch.isnan(y).any() else err

    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
                 "torch": torch.__version__, "triton": triton.__version__, "group_size": GROUP, "tiny": args.tiny}
    failures: list[str] = []
    res["failures"] = failures
    # bf16 F.linear is a fine check for 1e-2; fp16 GPTQ outputs round to ~5e-4, bf16 ones to ~4e-3
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
    check_dtypes = [torch.float16, torch.bfloat16] if dev.type == "cuda" else [torch.float16]

    # 1. copy bandwidth
    src = torch.empty(sizes["copy_bytes"] // 4, device=dev)
    src.uniform_()
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * sizes["copy_bytes"] / t / 1e6
    res["copy_GBps"] = round(copy_gbs, 1)
    del src, dst

    # 2. GEMV bandwidth
    gemv_rows = res["gemv"] = []
    for K, N in sizes["gemv"]:
        for bits in (4, 8):
            layer = random_layer(K, N, bits)
            x = torch.randn(1, K, device=dev, dtype=torch.float16)
            errs = {str(d).split(".")[-1]: rel_err(layer, K, bits, 1, d) for d in check_dtypes}
            for name, e in errs.items():
                if not e < tol[getattr(torch, name)]:
                    failures.append(f"GEMV {K}x{N} int{bits} {name}: rel err {e}")
            configs = [{}]
            if args.sweep:
                configs += [dict(block_n=bn, split_k=sk) for bn in (32, 64, 128) for sk in (1, 2, 4, 8)]
            best = None
            for cfg in configs:
                if cfg and not rel_err(layer, K, bits, 1, torch.float16, **cfg) < tol[torch.float16]:
                    failures.append(f"GEMV {K}x{N} int{bits} {cfg}: wrong result")
                    continue
                t = bench_ms(lambda: gm.gptq_matmul(x, *layer[:3], bits, GROUP, layer[3], **cfg))
                if best is None or t < best[0]:
                    best = (t, cfg)
            t, cfg = best
            packed = K * N * bits / 8
            total = packed + 2 * layer[1].numel() * 2 + layer[3].numel() * 2 + (K + N) * 2
            row = dict(K=K, N=N, bits=bits, us=round(t * 1e3, 2), packed_GBps=round(packed / t / 1e6, 1),
                       all_bytes_GBps=round(total / t / 1e6, 1), frac_of_copy=round(packed / t / 1e6 / copy_gbs, 3),
                       default_config=gm.gemv_config(1, N, K, bits, dev), best_config=cfg or "default", rel_err=errs)
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
            t_bf16 = bench_ms(lambda: F.linear(xb, w_bf16, b_bf16))
            row["bf16_us"] = round(t_bf16 * 1e3, 2)
            totals[(M, "bf16")] = totals.get((M, "bf16"), 0.0) + t_bf16
            for bits, layer in layers.items():
                errs = {str(d).split(".")[-1]: rel_err(layer, K, bits, M, d) for d in check_dtypes}
                for dname, e in errs.items():
                    if not e < tol[getattr(torch, dname)]:
                        failures.append(f"{name} M={M} int{bits} {dname}: rel err {e}")
                x = torch.randn(M, K, device=dev, dtype=torch.float16)
                t = bench_ms(lambda: gm.gptq_matmul(x, *layer[:3], bits, GROUP, layer[3]))
                row[f"int{bits}_us"] = round(t * 1e3, 2)
                row[f"int{bits}_speedup"] = round(t_bf16 / t, 2)
                row[f"int{bits}_rel_err"] = errs
                totals[(M, f"int{bits}")] = totals.get((M, f"int{bits}"), 0.0) + t
            decode_rows.append(row)
            write_json(res, "gptq_bench.json")
        del w_bf16, layers
    res["decode_step_matmuls_ms"] = {f"M{M}_{kind}": round(t * LAYERS, 3) for (M, kind), t in totals.items()}
    write_json(res, "gptq_bench.json")

    # table
    print(f"device: {res['device']}   torch {res['torch']}   triton {res['triton']}   copy bandwidth "
          f"{copy_gbs:.0f} GB/s (read + write)")
    print("\nGEMV, 1 row, fp16 x, group 128        us   GB/s packed  GB/s all  of copy  best config")
    for r in gemv_rows:
        print(f"  {r['K']:>5} x {r['N']:<5} int{r['bits']}          {r['us']:>9.2f}  {r['packed_GBps']:>11.1f}  "
              f"{r['all_bytes_GBps']:>8.1f}  {r['frac_of_copy']:>6.1%}  {r['best_config']}")
    print("\ndecode-step matmuls     K x N          M   bf16 us   int4 us  (x bf16)   int8 us  (x bf16)")
    for r in decode_rows:
        print(f"  {r['layer']:<12} {r['K']:>5} x {r['N']:<5} {r['M']:>4} {r['bf16_us']:>9.2f} {r['int4_us']:>9.2f} "
              f"({r['int4_speedup']:>5.2f}x) {r['int8_us']:>9.2f} ({r['int8_speedup']:>5.2f}x)")
    for M in sizes["rows"]:
        b, i4, i8 = (totals[(M, k)] * LAYERS for k in ("bf16", "int4", "int8"))
        print(f"  {LAYERS} layers, M={M:<3}              bf16 {b:8.3f} ms   int4 {i4:8.3f} ms ({b / i4:.2f}x)   "
              f"int8 {i8:8.3f} ms ({b / i8:.2f}x)")
    print("\ncorrectness: " + ("all checks passed" if not failures else f"{len(failures)} FAILED:\n  "
                               + "\n  ".join(failures)))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
