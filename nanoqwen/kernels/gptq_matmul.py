"""GPTQ int4/int8 fused dequantize-and-multiply: y = x @ W + bias with W read packed, never materialised.

The packed layout ("planar", what `nanoqwen.quant.gptq.repack` writes and these kernels read)
------------------------------------------------------------------------------------------------
For an [K in, N out] weight with `bits` in {4, 8}, PACK = 32 // bits values per int32 word and
CHUNK = 16 * PACK input rows per chunk (128 rows for int4, 64 for int8):
- `qweight` int32 [ceil(K / CHUNK) * 16, N]: word row `16 * c + r`, bit field `j` (bits j*bits .. j*bits+bits-1,
  least significant first) holds the quantized value of input row `k = c * CHUNK + 16 * j + r`. So field j of a
  [16, N] chunk of words is one contiguous [16, N] slab of rows ("plane"): the kernel shifts and masks it straight
  into a tl.dot operand, with no reshape or interleave. Rows past K are zero padding, so any K works.
  (AutoGPTQ packs the PACK consecutive rows 8r..8r+7 into word r instead.)
- `scales` [n_groups, N] (fp16 in Qwen's checkpoints; any float dtype) and `zeros` [n_groups, N] in the scales'
  dtype holding the TRUE zero point (AutoGPTQ's stored zero + 1; small integers, exact in fp16/bf16).
- `perm` int32 [K] or None: with act-order (desc_act) g_idx the rows are sorted by group at repack time, kernel row
  k being input feature perm[k]; the kernels gather x through it (x_kernel[:, k] = x[:, perm[k]]).
Row k of the kernel order belongs to group k // group_size (group_size -1: one group), and
W[k, n] = scales[g, n] * (q[k, n] - zeros[g, n]).

Arithmetic: per plane the kernel computes P = x_plane @ q_plane (q exact in the activation dtype; fp32 accumulate)
and the row sums of x, and once per group span applies the scale and zero: acc += (P - rowsum(x) * z) * s.
That keeps the inner loop at shift, mask, convert and the tensor-core dot. It needs each plane (16 rows) inside one
group, hence the kernels' rule: group_size a multiple of 16, or -1 (torch reference: any group size).

Two kernels, picked by row count (`gptq_matmul`):
- `_gptq_gemv_kernel` for M <= GEMV_MAX_ROWS (decode, batched decode; bandwidth-bound): 16..64-row tiles, narrow
  column tiles and split-K over a third grid axis so that a 4096-wide layer still fills every SM. The partial sums
  go to an fp32 workspace; the last program of each output tile to arrive (an atomic counter per tile, reset by
  that program) adds them in a fixed order, so results are deterministic and it is still one launch.
- `_gptq_gemm_kernel` for prefill and bigger batches: classic 2-D tiles, grouped tile order for L2 reuse.
Both accumulate in fp32 and write x's dtype (fp32, fp16, bf16). `gptq_matmul_ref` is the torch reference.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from . import use_triton  # noqa: F401  (re-exported: quant.gptq picks the path with it)

GEMV_MAX_ROWS = 64  # at or below this many rows the split-K kernel runs; above it the tiled GEMM
_PLANE = 16  # rows per plane: tl.dot's smallest K


def pack_factor(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"GPTQ bits must be 4 or 8, got {bits}")
    return 32 // bits


def chunk_rows(bits: int) -> int:
    """Input rows per chunk of the planar layout: 128 for int4, 64 for int8."""
    return _PLANE * pack_factor(bits)


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Wrap unsigned 32-bit values held in int64 into int32 (two's complement)."""
    return torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)


def pack_planar(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized values q [K, N] (ints in 0 .. 2^bits - 1, kernel row order) -> planar int32 words [K_pad/PACK, N]."""
    pack, chunk = pack_factor(bits), chunk_rows(bits)
    K, N = q.shape
    k_pad = -(-K // chunk) * chunk
    qp = torch.zeros(k_pad, N, dtype=torch.int64, device=q.device)
    qp[:K] = q.to(torch.int64)
    qp = qp.view(k_pad // chunk, pack, _PLANE, N)  # [c, j, r, n] is row c*CHUNK + 16*j + r
    shifts = (torch.arange(pack, device=q.device, dtype=torch.int64) * bits).view(1, pack, 1, 1)
    words = (qp << shifts).sum(1)  # fields do not overlap: the sum is a bitwise or
    return _to_int32(words.reshape(k_pad // pack, N))


def unpack_planar(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Planar int32 words [K_pad/PACK, N] -> quantized values [K, N] int32 (kernel row order)."""
    pack = pack_factor(bits)
    n_words, N = qweight.shape
    shifts = (torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits).view(1, pack, 1, 1)
    w = qweight.view(n_words // _PLANE, 1, _PLANE, N)
    q = (w >> shifts) & ((1 << bits) - 1)  # [c, j, r, n]
    return q.reshape(n_words * pack, N)[:in_features]


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Group of each kernel-order row: k // group_size (group_size -1: all rows in group 0)."""
    k = torch.arange(in_features, device=device)
    return k // group_size if group_size > 0 else torch.zeros_like(k)


def dequantize_planar(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                      bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """fp32 weight W [N out, K in] in the ORIGINAL input order: scales[g] * (q - zeros[g]), computed in fp32.

    Bit for bit what `nanoqwen.quant.gptq.dequantize_gptq` gives for the official tensors it was repacked from.
    """
    q = unpack_planar(qweight, bits, in_features)
    g = group_index(in_features, group_size, q.device)
    w = scales.float()[g] * (q.float() - zeros.float()[g])  # [K, N], kernel row order
    if perm is not None:
        w = torch.empty_like(w).index_copy_(0, perm.long(), w)
    return w.t()


def gptq_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int, bias: torch.Tensor | None = None,
                    perm: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: dequantize (fp32, then x's dtype) and F.linear. x [..., K] -> [..., N] in x's dtype."""
    w = dequantize_planar(qweight, scales, zeros, perm, bits, group_size, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def kernel_supports(group_size: int) -> bool:
    """The kernels need every 16-row plane inside one group."""
    return group_size == -1 or (group_size > 0 and group_size % _PLANE == 0)


# ----------------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _accumulate_chunk(acc, c, x_ptr, stride_xm, perm_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K,
                      n_groups, group_size,
                      BITS: tl.constexpr, PLANES_PER_SCALE: tl.constexpr, HAS_PERM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 += x[rows, chunk c] @ W[chunk c, cols] for one CHUNK of input rows."""
    PACK: tl.constexpr = 32 // BITS
    CHUNK: tl.constexpr = 16 * PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_r = tl.arange(0, 16)
    m_ok = offs_m < M
    n_ok = offs_n < N
    words = tl.load(w_ptr + (c * 16 + offs_r)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in tl.static_range(PACK):
        k = c * CHUNK + j * 16 + offs_r
        k_ok = k < K
        if HAS_PERM:
            kx = tl.load(perm_ptr + k, mask=k_ok, other=0)
        else:
            kx = k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kx[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = ((words >> (BITS * j)) & MASK).to(x.dtype)  # exact: at most 255
        part = tl.dot(x, q, part, input_precision=DOT_PRECISION)
        xsum += tl.sum(x.to(tl.float32), axis=1)
        if (j + 1) % PLANES_PER_SCALE == 0:  # end of a span of planes that share one group: apply its scale/zero
            # padding rows past K may map past the last group: clamp (their x is 0, so they add nothing)
            g = tl.minimum((c * CHUNK + (j + 1 - PLANES_PER_SCALE) * 16) // group_size, n_groups - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += (part - xsum[:, None] * z[None, :]) * s[None, :]
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return acc


@triton.jit
def _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gptq_gemv_kernel(x_ptr, stride_xm, perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                      M, N, K, n_groups, group_size, chunks_per_split,
                      BITS: tl.constexpr, PLANES_PER_SCALE: tl.constexpr, HAS_PERM: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Grid (n tiles, m tiles, SPLIT_K): program (n, m, s) does chunks [s * chunks_per_split, ...) of tile (m, n)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    CHUNK: tl.constexpr = 16 * (32 // BITS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, tl.cdiv(K, CHUNK))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(c_begin, c_end):
        acc = _accumulate_chunk(acc, c, x_ptr, stride_xm, perm_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K,
                                n_groups, group_size, BITS, PLANES_PER_SCALE, HAS_PERM, BLOCK_M, BLOCK_N,
                                DOT_PRECISION)
    if SPLIT_K == 1:
        _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, HAS_BIAS)
    else:
        # workspace [SPLIT_K, M, N] fp32 (rows >= M / cols >= N are never stored nor read)
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(ws_tile + pid_s * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the (release) atomic below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split of this tile sums all partials, in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_tile + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch
            _store_tile(out_ptr, bias_ptr, total, offs_m, offs_n, M, N, HAS_BIAS)


@triton.jit
def _gptq_gemm_kernel(x_ptr, stride_xm, perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
                      M, N, K, n_groups, group_size,
                      BITS: tl.constexpr, PLANES_PER_SCALE: tl.constexpr, HAS_PERM: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """1-D grid over output tiles, GROUP_M row tiles at a time so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    CHUNK: tl.constexpr = 16 * (32 // BITS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, tl.cdiv(K, CHUNK)):
        acc = _accumulate_chunk(acc, c, x_ptr, stride_xm, perm_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, M, N, K,
                                n_groups, group_size, BITS, PLANES_PER_SCALE, HAS_PERM, BLOCK_M, BLOCK_N,
                                DOT_PRECISION)
    _store_tile(out_ptr, bias_ptr, acc, offs_m, offs_n, M, N, HAS_BIAS)


# ----------------------------------------------------------------------------------------------- launcher

# Per-device split-K arrival counters, all zero between launches. Shared by every GEMV launch on the device, so two
# split-K launches must not run concurrently on different streams (nanoqwen runs one stream).
_LOCKS: dict[torch.device, torch.Tensor] = {}
_SM_COUNT: dict[torch.device, int] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < n:  # allocated once, before any CUDA graph capture (the first call)
        locks = _LOCKS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return locks


def _sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 4
    return _SM_COUNT[device]


def _planes_per_scale(bits: int, group_size: int) -> int:
    """Planes that share one scale/zero row: the largest power of two <= PACK dividing group_size / 16."""
    pack = pack_factor(bits)
    if group_size == -1:
        return pack
    p = 1
    while p < pack and (group_size // _PLANE) % (2 * p) == 0:
        p *= 2
    return p


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def gemv_config(M: int, N: int, K: int, bits: int, device: torch.device) -> dict:
    """Split-K kernel launch config. Untuned guesses for an H100/H200 (see benchmarks/gptq_bench.py --sweep)."""
    block_m = max(16, _next_pow2(M))
    block_n = 64 if block_m <= 32 else 128
    n_chunks = -(-K // chunk_rows(bits))
    tiles = -(-N // block_n) * -(-M // block_m)
    split_k = max(1, min(4 * _sm_count(device) // tiles, n_chunks // 4, 16))
    return dict(block_m=block_m, block_n=block_n, split_k=split_k, num_warps=8 if block_m * block_n >= 8192 else 4,
                num_stages=4)


def gemm_config(M: int, N: int, K: int, bits: int, device: torch.device) -> dict:
    """Tiled kernel launch config (untuned guesses)."""
    if M <= 128:
        return dict(block_m=64, block_n=128, num_warps=8, num_stages=3)
    return dict(block_m=128, block_n=128, num_warps=8, num_stages=3)


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, kernel: str | None = None, **config) -> torch.Tensor:
    """y = x @ W + bias with W in the planar layout (module docstring). x [..., K] fp32/fp16/bf16 -> [..., N].

    out: optional contiguous [M, N] tensor of x's dtype to write (M = rows of x flattened).
    kernel: "gemv" (split-K) or "gemm" (tiled); default by row count (<= GEMV_MAX_ROWS rows: "gemv").
    config overrides the launch config: block_m, block_n, split_k (gemv), num_warps, num_stages.
    """
    K, N = x.shape[-1], qweight.shape[1]
    pack, chunk = pack_factor(bits), chunk_rows(bits)
    if not kernel_supports(group_size):
        raise ValueError(f"the GPTQ kernels need group_size -1 or a multiple of 16, got {group_size}: "
                         "use gptq_matmul_ref")
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    if qweight.dtype != torch.int32 or qweight.shape[0] != -(-K // chunk) * chunk // pack:
        raise ValueError(f"qweight must be int32 [{-(-K // chunk) * chunk // pack}, N] (planar layout for K={K}, "
                         f"{bits} bits), got {qweight.dtype} {list(qweight.shape)}")
    if scales.shape != (n_groups, N) or zeros.shape != (n_groups, N):
        raise ValueError(f"scales and zeros must be [{n_groups}, {N}] (K={K}, group_size={group_size}), "
                         f"got {list(scales.shape)} and {list(zeros.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} [{M}, {N}] tensor, got {out.dtype} {list(out.shape)}")
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    kernel = kernel or ("gemv" if M <= GEMV_MAX_ROWS else "gemm")
    base = gemv_config if kernel == "gemv" else gemm_config
    cfg = {**base(M, N, K, bits, x.device), **config}
    common = dict(BITS=bits, PLANES_PER_SCALE=_planes_per_scale(bits, group_size), HAS_PERM=perm is not None,
                  HAS_BIAS=bias is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    gs = group_size if group_size > 0 else 1 << 30
    perm_arg = perm if perm is not None else qweight  # never read without HAS_PERM
    bias_arg = bias if bias is not None else scales  # never read without HAS_BIAS
    tiles_m, tiles_n = triton.cdiv(M, cfg["block_m"]), triton.cdiv(N, cfg["block_n"])
    if kernel == "gemv":
        n_chunks = triton.cdiv(K, chunk)
        per_split = triton.cdiv(n_chunks, max(1, min(cfg["split_k"], n_chunks)))
        split_k = triton.cdiv(n_chunks, per_split)  # no empty splits
        ws = torch.empty(split_k * M * N if split_k > 1 else 1, dtype=torch.float32, device=x.device)
        locks = _locks(x.device, tiles_m * tiles_n) if split_k > 1 else ws
        _gptq_gemv_kernel[(tiles_n, tiles_m, split_k)](
            x2, x2.stride(0), perm_arg, qweight, scales, zeros, bias_arg, out, ws, locks,
            M, N, K, n_groups, gs, per_split, SPLIT_K=split_k, **common)
    elif kernel == "gemm":
        _gptq_gemm_kernel[(tiles_m * tiles_n,)](
            x2, x2.stride(0), perm_arg, qweight, scales, zeros, bias_arg, out,
            M, N, K, n_groups, gs, GROUP_M=8, **common)
    else:
        raise ValueError(f"kernel must be 'gemv' or 'gemm', got {kernel!r}")
    return out.view(*x.shape[:-1], N)
