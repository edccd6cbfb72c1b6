"""The MLP's gated activation in one pass: up * silu(gate) from the fused w2_w1 projection (rows of w2, the gated
branch, then w1), as the reference's w1(x) * silu(w2(x)); each op rounded to the activation dtype as torch does."""
import torch
import torch.nn.functional as F
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from .rope import round_to


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference: gate_up [..., 2F] (gate first) -> up * silu(gate) [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    silu = round_to(gate / (1.0 + tl.exp(-gate)), DTYPE)
    tl.store(out_ptr + row * stride_o + cols, round_to(up * silu, DTYPE).to(DTYPE), mask=mask)


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton, same semantics as `silu_mul_ref` (rows with a contiguous last dim). `out` (optional, contiguous)
    receives the result instead of a new tensor."""
    width = gate_up.shape[-1] // 2
    assert gate_up.shape[-1] == 2 * width and gate_up.stride(-1) == 1, \
        f"silu_mul takes [..., 2 * width] rows with a contiguous last dim, got {list(gate_up.shape)}"
    x = gate_up.reshape(-1, 2 * width)
    out = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device) if out is None else out.view(-1, width)
    if x.shape[0] and width:
        block = min(1024, triton.next_power_of_2(width))
        _silu_mul_kernel[(x.shape[0], triton.cdiv(width, block))](x, out, x.stride(0), out.stride(0), width,
                                                                  BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], width)
