"""Write a step's new K and V into their slots of the paged KV cache.

Cache layout (one layer): k_cache, v_cache [num_blocks, block_size, num_heads, head_dim]; the slot of a token is
block_id * block_size + offset; slot -1 means "do not write" (padding rows of a CUDA-graph batch).
"""
import torch
import triton
import triton.language as tl


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Torch reference: k, v [T, heads, head_dim] into the flat slots of the caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,  # cache strides: block, slot in block, head (head_dim is 1)
                     num_heads, block_size,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding row: leave the cache alone
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_heads)[:, None]
    token = token.to(tl.int64)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton: k, v [T, heads, head_dim] (any token/head strides, unit head_dim stride) into their cache slots.

    One program per (token, group of heads); slots < 0 are skipped on the device: no host sync, capturable.
    """
    T, H, D = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "store_kv needs a contiguous head_dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k_cache and v_cache must share a layout"
    assert D & (D - 1) == 0, f"head_dim must be a power of two, got {D}"
    if T == 0:
        return
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // D))  # about 4k elements per program
    grid = (T, triton.cdiv(H, block_h))
    _store_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H, k_cache.shape[1],
                           HEAD_DIM=D, BLOCK_H=block_h, num_warps=4)
