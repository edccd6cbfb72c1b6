"""Causal attention over packed variable-length sequences (prefill and prefill chunks).

Sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1]. Without a cache its keys are its own new rows (plain
causal attention). With a cache (block_tables given) its keys are the first context_lens[i] tokens of its paged cache,
the new ones included (they were stored before attention), and query j sits at absolute position
context_lens[i] - q_len + j: it sees the cached prefix and, causally, the new chunk.
"""
import torch
import torch.nn.functional as F


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache [num_blocks, block_size, heads, head_dim]."""
    n_blocks = -(-length // cache.shape[1])
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def flash_attn_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None,
                          context_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: q, k, v [T, heads, head_dim] -> out [T, heads, head_dim]; softmax and sums in fp32."""
    cu = cu_seqlens_q.tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if block_tables is None and len(set(lens)) == 1:  # equal lengths, no cache: one batched call
        B, S = len(lens), lens[0]
        qb, kb, vb = (t.view(B, S, *t.shape[1:]).transpose(1, 2).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        return out.transpose(1, 2).reshape(q.shape).to(q.dtype)
    out = torch.empty_like(q)
    ctx = context_lens.tolist() if context_lens is not None else lens
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b == a:
            continue
        if block_tables is None:
            ks, vs = k[a:b], v[a:b]
        else:
            ks, vs = gather_paged(k_cache, block_tables[i], ctx[i]), gather_paged(v_cache, block_tables[i], ctx[i])
        n_q, n_k = b - a, ks.shape[0]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1).float(), ks.transpose(0, 1).float(),
                                           vs.transpose(0, 1).float(), attn_mask=mask, scale=scale)
        out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out
