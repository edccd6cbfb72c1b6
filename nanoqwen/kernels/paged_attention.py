"""Decode attention: one query token per sequence over its paged KV cache (block_tables, context_lens).

The Triton path is flash-decoding. The grid is (sequence, head, split) with a number of splits S chosen on the host
from the batch, the heads and `max_context_len` (host ints: static per CUDA-graph bucket). Each sequence's own context,
read on the device, is cut evenly into at most S splits of at least `min_split` tokens (vLLM's triton decode does the
same with 16 segments), so the work follows the real context lengths: at 512 tokens and batch 1, 4 splits a head work
where a split of the static 32k maximum left one. A program past its sequence's splits exits at once; each runs an
online softmax over its split and writes its normalised partial output and log-sum-exp, and a second kernel merges
the sequence's own splits. With S = 1 the first kernel writes the output directly.
Keys and values are read tile by tile in a software-pipelined loop (`tl.range(..., num_stages)`); `block_size` is a
compile-time constant (block index and offset are a shift and a mask for powers of two). RoPE on q and LogN can be
done here too (`rope=`, `logn_seq_length=`: the decode step's fused path; nanoqwen.kernels.rope).
"""
import os

import torch
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from ..quant.kv_int8 import dequantize
from ..rope import apply_rotary, logn_factors, rotary_tables
from .rope import RopeArgs, logn_factor, rope_cos_sin, rope_launch_args, rotate, round_to

LOG2E = 1.4426950408889634
NUM_STAGES = 2  # K/V tiles in the software pipeline (cp.async loads one tile ahead of use)


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
def _split_len(ctx, num_splits, min_split, BLOCK_N: tl.constexpr):
    """Tokens per split of a context of `ctx` tokens cut into at most `num_splits`: about even, at least `min_split`,
    whole key tiles. Its splits are cdiv(ctx, split_len) <= num_splits (0 for an empty context)."""
    return tl.cdiv(tl.maximum(tl.cdiv(ctx, num_splits), min_split), BLOCK_N) * BLOCK_N


@triton.jit
def _paged_attn_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
                       stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                       stride_ob, stride_oh, stride_os, stride_lb, stride_lh, qk_scale, min_split,
                       logn_ptr, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f, logn_seq_length,
                       k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_sb, stride_ss, stride_sh,
                       LOGN: tl.constexpr, ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr, SPLIT: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       QUANT: tl.constexpr, NUM_STAGES: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    split_len = _split_len(ctx, tl.num_programs(2), min_split, BLOCK_N)
    lo = split * split_len
    if SPLIT and lo >= ctx:  # past this sequence's splits: the reduction does not read this one
        return
    hi = tl.minimum(ctx, lo + split_len)
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
def _paged_reduce_kernel(part_ptr, lse_ptr, out_ptr, context_lens_ptr, grid_splits, min_split,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Merge sequence `seq`'s own splits for one head: two passes over their log-sum-exps (the max, then the
    weights), SPLIT_BLOCK splits at a time."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    num_splits = tl.cdiv(ctx, _split_len(ctx, grid_splits, min_split, BLOCK_N))
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
    """(BLOCK_N keys per step, num_warps, smallest split in tokens); small in the interpreter to exercise splits.

    On Hopper (sm_90 builds, benchmarks/NOTES.md) hd 128 at BLOCK_N 64 with 4 warps and 2 stages takes 96-116
    registers and 34 KB of shared memory (the pipelined K/V tiles), no spills. Not yet tuned on timings.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 1, 32
    return (64, 4, 128) if head_dim >= 128 else (128, 4, 256)


MAX_SPLIT = 8192  # tokens a program reads at most when the batch alone fills the GPU: bounds one long context's tail


def _workspace(*shape, device) -> torch.Tensor:
    """fp32 partial results of the splits (a function, so that tests can poison it)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def num_kv_splits(batch: int, heads: int, max_context_len: int, min_split: int, device: torch.device) -> int:
    """Splits in the grid (host ints only: static per batch size and max_context_len): enough (sequence, head, split)
    programs to fill the GPU about 4 times over, and at most MAX_SPLIT tokens a program, never below `min_split`
    tokens a split. Each sequence uses only as many as its own context needs (`_split_len`)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(triton.cdiv(4 * sms, max(batch * heads, 1)), triton.cdiv(max_context_len, MAX_SPLIT))
    return max(1, min(want, triton.cdiv(max_context_len, min_split)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, max_context_len: int, logn: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, k_zero: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
                    *, num_splits: int | None = None, out: torch.Tensor | None = None,
                    rope: RopeArgs | None = None, logn_seq_length: int = 0) -> torch.Tensor:
    """Triton decode attention, same semantics as `paged_attention_ref` (a zero-length context gives zeros).

    q [B, heads, head_dim] (unit stride on head_dim); k_cache, v_cache [num_blocks, block_size, heads, head_dim];
    block_tables [B, max_blocks] int32; context_lens [B] int32 (each <= max_context_len, a host int that sizes the
    grid; 0 means "use the block table's capacity"). `num_splits` forces the splits of the grid (None: from batch,
    heads and max_context_len); every context is cut into at most that many. `out` (optional, q's shape and dtype,
    unit head_dim stride)
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
    block_n, warps, min_split = _tiles(D)
    splits = num_splits or num_kv_splits(B, H, max_context_len, min_split, q.device)
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
                  BLOCK_SIZE=k_cache.shape[1], QUANT=k_scale is not None, NUM_STAGES=NUM_STAGES, num_warps=warps)
    if splits == 1:
        _paged_attn_kernel[(B, H, 1)](*common, out, out, *strides, out.stride(0), out.stride(1), 0, 0, 0,
                                      scale * LOG2E, min_split, *position_args, *quant, SPLIT=False, **consts)
        return out
    part = _workspace(B, H, splits, D, device=q.device)
    lse = _workspace(B, H, splits, device=q.device)
    _paged_attn_kernel[(B, H, splits)](*common, part, lse, *strides, *part.stride()[:3], *lse.stride()[:2],
                                       scale * LOG2E, min_split, *position_args, *quant, SPLIT=True, **consts)
    _paged_reduce_kernel[(B, H)](part, lse, out, context_lens, splits, min_split, *part.stride()[:3],
                                 *lse.stride()[:2], out.stride(0), out.stride(1), HEAD_DIM=D, BLOCK_N=block_n,
                                 SPLIT_BLOCK=16, num_warps=4)
    return out
