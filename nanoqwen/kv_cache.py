"""Paged KV cache: K and V storage per layer in blocks of `block_size` tokens."""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch


class LayerCache(NamedTuple):
    """One layer's view of the cache: k, v [num_blocks, block_size, heads, head_dim]; for the int8 cache k, v are
    uint8 and each (slot, head) has a scale and a zero point: x = scale * (q - zero) (nanoqwen.quant.kv_int8)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    quant_mode: str | None = None  # None (model-dtype cache), "default" or "qwen"


class KVCache:
    """k[layer], v[layer]: [num_blocks, block_size, num_heads, head_dim]. A token's slot is block * block_size + offset.
    With `kv_cache_dtype="int8"` the values are uint8 with per (slot, head) scales and zeros beside them."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device, kv_cache_dtype: str | None = None, quant_mode: str = "default"):
        from .quant.kv_int8 import MODES, scale_dtype
        shape = (num_layers, num_blocks, block_size, num_heads, head_dim)
        if kv_cache_dtype not in (None, "auto", "int8"):
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: use None (the model dtype) or 'int8'")
        if quant_mode not in MODES:
            raise ValueError(f"kv_quant_mode {quant_mode!r}: use one of {', '.join(MODES)}")
        self.quantized = kv_cache_dtype == "int8"
        self.quant_mode = quant_mode if self.quantized else None
        store = torch.uint8 if self.quantized else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        if self.quantized:
            sdt = scale_dtype(dtype)
            self.k_scale, self.k_zero, self.v_scale, self.v_zero = (
                torch.zeros(shape[:4], dtype=sdt, device=device) for _ in range(4))
        self.num_blocks, self.block_size = num_blocks, block_size

    def layer(self, i: int) -> LayerCache:
        if not self.quantized:
            return LayerCache(self.k[i], self.v[i])
        return LayerCache(self.k[i], self.v[i], self.k_scale[i], self.k_zero[i], self.v_scale[i], self.v_zero[i],
                          self.quant_mode)

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                        kv_cache_dtype: str | None = None) -> int:
        """K and V bytes of one token over all layers (int8: one byte per value plus scale and zero per head)."""
        if kv_cache_dtype == "int8":
            from .quant.kv_int8 import scale_dtype
            per_head = head_dim + 2 * torch.empty((), dtype=scale_dtype(dtype)).element_size()
        else:
            per_head = head_dim * torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_heads * per_head


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
        # insertion-ordered free set; an OrderedDict, since a dict whose front is popped again and again leaves
        # holes that every later `next(iter(...))` scans over (12 us a block at a few thousand blocks)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_hashes(self, token_ids: list[int], num_prompt: int, salt) -> list[int]:
        """Chained hashes of the full blocks inside the prompt; `salt` (hashable) starts the chain: what else the
        cached K/V depend on (the NTK row, the LoRA adapter)."""
        hashes, h = [], hash(("nanoqwen", salt))
        for i in range(num_prompt // self.block_size):
            h = hash((h, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])))
            hashes.append(h)
        return hashes

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
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

    def register(self, table: list[int], token_ids: list[int], hashes: list[int], start: int, end: int) -> None:
        """Make a sequence's full prompt blocks start..end-1 (computed, or being computed by a launched step)
        available to later sequences."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(start, end):
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
