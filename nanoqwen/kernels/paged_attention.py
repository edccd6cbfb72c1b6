"""Decode attention: one query token per sequence over its paged KV cache (block_tables, context_lens)."""
import torch


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch reference: q [B, heads, head_dim] -> out [B, heads, head_dim]; fp32 softmax and sums.

    Gathers every sequence's blocks into one padded [B, max_blocks * block_size] batch and masks the tail.
    """
    B, H, D = q.shape
    k = k_cache[block_tables.long()].flatten(1, 2).float()  # [B, S, H, D]
    v = v_cache[block_tables.long()].flatten(1, 2).float()
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v).to(q.dtype)
