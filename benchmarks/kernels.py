"""Attention kernels on the GPU: check against the references, time, and compare with baselines of the same run.

- prefill: `flash_attn_varlen` TFLOP/s against torch SDPA (flash backend), causal, 32 heads of 128, bf16, 2k and 8k
  tokens, as one sequence and as 4 packed sequences (SDPA then runs them as a batch of 4).
- decode: the very call the model makes, `nanoqwen.attention.attention(q, k, v, meta, layer_cache, logn)` (it stores
  the new token's K/V, then runs paged decode attention), GB/s on the KV bytes read, batches 1 and 32 at 512, 2k and
  8k context (and the 32 x 4k target) in shuffled blocks of 16. Twice per shape: with the metadata the engine passes
  (block tables padded to max_model_len / 16 columns, max_context_len = the static max_model_len, as a CUDA-graph
  decode step must) and with ideal metadata (tables and max_context_len exactly the context): the first against the
  second, the second against the device copy bandwidth measured here (read + written, as ceilings.py).
- KV store: `store_kv` GB/s (K and V read and written) against the same copy bandwidth.

    python benchmarks/kernels.py [--sweep]                    # GPU; --sweep also times other tile choices
    TRITON_INTERPRET=1 python benchmarks/kernels.py --tiny    # CPU smoke run: tiny shapes, numbers mean nothing

Every output is checked against the torch reference in the same run. Prints a table last; writes $OUT/kernels.json
after every row when OUT is set. Exit status 1 if a result is wrong.
"""
import argparse
import contextlib
import inspect
import os
import sys
import time

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run interpreted
    os.environ.setdefault("NANOQWEN_KERNELS", "triton")  # and the model's attention call takes them too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from nanoqwen import LLM  # noqa: E402
from nanoqwen.attention import AttentionMetadata, attention  # noqa: E402
from nanoqwen.kernels import flash_attention, kv_store, paged_attention  # noqa: E402
from nanoqwen.kv_cache import LayerCache  # noqa: E402
from throughput import write_json  # noqa: E402

TARGET_PREFILL = 0.8  # x SDPA TFLOP/s (PERFORMANCE.md)
TARGET_DECODE = 0.7  # x copy bandwidth on the KV bytes (PERFORMANCE.md)
# --sweep candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill, (BLOCK_N, num_warps) for decode; the
# hd-128 ones build without register spills for sm_90 except (128, 64, 4, 3), kept as a check of that claim
PREFILL_SWEEP = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]
DECODE_SWEEP = [(16, 4), (32, 4), (64, 4), (128, 4), (64, 8), (128, 8)]
PREFILL_SWEEP_TINY, DECODE_SWEEP_TINY = [(16, 16, 1, 1), (32, 16, 1, 1)], [(16, 1), (32, 1)]
DECODE_SHAPES = [(1, 512), (1, 2048), (1, 8192), (32, 512), (32, 2048), (32, 4096), (32, 8192)]  # (batch, context)


def bench(fn):
    """Median seconds of fn(). On the GPU triton's do_bench: the L2 is flushed before every call, so every byte comes
    from HBM as in a real step (one layer's KV is not reused before the other 31 layers and the weights pass), and the
    flush also covers the Python launch time of fn (it runs longer on the GPU)."""
    if DEV == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    t = time.perf_counter()  # the interpreter: one call, no warm-up (the numbers mean nothing)
    fn()
    return time.perf_counter() - t


def max_err(out, ref):
    return (out.float() - ref.float()).abs().max().item()


def decode_meta(tables, lens, slots, max_context_len) -> AttentionMetadata:
    """Decode metadata for one new token per sequence (the token at position lens - 1, stored at `slots`)."""
    B = lens.shape[0]
    return AttentionMetadata(
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=DEV), max_seqlen_q=1, positions=(lens - 1).long(),
        ntk_index=torch.zeros(B, dtype=torch.long, device=DEV), slot_mapping=slots, block_tables=tables,
        context_lens=lens, max_context_len=max_context_len, is_decode=True, logits_indices=None)


# ---- engine internal (adapt here when nanoqwen/engine changes): the decode metadata its CUDA-graph step passes
# (nanoqwen/engine.py DecodeGraphs._meta and LLM._prepare): every block table padded to max_model_len / block_size
# columns, max_context_len the static max_model_len, the real context lengths on the device.
def engine_decode_meta(tables, lens, slots, max_model_len, block_size) -> AttentionMetadata:
    width = -(-max_model_len // block_size)
    padded = torch.zeros(tables.shape[0], width, dtype=torch.int32, device=DEV)
    padded[:, :tables.shape[1]] = tables
    return decode_meta(padded, lens, slots, width * block_size)


def engine_max_model_len() -> int:
    """The engine's default max_model_len (what `LLM(model)` uses), read from its signature."""
    default = inspect.signature(LLM).parameters.get("max_model_len")
    return default.default if default is not None and isinstance(default.default, int) else 32768


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
    import triton
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype), "heads": H, "head_dim": D,
           "tiny": tiny, "rows": []}
    rows = res["rows"]

    def row(name, value, unit, baseline="", ratio=None, target=None, err=None, **extra):
        ok = "" if target is None or ratio is None else ("yes" if ratio >= target else "NO")
        rows.append(dict(name=name, value=value, unit=unit, baseline=baseline, ratio=ratio, target=target, ok=ok,
                         max_err=err, **extra))
        write_json(res, "kernels.json")
        print(f"{name}: {value:.3f} {unit} {baseline} err={err}", flush=True)

    # ---- copy bandwidth (read + written), as ceilings.py
    n = (1 << 20) if tiny else (1 << 30)
    a = torch.randn(n, device=DEV, dtype=torch.bfloat16); b = torch.empty_like(a)
    copy_bw = 2 * a.numel() * 2 / bench(lambda: b.copy_(a)) / 1e9
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
                t_sdpa = bench(sdpa)
                sdpa_out = sdpa().transpose(1, 2).reshape(S, H, D)
            out = torch.full_like(q, float("nan"))
            kernel = lambda: flash_attention.flash_attn_varlen(q, k, v, cu, L, scale, out=out)
            kernel()
            # the torch reference (fp32 math) where it fits quickly, else the SDPA result
            ref = flash_attention.flash_attn_varlen_ref(q, k, v, cu, scale) if S <= 2048 else sdpa_out
            err = max_err(out, ref)
            t = bench(kernel)
            name = f"prefill S={S} {'1 seq' if nseq == 1 else f'{nseq}x{L}'}"
            row(name, flops / t / 1e12, "TFLOP/s", f"SDPA {flops / t_sdpa / 1e12:.1f}", (flops / t) / (flops / t_sdpa),
                TARGET_PREFILL, err, ms=t * 1e3, sdpa_ms=t_sdpa * 1e3)
            if args.sweep and nseq == 1:
                default = flash_attention._tiles
                for cfg in PREFILL_SWEEP_TINY if tiny else PREFILL_SWEEP:
                    flash_attention._tiles = lambda d, dt, cfg=cfg: cfg
                    try:
                        t_cfg = bench(kernel)
                        print(f"  sweep {name} tiles {cfg}: {flops / t_cfg / 1e12:.1f} TFLOP/s, err {max_err(out, ref):.3g}")
                        res.setdefault("sweep", []).append(dict(name=name, tiles=cfg, TFLOPs=flops / t_cfg / 1e12))
                    except Exception as e:  # out of shared memory, say
                        print(f"  sweep {name} tiles {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                    finally:
                        flash_attention._tiles = default
            del q, k, v, out, ref, sdpa_out

    # ---- paged decode through the model's own call: the engine's launch (static max length) vs the ideal one
    block_size = 16
    max_model_len = engine_max_model_len()
    res["engine_max_model_len"] = max_model_len
    for B, ctx in ([(1, 40), (3, 100)] if tiny else DECODE_SHAPES):
        k_cache, v_cache, tables = paged_cache(B, ctx, block_size, H, D, dtype)
        lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
        slots = (tables[:, (ctx - 1) // block_size].long() * block_size + (ctx - 1) % block_size)  # the new token
        q, k, v = (torch.randn(B, H, D, device=DEV, dtype=dtype) for _ in range(3))
        logn = 1 + torch.rand(B, device=DEV)
        cache = LayerCache(k_cache, v_cache)
        metas = {"ideal": decode_meta(tables, lens, slots, ctx),
                 "engine": engine_decode_meta(tables, lens, slots, max_model_len, block_size)}
        nc = min(B, 4)  # the reference gathers whole contexts in fp32: check the first sequences only
        kv_bytes = 2 * B * ctx * H * D * k_cache.element_size()
        gbps = {}
        for launch, meta in metas.items():
            poison = torch.full_like(q, float("nan"))  # NaN in the memory the output will most likely be given
            del poison
            out = attention(q, k, v, meta, cache, logn)  # stores k, v into the new token's slot, then attends
            ref = paged_attention.paged_attention_ref(q[:nc], k_cache, v_cache, tables[:nc], lens[:nc], scale, logn[:nc])
            err = max_err(out[:nc], ref)
            t = bench(lambda: attention(q, k, v, meta, cache, logn))
            gbps[launch] = kv_bytes / t / 1e9
            if launch == "ideal":
                target = TARGET_DECODE if (B, ctx) == (32, 4096) else None
                row(f"decode {B}x{ctx} ideal", gbps[launch], "GB/s", f"copy {copy_bw:.0f}", gbps[launch] / copy_bw,
                    target, err, us=t * 1e6, max_context_len=ctx)
            else:
                row(f"decode {B}x{ctx} engine", gbps[launch], "GB/s", f"ideal {gbps['ideal']:.0f}",
                    gbps[launch] / gbps["ideal"], None, err, us=t * 1e6, max_context_len=max_model_len,
                    of_copy=gbps[launch] / copy_bw)
        if args.sweep:
            default = paged_attention._tiles
            for cfg in DECODE_SWEEP_TINY if tiny else DECODE_SWEEP:
                paged_attention._tiles = lambda d, cfg=cfg: (*cfg, default(d)[2])
                try:
                    t_cfg = bench(lambda: attention(q, k, v, metas["ideal"], cache, logn))
                    print(f"  sweep decode {B}x{ctx} BLOCK_N,warps {cfg}: {kv_bytes / t_cfg / 1e9:.0f} GB/s")
                    res.setdefault("sweep", []).append(dict(name=f"decode {B}x{ctx}", tiles=cfg,
                                                            GBps=kv_bytes / t_cfg / 1e9))
                except Exception as e:  # out of resources, or the launcher changed
                    print(f"  sweep decode {B}x{ctx} tiles {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                finally:
                    paged_attention._tiles = default
        del k_cache, v_cache, cache, q, k, v, out, ref

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
    t = bench(lambda: kv_store.store_kv(k, v, k_cache, v_cache, slots))
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
    res["wrong"] = bad
    write_json(res, "kernels.json")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
