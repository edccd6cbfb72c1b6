"""Triton kernels against their torch references, and the golden tiny model run through the kernels.

Without a GPU the kernels run in Triton's CPU interpreter (small shapes, fp32 and fp16: the interpreter's bf16
`tl.dot` is wrong); on a GPU the same tests compile them for real and add bf16. Inputs are fresh random every run:
the seed is in every assertion message, and KERNEL_TEST_SEED=<seed> replays a run.
"""
import os

import torch

import pytest

# tests/conftest.py sets TRITON_INTERPRET=1 without a GPU before anything imports triton
from nanoqwen.kernels import flash_attention, kv_store, paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
NAN = float("nan")


@pytest.fixture
def rng():
    """A fresh seed every run (`initial_seed()` is quoted in the messages); KERNEL_TEST_SEED=<seed> replays one."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"KERNEL_TEST_SEED={seed}")  # shown with any failure, an exception included
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def randint(gen, lo, hi, n=None):
    if n is None:
        return int(torch.randint(lo, hi, (1,), generator=gen))
    return torch.randint(lo, hi, (n,), generator=gen).tolist()


def check(out, ref, dtype, gen, what):
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}, {dtype}, seed {gen.initial_seed()}: {m}")


def paged_layout(gen, ctx_lens, block_size, spare=5):
    """Block tables over shuffled, non-contiguous blocks (spare blocks unused); padded with -1 entries."""
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(ctx_lens), max(need) + 1), -1, dtype=torch.int32)  # -1 entries are never read
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return num_blocks, tables


def slots_of(tables, block_size, seq, positions):
    return [int(tables[seq, p // block_size]) * block_size + p % block_size for p in positions]


def nan_cache(num_blocks, block_size, heads, head_dim, dtype):
    """A cache that is NaN wherever nothing was stored: reading past a context poisons the result."""
    return (torch.full((num_blocks, block_size, heads, head_dim), NAN, dtype=dtype, device=DEVICE) for _ in range(2))


def qkv(gen, T, heads, head_dim, dtype):
    """q, k, v [T, heads, head_dim] as the model makes them: strided views of one fused projection."""
    return randn(gen, T, 3, heads, head_dim, dtype=dtype).unbind(1)


# ---------------------------------------------------------------------------------------------------- KV store
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_store_kv(dtype, rng):
    T, H, D, block_size = 23, 3, 32, 4
    num_blocks = 9
    k, v, _ = qkv(rng, T, H, D, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=rng)[:T]
    slots[torch.randperm(T, generator=rng)[:4]] = -1  # padding rows: must not be written
    slots = slots.to(DEVICE)
    k_cache, v_cache = nan_cache(num_blocks, block_size, H, D, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_store.store_kv(k, v, k_cache, v_cache, slots)
    kv_store.store_kv_ref(k, v, k_ref, v_ref, slots)
    for out, ref, name in ((k_cache, k_ref, "k_cache"), (v_cache, v_ref, "v_cache")):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"store_kv {name}, {dtype}, seed {rng.initial_seed()}: {m}")


# ----------------------------------------------------------------------------------------- varlen prefill
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cached", [False, True], ids=["no_cache", "cached_prefix"])
@pytest.mark.parametrize("use_logn", [False, True], ids=["plain", "logn"])
def test_flash_attn_varlen(dtype, cached, use_logn, rng):
    H = 3
    D = [16, 32, 64, 128][randint(rng, 0, 4)]  # one head dim a run; test_flash_attn_head_dims covers them all
    q_lens = [1, randint(rng, 17, 50)] + randint(rng, 1, 40, 5)  # length 1, beyond several tiles, many sequences
    q_lens = [q_lens[i] for i in torch.randperm(len(q_lens), generator=rng).tolist()]
    _run_flash(rng, dtype, H, D, q_lens, cached, use_logn)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_flash_attn_head_dims(head_dim, rng):
    _run_flash(rng, torch.float32, 2, head_dim, [randint(rng, 1, 40), 1, randint(rng, 1, 40)], True, True)


def _run_flash(gen, dtype, H, D, q_lens, cached, use_logn):
    T = sum(q_lens)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(DEVICE)
    q, k, v = qkv(gen, T, H, D, dtype)
    logn = (1 + torch.rand(T, generator=gen)).to(DEVICE) if use_logn else None
    scale = D ** -0.5
    cache, max_context_len = {}, 0
    if cached:
        block_size = [4, 16][randint(gen, 0, 2)]
        prefix = [0 if i % 3 == 0 else randint(gen, 1, 45) for i in range(len(q_lens))]  # some with no prefix
        ctx = [p + n for p, n in zip(prefix, q_lens)]
        num_blocks, tables = paged_layout(gen, ctx, block_size)
        k_cache, v_cache = nan_cache(num_blocks, block_size, H, D, dtype)
        slots = sum((slots_of(tables, block_size, i, range(c)) for i, c in enumerate(ctx)), [])
        old_k, old_v = randn(gen, len(slots), H, D, dtype=dtype), randn(gen, len(slots), H, D, dtype=dtype)
        slots = torch.tensor(slots, device=DEVICE)
        kv_store.store_kv_ref(old_k, old_v, k_cache, v_cache, slots)  # the prefix
        new_slots = torch.tensor(sum((slots_of(tables, block_size, i, range(p, c))
                                      for i, (p, c) in enumerate(zip(prefix, ctx))), []), device=DEVICE)
        kv_store.store_kv_ref(k, v, k_cache, v_cache, new_slots)  # the chunk, stored before attention
        cache = dict(k_cache=k_cache, v_cache=v_cache, block_tables=tables.to(DEVICE),
                     context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEVICE))
        max_context_len = max(ctx)
    out = torch.full_like(q, NAN)
    got = flash_attention.flash_attn_varlen(q, k, v, cu, max(q_lens), scale, **cache,
                                            max_context_len=max_context_len, logn=logn, out=out)
    assert got is out
    ref = flash_attention.flash_attn_varlen_ref(q, k, v, cu, scale, **cache, logn=logn)
    check(out, ref, dtype, gen, f"flash_attn_varlen q_lens={q_lens} hd={D} cached={cached} logn={use_logn}")


# -------------------------------------------------------------------------------------------- paged decode
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("use_logn", [False, True], ids=["plain", "logn"])
@pytest.mark.parametrize("splits", [None, 1, 5], ids=["auto_splits", "one_split", "five_splits"])
def test_paged_attention(dtype, use_logn, splits, rng):
    H, D = 3, [16, 32, 64, 128][randint(rng, 0, 4)]
    ctx = [1, randint(rng, 100, 200)] + randint(rng, 1, 80, 5)  # a long context spans many blocks and splits
    _run_paged(rng, dtype, H, D, ctx, use_logn, splits)


def test_paged_attention_auto_splits_small_batch(rng):
    """Few (sequence, head) programs: the default must pick the split-KV path, and it must be right."""
    H, ctx = 2, [randint(rng, 150, 260), 1]
    splits = paged_attention.num_kv_splits(len(ctx), H, max(ctx), paged_attention._tiles(32)[2], torch.device(DEVICE))
    if DEVICE == "cpu":
        assert splits > 1
    _run_paged(rng, torch.float32, H, 32, ctx, True, None)


def _run_paged(gen, dtype, H, D, ctx, use_logn, splits):
    B, block_size = len(ctx), [4, 16][randint(gen, 0, 2)]
    num_blocks, tables = paged_layout(gen, ctx, block_size)
    k_cache, v_cache = nan_cache(num_blocks, block_size, H, D, dtype)
    slots = torch.tensor(sum((slots_of(tables, block_size, i, range(c)) for i, c in enumerate(ctx)), []), device=DEVICE)
    kv_store.store_kv_ref(randn(gen, len(slots), H, D, dtype=dtype), randn(gen, len(slots), H, D, dtype=dtype),
                          k_cache, v_cache, slots)
    q = randn(gen, B, 3, H, D, dtype=dtype)[:, 0]  # strided, as the model's q
    tables = tables.clamp(min=0).to(DEVICE)  # the reference gathers whole rows: entries past a context must be valid
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    logn = (1 + torch.rand(B, generator=gen)).to(DEVICE) if use_logn else None
    out = torch.full_like(q, NAN)
    got = paged_attention.paged_attention(q, k_cache, v_cache, tables, context_lens, D ** -0.5, max(ctx), logn,
                                          num_splits=splits, out=out)
    assert got is out
    # the reference multiplies masked positions by 0, and 0 * NaN is NaN: give it the cache with the poison zeroed
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    ref = paged_attention.paged_attention_ref(q, k_cache, v_cache, tables, context_lens, D ** -0.5, logn)
    check(out, ref, dtype, gen, f"paged_attention ctx={ctx} hd={D} block={block_size} splits={splits}")


def test_paged_attention_empty_context_is_zero():
    """A zero-length context (a padding row of a CUDA-graph batch) gives zeros, not NaN, on both paths."""
    k_cache, v_cache = nan_cache(3, 4, 2, 16, torch.float32)
    k_cache[1, :2], v_cache[1, :2] = 1.0, 2.0
    q = torch.ones(2, 2, 16, device=DEVICE)
    tables = torch.tensor([[0, 2], [1, 0]], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = paged_attention.paged_attention(q, k_cache, v_cache, tables, context_lens, 0.25, 8, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1], torch.full_like(out[1], 2.0))


# ------------------------------------------------------------------------------- golden tiny model, end to end
@pytest.fixture
def tiny_model(golden, monkeypatch):
    from nanoqwen.model import Qwen
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    return Qwen.from_pretrained(golden / "qwen-tiny" / "checkpoint", device=DEVICE, dtype=torch.float32)


def test_tiny_forward_through_kernels(tiny_model, tiny_ref, tiny_ref_tensors):
    case = tiny_ref["cases"]["fp32/forward/text"]
    ids = torch.tensor([case["input_ids"]], device=DEVICE)
    with torch.no_grad():
        logits = tiny_model(ids)[0].cpu()
    assert logits.argmax(-1).tolist() == case["argmax"]
    torch.testing.assert_close(logits[case["positions"]], tiny_ref_tensors["fp32/forward/text/logits"],
                               rtol=0, atol=1e-4)


def test_tiny_prefill_then_decode_through_kernels(tiny_model, tiny_ref, tiny_ref_tensors, rng):
    from conftest import run_paged

    name = "fp32/decode/random"
    case = tiny_ref["cases"][name]
    steps = torch.cat(run_paged(tiny_model, case["input_ids"], case["n_prefill"], generator=rng))  # shuffled blocks
    msg = lambda m: f"{name}: {m}"
    torch.testing.assert_close(steps[case["steps_with_full_logits"]], tiny_ref_tensors[f"{name}/step_logits"],
                               rtol=0, atol=1e-4, msg=msg)
    for i, (top_ids, top_logits) in enumerate(zip(case["top10_ids"], case["top10_logits"])):
        assert steps[i].argmax().item() == top_ids[0], f"{name} step {i}"
        torch.testing.assert_close(steps[i][top_ids], torch.tensor(top_logits), rtol=0, atol=1e-4, msg=msg)
