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

The magic-number GEMV (`gptq_gemv`, decode: at most 64 rows; chosen against `gptq_matmul` at run time on the GPU by
nanoqwen/kernels/gemv.py's `pick`)
-------------------------------------------------------------------------------------------------------------------
The kernels above convert every weight with an int-to-float instruction (a quarter-rate one) and pass the fp16 tile
through shared memory into tl.dot: 7.7 SASS instructions per int4 weight and thread, 12% of copy bandwidth measured.
This one reads the same planar words and computes the transposed product acc[n, m] += A[n, kappa] @ x[m, .].T on the
tensor cores with A = q - z built straight in the registers the MMA reads (Triton propagates the dot-operand layout
back through the bit operations to the shared-memory load), two weights per 32-bit operation:
- magic number: fields f and f + 16/bits of a word sit at bits (b, b + 16); `(word >> b) & 0x000F000F | 0x66006600`
  (0x00FF00FF for int8) puts them under the exponent of 1536.0, so each 16-bit half reads as the fp16 1536 + q. In
  [1024, 2048) fp16 values are spaced by 1, so the bits of 1536 + d are 0x6600 + d for |d| <= 512: subtracting
  z * 0x10001 as an integer gives 1536 + (q - z) per half with no borrow (z in [0, 2^bits]), and one packed fp16
  subtraction of 1536 leaves q - z exactly. Symmetric checkpoints (every z = 2^(bits-1), Qwen's) skip the integer
  subtraction: 1536 + 2^(bits-1) is subtracted instead. bf16 activations: 192.0 (0x4340) in bf16, spaced by 1 in
  [128, 256), int4 only; int8 builds in fp16 and converts (exact: |q - z| <= 256 has at most 8 significant bits).
- order: the pair (f, f + 16/bits) of a word becomes two neighbouring contraction indices, and a lane's four words
  are the four planar rows 4t..4t+3 of its column. So A's contraction order kappa is a fixed permutation of the
  chunk's rows, kappa = 8 P ri + 8 j + 2 t + h <-> row 16 P h + 16 j + 4 t + ri (P = 16 / bits pairs per word), and
  x is read in that same order (a reshape and permute of its contiguous chunk in registers, or folded into the
  act-order gather). The contraction order being free, the weights need no new layout: the planar words are read
  with 16-byte cp.async loads as they are (a pre-shuffled layout measured 2.70 against 2.77 instructions per weight
  offline: not worth a format change).
- scale: with groups that are whole chunks (128 rows int4, 64 int8; or one group) the dot of a chunk is
  P = x . (q - z) in fp32, products exact (x has 11 or 8 significant bits, q - z at most 9), and acc += s * P once
  per chunk. Other group sizes (any positive size) scale every weight first: A = (q - z) * s in fp32, rounded once
  to x's dtype (the reference's weights exactly), then the dot.
Exactness: q - z is exact, so the only difference from `gptq_matmul_ref` (which rounds each weight s * (q - z) to x's
dtype, then multiplies) is that rounding: within half an ulp per weight, |y - y_ref| <= u * sum_k |x_k w_k| plus fp32
summation error, u = 2^-11 (fp16) or 2^-8 (bf16): the size of the output's own rounding. With a one-hot row of x,
P = q - z and s * P are exact in fp32, so y rounds to the reference's dequantized weight bit for bit (the tests check
this). The "folded zero" form fma(q, s, -(z * s)) is not used: z * s is rounded first (up to half an ulp of 16 s for
int4, larger than a weight's own ulp when q is near z), and it would save nothing with the scale applied per chunk.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

from . import use_triton  # noqa: F401  (re-exported: quant.gptq picks the path with it)
from .gemv import _LOCKS, locks as _locks, sm_count as _sm_count, split_k_for, store_or_reduce  # noqa: F401

GEMV_MAX_ROWS = 64  # at or below this many rows the split-K kernel runs; above it the tiled GEMM
MAGIC_MAX_ROWS = 64  # rows the magic-number GEMV takes (16, 32 or 64 per tile)
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


@triton.jit
def _q_minus_z(words, zp, magic, BLOCK_N: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr, DQ: tl.constexpr):
    """One planar chunk, words int32 [16, BLOCK_N] -> A [BLOCK_N, CHUNK] in DQ with A[n, kappa] = q - z EXACTLY,
    q the value of the chunk's kernel row k(kappa) (module docstring, "magic-number GEMV"). ZERO: "packed" (zp
    [BLOCK_N] int32 = z * 0x10001), "sym" (z = 2^(bits-1)) or "none" (A = q). magic: `magic_bits(BITS, DQ)`, a
    run-time argument so that ptxas keeps it in a register and fuses the mask and the or into one LOP3 (with a
    literal, triton 3.6's ptxas spends two; benchmarks/NOTES.md)."""
    PAIRS: tl.constexpr = 16 // BITS  # a word's fields f and f + PAIRS sit at bits (BITS f, BITS f + 16)
    CHUNK: tl.constexpr = 512 // BITS
    MASK: tl.constexpr = 0x000F000F if BITS == 4 else 0x00FF00FF
    BF16: tl.constexpr = DQ == tl.bfloat16 and BITS == 4  # int8 values need 9 significant bits: built in fp16
    HALF: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    BASE: tl.constexpr = 192.0 if BF16 else 1536.0  # magic = its bits twice: 0x43404340 (bf16), 0x66006600 (fp16)
    OFFSET: tl.constexpr = BASE + (1 << (BITS - 1)) if ZERO == "sym" else BASE
    w = tl.trans(words).reshape(BLOCK_N, 4, 4)  # [n, t, ri]: word row r = 4 t + ri
    j = tl.arange(0, PAIRS)
    # fields j and j + PAIRS of each word into the low bits of its two halves, under the magic number's exponent:
    # the halves read as BASE + q (exact: the binade of BASE has unit spacing and q fits in its mantissa)
    t = ((w[:, :, :, None] >> (BITS * j)[None, None, None, :]) & MASK) | magic
    if ZERO == "packed":
        t = t - zp[:, None, None, None]  # BASE + q - z per half: 0 <= z <= 2^bits, no borrow, same binade
    lo = t.to(tl.int16).to(HALF, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(HALF, bitcast=True)
    v = tl.join(lo, hi) - OFFSET  # [n, t, ri, j, h]: exact small integers
    return tl.permute(v, (0, 2, 3, 1, 4)).reshape(BLOCK_N, CHUNK).to(DQ)  # kappa = 8 PAIRS ri + 8 j + 2 t + h


@triton.jit
def _gptq_magic_kernel(x_ptr, stride_xm, perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                       M, N, K, group_size, chunks_per_split, magic,
                       BITS: tl.constexpr, ZERO: tl.constexpr, CHUNK_GROUPS: tl.constexpr, HAS_PERM: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Grid (column tiles, splits): program (t, s) does chunks [s * chunks_per_split, ...) of columns t, computing
    the transposed tile acc[n, m] += A[n, kappa] @ x[m, k(kappa)].T."""
    PAIRS: tl.constexpr = 16 // BITS
    CHUNK: tl.constexpr = 512 // BITS
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, CHUNK)
    n_ok, m_ok = offs_n < N, offs_m < M
    c_begin = tl.program_id(1) * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, tl.cdiv(K, CHUNK))
    kap = offs_c  # the chunk's kernel row of each kappa: the inverse of the permutation below
    k_of_kap = 16 * ((kap // 8) % PAIRS) + 4 * ((kap // 2) % 4) + kap // (8 * PAIRS) + 16 * PAIRS * (kap % 2)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c in range(c_begin, c_end):
        words = tl.load(w_ptr + (c * 16 + tl.arange(0, 16))[:, None] * N + offs_n[None, :], mask=n_ok[None, :],
                        other=0)
        # x^T [CHUNK, BLOCK_M] in kappa order
        if HAS_PERM:  # a gather anyway: through perm and k(kappa) at once
            k = c * CHUNK + k_of_kap
            kx = tl.load(perm_ptr + k, mask=k < K, other=0)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kx[:, None], mask=m_ok[None, :] & (k < K)[:, None],
                         other=0.0)
        else:  # contiguous rows, permuted in registers: kernel row 16 PAIRS h + 16 j + 4 t + ri -> kappa
            k = c * CHUNK + offs_c
            xc = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                         other=0.0)
            xt = tl.trans(xc.reshape(BLOCK_M, 2, PAIRS, 4, 4).permute(0, 4, 2, 3, 1).reshape(BLOCK_M, CHUNK))
        if CHUNK_GROUPS:  # the chunk lies in one group: (q - z) into the dot, the scale onto its fp32 result
            g = (c * CHUNK) // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if ZERO == "packed":
                zp = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.int32) * 0x10001
            else:
                zp = 0
            a = _q_minus_z(words, zp, magic, BLOCK_N, BITS, ZERO, XDT)
            acc += tl.dot(a, xt, input_precision=DOT_PRECISION) * s[:, None]
        else:  # smaller or unaligned groups: every weight gets its group's scale and zero before the dot
            kg = c * CHUNK + k_of_kap
            el = (kg[None, :] // group_size) * N + offs_n[:, None]
            el_ok = n_ok[:, None] & (kg < K)[None, :]
            s = tl.load(s_ptr + el, mask=el_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + el, mask=el_ok, other=0.0).to(tl.float32)
            q = _q_minus_z(words, 0, magic, BLOCK_N, BITS, "none", XDT).to(tl.float32)  # the magic of XDT
            acc = tl.dot(((q - z) * s).to(XDT), xt, acc, input_precision=DOT_PRECISION)  # the reference's rounding
    store_or_reduce(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, offs_n, offs_m, M, N, HAS_BIAS, SPLIT)


# ----------------------------------------------------------------------------------------------- launcher

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


def _prepare(x, qweight, scales, zeros, bits, group_size, out):
    """Checks shared by the launchers; returns (x as [M, K] with unit last stride, out [M, N], n_groups)."""
    K, N = x.shape[-1], qweight.shape[1]
    pack, chunk = pack_factor(bits), chunk_rows(bits)
    if not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
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
    return x2, out, n_groups


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, kernel: str | None = None, **config) -> torch.Tensor:
    """y = x @ W + bias with W in the planar layout (module docstring). x [..., K] fp32/fp16/bf16 -> [..., N].

    out: optional contiguous [M, N] tensor of x's dtype to write (M = rows of x flattened).
    kernel: "gemv" (split-K) or "gemm" (tiled); default by row count (<= GEMV_MAX_ROWS rows: "gemv").
    config overrides the launch config: block_m, block_n, split_k (gemv), num_warps, num_stages.
    """
    if not kernel_supports(group_size):
        raise ValueError(f"the GPTQ kernels need group_size -1 or a multiple of 16, got {group_size}: "
                         "use gptq_matmul_ref")
    x2, out, n_groups = _prepare(x, qweight, scales, zeros, bits, group_size, out)
    M, K, N = x2.shape[0], x2.shape[1], qweight.shape[1]
    chunk = chunk_rows(bits)
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


def magic_bits(bits: int, dtype: torch.dtype) -> int:
    """The magic number of `_q_minus_z`, twice (one per 16-bit half): 192.0 in bf16 for int4 with bf16 activations,
    else 1536.0 in fp16 (int8 values need more mantissa than bf16 has: built in fp16, then converted exactly)."""
    return 0x43404340 if bits == 4 and dtype == torch.bfloat16 else 0x66006600


def magic_config(M: int, N: int, K: int, bits: int, group_size: int, device: torch.device) -> dict:
    """Magic-number GEMV launch config: untuned guesses for an H100/H200, checked only offline (registers, spills:
    benchmarks/NOTES.md). 256 columns x 16 rows on 8 warps (two warpgroups of 64 x 16 wgmma tiles); 128 columns for
    the wider row tiles."""
    block_m = max(16, _next_pow2(M))
    chunk_groups = group_size == -1 or group_size % chunk_rows(bits) == 0
    block_n = 64 if not chunk_groups else 256 if block_m == 16 else 128
    split_k = split_k_for(-(-N // block_n), -(-K // chunk_rows(bits)), device)
    return dict(block_m=block_m, block_n=block_n, split_k=split_k, num_warps=8 if block_n == 256 else 4,
                num_stages=4 if chunk_groups else 2)  # per-weight scales and zeros: tiles as big as the weights'


def gptq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group_size: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
              sym: bool = False, out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """The magic-number GEMV (module docstring): y = x @ W + bias for x [..., K] with at most MAGIC_MAX_ROWS rows,
    W in the planar layout, any group size, act-order perm. sym: the caller knows every zero is 2^(bits - 1) (Qwen's
    checkpoints), which saves one integer subtraction per pair of weights. Zeros must be integers in [0, 2^bits]
    (true zero points, as `repack` writes them). config overrides `magic_config`: block_m, block_n, split_k,
    num_warps, num_stages."""
    x2, out, n_groups = _prepare(x, qweight, scales, zeros, bits, group_size, out)
    M, K, N = x2.shape[0], x2.shape[1], qweight.shape[1]
    if M > MAGIC_MAX_ROWS:
        raise ValueError(f"gptq_gemv takes at most {MAGIC_MAX_ROWS} rows, got {M}: use gptq_matmul")
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    chunk = chunk_rows(bits)
    cfg = {**magic_config(M, N, K, bits, group_size, x.device), **config}
    if x.dtype == torch.float32 and "num_stages" not in config:
        cfg["num_stages"] = 2  # fp32 tiles of x and A are twice the bytes (fp32 models: tests, not speed)
    n_chunks = triton.cdiv(K, chunk)
    per_split = triton.cdiv(n_chunks, max(1, min(cfg["split_k"], n_chunks)))
    split_k = triton.cdiv(n_chunks, per_split)  # no empty splits
    tiles = triton.cdiv(N, cfg["block_n"])
    ws = torch.empty(split_k * M * N if split_k > 1 else 1, dtype=torch.float32, device=x.device)
    _gptq_magic_kernel[(tiles, split_k)](
        x2, x2.stride(0), perm if perm is not None else qweight, qweight, scales, zeros,
        bias if bias is not None else scales, out, ws, _locks(x.device, tiles) if split_k > 1 else ws,
        M, N, K, group_size if group_size > 0 else 1 << 30, per_split, magic_bits(bits, x.dtype),
        BITS=bits, ZERO="sym" if sym else "packed", CHUNK_GROUPS=group_size == -1 or group_size % chunk == 0,
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, SPLIT=split_k > 1, BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*x.shape[:-1], N)
