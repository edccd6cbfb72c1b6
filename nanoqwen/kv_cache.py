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


class BlockManager:
    """Allocation of cache blocks to sequences: a free list, reference counts, and prefix caching.

    Prefix caching: a full block of prompt tokens is identified by a hash chained over all the blocks before it (and
    the sequence's NTK row, since cached keys are rotated with it). Once its K/V are computed it is registered, and a
    later sequence with the same prefix shares it (ref count + 1) instead of recomputing it. A block whose count drops
    to 0 goes to the back of the free list with its hash kept, so it can still be reused until it is taken for new
    tokens; fresh blocks are taken from the front (least recently freed first).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered free set

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_hashes(self, token_ids: list[int], num_prompt: int, salt: int) -> list[int]:
        """Chained hashes of the full blocks inside the prompt."""
        hashes, h = [], hash(("nanoqwen", salt))
        for i in range(num_prompt // self.block_size):
            h = hash((h, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])))
            hashes.append(h)
        return hashes

    def _take(self) -> int:
        block = next(iter(self.free))
        del self.free[block]
        if self.block_hash[block] is not None and self.cached.get(self.block_hash[block]) == block:
            del self.cached[self.block_hash[block]]
        self.block_hash[block] = self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def _cache_hit(self, h: int, tokens: tuple) -> int | None:
        block = self.cached.get(h)
        if block is None or self.block_tokens[block] != tokens:  # hash collisions are checked against the tokens
            return None
        return block

    def can_allocate(self, num_tokens: int) -> bool:
        """Conservative: as if no prefix block were cached."""
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, token_ids: list[int], hashes: list[int]) -> tuple[list[int], int]:
        """Blocks for all of `token_ids`, reusing cached prefix blocks. Returns (block_table, cached_tokens).
        The last token is always left to compute (its logits are needed), so a fully cached prompt still
        recomputes its last block."""
        bs = self.block_size
        usable = (len(token_ids) - 1) // bs if self.enable_prefix_caching else 0
        table, n_hit = [], 0
        for i in range(self.blocks_for(len(token_ids))):
            block = None
            if n_hit == i and i < min(usable, len(hashes)):
                block = self._cache_hit(hashes[i], tuple(token_ids[i * bs:(i + 1) * bs]))
            if block is None:
                block = self._take()
            else:
                n_hit += 1
                if self.ref_count[block] == 0:
                    del self.free[block]
                self.ref_count[block] += 1
            table.append(block)
        return table, n_hit * bs

    def register(self, table: list[int], token_ids: list[int], hashes: list[int], num_computed: int) -> None:
        """Make the computed full prompt blocks of a sequence available to later sequences."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(min(num_computed // bs, len(hashes))):
            block = table[i]
            if self.block_hash[block] is None:
                self.block_hash[block], self.block_tokens[block] = hashes[i], tuple(token_ids[i * bs:(i + 1) * bs])
                self.cached.setdefault(hashes[i], block)

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append blocks so that `table` holds `num_tokens`; False (and nothing taken) if too few are free."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            return False
        table.extend(self._take() for _ in range(max(need, 0)))
        return True

    def free_blocks(self, table: list[int]) -> None:
        for block in reversed(table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        table.clear()
