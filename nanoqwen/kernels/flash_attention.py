"""Causal attention over packed variable-length sequences (prefill and prefill chunks).

Sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1]. Without a cache its keys are its own new rows (plain
causal attention). With a cache (block_tables given) its keys are the first context_lens[i] tokens of its paged cache,
the new ones included (they were stored before attention), and query j sits at absolute position
context_lens[i] - q_len + j: it sees the cached prefix and, causally, the new chunk.
"""
import os

import torch
import torch.nn.functional as F
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from ..quant.kv_int8 import dequantize
from .rope import logn_factor

LOG2E = 1.4426950408889634  # the kernel works in base 2: exp(x) = exp2(x * log2(e))


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache [num_blocks, block_size, heads, head_dim];
    an int8 cache (uint8 values with `scale` and `zero` [num_blocks, block_size, heads]) comes back dequantized."""
    blocks = block_table[:-(-length // cache.shape[1])].long()
    x = cache[blocks].flatten(0, 1)[:length]
    if scale is None:
        return x
    return dequantize(x, scale[blocks].flatten(0, 1)[:length], zero[blocks].flatten(0, 1)[:length], scale.dtype)


def flash_attn_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None,
                          context_lens: torch.Tensor | None = None, logn: torch.Tensor | None = None,
                          k_scale=None, k_zero=None, v_scale=None, v_zero=None) -> torch.Tensor:
    """Torch reference: q, k, v [T, heads, head_dim] -> out [T, heads, head_dim]; softmax and sums in fp32.

    `logn` [T] (optional, fp32): LogN factor of every query row, multiplied into q in q's dtype first.
    `k_scale`... (optional): the int8 cache's scales and zeros; cached keys and values are dequantized as read.
    """
    if logn is not None:
        q = q * logn[:, None, None].to(q.dtype)
    cu = cu_seqlens_q.tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if block_tables is None and len(set(lens)) == 1:  # equal lengths, no cache: one batched call
        B, S = len(lens), lens[0]
        qb, kb, vb = (t.view(B, S, *t.shape[1:]).transpose(1, 2).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        return out.transpose(1, 2).reshape(q.shape).to(q.dtype)
    out = torch.empty_like(q)
    ctx = context_lens.tolist() if context_lens is not None else lens
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b == a:
            continue
        if block_tables is None:
            ks, vs = k[a:b], v[a:b]
        else:
            ks = gather_paged(k_cache, block_tables[i], ctx[i], k_scale, k_zero)
            vs = gather_paged(v_cache, block_tables[i], ctx[i], v_scale, v_zero)
        n_q, n_k = b - a, ks.shape[0]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1).float(), ks.transpose(0, 1).float(),
                                           vs.transpose(0, 1).float(), attn_mask=mask, scale=scale)
        out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _dequant_tile(x, scale_ptr, zero_ptr, s_off, mask, MASKED: tl.constexpr):
    """uint8 tile [BLOCK_N, HEAD_DIM] -> scale * (x - zero) in fp32; scale and zero per row (slot)."""
    if MASKED:
        scale = tl.load(scale_ptr + s_off, mask=mask, other=0.0)
        zero = tl.load(zero_ptr + s_off, mask=mask, other=0.0)
    else:
        scale = tl.load(scale_ptr + s_off)
        zero = tl.load(zero_ptr + s_off)
    return scale.to(tl.float32)[:, None] * (x.to(tl.float32) - zero.to(tl.float32)[:, None])


@triton.jit
def _attn_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, k_row0, offs_m, q_pos, k_len, lo, hi,
                stride_kt, stride_vt, stride_cb, stride_cs, block_size, qk_scale,
                k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss,
                PAGED: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr):
    """Online softmax over key tiles [lo, hi). MASKED: apply the causal and length masks (diagonal tiles only).
    QUANT (paged only): the cache is uint8 with a scale and zero per (slot, head), dequantized here in registers."""
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        in_range = n < k_len
        if PAGED:  # key n of this sequence sits in block block_table[n // block_size] at n % block_size
            blk = tl.load(block_table_ptr + n // block_size, mask=in_range, other=0).to(tl.int64)
            k_off = blk * stride_cb + (n % block_size) * stride_cs
            v_off = k_off
        else:
            k_off = (k_row0 + n).to(tl.int64) * stride_kt
            v_off = (k_row0 + n).to(tl.int64) * stride_vt
        if MASKED:
            k = tl.load(k_ptr + k_off[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_off[:, None] + dims[None, :])
            v = tl.load(v_ptr + v_off[:, None] + dims[None, :])
        if QUANT:  # paged only: the scale and zero of slot n sit at the same (block, offset) as its values
            s_off = blk * stride_sb + (n % block_size) * stride_ss
            k = _dequant_tile(k, k_scale_ptr, k_zero_ptr, s_off, in_range, MASKED).to(q.dtype)
            v = _dequant_tile(v, v_scale_ptr, v_zero_ptr, s_off, in_range, MASKED).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASKED:
            s = tl.where((n[None, :] <= q_pos[:, None]) & in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_attn_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr, logn_ptr,
                       block_tables_ptr, context_lens_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                       stride_cb, stride_cs, stride_ch, stride_bt, block_size, qk_scale, logn_seq_length,
                       k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss, stride_sh,
                       PAGED: tl.constexpr, LOGN: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       QUANT: tl.constexpr):
    # the longest (most key tiles) query blocks start first: program 0 takes the last block of the sequence
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    if PAGED:
        k_len = tl.load(context_lens_ptr + seq)
        block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_base, v_base = k_ptr + head * stride_ch, v_ptr + head * stride_ch
        if QUANT:  # this head's scales and zeros
            k_scale_ptr, k_zero_ptr = k_scale_ptr + head * stride_sh, k_zero_ptr + head * stride_sh
            v_scale_ptr, v_zero_ptr = v_scale_ptr + head * stride_sh, v_zero_ptr + head * stride_sh
    else:
        k_len = q_len
        block_table_ptr = block_tables_ptr
        k_base, v_base = k_ptr + head * stride_kh, v_ptr + head * stride_vh
    prefix = k_len - q_len  # absolute position of this chunk's first query

    offs_m = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = prefix + offs_m  # the queries' absolute positions
    if LOGN == 1:  # given factors
        q = (q * tl.load(logn_ptr + rows, mask=row_ok, other=1.0).to(q.dtype)[:, None]).to(q.dtype)
    elif LOGN == 2:  # from the positions; rounded to q's dtype, as the model scales q before attention
        q = (q * logn_factor(q_pos, logn_seq_length).to(q.dtype)[:, None]).to(q.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # key tiles below the block's first query position are fully visible: no mask needed there
    full_end = (prefix + start_m + 1) // BLOCK_N * BLOCK_N
    end = tl.minimum(k_len, prefix + start_m + BLOCK_M)
    acc, m_i, l_i = _attn_tiles(acc, m_i, l_i, q, k_base, v_base, block_table_ptr, q_start, offs_m, q_pos, k_len,
                                0, full_end, stride_kt, stride_vt, stride_cb, stride_cs, block_size, qk_scale,
                                k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss,
                                PAGED, False, HEAD_DIM, BLOCK_N, DOT_PRECISION, QUANT)
    acc, m_i, l_i = _attn_tiles(acc, m_i, l_i, q, k_base, v_base, block_table_ptr, q_start, offs_m, q_pos, k_len,
                                full_end, end, stride_kt, stride_vt, stride_cb, stride_cs, block_size, qk_scale,
                                k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss,
                                PAGED, True, HEAD_DIM, BLOCK_N, DOT_PRECISION, QUANT)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim and dtype; small tiles in the interpreter.

    Chosen for Hopper from sm_90 builds (registers, spills, shared memory), not yet from timings: 16-bit tiles run on
    wgmma with cp.async pipelining and no spills; fp32 (ieee, FMA) is a correctness path, sized only not to spill.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 8, 2)}.get(head_dim, (32, 16, 8, 2))
    return (128, 64, 8, 3) if head_dim == 128 else (128, 64, 4, 3)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      max_seqlen_q: int, scale: float, k_cache: torch.Tensor | None = None,
                      v_cache: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                      context_lens: torch.Tensor | None = None, max_context_len: int = 0,
                      logn: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                      k_zero: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      v_zero: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                      logn_seq_length: int = 0) -> torch.Tensor:
    """Triton FlashAttention-2 forward, causal, over packed sequences; same semantics as `flash_attn_varlen_ref`.

    q, k, v [T, heads, head_dim] (unit stride on head_dim); `max_seqlen_q` (host int) sizes the grid. With
    `block_tables` the keys come from the paged cache for positions 0..context_lens[i]-1 (k and v are not read);
    `max_context_len` is accepted for symmetry and not needed (the key loop bound is read on the device).
    `logn` [T] fp32 multiplies each query row (rounded to q's dtype) before the scores; or `logn_seq_length` > 0:
    the LogN factors of the queries' positions (nanoqwen.rope.logn_factors) computed here. `out` (optional, q's shape
    and dtype, unit head_dim stride) receives the result instead of a new tensor.
    int8 cache: k_cache, v_cache uint8 with `k_scale`, `k_zero`, `v_scale`, `v_zero` [num_blocks, block_size, heads]
    (one layout); each key/value tile is dequantized in registers, scale * (q - zero) in fp32 then q's dtype.
    """
    T, H, D = q.shape
    assert D in (16, 32, 64, 128), f"head_dim must be 16, 32, 64 or 128, got {D}"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim must be contiguous"
    out = torch.empty_like(q) if out is None else out
    B = cu_seqlens_q.numel() - 1
    if T == 0 or B == 0 or max_seqlen_q == 0:
        return out
    paged = block_tables is not None
    if paged:
        assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches must share a contiguous layout"
        cache_k, cache_v = k_cache, v_cache
        cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
        block_size = k_cache.shape[1]
    else:
        cache_k, cache_v, cache_strides, block_size = k, v, (0, 0, 0, 0), 1
    quant = k_scale is not None
    if quant:
        assert paged and k_cache.dtype == torch.uint8, "k_scale...: the int8 path reads a uint8 paged cache"
        quant_ptrs = (k_scale, k_zero, v_scale, v_zero)
        assert all(t.stride() == k_scale.stride() for t in quant_ptrs), "scales and zeros must share one layout"
        quant_strides = k_scale.stride()
    else:
        quant_ptrs, quant_strides = (q, q, q, q), (0, 0, 0)
    assert not (logn is not None and logn_seq_length), "give LogN as factors (logn) or as logn_seq_length, not both"
    block_m, block_n, warps, stages = _tiles(D, q.dtype)
    grid = (triton.cdiv(max_seqlen_q, block_m), H, B)
    _flash_attn_kernel[grid](
        q, cache_k, cache_v, out, cu_seqlens_q, logn if logn is not None else q,
        block_tables if paged else cu_seqlens_q, context_lens if paged else cu_seqlens_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *cache_strides, block_size, scale * LOG2E, logn_seq_length, *quant_ptrs, *quant_strides,
        PAGED=paged, LOGN=1 if logn is not None else 2 if logn_seq_length else 0, HEAD_DIM=D, BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", QUANT=quant, num_warps=warps,
        num_stages=stages)
    return out
