"""Write a step's new K and V into their slots of the paged KV cache.

Cache layout (one layer): k_cache, v_cache [num_blocks, block_size, num_heads, head_dim]; the slot of a token is
block_id * block_size + offset; slot -1 means "do not write" (padding rows of a CUDA-graph batch).

Every store can apply RoPE to K on the way (`rope=`, the decode path): keys are cached rotated. Its reference is the
rotation of nanoqwen.kernels.rope (`rotary_qk_`, tested against torch) followed by the plain store: the stores are
launched without FMA contraction so that they rotate exactly as `rotary_qk_` does, and the int8 stores stay
bit-exact with their torch references given the same rotated keys.
"""
import torch
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from .rope import RopeArgs, rope_consts, rope_cos_sin, rope_launch_args, rotate, round_to


@triton.jit
def _rotated_key(ptrs, x, mask, dims, pos, ntk, inv_freq_ptr, stride_f, ROTARY_DIM: tl.constexpr):
    """Keys x (fp32, loaded from `ptrs`) of tokens at `pos` with NTK rows `ntk` (scalars, or [N, 1] for N tokens'
    rows) rotated and rounded to their dtype, in fp32: what the model's RoPE leaves in the activation dtype."""
    cos, sin = rope_cos_sin(pos, ntk, inv_freq_ptr, stride_f, dims, ROTARY_DIM)
    return round_to(rotate(ptrs, x, mask, cos, sin, dims, ROTARY_DIM), ptrs.dtype.element_ty)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Torch reference: k, v [T, heads, head_dim] into the flat slots of the caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,  # cache strides: block, slot in block, head (head_dim is 1)
                     num_heads, block_size, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding row: leave the cache alone
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_heads)[:, None]
    token = token.to(tl.int64)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k_ptrs = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    k = tl.load(k_ptrs, mask=mask)
    if ROPE:
        k = _rotated_key(k_ptrs, k.to(tl.float32), mask, dims, tl.load(positions_ptr + token), tl.load(ntk_ptr + token),
                         inv_freq_ptr, stride_f, ROTARY_DIM)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, rope: RopeArgs | None = None) -> None:
    """Triton: k, v [T, heads, head_dim] (any token/head strides, unit head_dim stride) into their cache slots, k
    rotated first when `rope` is given.

    One program per (token, group of heads); slots < 0 are skipped on the device: no host sync, capturable.
    """
    T, H, D = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "store_kv needs a contiguous head_dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k_cache and v_cache must share a layout"
    assert D & (D - 1) == 0, f"head_dim must be a power of two, got {D}"
    if T == 0:
        return
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // D))  # about 4k elements per program
    grid = (T, triton.cdiv(H, block_h))
    _store_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H, k_cache.shape[1],
                           *rope_launch_args(rope, slot_mapping), HEAD_DIM=D, BLOCK_H=block_h, num_warps=4,
                           **rope_consts(rope))


# ------------------------------------------------------------------------------------------------ int8 KV cache
# Torch reference: nanoqwen.quant.kv_int8.store_kv_int8_ref (quantize_per_token, quantize_qwen). Bit-exactness with
# it rests on IEEE-rounded divisions (`div_rn`: a plain `/` compiles to an approximate division on NVIDIA GPUs), on
# no multiply-add pairs that the compiler could fuse into an FMA, and on rounding half to even like torch.round.

@triton.jit
def _round_half_even(y):
    """The nearest integer to y in [0, 255], ties to even (torch.round). y - floor(y) is exact in that range."""
    r = tl.floor(y)
    d = y - r
    odd = (r.to(tl.int32) & 1) == 1
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _quantize_heads(x, dst, scale_dst, zero_dst, mask, head_ok):
    """x [BLOCK_H, HEAD_DIM] fp32 -> uint8 at `dst`, scale and zero [BLOCK_H]: quantize_per_token's arithmetic."""
    lo = tl.min(x, 1)
    hi = tl.max(x, 1)
    scale = tl.maximum(tl.maximum(tl.math.div_rn(hi - lo, 255.0), tl.math.div_rn(tl.abs(lo), 60000.0)), 1e-8)  # ZERO_MAX
    zero = tl.math.div_rn(-lo, scale)
    y = tl.math.div_rn(x, scale[:, None]) + zero[:, None]
    q = _round_half_even(tl.minimum(tl.maximum(y, 0.0), 255.0))  # clamp(round(y)) == round(clamp(y)) at 0 and 255
    tl.store(dst, q.to(tl.uint8), mask=mask)
    tl.store(scale_dst, scale.to(scale_dst.dtype.element_ty), mask=head_ok)
    tl.store(zero_dst, zero.to(zero_dst.dtype.element_ty), mask=head_ok)


@triton.jit
def _store_kv_int8_kernel(k_ptr, v_ptr, kq_ptr, vq_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, slot_ptr,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_cb, stride_cs, stride_ch,  # uint8 cache strides: block, slot in block, head
                          stride_sb, stride_ss, stride_sh,  # scale and zero strides: block, slot in block, head
                          num_heads, block_size, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f,
                          HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, ROPE: tl.constexpr,
                          ROTARY_DIM: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding row: leave the cache alone
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    head_ok = heads < num_heads
    mask = head_ok[:, None]
    token = token.to(tl.int64)
    blk, off = slot // block_size, slot % block_size
    dst = blk * stride_cb + off * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    sdst = blk * stride_sb + off * stride_ss + heads * stride_sh
    k_ptrs = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        k = _rotated_key(k_ptrs, k, mask, dims, tl.load(positions_ptr + token), tl.load(ntk_ptr + token),
                         inv_freq_ptr, stride_f, ROTARY_DIM)
    _quantize_heads(k, kq_ptr + dst, k_scale_ptr + sdst, k_zero_ptr + sdst, mask, head_ok)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask, other=0.0)
    _quantize_heads(v.to(tl.float32), vq_ptr + dst, v_scale_ptr + sdst, v_zero_ptr + sdst, mask, head_ok)


@triton.jit
def _load_rows(src, rows, mask, stride_xt, dims, is_key, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f,
               ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr):
    """Rows `rows` of one head (fp32); keys rotated with ROPE."""
    ptrs = src + rows.to(tl.int64)[:, None] * stride_xt
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        if is_key:
            x = _rotated_key(ptrs, x, mask, dims, tl.load(positions_ptr + rows[:, None], mask=mask, other=0),
                             tl.load(ntk_ptr + rows[:, None], mask=mask, other=0), inv_freq_ptr, stride_f, ROTARY_DIM)
    return x


@triton.jit
def _store_qwen_kernel(k_ptr, v_ptr, kq_ptr, vq_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, slot_ptr,
                       cu_seqlens_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                       block_size, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f,
                       HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr):
    """One program per (sequence, head, K or V): min/max over the sequence's whole chunk, then quantize and store."""
    seq = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    is_key = tl.program_id(2) == 0
    if is_key:
        x_ptr, q_ptr, scale_ptr, zero_ptr = k_ptr, kq_ptr, k_scale_ptr, k_zero_ptr
        stride_xt, stride_xh = stride_kt, stride_kh
    else:
        x_ptr, q_ptr, scale_ptr, zero_ptr = v_ptr, vq_ptr, v_scale_ptr, v_zero_ptr
        stride_xt, stride_xh = stride_vt, stride_vh
    start = tl.load(cu_seqlens_ptr + seq)
    end = tl.load(cu_seqlens_ptr + seq + 1)
    if end <= start:  # an empty chunk: nothing to store (and no inf - inf)
        return
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    dims = tl.arange(0, HEAD_DIM)
    src = x_ptr + head * stride_xh + dims[None, :]
    hi = tl.full([BLOCK_T, HEAD_DIM], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_T, HEAD_DIM], float("inf"), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = (rows < end)[:, None]
        x = _load_rows(src, rows, ok, stride_xt, dims, is_key, positions_ptr, ntk_ptr, inv_freq_ptr, stride_f, ROPE,
                       ROTARY_DIM)
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
    fmax = tl.max(tl.max(hi, 1), 0)
    fmin = tl.min(tl.min(lo, 1), 0)
    # the reference: scale = (fmax - fmin) / (qmax - qmin); zero = qmin - fmin / scale; q = clamp(x / scale + zero)
    # truncated to uint8, each op in the model dtype; no guard for a constant chunk (scale 0), as the reference
    scale = round_to(tl.math.div_rn(round_to(fmax - fmin, DTYPE), 255.0), DTYPE)
    zero = -round_to(tl.math.div_rn(fmin, scale), DTYPE)  # 0 - t is exactly -t
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        slot = tl.load(slot_ptr + rows, mask=rows < end, other=-1).to(tl.int64)
        keep = slot >= 0  # rows with slot < 0 count in the chunk's min/max but are not stored (as the reference)
        x = _load_rows(src, rows, keep[:, None], stride_xt, dims, is_key, positions_ptr, ntk_ptr, inv_freq_ptr,
                       stride_f, ROPE, ROTARY_DIM)
        y = round_to(round_to(tl.math.div_rn(x, scale), DTYPE) + zero, DTYPE)
        q = tl.minimum(tl.maximum(y, 0.0), 255.0).to(tl.uint8)  # float -> uint8 truncates, as .to(torch.uint8)
        blk, off = slot // block_size, slot % block_size
        tl.store(q_ptr + (blk * stride_cb + off * stride_cs + head * stride_ch)[:, None] + dims[None, :], q,
                 mask=keep[:, None])
        sdst = blk * stride_sb + off * stride_ss + head * stride_sh
        tl.store(scale_ptr + sdst, tl.full([BLOCK_T], 0.0, tl.float32) + scale, mask=keep)
        tl.store(zero_ptr + sdst, tl.full([BLOCK_T], 0.0, tl.float32) + zero, mask=keep)


def store_kv_int8(k: torch.Tensor, v: torch.Tensor, cache, slot_mapping: torch.Tensor, mode: str = "default",
                  cu_seqlens_q: torch.Tensor | None = None, rope: RopeArgs | None = None) -> None:
    """Triton: quantize the step's K and V [T, heads, head_dim] and write them with their scales and zeros into
    `cache` (a LayerCache: k, v uint8 [num_blocks, block_size, heads, head_dim]; k_scale, k_zero, v_scale, v_zero
    [num_blocks, block_size, heads]). Same results as `store_kv_int8_ref`; slots < 0 are skipped on the device.
    With `rope`, K is rotated first (module docstring). One launch in either mode.

    "default": one program per (token, group of heads), min/max over head_dim, round half to even, fp32 math; no
    host sync (capturable). Bit-exact with `quantize_per_token` for every input dtype (it works on exact fp32 copies).
    "qwen": one program per (sequence, head) over the sequence's rows cu_seqlens_q[i]:cu_seqlens_q[i+1] (read on the
    device: no host sync either), each op rounded to the model dtype as torch does; bit-exact with `quantize_qwen`
    where torch's division is IEEE-rounded (CPU; CUDA for tensor / tensor, which is what the reference does).
    """
    T, H, D = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "store_kv_int8 needs a contiguous head_dim"
    assert cache.k.dtype == torch.uint8 and cache.k.stride() == cache.v.stride() and cache.k.stride(-1) == 1, \
        "the int8 cache's k and v must be uint8 with one contiguous layout"
    sc = (cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero)
    assert all(t.stride() == sc[0].stride() for t in sc), "scales and zeros must share one layout"
    assert D & (D - 1) == 0, f"head_dim must be a power of two, got {D}"
    if T == 0:
        return
    block_size = cache.k.shape[1]
    cache_strides = (*cache.k.stride()[:3], *cache.k_scale.stride())
    if mode == "default":
        block_h = min(triton.next_power_of_2(H), max(1, 4096 // D))
        grid = (T, triton.cdiv(H, block_h))
        _store_kv_int8_kernel[grid](k, v, cache.k, cache.v, *sc, slot_mapping,
                                    k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cache_strides,
                                    H, block_size, *rope_launch_args(rope, slot_mapping), HEAD_DIM=D, BLOCK_H=block_h,
                                    num_warps=4, **rope_consts(rope))
    elif mode == "qwen":
        assert cu_seqlens_q is not None, "qwen mode quantizes per sequence: pass cu_seqlens_q"
        num_seqs = cu_seqlens_q.numel() - 1
        block_t = max(1, min(64, 4096 // D))
        _store_qwen_kernel[(num_seqs, H, 2)](k, v, cache.k, cache.v, *sc, slot_mapping, cu_seqlens_q,
                                             k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cache_strides,
                                             block_size, *rope_launch_args(rope, slot_mapping), HEAD_DIM=D,
                                             BLOCK_T=block_t, num_warps=4, **rope_consts(rope))
    else:
        raise ValueError(f"int8 KV mode {mode!r}: use 'default' or 'qwen'")
