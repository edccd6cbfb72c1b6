"""RMSNorm with the residual add in front of it, in one pass: the two norms of every layer (and the final one).

The reference's numerics: (optionally) x + residual in the activation dtype, then normalise in fp32, cast to the
activation dtype, then multiply by the weight (rounded to the product's dtype). One program per row.
"""
import torch
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from .rope import round_to


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: s = x + residual (x when None), returns (RMSNorm(s) * weight, s)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight, x


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = round_to(x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
        tl.store(sum_ptr + row * stride_s + cols, x.to(DTYPE), mask=mask)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / n + eps)
    y = round_to(x * inv_rms, DTYPE) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_to(y, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, sum_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton, same semantics as `rms_norm_ref`: x, residual [..., n] (unit last stride), weight [n]. The normed
    output has torch's product dtype of x and weight. Without residual the sum is x itself; with it, a new tensor.
    `out`, `sum_out` (optional, contiguous): receive the results instead of new tensors."""
    n = x.shape[-1]
    assert x.stride(-1) == 1 and weight.shape == (n,) and weight.stride(0) == 1, \
        f"rms_norm needs rows with a contiguous last dim and a weight of [{n}]"
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device) \
        if out is None else out.view(rows, n)
    if residual is None:
        total = r2 = x2
    else:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1, \
            "the residual must match x in shape and dtype, with a contiguous last dim"
        r2 = residual.reshape(-1, n)
        total = torch.empty_like(x2) if sum_out is None else sum_out.view(rows, n)
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, total, x2.stride(0), r2.stride(0), out.stride(0),
                                  total.stride(0), n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                  num_warps=min(16, max(1, block // 512)))
    return out.view(*x.shape[:-1], n), total.view(x.shape)
