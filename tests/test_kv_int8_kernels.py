"""int8 KV cache through the Triton kernels: the fused quantizing store (default and qwen modes) and the prefill and
decode attention kernels reading a uint8 cache, each against its torch reference; then the golden tiny model end to
end with NANOQWEN_KERNELS=triton.

Without a GPU the kernels run in Triton's CPU interpreter (fp32 and fp16 attention; bf16 only for the store, which
has no `tl.dot`). Inputs are fresh random every run: the seed is in every message, KERNEL_TEST_SEED=<seed> replays.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest does it too)

import pytest

from nanoqwen.kv_cache import KVCache
from nanoqwen.quant.kv_int8 import store_kv_int8_ref
from test_kernels import (DEVICE, DTYPES, NAN, check, paged_layout, qkv, randint, randn,  # noqa: F401
                          rope_args, slots_of)
from conftest import int8_noise_envelope
from test_kv_int8 import argmax_within_noise, model, run_int8, within_noise  # noqa: F401  (model: fp32, CPU)

from nanoqwen.kernels import flash_attention, kv_store, paged_attention, rope

STORE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the store has no tl.dot: bf16 is right interpreted


FIELDS = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")


def int8_cache(num_blocks, block_size, heads, head_dim, dtype, mode, gen):
    """A LayerCache whose values are random bytes and whose scales and zeros are NaN: anything the store forgets to
    write, or attention reads past a context, shows."""
    cache = KVCache(1, num_blocks, block_size, heads, head_dim, dtype, DEVICE, "int8", mode).layer(0)
    for t in (cache.k, cache.v):
        t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
    for t in (cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero):
        t.fill_(NAN)
    return cache


def clone_cache(cache):
    return cache._replace(**{f: getattr(cache, f).clone() for f in FIELDS})


def quant_args(cache, nan_to_num=False):
    fields = ("k_scale", "k_zero", "v_scale", "v_zero")
    return {f: getattr(cache, f).nan_to_num(0.0) if nan_to_num else getattr(cache, f) for f in fields}


# ---------------------------------------------------------------------------------------------- int8 KV store
@pytest.mark.parametrize("dtype", STORE_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["default", "qwen"])
def test_store_kv_int8(mode, dtype, rng):
    """Bit-exact against the reference (both divide IEEE-rounded, round half to even / truncate identically): q
    bytes, scales and zeros equal, and every slot not written (slot -1, spare slots) untouched."""
    H, D, block_size = 3, [16, 32, 64][randint(rng, 0, 3)], 4
    seq_lens = [1, 0, randint(rng, 2, 30), randint(rng, 1, 12)]  # a decode row, an empty sequence, chunks
    T = sum(seq_lens)
    cu = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32).to(DEVICE)
    k, v = (randn(rng, T, 3, H, D, dtype=dtype) * 3 + 0.5).unbind(1)[1:]  # off-centre; strided, as the model's
    if mode == "default":  # a constant row: scale clamps to 1e-8, q = 0 (fp16 scales: zero must stay finite)
        k[0, 1] = 0.25 if dtype == torch.float32 else 0.0
    num_blocks = T // block_size + 4
    slots = torch.randperm(num_blocks * block_size, generator=rng)[:T]
    slots[torch.randperm(T, generator=rng)[:3]] = -1  # padding rows: not stored (in qwen mode still in the min/max)
    slots = slots.to(DEVICE)
    cache = int8_cache(num_blocks, block_size, H, D, dtype, mode, rng)
    ref = clone_cache(cache)
    kv_store.store_kv_int8(k, v, cache, slots, mode, cu)
    store_kv_int8_ref(k, v, ref, slots, mode, cu)
    for name in FIELDS:
        torch.testing.assert_close(getattr(cache, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"store_kv_int8 {mode} {name}, {dtype}, hd {D}, "
                                                 f"seq_lens {seq_lens}, seed {rng.initial_seed()}: {m}")


@pytest.mark.parametrize("dtype", STORE_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["default", "qwen"])
def test_store_kv_int8_rope(mode, dtype, rng):
    """Keys rotated on the way in (the decode path): bit for bit the reference store of the keys rotary_qk_ rotates
    (tested against torch in test_kernels.py), in both modes; decode-like one-token chunks and a longer one."""
    H, D, block_size = 3, [32, 128][randint(rng, 0, 2)], 4
    seq_lens = [1, 1, randint(rng, 2, 12)]
    T = sum(seq_lens)
    cu = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32).to(DEVICE)
    k, v = (randn(rng, T, 3, H, D, dtype=dtype) * 3 + 0.5).unbind(1)[1:]
    args = rope_args(rng, T, D)
    num_blocks = T // block_size + 4
    slots = torch.randperm(num_blocks * block_size, generator=rng)[:T]
    slots[randint(rng, 0, T)] = -1
    slots = slots.to(DEVICE)
    cache = int8_cache(num_blocks, block_size, H, D, dtype, mode, rng)
    ref = clone_cache(cache)
    kv_store.store_kv_int8(k, v, cache, slots, mode, cu, rope=args)
    k_rot = k.clone()
    rope.rotary_qk_(k_rot, k_rot.clone(), *args)
    store_kv_int8_ref(k_rot, v, ref, slots, mode, cu)
    for name in FIELDS:
        torch.testing.assert_close(getattr(cache, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"store_kv_int8 rope {mode} {name}, {dtype}, hd {D}, "
                                                 f"seq_lens {seq_lens}, seed {rng.initial_seed()}: {m}")


def test_store_kv_int8_rounds_half_to_even():
    """A row spanning 0..255 has scale 1 and zero 0, so t + 0.5 is an exact tie: torch.round goes to even."""
    ties = torch.arange(126, dtype=torch.float32) + 0.5  # 0.5, 1.5, .. 125.5
    k = torch.stack([torch.cat([torch.tensor([0.0, 255.0]), ties + 128 * h]) for h in range(2)])[None].to(DEVICE)
    cache = KVCache(1, 2, 4, 2, 128, torch.float32, DEVICE, "int8").layer(0)
    ref = clone_cache(cache)
    slots = torch.tensor([5], device=DEVICE)
    kv_store.store_kv_int8(k, k, cache, slots)
    store_kv_int8_ref(k, k, ref, slots, "default", None)
    assert torch.equal(cache.k_scale[1, 1], torch.ones(2, device=DEVICE)), cache.k_scale[1, 1]
    even = (2 * torch.floor((k[0, :, 2:] + 0.5) / 2)).to(torch.uint8)  # t + 0.5 -> the even one of t, t + 1
    assert torch.equal(cache.k[1, 1, :, 2:], even) and torch.equal(cache.k, ref.k)
    assert torch.equal(cache.k_zero, ref.k_zero) and torch.equal(cache.v, ref.v)


# --------------------------------------------------------------------------------- prefill over an int8 cache
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("use_logn", [False, True], ids=["plain", "logn"])
def test_flash_attn_varlen_int8(dtype, use_logn, rng):
    """Chunks over a cached prefix (some sequences without one), shuffled blocks, lengths off the tile sizes."""
    H, D = 3, [16, 32, 64][randint(rng, 0, 3)]
    q_lens = [1, randint(rng, 17, 40)] + randint(rng, 1, 30, 3)
    q_lens = [q_lens[i] for i in torch.randperm(len(q_lens), generator=rng).tolist()]
    T = sum(q_lens)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(DEVICE)
    q, k, v = qkv(rng, T, H, D, dtype)
    logn = (1 + torch.rand(T, generator=rng)).to(DEVICE) if use_logn else None
    block_size = [4, 16][randint(rng, 0, 2)]
    prefix = [0 if i % 3 == 0 else randint(rng, 1, 40) for i in range(len(q_lens))]
    ctx = [p + n for p, n in zip(prefix, q_lens)]
    num_blocks, tables = paged_layout(rng, ctx, block_size)
    cache = int8_cache(num_blocks, block_size, H, D, dtype, "default", rng)
    old = sum((slots_of(tables, block_size, i, range(p)) for i, p in enumerate(prefix)), [])
    old_k, old_v = randn(rng, len(old), H, D, dtype=dtype), randn(rng, len(old), H, D, dtype=dtype)
    store_kv_int8_ref(old_k, old_v, cache, torch.tensor(old, device=DEVICE), "default", None)  # the prefix
    new = torch.tensor(sum((slots_of(tables, block_size, i, range(p, c))
                            for i, (p, c) in enumerate(zip(prefix, ctx))), []), device=DEVICE)
    store_kv_int8_ref(k, v, cache, new, "default", None)  # the chunk, stored before attention
    args = dict(k_cache=cache.k, v_cache=cache.v, block_tables=tables.to(DEVICE),
                context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEVICE))
    out = torch.full_like(q, NAN)
    got = flash_attention.flash_attn_varlen(q, k, v, cu, max(q_lens), D ** -0.5, **args, max_context_len=max(ctx),
                                            logn=logn, **quant_args(cache), out=out)
    assert got is out
    ref = flash_attention.flash_attn_varlen_ref(q, k, v, cu, D ** -0.5, **args, logn=logn, **quant_args(cache))
    check(out, ref, dtype, rng, f"flash_attn_varlen int8 q_lens={q_lens} prefix={prefix} hd={D} block={block_size}")


# ---------------------------------------------------------------------------------- decode over an int8 cache
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("use_logn,splits", [(False, None), (True, 1), (True, 5), ("positions", None)],
                         ids=["plain-auto_splits", "logn-one_split", "logn-five_splits", "rope_logn_fused"])
def test_paged_attention_int8(dtype, use_logn, splits, rng):
    H, D = 3, [16, 32, 64][randint(rng, 0, 3)]
    ctx = [1, randint(rng, 100, 160)] + randint(rng, 1, 60, 3)  # the long one spans many blocks and splits
    B, block_size = len(ctx), [4, 16][randint(rng, 0, 2)]
    num_blocks, tables = paged_layout(rng, ctx, block_size)
    cache = int8_cache(num_blocks, block_size, H, D, dtype, "default", rng)
    slots = torch.tensor(sum((slots_of(tables, block_size, i, range(c)) for i, c in enumerate(ctx)), []), device=DEVICE)
    store_kv_int8_ref(randn(rng, len(slots), H, D, dtype=dtype), randn(rng, len(slots), H, D, dtype=dtype), cache,
                      slots, "default", None)
    q = randn(rng, B, 3, H, D, dtype=dtype)[:, 0]  # strided, as the model's q
    tables = tables.clamp(min=0).to(DEVICE)  # the reference gathers whole rows: entries past a context must be valid
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    logn = (1 + torch.rand(B, generator=rng)).to(DEVICE) if use_logn is True else None
    # the fused decode path: q rotated and scaled by LogN of its position inside the kernel
    fused = dict(rope=rope_args(rng, B, D, max_pos=100), logn_seq_length=30) if use_logn == "positions" else {}
    out = torch.full_like(q, NAN)
    got = paged_attention.paged_attention(q, cache.k, cache.v, tables, context_lens, D ** -0.5, max(ctx), logn,
                                          **quant_args(cache), num_splits=splits, out=out, **fused)
    assert got is out
    # the reference multiplies masked positions by 0, and 0 * NaN is NaN: give it the scales with the poison zeroed
    ref = paged_attention.paged_attention_ref(q, cache.k, cache.v, tables, context_lens, D ** -0.5, logn,
                                              **quant_args(cache, nan_to_num=True), **fused)
    check(out, ref, dtype, rng, f"paged_attention int8 ctx={ctx} hd={D} block={block_size} splits={splits}")


# ------------------------------------------------------------------------------- golden tiny model, end to end
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="the golden model fixture (test_kv_int8.py) lives on the CPU")


@cpu_only
def test_qwen_mode_forward_through_kernels(model, tiny_ref, tiny_ref_tensors, monkeypatch):
    """As test_kv_int8.test_qwen_mode_forward: golden and ours within the simulated truncation noise."""
    case = tiny_ref["cases"]["kv_int8/forward/text"]
    ids = case["input_ids"]
    center, spread = int8_noise_envelope(model, ids, len(ids), "qwen", positions=list(range(len(ids))))
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    ours = run_int8(model, ids, len(ids), "qwen", all_logits=True)[0]
    within_noise(ours, center, spread, "ours through the kernels")
    argmax_within_noise(center, ours.argmax(-1).tolist(), spread, "our argmax through the kernels")


@cpu_only
def test_qwen_mode_decode_through_kernels(model, tiny_ref, tiny_ref_tensors, monkeypatch):
    """As test_kv_int8.test_qwen_mode_decode: our steps through the kernels within the simulated truncation noise,
    and their argmaxes where the margin allows."""
    case = tiny_ref["cases"]["kv_int8/decode/random"]
    ids, n = case["input_ids"], case["n_prefill"]
    center, spread = int8_noise_envelope(model, ids, n, "qwen")
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    ours = torch.cat(run_int8(model, ids, n, "qwen"))
    within_noise(ours, center, spread, "ours through the kernels")
    argmax_within_noise(center, [t[0] for t in case["top10_ids"]], spread, "golden argmax")
    argmax_within_noise(center, ours.argmax(-1).tolist(), spread, "our argmax through the kernels")


@cpu_only
def test_default_mode_kernels_match_torch_path(model, tiny_ref, monkeypatch):
    """Default mode has no golden data: the kernels (bit-exact store, fp32 attention) against the torch path. Rounding
    to nearest flips a value that lands within an ulp of a half step, so both are held to the simulated noise."""
    case = tiny_ref["cases"]["kv_int8/decode/random"]
    ids, n = case["input_ids"][:16], case["n_prefill"]
    center, spread = int8_noise_envelope(model, ids, n, "default")
    monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
    expect = torch.cat(run_int8(model, ids, n, "default"))
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    got = torch.cat(run_int8(model, ids, n, "default"))
    within_noise(expect, center, spread, "torch path")
    within_noise(got, center, spread, "kernels")


def test_qwen_mode_generate_through_kernels(tiny_ckpt, model, tiny_ref, monkeypatch):
    """As test_kv_int8.test_qwen_mode_generate: the golden tokens up to the first step the noise could decide."""
    from nanoqwen import LLM, SamplingParams
    case = tiny_ref["cases"]["kv_int8/generate/text"]
    prompt, expect = case["input_ids"], case["output_ids"]
    center, spread = int8_noise_envelope(model, prompt + expect[:-1], len(prompt), "qwen")
    sure = argmax_within_noise(center, expect, spread, "golden tokens")
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    llm = LLM(tiny_ckpt, device=DEVICE, dtype=torch.float32, num_kv_blocks=64, kv_cache_dtype="int8",
              kv_quant_mode="qwen")
    out = llm.generate(prompt, SamplingParams(temperature=0, repetition_penalty=case["repetition_penalty"],
                                              max_new_tokens=case["max_new_tokens"]))
    first_open = next((t for t in range(len(expect)) if t not in sure), len(expect))
    assert out.token_ids[:first_open] == expect[:first_open]
