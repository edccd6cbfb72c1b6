"""Write a step's new K and V into their slots of the paged KV cache.

Cache layout (one layer): k_cache, v_cache [num_blocks, block_size, num_heads, head_dim]; the slot of a token is
block_id * block_size + offset; slot -1 means "do not write" (padding rows of a CUDA-graph batch).
"""
import torch


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Torch reference: k, v [T, heads, head_dim] into the flat slots of the caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))
