"""Attention for a batch of packed sequences: varlen causal prefill (with an optional cached prefix) and paged decode.

A batch is the concatenation of the new tokens of its sequences (no padding). `AttentionMetadata` says where each
sequence starts, the absolute positions and NTK rows of its tokens, where their K/V go in the paged cache, and how
long each sequence's context is. The Triton kernels run on CUDA, the torch references elsewhere; the environment
variable NANOQWEN_KERNELS=torch|triton forces either (triton on the CPU needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import use_triton
from .kernels.flash_attention import flash_attn_varlen_ref
from .kernels.kv_store import store_kv_ref
from .kernels.paged_attention import paged_attention_ref
from .kv_cache import LayerCache
from .quant.kv_int8 import store_kv_int8_ref


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: sequence i owns rows cu[i]:cu[i+1] of the batch
    max_seqlen_q: int
    positions: torch.Tensor  # [T] int64 absolute position of every new token
    ntk_index: torch.Tensor  # [T] int64 row of the RoPE table (alpha = 2^(index+1) - 1), frozen per sequence
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache slot of every new token (-1: not stored)
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32 tokens in the cache after this step (prefix + new)
    max_context_len: int = 0
    is_decode: bool = False  # every sequence has exactly one new token
    logits_indices: torch.Tensor | None = None  # rows whose logits are wanted (None: all rows)

    @classmethod
    def for_prefill(cls, seq_lens: list[int], device, ntk_indices: list[int], start_positions: list[int] | None = None,
                    **cache_fields) -> "AttentionMetadata":
        """Metadata for sequences whose new tokens are `seq_lens` long, starting at `start_positions` (default 0)."""
        starts = start_positions or [0] * len(seq_lens)
        cu = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, seq_lens)])
        ntk = torch.repeat_interleave(torch.tensor(ntk_indices, dtype=torch.int64), torch.tensor(seq_lens))
        return cls(cu_seqlens_q=cu.to(device), max_seqlen_q=max(seq_lens), positions=positions.to(device),
                   ntk_index=ntk.to(device), **cache_fields)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv: LayerCache, meta: AttentionMetadata, triton: bool) -> None:
    """Write the step's K, V into their slots (quantizing them for the int8 cache)."""
    if kv.quant_mode is not None:
        if triton:
            from .kernels.kv_store import store_kv_int8
            store_kv_int8(k, v, kv, meta.slot_mapping, kv.quant_mode, meta.cu_seqlens_q)
        else:
            store_kv_int8_ref(k, v, kv, meta.slot_mapping, kv.quant_mode, meta.cu_seqlens_q)
    elif triton:
        from .kernels.kv_store import store_kv as kernel
        kernel(k, v, kv.k, kv.v, meta.slot_mapping)
    else:
        store_kv_ref(k, v, kv.k, kv.v, meta.slot_mapping)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, kv: LayerCache | None,
              logn: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [T, heads, head_dim] (RoPE applied) -> [T, heads, head_dim]. With a cache, k and v are stored first
    and every key is then read from the cache (the new ones too). `logn` [T] scales each query row (LogN)."""
    scale = q.shape[-1] ** -0.5
    triton = use_triton(q.device)
    if kv is None:
        if triton:
            from .kernels.flash_attention import flash_attn_varlen
            return flash_attn_varlen(q, k, v, meta.cu_seqlens_q, meta.max_seqlen_q, scale, logn=logn)
        return flash_attn_varlen_ref(q, k, v, meta.cu_seqlens_q, scale, logn=logn)
    store_kv(k, v, kv, meta, triton)
    quant = dict(k_scale=kv.k_scale, k_zero=kv.k_zero, v_scale=kv.v_scale, v_zero=kv.v_zero) if kv.quant_mode else {}
    if meta.is_decode:
        if triton:
            from .kernels.paged_attention import paged_attention
            return paged_attention(q, kv.k, kv.v, meta.block_tables, meta.context_lens, scale, meta.max_context_len,
                                   logn=logn, **quant)
        return paged_attention_ref(q, kv.k, kv.v, meta.block_tables, meta.context_lens, scale, logn=logn, **quant)
    if triton:
        from .kernels.flash_attention import flash_attn_varlen
        return flash_attn_varlen(q, k, v, meta.cu_seqlens_q, meta.max_seqlen_q, scale, k_cache=kv.k, v_cache=kv.v,
                                 block_tables=meta.block_tables, context_lens=meta.context_lens,
                                 max_context_len=meta.max_context_len, logn=logn, **quant)
    return flash_attn_varlen_ref(q, k, v, meta.cu_seqlens_q, scale, k_cache=kv.k, v_cache=kv.v,
                                 block_tables=meta.block_tables, context_lens=meta.context_lens, logn=logn, **quant)
