"""The multi-LoRA kernels (shrink, expand) against their torch references, and the references against a per-row
float64 computation of y + scale * B (A x).

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1; small shapes,
fp32 and fp16: the interpreter's bf16 tl.dot is wrong); on a GPU the same tests compile them and add bf16. Inputs are
fresh random every run: the seed is in every assertion message, and KERNEL_TEST_SEED=<seed> replays a run.
"""

import pytest
import torch

from nanoqwen.kernels import lora as kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # as tests/test_kernels.py
NAN = float("nan")


def randint(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def batch_indices(gen, L, T):
    """Slots as a batch lays them out: runs of one slot (prefill chunks), single rows of mixed slots (decodes), -1
    rows (no adapter); the largest slot L - 1 always appears, and the rows are cut at T."""
    idx = []
    while len(idx) < T:
        slot = randint(gen, -1, L)
        idx += [slot] * (randint(gen, 1, 20) if randint(gen, 0, 2) else 1)
    idx = torch.tensor(idx[:T])
    idx[randint(gen, 0, T)] = L - 1
    return idx


def problem(gen, dtype, T, K, N, L, S, R):
    """x [T, K], A [L, S*R, K], B [L, N, R], scales [L, S], y [T, N], indices [T]; magnitudes near 1."""
    x = torch.randn(T, K, generator=gen)
    a = torch.randn(L, S * R, K, generator=gen) / K ** 0.5
    b = torch.randn(L, N, R, generator=gen) / R ** 0.5
    scales = torch.rand(L, S, generator=gen) * 2
    y = torch.randn(T, N, generator=gen)
    to = lambda t: t.to(dtype=dtype, device=DEVICE)  # noqa: E731
    return to(x), to(a), to(b), scales.to(DEVICE), to(y), batch_indices(gen, L, T).to(DEVICE)


def sizes(gen):
    """Shapes that are not multiples of any tile: T rows, K in, N out (a multiple of the S slices), L slots."""
    S = randint(gen, 1, 3)
    return dict(T=randint(gen, 1, 70), K=randint(gen, 20, 100), N=S * randint(gen, 10, 50), L=randint(gen, 1, 5), S=S,
                R=[16, 32][randint(gen, 0, 2)])


def check(out, ref, dtype, gen, what):
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}, {dtype}, seed {gen.initial_seed()}: {m}")


def per_row(x, a, b, scales, y, idx):
    """float64, one row at a time: the definition."""
    L, N, R = b.shape
    S = scales.shape[1]
    out = y.double().clone()
    for t, i in enumerate(idx.tolist()):
        if i < 0:
            continue
        for j in range(S):
            cols = slice(j * N // S, (j + 1) * N // S)
            v = a[i, j * R:(j + 1) * R].double() @ x[t].double()
            out[t, cols] += float(scales[i, j]) * (b[i, cols].double() @ v)
    return out


def test_references_are_the_definition(rng):
    p = sizes(rng)
    x, a, b, scales, y, idx = problem(rng, torch.float32, **p)
    ref = kl.lora_expand_ref(y, kl.lora_shrink_ref(x, a, idx), b, scales, idx)
    torch.testing.assert_close(ref.double(), per_row(x, a, b, scales, y, idx), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"references {p}, seed {rng.initial_seed()}: {m}")
    assert torch.equal(ref[idx < 0], y[idx < 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_shrink(dtype, rng):
    p = sizes(rng)
    x, a, _, _, _, idx = problem(rng, dtype, **p)
    out = torch.full((p["T"], p["S"] * p["R"]), NAN, device=DEVICE)  # poisoned: unwritten rows fail
    got = kl.lora_shrink(x, a, idx, out=out)
    assert got is out
    check(out, kl.lora_shrink_ref(x, a, idx), dtype, rng, f"lora_shrink {p} indices {idx.tolist()}")
    assert torch.equal(out[idx < 0], torch.zeros_like(out[idx < 0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_expand(dtype, in_place, rng):
    p = sizes(rng)
    x, a, b, scales, y, idx = problem(rng, dtype, **p)
    v = kl.lora_shrink_ref(x, a, idx)
    ref = kl.lora_expand_ref(y, v, b, scales, idx)
    out = y.clone() if in_place else torch.full_like(y, NAN)
    got = kl.lora_expand(out if in_place else y, v, b, scales, idx, out=out)
    assert got is out
    check(out, ref, dtype, rng, f"lora_expand {p} in_place={in_place} indices {idx.tolist()}")
    assert torch.equal(out[idx < 0], y[idx < 0]), "rows without an adapter must be y exactly"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_add_lora_decode_batch(dtype, rng, monkeypatch):
    """A decode-shaped batch (one row per sequence, adapters mixed, rank padding zero) through add_lora's kernel path,
    against the per-row definition."""
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    T, K, N, L, S, R = randint(rng, 1, 33), 64, 96, 4, 2, 16
    x, a, b, scales, y, _ = problem(rng, dtype, T, K, N, L, S, R)
    a[:, 8:16].zero_()  # rank-8 adapters in rank-16 slots: the padding rows and columns are zero
    b[:, :, 8:].zero_()
    idx = torch.randint(-1, L, (T,), generator=rng).to(DEVICE)
    want = per_row(x, a, b, scales, y, idx)
    got = kl.add_lora(x, y.clone(), a, b, scales, idx)
    check(got, want, dtype, rng, f"add_lora T={T} indices {idx.tolist()}")


def test_no_adapter_rows_leave_y_alone(rng):
    T, K, N = 20, 48, 40
    x, a, b, scales, y, _ = problem(rng, torch.float32, T, K, N, 2, 1, 16)
    idx = torch.full((T,), -1, device=DEVICE)
    v = kl.lora_shrink(x, a, idx, out=torch.full((T, 16), NAN, device=DEVICE))
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.equal(kl.lora_expand(y, v, b, scales, idx, out=torch.full_like(y, NAN)), y)


def test_shape_errors_name_the_shapes():
    x = torch.zeros(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"lora_shrink: x \[3, 8\], lora_a \[2, 16, 9\]"):
        kl.lora_shrink(x, torch.zeros(2, 16, 9, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"lora_expand: y \[3, 10\].*lora_b \[2, 12, 16\]"):
        kl.lora_expand(torch.zeros(3, 10, device=DEVICE), torch.zeros(3, 16, device=DEVICE),
                       torch.zeros(2, 12, 16, device=DEVICE), torch.zeros(2, 1, device=DEVICE),
                       torch.zeros(3, dtype=torch.int32, device=DEVICE))
