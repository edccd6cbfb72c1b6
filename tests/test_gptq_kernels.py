"""GPTQ Triton kernels (GEMV split-K, tiled GEMM, magic-number GEMV) against the torch reference, on fresh random
packed weights.

On a machine without CUDA they run under Triton's CPU interpreter (TRITON_INTERPRET=1, small shapes, fp32 and fp16
only: the interpreter's bf16 tl.dot is wrong); on a GPU the same tests run compiled, bf16 included.
Shapes: K = 136 is not a multiple of a chunk (128 rows int4, 64 int8) nor N = 40 of a column tile; the planar
layout takes any K (one test uses K = 100, which the official format, needing K % (32 / bits) == 0, could not hold).
"""
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

import triton.language as tl  # noqa: E402

import nanoqwen.kernels.gptq_matmul as gm  # noqa: E402

# Triton decides "interpreter or compiler" for every @triton.jit function (its own tl.sum, tl.cdiv too) when it is
# first imported. If another test module imported it first without TRITON_INTERPRET=1 on a CPU-only machine, these
# tests cannot run in this process: they are skipped here and run in a fresh one by test_in_fresh_process.
RUNNABLE = CUDA or type(tl.sum).__name__ == "InterpretedFunction"
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="triton was imported without TRITON_INTERPRET=1: "
                                   "these tests run in a subprocess (test_in_fresh_process)")

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def random_planar(K, N, bits, group_size, act_order):
    """Random quantized weight in the planar layout: (qweight, scales fp16, zeros fp16, perm or None)."""
    q = torch.randint(0, 2**bits, (K, N))
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    scales = (torch.rand(n_groups, N) * 0.02 + 0.002).half()
    zeros = torch.randint(1, 2**bits + 1, (n_groups, N)).half()  # true zero points 1 .. 2^bits
    perm = torch.randperm(K).to(torch.int32) if act_order else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(gm.pack_planar(q, bits)), to(scales), to(zeros), to(perm)


def check(kernel, M, K, N, bits, group_size, act_order, dtype, bias=True, **config):
    qweight, scales, zeros, perm = random_planar(K, N, bits, group_size, act_order)
    b = torch.randn(N, device=DEVICE).half() if bias else None
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # poisoned: unwritten elements fail
    y = gm.gptq_matmul(x, qweight, scales, zeros, bits, group_size, b, perm, out=out, kernel=kernel, **config)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    W = gm.dequantize_planar(qweight, scales, zeros, perm, bits, group_size, K)
    ref = x.double() @ W.double().t() + (b.double() if bias else 0)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert not torch.isnan(y).any(), f"unwritten or NaN outputs ({kernel}, M={M})"
    assert err < tol, f"{kernel} M={M} K={K} N={N} bits={bits} group={group_size} {dtype}: rel err {err:.2e}"
    # the module-level reference agrees too (it is what the CPU path runs)
    ref_torch = gm.gptq_matmul_ref(x.float(), qweight, scales, zeros, bits, group_size, b, perm)
    torch.testing.assert_close(y.float(), ref_torch, rtol=tol * 10, atol=tol * 10 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_vs_reference(bits, group_size, kernel):
    """M in {1, 3, 16, 33}, fresh weights each call; act-order on odd M; fp32 on M = 1, 33 and fp16 on M = 3, 16
    (so every (dtype, act-order) pair runs) in the interpreter; on a GPU every dtype (bf16 too) for every M."""
    # split-K in the interpreter too; small GEMM tiles so that several row and column tiles (and the grouped
    # tile order) are exercised
    config = {"split_k": 3} if kernel == "gemv" else {"block_m": 16, "block_n": 32}
    for M in (1, 3, 16, 33):
        for dtype in DTYPES if CUDA else [torch.float16 if M in (3, 16) else torch.float32]:
            check(kernel, M, 136, 40, bits, group_size, act_order=M % 2 == 1, dtype=dtype, **config)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_split_k_and_tiles(bits):
    """Split-K variants (none, uneven, more splits than chunks) and narrow tiles; the counters end at zero."""
    for split_k, block_n in ((1, 16), (5, 64), (64, 32)):
        check("gemv", 2, 264, 40, bits, 64, act_order=False, dtype=torch.float32, split_k=split_k, block_n=block_n)
    check("gemv", 40, 136, 40, bits, 64, act_order=True, dtype=torch.float16, split_k=2, block_m=16, block_n=32)
    for locks in gm._LOCKS.values():
        assert int(locks.abs().sum()) == 0


@needs_kernels
def test_odd_shapes_and_defaults():
    """K not a multiple of 8, group 48 (one plane per scale span), no bias, default kernel choice, 3-D input."""
    check("gemv", 4, 100, 24, 4, 48, act_order=True, dtype=torch.float32, bias=False)
    check("gemm", 20, 100, 24, 8, 48, act_order=False, dtype=torch.float16, bias=False)
    qweight, scales, zeros, perm = random_planar(136, 56, 4, 32, act_order=True)
    x = torch.randn(2, 3, 136, device=DEVICE)
    y = gm.gptq_matmul(x, qweight, scales, zeros, 4, 32, None, perm)  # 6 rows: the GEMV kernel
    ref = gm.gptq_matmul_ref(x, qweight, scales, zeros, 4, 32, None, perm)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with pytest.raises(ValueError, match="multiple of 16"):
        gm.gptq_matmul(x, qweight, scales, zeros, 4, 24, None, perm)
    with pytest.raises(ValueError, match="planar"):
        gm.gptq_matmul(x[..., :128], qweight, scales, zeros, 4, 32, None, None)


@needs_kernels
def test_gptq_linear_uses_kernels(monkeypatch):
    """GPTQLinear.forward takes the Triton path with NANOQWEN_KERNELS=triton and matches its torch path."""
    from nanoqwen.quant.gptq import GPTQLinear
    qweight, scales, zeros, perm = random_planar(128, 48, 8, 32, act_order=True)
    m = GPTQLinear.from_planar({"qweight_planar": qweight, "scales": scales, "zeros": zeros, "perm": perm,
                                "bias": torch.randn(48, device=DEVICE).half()}, 8, 32, in_features=128)
    x = torch.randn(5, 128, device=DEVICE)
    monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
    ref = m(x)
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    calls = []
    real = gm.gptq_matmul
    monkeypatch.setattr(gm, "gptq_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert calls, "the Triton path was not taken"


# ----------------------------------------------------------------------------------------------- magic-number GEMV
# Tolerances, relative to the norm: two units of the output dtype's eps (the kernel applies the scale to exact
# integer dot products in fp32 and rounds once; the reference's own rounding of every weight is as large), 1e-5 fp32.
MAGIC_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}


def magic_layer(gen, K, N, bits, group_size, act_order, zeros):
    """Random planar weights with zeros "sym" (all 2^(bits-1)), "random" (1 .. 2^bits) or "extreme" (0 and 2^bits:
    the ends of the range the magic-number subtraction must take without a borrow)."""
    q = torch.randint(0, 2**bits, (K, N), generator=gen)
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    scales = (torch.rand(n_groups, N, generator=gen) * 0.02 + 0.002).half()
    if zeros == "sym":
        z = torch.full((n_groups, N), 2 ** (bits - 1))
    elif zeros == "random":
        z = torch.randint(1, 2**bits + 1, (n_groups, N), generator=gen)
    else:
        z = torch.randint(0, 2, (n_groups, N), generator=gen) * 2**bits
    perm = torch.randperm(K, generator=gen).to(torch.int32) if act_order else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(gm.pack_planar(q, bits)), to(scales), to(z.half()), to(perm)


def check_magic(gen, M, K, N, bits, group_size, act_order, dtype, zeros="random", bias=True, **config):
    seed = gen.initial_seed()
    qweight, scales, z, perm = magic_layer(gen, K, N, bits, group_size, act_order, zeros)
    b = (torch.randn(N, generator=gen) * 0.1).half().to(DEVICE) if bias else None
    x = torch.randn(M, K, generator=gen).to(dtype=dtype, device=DEVICE)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # poisoned: unwritten elements fail
    y = gm.gptq_gemv(x, qweight, scales, z, bits, group_size, b, perm, sym=zeros == "sym", out=out, **config)
    what = f"M={M} K={K} N={N} int{bits} group {group_size} act_order={act_order} zeros {zeros} {dtype} {config}"
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any(), f"unwritten outputs, {what}, seed {seed}"
    W = gm.dequantize_planar(qweight, scales, z, perm, bits, group_size, K)
    ref = x.double() @ W.double().t() + (b.double() if bias else 0)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < MAGIC_TOL[dtype], f"{what}: rel err {err:.2e}, seed {seed}"
    ref_torch = gm.gptq_matmul_ref(x, qweight, scales, z, bits, group_size, b, perm)  # what the CPU path runs
    tol = MAGIC_TOL[dtype]
    torch.testing.assert_close(y, ref_torch, rtol=tol, atol=tol * ref.abs().max().item(),
                               msg=lambda m: f"{what}, seed {seed}: {m}")


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_magic_gemv_vs_reference(bits, group_size, rng):
    """Rows 1, 3, 16 (the 16-row tile), 33 (32 rows... 64-row tile) with K = 200 and N = 40 (not multiples of a chunk
    or a column tile); act-order on odd rows; zeros symmetric, random, extreme; split-K 3 (uneven); fp32 and fp16 in
    the interpreter, bf16 too on a GPU. Groups 32 and 64 of int4 (and 32 of int8) are smaller than a chunk: the
    per-weight scale path."""
    for M, zeros in ((1, "sym"), (3, "random"), (16, "extreme"), (33, "random")):
        for dtype in DTYPES if CUDA else [torch.float16 if M in (3, 16) else torch.float32]:
            check_magic(rng, M, 200, 40, bits, group_size, act_order=M % 2 == 1, dtype=dtype, zeros=zeros,
                        split_k=3)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_magic_gemv_splits_tiles_defaults(bits, rng):
    """Split-K none and more splits than chunks, a narrow column tile, the default config, 64 rows, no bias, group
    48 (not a power of two); the arrival counters end at zero."""
    check_magic(rng, 2, 264, 40, bits, 128, act_order=False, dtype=torch.float32, split_k=1)
    check_magic(rng, 2, 264, 72, bits, 64, act_order=True, dtype=torch.float16, zeros="sym", split_k=64, block_n=64)
    check_magic(rng, 64, 136, 24, bits, -1, act_order=False, dtype=torch.float16, bias=False)
    check_magic(rng, 5, 100, 24, bits, 48, act_order=True, dtype=torch.float32)
    for locks in gm._LOCKS.values():
        assert int(locks.abs().sum()) == 0


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_magic_gemv_dequantizes_exactly(bits, rng):
    """With one-hot rows of x (x[m] = e_k), y[m] is the dequantized column k: the kernel's q - z is exact and the
    scale lands on an exact fp32 product, so y must EQUAL the reference's weights rounded to x's dtype, bit for bit,
    for every zero kind, chunk-sized and per-weight groups, act-order and split-K."""
    seed = rng.initial_seed()
    K, N = 200, 40
    for group_size, zeros, act_order, split_k in ((128 if bits == 4 else 64, "sym", False, 1), (-1, "extreme", True, 3),
                                                  (32, "random", False, 2), (128, "random", True, 4)):
        qweight, scales, z, perm = magic_layer(rng, K, N, bits, group_size, act_order, zeros)
        W = gm.dequantize_planar(qweight, scales, z, perm, bits, group_size, K)  # [N, K], original input order
        ks = torch.randperm(K, generator=rng)[:16]
        for dtype in DTYPES:
            x = torch.zeros(16, K, dtype=dtype, device=DEVICE)
            x[torch.arange(16), ks.to(DEVICE)] = 1
            y = gm.gptq_gemv(x, qweight, scales, z, bits, group_size, None, perm, sym=zeros == "sym",
                             split_k=split_k)
            want = W[:, ks.to(DEVICE)].t().to(dtype)
            bad = (y != want).sum().item()
            assert bad == 0, (f"int{bits} group {group_size} zeros {zeros} act_order={act_order} {dtype}: {bad} of "
                              f"{want.numel()} weights differ, seed {seed}")


@needs_kernels
def test_magic_gemv_rejects():
    qweight, scales, z, _ = magic_layer(torch.Generator().manual_seed(0), 128, 16, 4, 128, False, "sym")
    with pytest.raises(ValueError, match="at most 64 rows"):
        gm.gptq_gemv(torch.randn(65, 128, device=DEVICE), qweight, scales, z, 4, 128)
    with pytest.raises(ValueError, match="planar"):
        gm.gptq_gemv(torch.randn(2, 300, device=DEVICE), qweight, scales, z, 4, 128)


@needs_kernels
def test_gptq_linear_picks_between_kernels(monkeypatch, rng):
    """GPTQLinear with the Triton kernels: up to 64 rows NANOQWEN_GEMV picks the old split-K kernel (cublas, and
    auto on the CPU: nothing changes) or the magic GEMV (triton); the symmetric path follows in-place changes of
    the zeros (checked per version of the tensor)."""
    from nanoqwen.quant.gptq import GPTQLinear
    seed = rng.initial_seed()
    qweight, scales, z, perm = magic_layer(rng, 256, 48, 4, 128, True, "sym")
    m = GPTQLinear.from_planar({"qweight_planar": qweight, "scales": scales, "zeros": z, "perm": perm,
                                "bias": torch.randn(48, generator=rng).half().to(DEVICE)}, 4, 128, in_features=256)
    x = torch.randn(5, 256, generator=rng).to(DEVICE)
    monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
    ref = m(x)
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    calls = []
    real_old, real_new = gm.gptq_matmul, gm.gptq_gemv
    monkeypatch.setattr(gm, "gptq_matmul", lambda *a, **k: calls.append("old") or real_old(*a, **k))
    monkeypatch.setattr(gm, "gptq_gemv", lambda *a, **k: calls.append(("magic", k["sym"])) or real_new(*a, **k))
    tol = dict(rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=lambda msg: f"seed {seed}: {msg}")
    for mode, want in (("cublas", "old"), ("triton", ("magic", True))) + ((("auto", "old"),) if not CUDA else ()):
        monkeypatch.setenv("NANOQWEN_GEMV", mode)
        calls.clear()
        torch.testing.assert_close(m(x), ref, **tol)
        assert calls == [want], (mode, calls)
    monkeypatch.setenv("NANOQWEN_GEMV", "triton")
    m.zeros[0, 0] = 7  # no longer symmetric: the general path
    calls.clear()
    monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
    ref = m(x)
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    torch.testing.assert_close(m(x), ref, **tol)
    assert calls == [("magic", False)]
    calls.clear()
    m(torch.randn(65, 256, device=DEVICE))
    assert calls == ["old"]  # more rows than the magic GEMV takes


@pytest.mark.skipif(RUNNABLE, reason="the kernel tests ran in this process")
def test_in_fresh_process():
    """Run this file's kernel tests in a new interpreter process with TRITON_INTERPRET=1 set before triton loads."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"kernel tests failed in the subprocess:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
