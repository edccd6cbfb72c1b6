"""Attention for a batch of packed sequences: varlen causal prefill (with an optional cached prefix) and paged decode.

A batch is the concatenation of the new tokens of its sequences (no padding). `AttentionMetadata` says where each
sequence starts, the absolute positions and NTK rows of its tokens, where their K/V go in the paged cache, and how
long each sequence's context is. The Triton kernels run on CUDA, the torch references elsewhere; the environment
variable NANOQWEN_KERNELS=torch|triton forces either (triton on the CPU needs TRITON_INTERPRET=1).

The model's torch path gives `attention` q and k rotated and the LogN factors. Through the kernels it gives them as
projected with `rope` (nanoqwen.rope.StepRope: no tables), and RoPE and LogN happen inside the launches, from each
token's position and NTK row: in a decode step the KV store rotates K as it caches it and paged attention rotates q
and scales it by LogN as it loads it; other steps (prefill, chunks) rotate q and k in place in one launch
(`rotary_qk_`) and scale q by LogN inside flash attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import use_triton
from .kernels.flash_attention import flash_attn_varlen_ref
from .kernels.kv_store import store_kv_ref
from .kernels.paged_attention import paged_attention_ref
from .kernels.rope import RopeArgs
from .kv_cache import LayerCache
from .quant.kv_int8 import store_kv_int8_ref
from .rope import StepRope, apply_rotary, logn_factors, rotary_tables


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


def store_kv(k: torch.Tensor, v: torch.Tensor, kv: LayerCache, meta: AttentionMetadata, triton: bool,
             rope: RopeArgs | None = None) -> None:
    """Write the step's K, V into their slots (quantizing them for the int8 cache); `rope` (kernels only): K is not
    rotated yet, the store rotates it."""
    if kv.quant_mode is not None:
        if triton:
            from .kernels.kv_store import store_kv_int8
            store_kv_int8(k, v, kv, meta.slot_mapping, kv.quant_mode, meta.cu_seqlens_q, rope=rope)
        else:
            store_kv_int8_ref(k, v, kv, meta.slot_mapping, kv.quant_mode, meta.cu_seqlens_q)
    elif triton:
        from .kernels.kv_store import store_kv as kernel
        kernel(k, v, kv.k, kv.v, meta.slot_mapping, rope=rope)
    else:
        store_kv_ref(k, v, kv.k, kv.v, meta.slot_mapping)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """A backward will run through an op on these tensors. The Triton kernels have no backward, so such ops (training)
    take the torch references, which autograd differentiates; inference (no grad) keeps the kernels and numerics."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, kv: LayerCache | None,
              logn: torch.Tensor | None = None, rope: StepRope | None = None) -> torch.Tensor:
    """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]. q and k come rotated, with `logn` [T] the LogN factor
    of each query row; or, with `rope`, as projected: RoPE (and LogN, when rope.logn_seq_length) from each token's
    position and NTK row in `meta`, inside the kernels (module docstring). With a cache, k and v are stored first
    (keys rotated) and every key is then read from the cache (the new ones too)."""
    scale = q.shape[-1] ** -0.5
    triton = use_triton(q.device) and not needs_grad(q, k, v)  # training: the differentiable torch reference
    if rope is not None and not triton:  # the torch path rotates with tables
        cos, sin = rotary_tables(meta.positions, meta.ntk_index, rope.inv_freq)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        logn = logn_factors(meta.positions, rope.logn_seq_length) if rope.logn_seq_length else None
        rope = None
    rope_args = RopeArgs(meta.positions, meta.ntk_index, rope.inv_freq) if rope is not None else None
    logn_args = dict(logn=logn, logn_seq_length=rope.logn_seq_length if rope is not None else 0)
    quant = dict(k_scale=kv.k_scale, k_zero=kv.k_zero, v_scale=kv.v_scale, v_zero=kv.v_zero) \
        if kv is not None and kv.quant_mode else {}
    if triton and kv is not None and meta.is_decode:  # RoPE inside the store (k) and the attention kernel (q)
        from .kernels.paged_attention import paged_attention
        store_kv(k, v, kv, meta, triton, rope_args)
        return paged_attention(q, kv.k, kv.v, meta.block_tables, meta.context_lens, scale, meta.max_context_len,
                               rope=rope_args, **logn_args, **quant)
    if rope_args is not None:  # a prefill through the kernels: q and k rotated in place, in one launch
        from .kernels.rope import rotary_qk_
        rotary_qk_(q, k, *rope_args)
    if kv is None:
        if triton:
            from .kernels.flash_attention import flash_attn_varlen
            return flash_attn_varlen(q, k, v, meta.cu_seqlens_q, meta.max_seqlen_q, scale, **logn_args)
        return flash_attn_varlen_ref(q, k, v, meta.cu_seqlens_q, scale, logn=logn)
    store_kv(k, v, kv, meta, triton)
    if meta.is_decode:
        return paged_attention_ref(q, kv.k, kv.v, meta.block_tables, meta.context_lens, scale, logn=logn, **quant)
    if triton:
        from .kernels.flash_attention import flash_attn_varlen
        return flash_attn_varlen(q, k, v, meta.cu_seqlens_q, meta.max_seqlen_q, scale, k_cache=kv.k, v_cache=kv.v,
                                 block_tables=meta.block_tables, context_lens=meta.context_lens,
                                 max_context_len=meta.max_context_len, **logn_args, **quant)
    return flash_attn_varlen_ref(q, k, v, meta.cu_seqlens_q, scale, k_cache=kv.k, v_cache=kv.v,
                                 block_tables=meta.block_tables, context_lens=meta.context_lens, logn=logn, **quant)
