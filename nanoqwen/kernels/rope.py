"""RoPE and LogN inside the kernels: every token's angles from its position and NTK row, computed where its query or
key is loaded (no per-step cos/sin tables); and `rotary_qk_`, q and k rotated in place in one launch (prefill).

Torch reference: nanoqwen.rope (`RotaryEmbedding` tables + `apply_rotary`, `logn_factors`); `rotary_ref` below puts
them together. The same arithmetic: angle = float(position) * inv_freq[ntk_index, j mod rotary_dim/2] in fp32 (the
reference's product), fp32 cos and sin (libdevice `__nv_cosf`/`__nv_sinf` on NVIDIA, accurate at the large angles of
long contexts; numpy in the interpreter; either may differ from torch's by an ulp), x * cos + rotate_half(x) * sin in
fp32, rounded to x's dtype. Kernels whose output must equal another kernel's rotation bit for bit (the KV stores
against `rotary_qk_`, so that the int8 stores stay testable bit for bit) are launched without FMA contraction.
"""
from typing import NamedTuple

import torch
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from ..rope import apply_rotary, rotary_tables


class RopeArgs(NamedTuple):
    """What a kernel needs to rotate token t in place of a table: its position and NTK row, and the fp32 inv_freq
    table [rows, rotary_dim // 2] (nanoqwen.rope.RotaryEmbedding.inv_freq)."""
    positions: torch.Tensor  # [T] int64
    ntk_index: torch.Tensor  # [T] int64
    inv_freq: torch.Tensor


def rope_launch_args(rope: RopeArgs | None, like: torch.Tensor) -> tuple:
    """(positions, ntk_index, inv_freq, inv_freq row stride) for a kernel, dummies (never read) without RoPE."""
    if rope is None:
        return like, like, like, 0
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.stride(-1) == 1, "inv_freq: a contiguous fp32 table"
    return rope.positions, rope.ntk_index, rope.inv_freq, rope.inv_freq.stride(0)


def rope_consts(rope: RopeArgs | None) -> dict:
    """Constants of a KV store launch: RoPE or not, and no FMA contraction (module docstring)."""
    return dict(ROPE=rope is not None, ROTARY_DIM=2 * rope.inv_freq.shape[1] if rope is not None else 2,
                enable_fp_fusion=False)


def rotary_ref(x: torch.Tensor, positions: torch.Tensor, ntk_index: torch.Tensor,
               inv_freq: torch.Tensor) -> torch.Tensor:
    """Torch reference: x [T, heads, head_dim] rotated (rotary_dim = 2 * inv_freq.shape[1]), in x's dtype."""
    return apply_rotary(x, *rotary_tables(positions, ntk_index, inv_freq))


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round an fp32 value to DTYPE (to nearest, ties to even) and back: torch computes a half or bfloat16 op in fp32
    and rounds its result, so doing every step so reproduces "arithmetic in the model dtype". bfloat16 is rounded with
    integer ops because Triton's CPU interpreter truncates fp32 -> bf16 casts (the GPU rounds them to nearest even:
    these same bits)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def rope_cos_sin(pos, ntk, inv_freq_ptr, stride_f, dims, ROTARY_DIM: tl.constexpr):
    """cos and sin of the angles of `dims` for tokens at `pos` with NTK row `ntk` (scalars, or [N, 1] for a tile of
    tokens): 1 and 0 from rotary_dim on (those dims are not rotated)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    rot = dims < ROTARY_DIM
    freq = tl.load(inv_freq_ptr + ntk * stride_f + dims % HALF, mask=rot, other=0.0)
    angle = pos.to(tl.float32) * freq
    return tl.where(rot, tl.cos(angle), 1.0), tl.where(rot, tl.sin(angle), 0.0)


@triton.jit
def rotate(ptrs, x, mask, cos, sin, dims, ROTARY_DIM: tl.constexpr):
    """x (fp32, loaded from `ptrs`, head_dim last) rotated: x * cos + rotate_half(x) * sin, in fp32. rotate_half pairs
    dim j with j + rotary_dim/2 (-x2, x1); the partners are loaded here (same cache lines as x)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    first = dims < HALF
    partner = tl.load(ptrs + tl.where(first, HALF, -HALF), mask=mask & (dims < ROTARY_DIM), other=0.0)
    partner = partner.to(tl.float32)
    return x * cos + tl.where(first, -partner, partner) * sin


@triton.jit
def logn_factor(pos, seq_length):
    """LogN of a query at position `pos`: log(pos + 1) / log(seq_length) beyond seq_length, else 1; float64 like the
    reference's table (math.log), then fp32."""
    p1 = (pos + 1).to(tl.float64)
    f = tl.log(p1) / tl.log(seq_length.to(tl.float64))
    return tl.where(p1 > seq_length, f, 1.0).to(tl.float32)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, ntk_ptr, inv_freq_ptr, stride_t, stride_h, stride_f, num_heads,
                   HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    if tl.program_id(2) == 0:
        x_ptr = q_ptr
    else:
        x_ptr = k_ptr
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_heads)[:, None]
    ptrs = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    cos, sin = rope_cos_sin(tl.load(positions_ptr + token), tl.load(ntk_ptr + token), inv_freq_ptr, stride_f, dims,
                            ROTARY_DIM)
    y = round_to(rotate(ptrs, x, mask, cos, sin, dims, ROTARY_DIM), x_ptr.dtype.element_ty)
    tl.store(ptrs, y.to(x_ptr.dtype.element_ty), mask=mask)  # all of this head's loads are done: safe in place


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, ntk_index: torch.Tensor,
               inv_freq: torch.Tensor) -> None:
    """Triton: rotate q and k [T, heads, head_dim] in place (same shape, strides and dtype; unit head_dim stride),
    token t by positions[t] and NTK row ntk_index[t] of `inv_freq` [rows, rotary_dim // 2] (fp32). One launch."""
    T, H, D = q.shape
    assert k.shape == q.shape and k.stride() == q.stride() and k.dtype == q.dtype and q.stride(-1) == 1, \
        "rotary_qk_ needs q and k of one shape, layout and dtype, with a contiguous head_dim"
    assert inv_freq.dtype == torch.float32 and inv_freq.stride(-1) == 1, "inv_freq must be a contiguous fp32 table"
    assert D & (D - 1) == 0, f"head_dim must be a power of two, got {D}"
    if T == 0:
        return
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // D))
    _rotary_kernel[(T, triton.cdiv(H, block_h), 2)](q, k, positions, ntk_index, inv_freq, q.stride(0), q.stride(1),
                                                     inv_freq.stride(0), H, HEAD_DIM=D, BLOCK_H=block_h,
                                                     ROTARY_DIM=2 * inv_freq.shape[1], num_warps=4,
                                                     enable_fp_fusion=False)
