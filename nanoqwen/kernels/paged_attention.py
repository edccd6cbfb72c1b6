"""Decode attention: one query token per sequence over its paged KV cache (block_tables, context_lens).

The Triton path is flash-decoding: the context is cut into `num_splits` equal ranges (a multiple of the key tile), one
program per (sequence, head, split) runs an online softmax over its range and writes its normalised partial output
and log-sum-exp, and a small second kernel merges the splits. With one split the first kernel writes the output
directly. Every launch parameter comes from host ints (batch, heads, max_context_len), so a decode step with a fixed
max_context_len launches the same grid every time and can be captured in a CUDA graph.
"""
import os

import torch
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from ..quant.kv_int8 import dequantize

LOG2E = 1.4426950408889634


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float, logn: torch.Tensor | None = None,
                        k_scale=None, k_zero=None, v_scale=None, v_zero=None) -> torch.Tensor:
    """Torch reference: q [B, heads, head_dim] -> out [B, heads, head_dim]; fp32 softmax and sums.

    Gathers every sequence's blocks into one padded [B, max_blocks * block_size] batch and masks the tail.
    `logn` [B] (optional, fp32): LogN factor of every query, multiplied into q in q's dtype first.
    `k_scale`... (optional): the int8 cache's scales and zeros [num_blocks, block_size, heads].
    """
    if logn is not None:
        q = q * logn[:, None, None].to(q.dtype)
    B, H, D = q.shape
    bt = block_tables.long()
    k = k_cache[bt].flatten(1, 2)  # [B, S, H, D]
    v = v_cache[bt].flatten(1, 2)
    if k_scale is not None:  # int8 cache: dequantize what was gathered
        k = dequantize(k, k_scale[bt].flatten(1, 2), k_zero[bt].flatten(1, 2), k_scale.dtype)
        v = dequantize(v, v_scale[bt].flatten(1, 2), v_zero[bt].flatten(1, 2), v_scale.dtype)
    k, v = k.float(), v.float()
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v).to(q.dtype)


@triton.jit
def _paged_attn_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, logn_ptr, out_ptr, lse_ptr,
                       stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                       stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                       block_size, qk_scale, split_len,
                       k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss, stride_sh,
                       HAS_LOGN: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUANT: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    lo = split * split_len
    hi = tl.minimum(ctx, lo + split_len)
    dims = tl.arange(0, HEAD_DIM)

    q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + dims)
    if HAS_LOGN:  # rounded to q's dtype, as the model scales q before attention
        q = (q * tl.load(logn_ptr + seq).to(q.dtype)).to(q.dtype)
    q = q.to(tl.float32) * qk_scale  # log2 domain
    k_base = k_cache_ptr + head * stride_ch
    v_base = v_cache_ptr + head * stride_ch
    block_table_ptr = block_tables_ptr + seq * stride_bt
    if QUANT:  # int8 cache: this head's scales and zeros, one per slot
        k_scale_ptr, k_zero_ptr = k_scale_ptr + head * stride_sh, k_zero_ptr + head * stride_sh
        v_scale_ptr, v_zero_ptr = v_scale_ptr + head * stride_sh, v_zero_ptr + head * stride_sh

    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        ok = n < hi
        blk = tl.load(block_table_ptr + n // block_size, mask=ok, other=0).to(tl.int64)
        off = blk * stride_cb + (n % block_size) * stride_cs
        k = tl.load(k_base + off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        if QUANT:  # int8: x = scale * (q - zero) in fp32, each key's scale applied once to its score or weight
            s_off = blk * stride_sb + (n % block_size) * stride_ss
            k_s = tl.load(k_scale_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
            k_z = tl.load(k_zero_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
            s = tl.sum((k.to(tl.float32) - k_z[:, None]) * q[None, :], 1) * k_s
        else:
            s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        if QUANT:
            v_s = tl.load(v_scale_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
            v_z = tl.load(v_zero_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum((p * v_s)[:, None] * (v.to(tl.float32) - v_z[:, None]), 0)
        else:
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    # l_i >= 1 unless the range was empty (a split past this sequence's context, or a zero-length context): then
    # acc = 0 and m_i = -inf, so the output is 0 and the log-sum-exp -inf, with no 0/0 anywhere
    l_i = tl.maximum(l_i, 1.0)
    out = acc / l_i
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + split * stride_os + dims, out.to(out_ptr.dtype.element_ty))
    if SPLIT:
        tl.store(lse_ptr + seq * stride_lb + head * stride_lh + split, m_i + tl.log2(l_i))


@triton.jit
def _paged_reduce_kernel(part_ptr, lse_ptr, out_ptr, num_splits,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, SPLITS_P2)
    dims = tl.arange(0, HEAD_DIM)
    ok = s < num_splits
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + s, mask=ok, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), -1e30)  # finite even when every split is empty (a zero-length context)
    w = tl.exp2(lse - m)  # empty splits weigh 0; the largest weighs 1, so the total is >= 1 or all is empty
    part = tl.load(part_ptr + seq * stride_pb + head * stride_ph + s[:, None] * stride_ps + dims[None, :],
                   mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.maximum(tl.sum(w, 0), 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def _tiles(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N keys per step, num_warps, smallest split in tokens); small in the interpreter to exercise splits.

    On Hopper (sm_90 builds) hd 128 at BLOCK_N 64 with 4 warps takes about 80-96 registers and no spills: about six
    programs an SM, each with 32 KB of K and V loads in flight. Not yet tuned on timings.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 1, 32
    return (64, 4, 512) if head_dim >= 128 else (128, 4, 512)


def num_kv_splits(batch: int, heads: int, max_context_len: int, min_split: int, device: torch.device) -> int:
    """Split the context until (sequence, head, split) programs fill the GPU about 4 times over, never below
    `min_split` tokens a split. Host ints only."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(4 * sms, max(batch * heads, 1))
    return max(1, min(want, triton.cdiv(max_context_len, min_split), 64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, max_context_len: int, logn: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, k_zero: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
                    *, num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton decode attention, same semantics as `paged_attention_ref` (a zero-length context gives zeros).

    q [B, heads, head_dim] (unit stride on head_dim); k_cache, v_cache [num_blocks, block_size, heads, head_dim];
    block_tables [B, max_blocks] int32; context_lens [B] int32 (each <= max_context_len, a host int; 0 means "use
    the block table's capacity"). `num_splits` forces the split-KV count (None: chosen from batch and context).
    `out` (optional, q's shape and dtype, unit head_dim stride) receives the result instead of a new tensor.
    int8 cache: k_cache, v_cache uint8 with `k_scale`, `k_zero`, `v_scale`, `v_zero` [num_blocks, block_size, heads]
    (one layout); every key and value is dequantized in registers as read, scale * (q - zero) in fp32.
    """
    B, H, D = q.shape
    assert D & (D - 1) == 0 and 16 <= D <= 256, f"head_dim must be a power of two in [16, 256], got {D}"
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, \
        "q and the caches need a contiguous head_dim, and both caches the same layout"
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    if max_context_len <= 0:
        max_context_len = block_tables.shape[1] * k_cache.shape[1]
    block_n, warps, min_split = _tiles(D)
    if num_splits is None:
        num_splits = num_kv_splits(B, H, max_context_len, min_split, q.device)
    split_len = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_context_len, split_len)  # no split left empty for the longest sequence
    common = (q, k_cache, v_cache, block_tables, context_lens, logn if logn is not None else q)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    if k_scale is not None:
        assert k_cache.dtype == torch.uint8, "k_scale...: the int8 path reads a uint8 cache"
        quant = (k_scale, k_zero, v_scale, v_zero)
        assert all(t.stride() == k_scale.stride() for t in quant), "scales and zeros must share one layout"
        quant += k_scale.stride()
    else:
        quant = (q, q, q, q, 0, 0, 0)
    consts = dict(HAS_LOGN=logn is not None, HEAD_DIM=D, BLOCK_N=block_n, QUANT=k_scale is not None, num_warps=warps)
    if num_splits == 1:
        _paged_attn_kernel[(B, H, 1)](*common, out, out, *strides, out.stride(0), out.stride(1), 0, 0, 0,
                                      k_cache.shape[1], scale * LOG2E, split_len, *quant, SPLIT=False, **consts)
        return out
    part = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    _paged_attn_kernel[(B, H, num_splits)](*common, part, lse, *strides, *part.stride()[:3], *lse.stride()[:2],
                                           k_cache.shape[1], scale * LOG2E, split_len, *quant, SPLIT=True, **consts)
    _paged_reduce_kernel[(B, H)](part, lse, out, num_splits, *part.stride()[:3], *lse.stride()[:2],
                                 out.stride(0), out.stride(1), HEAD_DIM=D, SPLITS_P2=triton.next_power_of_2(num_splits),
                                 num_warps=4)
    return out
