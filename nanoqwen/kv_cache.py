"""Paged KV cache: K and V storage per layer in blocks of `block_size` tokens."""
from __future__ import annotations

import torch


class KVCache:
    """k[layer], v[layer]: [num_blocks, block_size, num_heads, head_dim]. A token's slot is block * block_size + offset."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, num_blocks, block_size, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()
