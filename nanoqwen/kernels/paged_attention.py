"""Decode attention: one query token per sequence over its paged KV cache (block_tables, context_lens).

The Triton path is flash-decoding over a fixed partition: each sequence's context is cut into ranges of `partition`
tokens (512 on a GPU), one program per (sequence, head, range) runs an online softmax over its range and writes its
normalised partial output and log-sum-exp, and a second kernel merges each sequence's own ranges. The grid holds
enough ranges for `max_context_len` (a host int: static per CUDA-graph bucket); a program past its sequence's context
exits at once, so the work follows the real context lengths, read on the device (no host sync). When
`max_context_len` fits one range the first kernel writes the output directly.
Keys and values are read tile by tile in a software-pipelined loop (`tl.range(..., num_stages)`); `block_size` is a
compile-time constant (block index and offset are a shift and a mask for powers of two). RoPE on q and LogN can be
done here too (`rope=`, `logn_seq_length=`: the decode step's fused path; nanoqwen.kernels.rope).
"""
import os

import torch
import triton
import triton.language as tl

from ..quant.kv_int8 import dequantize
from ..rope import apply_rotary, logn_factors, rotary_tables
from .rope import RopeArgs, logn_factor, rope_cos_sin, rope_launch_args, rotate, round_to

LOG2E = 1.4426950408889634
NUM_STAGES = 2  # K/V tiles loaded ahead of use (software pipelining, cp.async); 1 in the interpreter


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float, logn: torch.Tensor | None = None,
                        k_scale=None, k_zero=None, v_scale=None, v_zero=None, rope: RopeArgs | None = None,
                        logn_seq_length: int = 0) -> torch.Tensor:
    """Torch reference: q [B, heads, head_dim] -> out [B, heads, head_dim]; fp32 softmax and sums.

    Gathers every sequence's blocks into one padded [B, max_blocks * block_size] batch and masks the tail.
    `rope` (optional): q is not rotated yet: rotate it (nanoqwen.rope), each sequence at rope.positions[i].
    `logn` [B] (optional, fp32): LogN factor of every query, multiplied into q in q's dtype first; or
    `logn_seq_length` (with `rope`): the factors of rope.positions (nanoqwen.rope.logn_factors).
    `k_scale`... (optional): the int8 cache's scales and zeros [num_blocks, block_size, heads].
    """
    if rope is not None:
        q = apply_rotary(q, *rotary_tables(*rope))
        if logn_seq_length:
            logn = logn_factors(rope.positions, logn_seq_length)
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
def _paged_attn_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
                       stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                       stride_ob, stride_oh, stride_os, stride_lb, stride_lh, qk_scale, partition,
                       logn_ptr, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f, logn_seq_length,
                       k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss, stride_sh,
                       LOGN: tl.constexpr, ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr, SPLIT: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       QUANT: tl.constexpr, NUM_STAGES: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    lo = split * partition
    if SPLIT and lo >= ctx:  # past this sequence's context: the reduction does not read this range
        return
    hi = tl.minimum(ctx, lo + partition)
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = q_ptr + seq * stride_qb + head * stride_qh + dims
    q = tl.load(q_ptrs)
    if ROPE:  # rounded to q's dtype, as the model's RoPE leaves it
        pos = tl.load(positions_ptr + seq)
        cos, sin = rope_cos_sin(pos, tl.load(ntk_ptr + seq), inv_freq_ptr, stride_f, dims, ROTARY_DIM)
        q = round_to(rotate(q_ptrs, q.to(tl.float32), dims < HEAD_DIM, cos, sin, dims, ROTARY_DIM),
                     q.dtype).to(q.dtype)
    if LOGN == 1:  # given factors
        q = (q * tl.load(logn_ptr + seq).to(q.dtype)).to(q.dtype)
    elif LOGN == 2:  # from the query's position; rounded to q's dtype, as the model scales q before attention
        q = (q * logn_factor(tl.load(positions_ptr + seq), logn_seq_length).to(q.dtype)).to(q.dtype)
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
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        n = start_n + tl.arange(0, BLOCK_N)
        ok = n < hi
        blk = tl.load(block_table_ptr + n // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        off = blk * stride_cb + (n % BLOCK_SIZE) * stride_cs
        k = tl.load(k_base + off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + off[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
        if QUANT:  # int8: x = scale * (q - zero) in fp32, each key's scale applied once to its score or weight
            s_off = blk * stride_sb + (n % BLOCK_SIZE) * stride_ss
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
    # l_i >= 1 unless the range was empty (only a zero-length context without splits): then acc = 0 and the output 0
    l_i = tl.maximum(l_i, 1.0)
    out = acc / l_i
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + split * stride_os + dims, out.to(out_ptr.dtype.element_ty))
    if SPLIT:
        tl.store(lse_ptr + seq * stride_lb + head * stride_lh + split, m_i + tl.log2(l_i))


@triton.jit
def _paged_reduce_kernel(part_ptr, lse_ptr, out_ptr, context_lens_ptr, partition,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Merge sequence `seq`'s own ranges (cdiv(context, partition) of them) for one head: two passes over the
    log-sum-exps (their max, then the weights), SPLIT_BLOCK ranges at a time."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    num_splits = tl.cdiv(tl.load(context_lens_ptr + seq), partition)
    dims = tl.arange(0, HEAD_DIM)
    lse_base = lse_ptr + seq * stride_lb + head * stride_lh
    part_base = part_ptr + seq * stride_pb + head * stride_ph
    m = tl.full([], -1e30, tl.float32)  # finite even without any range (a zero-length context)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        m = tl.maximum(m, tl.max(tl.load(lse_base + s, mask=s < num_splits, other=float("-inf")), 0))
    acc = tl.zeros([HEAD_DIM], tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        ok = s < num_splits
        w = tl.exp2(tl.load(lse_base + s, mask=ok, other=float("-inf")) - m)  # the largest weighs 1
        part = tl.load(part_base + s[:, None] * stride_ps + dims[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
        total += tl.sum(w, 0)
    out = acc / tl.maximum(total, 1.0)  # total >= 1, or no range at all (then 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def _tiles(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N keys per step, num_warps, partition: tokens per split); small in the interpreter to exercise splits.

    On Hopper (sm_90 builds) hd 128 at BLOCK_N 64 with 4 warps and 3 stages: see benchmarks/NOTES.md for registers.
    Partition 512 as vLLM's paged attention: long enough that a split's online softmax amortises its partial write,
    short enough that 4k tokens give 8 splits a (sequence, head). Not yet tuned on timings.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 1, 32
    return (64, 4, 512) if head_dim >= 128 else (128, 4, 512)


def _workspace(*shape, device) -> torch.Tensor:
    """fp32 partial results of the splits (a function, so that tests can poison it)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def num_kv_splits(batch: int, heads: int, max_context_len: int, partition: int, device: torch.device) -> int:
    """Ranges in the grid for contexts up to `max_context_len`: cdiv(max_context_len, partition). Host ints only.
    (batch, heads and device do not change it: the partition is fixed, and each sequence uses only its own ranges.)"""
    return max(1, triton.cdiv(max_context_len, partition))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, max_context_len: int, logn: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, k_zero: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
                    *, num_splits: int | None = None, out: torch.Tensor | None = None,
                    rope: RopeArgs | None = None, logn_seq_length: int = 0) -> torch.Tensor:
    """Triton decode attention, same semantics as `paged_attention_ref` (a zero-length context gives zeros).

    q [B, heads, head_dim] (unit stride on head_dim); k_cache, v_cache [num_blocks, block_size, heads, head_dim];
    block_tables [B, max_blocks] int32; context_lens [B] int32 (each <= max_context_len, a host int that sizes the
    grid; 0 means "use the block table's capacity"). `num_splits` forces the number of ranges the longest context is
    cut into (None: ranges of the default partition). `out` (optional, q's shape and dtype, unit head_dim stride)
    receives the result instead of a new tensor.
    `rope` (optional): q is not rotated yet; each query is rotated here at rope.positions[i], NTK row
    rope.ntk_index[i]. `logn_seq_length` (with `rope`): LogN factors from those positions, instead of `logn`.
    int8 cache: k_cache, v_cache uint8 with `k_scale`, `k_zero`, `v_scale`, `v_zero` [num_blocks, block_size, heads]
    (one layout); every key and value is dequantized in registers as read, scale * (q - zero) in fp32.
    """
    B, H, D = q.shape
    assert D & (D - 1) == 0 and 16 <= D <= 256, f"head_dim must be a power of two in [16, 256], got {D}"
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, \
        "q and the caches need a contiguous head_dim, and both caches the same layout"
    assert not (logn_seq_length and rope is None), "logn_seq_length takes the positions from rope: pass rope too"
    assert not (logn_seq_length and logn is not None), "give LogN as factors (logn) or as logn_seq_length, not both"
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    if max_context_len <= 0:
        max_context_len = block_tables.shape[1] * k_cache.shape[1]
    block_n, warps, partition = _tiles(D)
    if num_splits is not None:
        partition = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    splits = num_kv_splits(B, H, max_context_len, partition, q.device)
    stages = 1 if os.environ.get("TRITON_INTERPRET") == "1" else NUM_STAGES
    common = (q, k_cache, v_cache, block_tables, context_lens)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    position_args = (logn if logn is not None else q, *rope_launch_args(rope, q), logn_seq_length)
    if k_scale is not None:
        assert k_cache.dtype == torch.uint8, "k_scale...: the int8 path reads a uint8 cache"
        quant = (k_scale, k_zero, v_scale, v_zero)
        assert all(t.stride() == k_scale.stride() for t in quant), "scales and zeros must share one layout"
        quant += k_scale.stride()
    else:
        quant = (q, q, q, q, 0, 0, 0)
    consts = dict(LOGN=1 if logn is not None else 2 if logn_seq_length else 0, ROPE=rope is not None,
                  ROTARY_DIM=2 * rope.inv_freq.shape[1] if rope is not None else 2, HEAD_DIM=D, BLOCK_N=block_n,
                  BLOCK_SIZE=k_cache.shape[1], QUANT=k_scale is not None, NUM_STAGES=stages, num_warps=warps)
    if splits == 1:
        _paged_attn_kernel[(B, H, 1)](*common, out, out, *strides, out.stride(0), out.stride(1), 0, 0, 0,
                                      scale * LOG2E, partition, *position_args, *quant, SPLIT=False, **consts)
        return out
    part = _workspace(B, H, splits, D, device=q.device)
    lse = _workspace(B, H, splits, device=q.device)
    _paged_attn_kernel[(B, H, splits)](*common, part, lse, *strides, *part.stride()[:3], *lse.stride()[:2],
                                       scale * LOG2E, partition, *position_args, *quant, SPLIT=True, **consts)
    _paged_reduce_kernel[(B, H)](part, lse, out, context_lens, partition, *part.stride()[:3], *lse.stride()[:2],
                                 out.stride(0), out.stride(1), HEAD_DIM=D, SPLIT_BLOCK=16, num_warps=4)
    return out
