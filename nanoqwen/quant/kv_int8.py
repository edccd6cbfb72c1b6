"""int8 KV cache: uint8 K and V with a scale and a zero point per (token, head), stored in the paged blocks.

Both modes store x = scale * (q - zero) with q uint8 and (scale, zero) per token and head, so attention dequantizes
them the same way (fused into its kernels: the cache is never dequantized as a whole).
- "default": per (token, head) min/max over the head's channels, round to nearest: error at most scale / 2.
- "qwen": the reference's `use_cache_quantization` exactly (QWEN_V1_SPEC.md section 6): one min/max per (sequence,
  head) over the whole chunk written in a step (all its tokens and channels), truncation instead of rounding, all
  arithmetic in the activation dtype, and the chunk's own attention reads the quantized values. For parity only: a
  long prefill shares one coarse scale across all its tokens.
The Triton store (nanoqwen.kernels.kv_store.store_kv_int8) is bit-exact with `store_kv_int8_ref` in both modes.
Scales and zeros are kept in fp32 for fp32 models and in fp16 otherwise (bf16's 8-bit mantissa cannot hold a zero
point near 255 to better than 1 quantization step).
"""
from __future__ import annotations

import torch

MODES = ("default", "qwen")
QMAX = 255.0
ZERO_MAX = 60000.0  # largest zero point of the default mode (fp16 holds up to 65504)


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if model_dtype == torch.float32 else torch.float16


def quantize_per_token(x: torch.Tensor, out_dtype: torch.dtype):
    """x [T, H, D] -> (q uint8 [T, H, D], scale [T, H], zero [T, H]); min/max per (token, head), rounding, fp32 math."""
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)
    # divide by a tensor, not by the Python float: torch's CUDA division by a CPU scalar multiplies by its reciprocal
    # (off by an ulp), so only this form gives the same bits on every device, and the same as the Triton kernel
    # the zero point -lo / scale must stay finite in fp16 (65504): scale >= |lo| / ZERO_MAX. That only coarsens rows
    # whose range is under |lo| / 235 (nearly constant rows), to steps of |lo| / 60000, far below bf16's precision
    scale = torch.maximum((hi - lo) / hi.new_full((), QMAX), lo.abs() / hi.new_full((), ZERO_MAX)).clamp_min(1e-8)
    zero = -lo / scale
    q = torch.clamp(torch.round(xf / scale[..., None] + zero[..., None]), 0, QMAX).to(torch.uint8)
    return q, scale.to(out_dtype), zero.to(out_dtype)


def quantize_qwen(x: torch.Tensor, cu_seqlens: torch.Tensor, out_dtype: torch.dtype):
    """The reference's chunk quantization: per (sequence, head) over the sequence's rows of x [T, H, D], truncation,
    arithmetic in x's dtype. Returns q uint8 [T, H, D] and scale, zero [T, H] (the chunk's values on every row)."""
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
    zero = torch.empty_like(scale)
    qmax, qmin = torch.tensor(QMAX, dtype=x.dtype, device=x.device), torch.tensor(0.0, dtype=x.dtype, device=x.device)
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if a == b:
            continue
        chunk = x[a:b].transpose(0, 1).flatten(1)  # [H, n * D]
        fmax, fmin = chunk.amax(-1), chunk.amin(-1)
        s = (fmax - fmin) / (qmax - qmin)
        z = qmin - fmin / s
        q[a:b] = torch.clamp(x[a:b] / s[None, :, None] + z[None, :, None], qmin, qmax).to(torch.uint8)
        scale[a:b], zero[a:b] = s, z
    return q, scale.to(out_dtype), zero.to(out_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., D] uint8, scale/zero [...] -> scale * (q - zero) in `dtype` (computed in scale's dtype, as the
    reference does in the model dtype)."""
    return (scale[..., None] * (q.to(scale.dtype) - zero[..., None])).to(dtype)


def store_kv_int8_ref(k: torch.Tensor, v: torch.Tensor, cache, slot_mapping: torch.Tensor, mode: str,
                      cu_seqlens: torch.Tensor) -> None:
    """Quantize the step's K and V [T, H, D] and write them with their scales and zeros into `cache` (a LayerCache
    with k, v [blocks, block_size, H, D] uint8 and k_scale, k_zero, v_scale, v_zero [blocks, block_size, H])."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, data, sc, zp in ((k, cache.k, cache.k_scale, cache.k_zero), (v, cache.v, cache.v_scale, cache.v_zero)):
        if mode == "qwen":
            q, s, z = quantize_qwen(x, cu_seqlens, sc.dtype)
        else:
            q, s, z = quantize_per_token(x, sc.dtype)
        data.view(-1, *data.shape[2:]).index_copy_(0, slots, q[keep])
        sc.view(-1, sc.shape[2]).index_copy_(0, slots, s[keep])
        zp.view(-1, zp.shape[2]).index_copy_(0, slots, z[keep])
