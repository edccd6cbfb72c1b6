"""Triton kernels against their torch references, and the golden tiny model run through the kernels.

Without a GPU the kernels run in Triton's CPU interpreter (small shapes, fp32 and fp16: the interpreter's bf16
`tl.dot` is wrong); on a GPU the same tests compile them for real and add bf16. Inputs are fresh random every run:
the seed is in every assertion message, and KERNEL_TEST_SEED=<seed> replays a run.
"""

import torch

import pytest

# tests/conftest.py sets TRITON_INTERPRET=1 without a GPU before anything imports triton
from nanoqwen.kernels import activation, flash_attention, kv_store, paged_attention, rms_norm, rope
from nanoqwen.rope import MAX_NTK_INDEX, RotaryEmbedding, logn_factors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # kernels without tl.dot: bf16 is right interpreted
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
NAN = float("nan")


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


def rope_args(gen, T, head_dim, max_pos=40000, rotary_dim=None):
    """Random positions (up to long-context angles) and NTK rows for T tokens, and the model's fp32 table."""
    table = RotaryEmbedding(rotary_dim or head_dim, 10000.0).inv_freq.to(DEVICE)
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(DEVICE)
    ntk = torch.randint(0, MAX_NTK_INDEX, (T,), generator=gen).to(DEVICE)
    return rope.RopeArgs(positions, ntk, table)


# --------------------------------------------------------------------------------- RMSNorm, SiLU-mul, RoPE
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm(dtype, with_residual, rng):
    T, n = randint(rng, 1, 9), [64, 200, 4096][randint(rng, 0, 3)]  # a width off the powers of two
    x = randn(rng, T, n + 8, dtype=dtype)[:, :n]  # strided rows, as a slice of a wider activation
    residual = randn(rng, T, n, dtype=dtype) if with_residual else None
    weight = (1 + 0.1 * randn(rng, n)).to(dtype)
    eps = 1e-6
    out, total = (torch.full((T, n), NAN, dtype=dtype, device=DEVICE) for _ in range(2))
    got, got_total = rms_norm.rms_norm(x, weight, eps, residual, out=out, sum_out=total)
    ref, ref_total = rms_norm.rms_norm_ref(x, weight, eps, residual)
    assert got.data_ptr() == out.data_ptr()
    # the sum is one rounding of an exact fp32 sum: bit for bit
    torch.testing.assert_close(got_total, ref_total, rtol=0, atol=0,
                               msg=lambda m: f"rms_norm sum, {dtype}, seed {rng.initial_seed()}: {m}")
    check(got, ref, dtype, rng, f"rms_norm n={n} residual={with_residual}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_silu_mul(dtype, rng):
    T, width = randint(rng, 1, 9), [32, 300, 1500][randint(rng, 0, 3)]  # one block, several, a ragged last one
    gate_up = randn(rng, T, 2 * width + 16, dtype=dtype)[:, :2 * width] * 4  # strided rows; silu's both tails
    out = torch.full((T, width), NAN, dtype=dtype, device=DEVICE)
    got = activation.silu_mul(gate_up, out=out)
    assert got.data_ptr() == out.data_ptr()
    check(got, activation.silu_mul_ref(gate_up), dtype, rng, f"silu_mul width={width}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("partial", [False, True], ids=["full_rotary", "partial_rotary"])
def test_rotary_qk(dtype, partial, rng):
    """q and k rotated in place in the fused projection's buffer; v (the third part) untouched."""
    T, H, D = randint(rng, 1, 20), 3, [16, 64, 128][randint(rng, 0, 3)]
    args = rope_args(rng, T, D, rotary_dim=D // 2 if partial else D)
    qkv = randn(rng, T, 3, H, D, dtype=dtype)
    before = qkv.clone()
    q, k, _ = qkv.unbind(1)
    rope.rotary_qk_(q, k, *args)
    for i, name in ((0, "q"), (1, "k")):
        check(qkv[:, i], rope.rotary_ref(before[:, i], *args), dtype, rng,
              f"rotary_qk_ {name} hd={D} partial={partial}")
    assert torch.equal(qkv[:, 2], before[:, 2])


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


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_store_kv_rope(dtype, rng):
    """Keys rotated on the way into the cache: bit for bit what rotary_qk_ (tested against torch above) and the
    plain store give; values stored as they are."""
    T, H, D, block_size = 13, 3, [32, 128][randint(rng, 0, 2)], 4
    num_blocks = 9
    k, v, _ = qkv(rng, T, H, D, dtype)
    args = rope_args(rng, T, D)
    slots = torch.randperm(num_blocks * block_size, generator=rng)[:T]
    slots[torch.randperm(T, generator=rng)[:3]] = -1
    slots = slots.to(DEVICE)
    k_cache, v_cache = nan_cache(num_blocks, block_size, H, D, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_store.store_kv(k, v, k_cache, v_cache, slots, rope=args)
    k_rot = k.clone()
    rope.rotary_qk_(k_rot, k_rot.clone(), *args)
    kv_store.store_kv_ref(k_rot, v, k_ref, v_ref, slots)
    for out, ref, name in ((k_cache, k_ref, "k_cache"), (v_cache, v_ref, "v_cache")):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"store_kv rope {name}, {dtype}, seed {rng.initial_seed()}: {m}")


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


def test_flash_attn_logn_from_positions(rng):
    """LogN computed in the kernel from each query's position (prefix + row) against the factors torch computes."""
    seq_length, H, D = 8, 2, 32  # positions beyond seq_length: LogN active for most rows
    q_lens = [randint(rng, 1, 30), 1, randint(rng, 5, 30)]
    _run_flash(rng, torch.float32, H, D, q_lens, True, True, logn_seq_length=seq_length)
    _run_flash(rng, torch.float32, H, D, q_lens, False, True, logn_seq_length=seq_length)


def _run_flash(gen, dtype, H, D, q_lens, cached, use_logn, logn_seq_length=0):
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
    kernel_logn = dict(logn=logn)
    if logn_seq_length:  # the kernel computes the factors of the queries' positions itself
        starts = [c - n for c, n in zip(ctx, q_lens)] if cached else [0] * len(q_lens)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, q_lens)]).to(DEVICE)
        logn, kernel_logn = logn_factors(positions, logn_seq_length), dict(logn_seq_length=logn_seq_length)
    out = torch.full_like(q, NAN)
    got = flash_attention.flash_attn_varlen(q, k, v, cu, max(q_lens), scale, **cache,
                                            max_context_len=max_context_len, out=out, **kernel_logn)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_paged_attention_rope_logn(dtype, rng):
    """The fused decode path: q rotated (its position and NTK row) and scaled by LogN of its position in the kernel."""
    H, D = 2, [32, 128][randint(rng, 0, 2)]
    ctx = [randint(rng, 1, 120), randint(rng, 1, 40), 1]
    _run_paged(rng, dtype, H, D, ctx, False, None, positions=True)


@pytest.mark.parametrize("splits", [None, 13], ids=["auto_splits", "thirteen_splits"])
def test_paged_attention_static_grid(splits, rng, monkeypatch):
    """As a CUDA graph replays it: the grid sized for a static max_context_len far beyond every context, a padding
    row (context 0), and NaN-poisoned split workspace: each sequence must cut its own context and merge only its
    own splits (programs past them exit without writing)."""
    def poisoned(*shape, device):
        return torch.full(shape, NAN, device=device)
    monkeypatch.setattr(paged_attention, "_workspace", poisoned)
    ctx = [randint(rng, 40, 100), 0, randint(rng, 1, 31), 32]  # several splits, none, one, exactly one
    out = _run_paged(rng, torch.float32, 2, 32, ctx, True, splits, max_context_len=400)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def _run_paged(gen, dtype, H, D, ctx, use_logn, splits, positions=False, max_context_len=None):
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
    fused = dict(rope=rope_args(gen, B, D, max_pos=100), logn_seq_length=30) if positions else {}
    out = torch.full_like(q, NAN)
    got = paged_attention.paged_attention(q, k_cache, v_cache, tables, context_lens, D ** -0.5,
                                          max_context_len or max(ctx), logn, num_splits=splits, out=out, **fused)
    assert got is out
    # the reference multiplies masked positions by 0, and 0 * NaN is NaN: give it the cache with the poison zeroed
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    ref = paged_attention.paged_attention_ref(q, k_cache, v_cache, tables, context_lens, D ** -0.5, logn, **fused)
    ref[context_lens == 0] = 0.0  # a padding row: zeros by definition (the reference's softmax over nothing is NaN)
    check(out, ref, dtype, gen, f"paged_attention ctx={ctx} hd={D} block={block_size} splits={splits} "
                                f"rope/logn={positions} max_context_len={max_context_len}")
    return out


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


@pytest.mark.parametrize("name", ["fp32/forward/text", "fp32/forward/long"])  # long: NTK alpha 7 and LogN
def test_tiny_forward_through_kernels(tiny_model, tiny_ref, tiny_ref_tensors, name):
    case = tiny_ref["cases"][name]
    ids = torch.tensor([case["input_ids"]], device=DEVICE)
    with torch.no_grad():
        logits = tiny_model(ids)[0].cpu()
    assert logits.argmax(-1).tolist() == case["argmax"]
    torch.testing.assert_close(logits[case["positions"]], tiny_ref_tensors[f"{name}/logits"], rtol=0, atol=1e-4)


# long_cross_seq_length: LogN switches on while decoding; long_prefill_beyond: NTK row 1 in every fused decode step
@pytest.mark.parametrize("name", ["fp32/decode/random", "fp32/decode/long_cross_seq_length",
                                  "fp32/decode/long_prefill_beyond"])
def test_tiny_prefill_then_decode_through_kernels(tiny_model, tiny_ref, tiny_ref_tensors, rng, name):
    from conftest import run_paged

    case = tiny_ref["cases"][name]
    steps = torch.cat(run_paged(tiny_model, case["input_ids"], case["n_prefill"], generator=rng))  # shuffled blocks
    msg = lambda m: f"{name}: {m}"
    torch.testing.assert_close(steps[case["steps_with_full_logits"]], tiny_ref_tensors[f"{name}/step_logits"],
                               rtol=0, atol=1e-4, msg=msg)
    for i, (top_ids, top_logits) in enumerate(zip(case["top10_ids"], case["top10_logits"])):
        assert steps[i].argmax().item() == top_ids[0], f"{name} step {i}"
        torch.testing.assert_close(steps[i][top_ids], torch.tensor(top_logits), rtol=0, atol=1e-4, msg=msg)


def test_gptq_generate_through_kernels(golden, monkeypatch):
    """GPTQ linears in the fused decode path: the golden int4 greedy tokens, prefill and every decode step through
    the kernels (fp32 activations)."""
    import json
    from nanoqwen import LLM, SamplingParams
    folder = golden / "qwen-tiny-int4"
    case = json.loads((folder / "reference.json").read_text())["cases"]["gptq/generate/text"]
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    llm = LLM(folder / "checkpoint", device=DEVICE, dtype=torch.float32, num_kv_blocks=64, progress=False)
    out = llm.generate(case["input_ids"], SamplingParams(temperature=0, repetition_penalty=case["repetition_penalty"],
                                                         max_new_tokens=case["max_new_tokens"]))
    assert out.token_ids == case["output_ids"]
