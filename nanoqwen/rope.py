"""Rotary position embedding (rotate-half, fp32), Qwen's dynamic-NTK alpha rule and LogN query scaling.

Dynamic NTK changes only the RoPE base: base' = base * alpha^(d / (d - 2)), with alpha = 2^k - 1 chosen from the
length of a sequence's first prefill and then frozen for that sequence (its cached keys were rotated with it).
Sequences in one batch may have different alphas, so RoPE is computed per token: `ntk_index` picks the row of a small
table of inverse frequencies, alpha = 2^(ntk_index + 1) - 1 (index 0 = alpha 1 = plain RoPE).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

MAX_NTK_INDEX = 16  # alpha up to 2^17 - 1: a first prefill of up to 2^16 x seq_length tokens


def ntk_alpha(length: int, seq_length: int) -> int:
    """The reference's `get_ntk_alpha`: 1 up to seq_length, 3 up to 2x, 7 up to 4x, ... (2^ceil(log2(L/S) + 1) - 1)."""
    if length <= 0:
        return 1
    alpha = 2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1
    return int(max(alpha, 1))


def ntk_index(length: int, seq_length: int, use_dynamic_ntk: bool = True) -> int:
    """Row of the inverse-frequency table for a sequence whose first prefill has `length` tokens."""
    if not use_dynamic_ntk:
        return 0
    idx = int(round(math.log2(ntk_alpha(length, seq_length) + 1))) - 1
    if idx >= MAX_NTK_INDEX:
        raise ValueError(f"a prompt of {length} tokens needs NTK alpha {ntk_alpha(length, seq_length)}, beyond "
                         f"the supported 2^{MAX_NTK_INDEX + 1} - 1; use a shorter prompt")
    return idx


def inv_freq_for_alpha(alpha: float, base: float, dim: int) -> torch.Tensor:
    """fp32 inverse frequencies exactly as the reference computes them (Python-float base, fp32 exponent)."""
    base = base * alpha ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


class StepRope(NamedTuple):
    """RoPE and LogN for one forward step, prepared once and used by every layer.

    The torch path rotates with the cos/sin tables and scales queries by the LogN factors made here. The Triton kernels
    get no tables: they compute each token's angles and LogN factor from its position and NTK row (AttentionMetadata),
    `inv_freq` and `logn_seq_length`.
    """
    inv_freq: torch.Tensor  # [MAX_NTK_INDEX, rotary_dim // 2] fp32
    logn_seq_length: int  # LogN scales queries past this length; 0: LogN off
    cos: torch.Tensor | None = None  # [T, 1, rotary_dim] fp32 (torch path)
    sin: torch.Tensor | None = None
    logn: torch.Tensor | None = None  # [T] fp32 (torch path with LogN on)


def rotary_tables(positions: torch.Tensor, ntk_index: torch.Tensor,
                  inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, rotary_dim] in fp32 for each token's absolute position and NTK row of `inv_freq`."""
    freqs = positions.float()[:, None] * inv_freq.float()[ntk_index]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos(), emb.sin()


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, base: float):
        super().__init__()
        self.rotary_dim, self.base = rotary_dim, base
        self.register_buffer("inv_freq", self._table(), persistent=False)  # [MAX_NTK_INDEX, rotary_dim // 2], fp32

    def _table(self, device=None) -> torch.Tensor:
        rows = [inv_freq_for_alpha(2 ** (k + 1) - 1, self.base, self.rotary_dim) for k in range(MAX_NTK_INDEX)]
        return torch.stack(rows).to(device)

    def _apply(self, fn, recurse=True):
        """Moves follow the model, but `model.to(dtype)` must not round the fp32 table: rebuilt where it landed."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._table(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, ntk_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rotary_dim] in fp32 for each token's absolute position and NTK row."""
        return rotary_tables(positions, ntk_index, self.inv_freq)

    def step(self, positions: torch.Tensor, ntk_index: torch.Tensor, logn_seq_length: int, tables: bool) -> StepRope:
        """This step's RoPE and LogN (logn_seq_length 0: no LogN); `tables`: make the torch path's tables."""
        if not tables:
            return StepRope(self.inv_freq, logn_seq_length)
        cos, sin = self(positions, ntk_index)
        logn = logn_factors(positions, logn_seq_length) if logn_seq_length else None
        return StepRope(self.inv_freq, logn_seq_length, cos, sin, logn)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, head_dim] in fp32 (dims j and j + rotary_dim/2 pair), cast back to x's dtype."""
    rd = cos.shape[-1]
    xr = x[..., :rd].float()
    x1, x2 = xr.chunk(2, dim=-1)
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    if rd < x.shape[-1]:
        out = torch.cat((out, x[..., rd:].float()), dim=-1)
    return out.to(x.dtype)


def logn_factors(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN query scale per token: log(p + 1) / log(seq_length) when p + 1 > seq_length, else 1 (fp32).

    Computed in float64 like the reference's Python `math.log(i, seq_length)` table, but with no 32,767-position
    limit (the reference's table is that long and fails beyond it).
    """
    p1 = positions.to(torch.float64) + 1
    f = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return f.float()
