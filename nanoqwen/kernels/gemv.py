"""Decode-sized matmuls (a few rows): a split-K GEMV for nn.Linear weights, and the run-time choice of kernel.

`linear_gemv`: y = x @ W.T + bias for x [M, K] with M <= GEMV_MAX_ROWS and W [N, K] as nn.Linear stores it (bf16,
fp16 or fp32, unit last stride). cuBLAS reads such weights at 2.2-2.4 TB/s at one row on an H200 (57% of copy
bandwidth, benchmarks/NOTES.md). Here each program streams a [BLOCK_N, BLOCK_K] tile of W per step (cp.async, a
few stages deep) and computes the transposed product acc[n, m] += W[n, k] @ x[m, k].T on the tensor cores: W is the
wide operand (64 rows per warpgroup), x the narrow one (BLOCK_M = 16 columns), so one row of x costs no more than 16.
Split-K over a second grid axis fills the GPU when N alone cannot; the partial sums go through an fp32 workspace and
the last program of each column tile to arrive adds them in split order (`store_or_reduce`): deterministic, one
launch, capturable in a CUDA graph. The GPTQ GEMV of gptq_matmul.py shares that epilogue.

Which kernel runs is decided on the GPU, per shape (`pick`): the first time a (kind, row bucket, N, K, dtype) is
seen on CUDA outside a CUDA-graph capture, every candidate (cuBLAS or the old GPTQ kernel, and the new kernels) is
timed with CUDA events and the fastest is remembered for the process. The engine runs every decode bucket eagerly
before it captures its graphs, so the choice is made there; a capture never times anything (an undecided shape
inside a capture runs the baseline, and is decided at the next eager call). NANOQWEN_GEMV forces a choice:
  NANOQWEN_GEMV=auto (default)  time on CUDA, baseline elsewhere (the CPU never times: nothing changes there)
  NANOQWEN_GEMV=cublas          always the baseline (F.linear / the old GPTQ kernel), as before this file existed
  NANOQWEN_GEMV=triton          always the new kernel where it applies (on the CPU: with NANOQWEN_KERNELS=triton)
These kernels only run where the Triton kernels do (`use_triton`: CUDA, or NANOQWEN_KERNELS=triton).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import tl, triton, use_triton  # Triton, or stand-ins when it is not installed (see __init__)

GEMV_MAX_ROWS = 16  # the linear GEMV's rows (one tensor-core tile of x)
TIMING_REPS = 10  # timed calls per candidate (after 2 untimed ones, the first of which compiles)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: x @ W.T + bias accumulated in fp32, rounded once to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _store_tile(acc, out_ptr, bias_ptr, offs_n, offs_m, M, N, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 (the transposed tile of y) + bias -> y[m, n] in out's dtype."""
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    mask = n_ok[:, None] & (offs_m < M)[None, :]
    tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_or_reduce(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, offs_n, offs_m, M, N,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Split-K epilogue of a grid (column tiles, splits): program (t, s) holds split s's partial acc of tile t.
    With SPLIT (more than one split; their number is the grid's, so it costs no recompilation) every partial goes to
    the workspace [splits, M, N] fp32; the last program of tile t to arrive (an arrival counter per tile, reset by
    that program) sums them in split order and stores y."""
    if not SPLIT:
        _store_tile(acc, out_ptr, bias_ptr, offs_n, offs_m, M, N, HAS_BIAS)
    else:
        mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws_tile + tl.program_id(1) * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the (release) atomic below
        arrived = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        n_split = tl.num_programs(1)
        if arrived == n_split - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(n_split):
                total += tl.load(ws_tile + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + tl.program_id(0), 0)  # ready for the next launch
            _store_tile(total, out_ptr, bias_ptr, offs_n, offs_m, M, N, HAS_BIAS)


@triton.jit
def _linear_gemv_kernel(x_ptr, stride_xm, w_ptr, stride_wn, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K,
                        steps_per_split,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (column tiles, splits): program (t, s) does K steps [s * steps_per_split, ...) of columns t."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    k_begin = tl.program_id(1) * steps_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = (k < K) | EVEN_K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    store_or_reduce(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, offs_n, offs_m, M, N, HAS_BIAS, SPLIT)


# ----------------------------------------------------------------------------------------------- launchers

# Per-device split-K arrival counters, all zero between launches. Shared by every split-K GEMV (this file's and the
# GPTQ ones), so two split-K launches must not run concurrently on different streams (nanoqwen runs one stream).
_LOCKS: dict[torch.device, torch.Tensor] = {}
_SM_COUNT: dict[torch.device, int] = {}


def locks(device: torch.device, n: int) -> torch.Tensor:
    lk = _LOCKS.get(device)
    if lk is None or lk.numel() < n:  # allocated once, before any CUDA graph capture (the first call)
        lk = _LOCKS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return lk


def sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 4
    return _SM_COUNT[device]


def split_k_for(tiles: int, steps: int, device: torch.device, min_steps: int = 4, max_split: int = 16) -> int:
    """Splits that bring the grid to about two programs per SM, each with at least `min_steps` K steps (untuned)."""
    return max(1, min(-(-2 * sm_count(device) // tiles), steps // min_steps, max_split))


def linear_gemv_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Untuned guesses for an H100/H200, checked only offline (benchmarks/NOTES.md): 128 x 64 tiles of W, 4 warps,
    6 stages (96 KB of tiles in flight per program)."""
    block_n, block_k = 128, 64
    split_k = split_k_for(-(-N // block_n), -(-K // block_k), device)
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=6)


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """Triton split-K GEMV, same result as `linear_ref` (up to fp32 summation order): x [..., K] with at most
    GEMV_MAX_ROWS rows, weight [N, K] (unit last stride) of x's dtype, bias [N] or None. out: optional contiguous
    [M, N]. config overrides `linear_gemv_config`: block_n, block_k, split_k, num_warps, num_stages."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS or weight.shape[1] != K or weight.dtype != x.dtype or weight.stride(-1) != 1:
        raise ValueError(f"linear_gemv takes at most {GEMV_MAX_ROWS} rows and a weight [N, {K}] of x's dtype with "
                         f"unit last stride; got x {list(x.shape)} {x.dtype}, weight {list(weight.shape)} "
                         f"{weight.dtype} strides {weight.stride()}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    cfg = {**linear_gemv_config(M, N, K, x.device), **config}
    if x.dtype == torch.float32 and "num_stages" not in config:
        cfg["num_stages"] = 2  # fp32 tiles are twice the bytes (fp32 models: tests and the CPU, not speed)
    tiles = triton.cdiv(N, cfg["block_n"])
    steps = triton.cdiv(K, cfg["block_k"])
    per_split = triton.cdiv(steps, max(1, min(cfg["split_k"], steps)))
    split_k = triton.cdiv(steps, per_split)  # no empty splits
    ws = torch.empty(split_k * M * N if split_k > 1 else 1, dtype=torch.float32, device=x.device)
    _linear_gemv_kernel[(tiles, split_k)](
        x2, x2.stride(0), weight, weight.stride(0), bias if bias is not None else weight, out, ws,
        locks(x.device, tiles) if split_k > 1 else ws, M, N, K, per_split,
        HAS_BIAS=bias is not None, SPLIT=split_k > 1, EVEN_K=K % cfg["block_k"] == 0, BLOCK_M=16,
        BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------- run-time choice

_CHOICES: dict[tuple, str] = {}  # (kind, row bucket, N, K, dtype, device) -> the candidate that was fastest


def gemv_mode() -> str:
    mode = os.environ.get("NANOQWEN_GEMV", "auto").lower()
    if mode not in ("auto", "cublas", "triton"):
        raise ValueError(f"NANOQWEN_GEMV={mode!r}: use 'auto', 'cublas' or 'triton' (or leave it unset)")
    return mode


def row_bucket(M: int) -> int:
    return 1 << max(M - 1, 0).bit_length()


def _time_ms(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Median GPU time of TIMING_REPS calls (after two untimed ones, the first of which compiles), each behind a write
    of twice the L2: the weights come from HBM as in a decode step, and the GPU is busy while the host launches, so
    launch overhead, which CUDA graphs do not have, is not counted."""
    with torch.cuda.device(device):
        fn(), fn()
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        scratch = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(TIMING_REPS)]
        for start, end in events:
            scratch.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
    return sorted(start.elapsed_time(end) for start, end in events)[TIMING_REPS // 2]


def pick(kind: str, x: torch.Tensor, N: int, K: int, candidates: dict[str, Callable[[], torch.Tensor]]) -> str:
    """The name of the candidate to run for this matmul. `candidates` maps names to zero-argument calls computing
    the same result, the baseline first (cuBLAS or the old kernel), the new kernel(s) after it. Forced modes and the
    CPU take the baseline or the first new kernel without timing; on CUDA the first call of a shape times them all
    (outside a CUDA-graph capture) and later calls reuse that answer."""
    names = list(candidates)
    mode = gemv_mode()
    if mode != "auto" or len(names) == 1:
        return names[0] if mode != "triton" else names[min(1, len(names) - 1)]
    if x.device.type != "cuda":
        return names[0]
    key = (kind, row_bucket(x.numel() // max(K, 1)), N, K, x.dtype, x.device)
    choice = _CHOICES.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return names[0]  # never time inside a capture; decided at the next eager call
        times = {name: _time_ms(fn, x.device) for name, fn in candidates.items()}
        choice = _CHOICES[key] = min(times, key=times.get)
    return choice


def choices() -> dict[tuple, str]:
    """What `pick` has decided so far (benchmarks print it)."""
    return dict(_CHOICES)


class Linear(nn.Linear):
    """nn.Linear whose decode-sized calls (at most GEMV_MAX_ROWS rows, where the Triton kernels run) go to the
    faster of cuBLAS and `linear_gemv` (`pick`). Same parameters and state dict as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        if (x.numel() > GEMV_MAX_ROWS * K or x.numel() == 0 or not use_triton(x.device)
                or self.weight.dtype != x.dtype or self.weight.stride(-1) != 1):
            return F.linear(x, self.weight, self.bias)
        candidates = {"cublas": lambda: F.linear(x, self.weight, self.bias),
                      "triton": lambda: linear_gemv(x, self.weight, self.bias)}
        return candidates[pick("linear", x, self.out_features, K, candidates)]()
