"""Many LoRA adapters in one batch: every token row adds the low-rank product of its own adapter (Punica-style).

For one adapted linear y = base(x), x [T, K], y [T, N], with up to L adapters held in stacked slot buffers:
  lora_a  [L, S * R, K]  the A matrices (shrink), S slices of R rows each, zero-padded to the rank R
  lora_b  [L, N, R]      the B matrices (expand); output column n belongs to slice n // (N / S) and reads that
                         slice's R columns of the shrunk vector
  scales  [L, S] fp32    lora_alpha / r of each slice
  indices [T] int        the slot of each token row, -1 for "no adapter"
  out[t] = y[t] + scales[i, j] * B[i, slice j] @ (A[i, slice j] @ x[t])   with i = indices[t]; rows with i = -1: y[t]
Slices carry the fused linears of nanoqwen: mlp.w2_w1 is w2 then w1, each with its own A and B (S = 2); c_attn's
q|k|v share one A in peft (S = 1, B has 3 * hidden rows). Two steps, as Punica/S-LoRA do:
  shrink  v = A[i] x   [T, S * R] fp32
  expand  out = y + scale * B[i] v
Both kernels tile rows (BLOCK_M token rows per program) and, inside a tile, loop over the slots its rows use (from
the smallest to the largest index present, skipping absent ones), multiplying with `tl.dot` the rows of that slot
(the others masked to zero). A prefill chunk of one sequence is one slot per tile; a decode batch mixing a few
adapters loads each adapter's weights once per tile. No sorting, no host sync, static shapes: capturable in a CUDA
graph, the slot indices being read from the device.
"""
from __future__ import annotations

import os

import torch

from . import tl, triton, use_triton  # Triton, or stand-ins when it is not installed (see __init__)


# ----------------------------------------------------------------------------------------------- torch reference

def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """v [T, S * R] fp32: row t is lora_a[indices[t]] @ x[t] (zeros where indices[t] = -1), computed in fp32.

    One masked matmul per slot: static shapes and no host sync, so the CPU path and a CUDA graph can use it too."""
    xf = x.float()
    v = xf.new_zeros(x.shape[0], lora_a.shape[1])
    for s in range(lora_a.shape[0]):
        v = torch.where((indices == s)[:, None], xf @ lora_a[s].float().t(), v)
    return v


def lora_expand_ref(y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                    indices: torch.Tensor) -> torch.Tensor:
    """y + per-row scales[i, j] * lora_b[i, slice j] @ v[:, slice j] in fp32, rounded once to y's dtype."""
    L, N, R = lora_b.shape
    S = scales.shape[1]
    width = N // S
    delta = y.new_zeros(y.shape, dtype=torch.float32)
    for s in range(L):
        mine = (indices == s)[:, None]
        for j in range(S):
            cols = slice(j * width, (j + 1) * width)
            d = (v[:, j * R:(j + 1) * R] * scales[s, j]) @ lora_b[s, cols].float().t()
            delta[:, cols] = torch.where(mine, d, delta[:, cols])
    return (y.float() + delta).to(y.dtype)


# ----------------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _slot_range(idx_ptr, rows, row_ok):
    """The slots of a tile's rows, and the smallest and largest slot used (lo > hi when no row has an adapter)."""
    slot = tl.load(idx_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    lo = tl.min(tl.where(slot >= 0, slot, 1 << 30), axis=0)
    hi = tl.max(slot, axis=0)
    return slot, lo, hi


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, idx_ptr, v_ptr, T, K, RS, stride_xm, stride_al, stride_ar, stride_vm,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of A = columns of v
    row_ok, col_ok = rows < T, cols < RS
    slot, lo, hi = _slot_range(idx_ptr, rows, row_ok)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(lo, hi + 1):
        mine = slot == s
        if tl.max(mine.to(tl.int32), axis=0) > 0:  # slots between lo and hi that no row of the tile uses: skipped
            a_base = a_ptr + s * stride_al  # < 2^31: slots * S * R * K
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :], mask=mine[:, None] & k_ok[None, :],
                            other=0.0)
                a = tl.load(a_base + cols[None, :] * stride_ar + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                            other=0.0)  # [BLOCK_K, BLOCK_R]: A transposed
                acc = tl.dot(x.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    tl.store(v_ptr + rows64[:, None] * stride_vm + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_expand_kernel(y_ptr, v_ptr, b_ptr, scale_ptr, idx_ptr, out_ptr, T, WIDTH, S,
                        stride_ym, stride_vm, stride_bl, stride_bn, stride_om,
                        R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IN_PLACE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    j = tl.program_id(2)  # the slice: output columns j * WIDTH .. (j + 1) * WIDTH - 1
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = j * WIDTH + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R)
    row_ok, col_ok = rows < T, tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N) < WIDTH
    slot, lo, hi = _slot_range(idx_ptr, rows, row_ok)
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(lo, hi + 1):
        mine = slot == s
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            scale = tl.load(scale_ptr + s * S + j)
            v = tl.load(v_ptr + rows64[:, None] * stride_vm + j * R + ranks[None, :], mask=mine[:, None], other=0.0)
            b = tl.load(b_ptr + s * stride_bl + cols[None, :].to(tl.int64) * stride_bn + ranks[:, None],
                        mask=col_ok[None, :], other=0.0)  # [R, BLOCK_N]: B transposed
            acc = tl.dot((v * scale).to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    # in place, rows without an adapter keep y as it is: neither read nor written
    keep = row_ok & ((slot >= 0) | (IN_PLACE == 0))
    mask = keep[:, None] & col_ok[None, :]
    y = tl.load(y_ptr + rows64[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_m(T: int) -> int:
    """Row tile: 16 (tl.dot's smallest) for decode-sized batches, 64 for prefill. Untuned guesses for Hopper."""
    return 16 if T <= 64 or _interpreting() else 64


def _precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 stays fp32 (no TF32): the golden tests compare at 1e-4


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `lora_shrink_ref`: x [T, K] (unit stride on K), lora_a [L, S * R, K] contiguous, indices [T] -> v
    [T, S * R] fp32, every row written (zeros where indices = -1). `out`: an fp32 [T, S * R] tensor to write."""
    T, K = x.shape
    L, RS, Ka = lora_a.shape
    if Ka != K or indices.shape != (T,):
        raise ValueError(f"lora_shrink: x {list(x.shape)}, lora_a {list(lora_a.shape)} and indices "
                         f"{list(indices.shape)} do not match (x [T, K], lora_a [slots, S * R, K], indices [T])")
    assert x.stride(-1) == 1 and lora_a.is_contiguous(), "lora_shrink needs x with unit stride on K and contiguous A"
    out = torch.empty(T, RS, dtype=torch.float32, device=x.device) if out is None else out
    assert out.shape == (T, RS) and out.dtype == torch.float32 and out.stride(-1) == 1
    if T == 0:
        return out
    block_m = _block_m(T)
    block_r = min(triton.next_power_of_2(RS), 64)
    block_k = 32 if _interpreting() else 128
    grid = (triton.cdiv(T, block_m), triton.cdiv(RS, block_r))
    _lora_shrink_kernel[grid](x, lora_a, indices, out, T, K, RS, x.stride(0), lora_a.stride(0), lora_a.stride(1),
                              out.stride(0), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
                              DOT_PRECISION=_precision(lora_a.dtype), num_warps=4)
    return out


def lora_expand(y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor,
                *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `lora_expand_ref`: y [T, N], v [T, S * R] fp32, lora_b [L, N, R] contiguous (R a power of two >= 16),
    scales [L, S] fp32 contiguous, indices [T] -> out [T, N] in y's dtype. `out` may be y itself (then rows without
    an adapter are not touched); None allocates a new tensor."""
    T, N = y.shape
    L, Nb, R = lora_b.shape
    S = scales.shape[1]
    if Nb != N or N % S or v.shape != (T, S * R) or scales.shape[0] != L or indices.shape != (T,):
        raise ValueError(f"lora_expand: y {list(y.shape)}, v {list(v.shape)}, lora_b {list(lora_b.shape)}, scales "
                         f"{list(scales.shape)}, indices {list(indices.shape)} do not match (y [T, N], v [T, S * R], "
                         "lora_b [slots, N, R], scales [slots, S], indices [T])")
    assert R >= 16 and R & (R - 1) == 0, f"lora_b's rank dimension must be a power of two >= 16, got {R}"
    assert y.stride(-1) == 1 and v.stride(-1) == 1 and lora_b.is_contiguous() and scales.is_contiguous()
    in_place = out is not None and out.data_ptr() == y.data_ptr()
    out = torch.empty_like(y) if out is None else out
    assert out.shape == y.shape and out.dtype == y.dtype and out.stride(-1) == 1
    if T == 0:
        return out
    width = N // S
    block_m = _block_m(T)
    block_n = 32 if _interpreting() else 64
    grid = (triton.cdiv(T, block_m), triton.cdiv(width, block_n), S)
    _lora_expand_kernel[grid](y, v, lora_b, scales, indices, out, T, width, S, y.stride(0), v.stride(0),
                              lora_b.stride(0), lora_b.stride(1), out.stride(0), R=R, BLOCK_M=block_m,
                              BLOCK_N=block_n, IN_PLACE=in_place, DOT_PRECISION=_precision(lora_b.dtype),
                              num_warps=4)
    return out


def add_lora(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
             indices: torch.Tensor) -> torch.Tensor:
    """y + each row's LoRA delta (module docstring), x [T, K], y [T, N]: the Triton kernels on CUDA (in place on y),
    the torch reference elsewhere; NANOQWEN_KERNELS=torch|triton forces either."""
    if use_triton(x.device):
        x = x if x.stride(-1) == 1 else x.contiguous()
        y = y if y.stride(-1) == 1 else y.contiguous()
        return lora_expand(y, lora_shrink(x, lora_a, indices), lora_b, scales, indices, out=y)
    return lora_expand_ref(y, lora_shrink_ref(x, lora_a, indices), lora_b, scales, indices)
