"""Tensor parallelism, the model side: the split (plans, GPTQ group boundaries), each rank's slices compared exactly
with the single-process model's weights, and the sharded forward on 2 and 4 CPU processes (gloo) against the
single-process logits and the golden reference.

Tolerances. A sharded forward computes the same sums as the single-process one, in another order: a row-parallel
layer adds per-rank partial sums, and matmuls of other shapes may block their sums differently. Both results are
therefore within this forward's floating-point rounding error of the exact value. That error is measured, not
guessed: `e32` = max |single-process fp32 - single-process fp64| over the model's cases (fp64 stands in for exact),
so |tensor-parallel fp32 - single-process fp32| <= 2 * e32. The same forward in fp64 has errors 2^-29 times
smaller (rounding error is proportional to the unit roundoff, 2^-53 against 2^-24), so the fp64 runs must agree to
2 * e32 * 2^-29. A sharding bug (a wrong slice, a bias added twice, a missing all-reduce) moves logits by 1e-3 or more.
"""
import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoqwen import Qwen
from nanoqwen.checkpoint import OFFICIAL_QUANTIZED, convert, load_model
from nanoqwen.config import QwenConfig
from nanoqwen.distributed import ShardPlan, TPGroup, check_tensor_parallel, split_evenly
from nanoqwen.kernels.gptq_matmul import pack_planar, unpack_planar
from nanoqwen.quant.gptq import GPTQLinear, planar_word_rows, slice_planar_rows
from nanoqwen.testing import random_official_state_dict, tiny_config, write_official_checkpoint
from test_gptq import quantize_official

FP64_OVER_FP32 = 2.0 ** -29  # unit roundoff of fp64 over fp32's


# ----------------------------------------------------------------------------------------------- checkpoints

def write_gptq_checkpoint(folder, bits: int, group_size: int, act_order: bool, seed: int, vocab_file, **dims):
    """A random GPTQ checkpoint in the official layout (AutoGPTQ's packing, via test_gptq.quantize_official), every
    quantized linear with a random bias (so that a bias added on every rank shows), converted; returns the
    converted folder. w1 and w2 share their g_idx, as they do in real act-order checkpoints (same input)."""
    cfg = tiny_config(**dims)
    sd = random_official_state_dict(cfg, seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.half() for k, v in sd.items() if not any(f".{lin}." in k for lin in OFFICIAL_QUANTIZED)}
    for i in range(cfg.num_hidden_layers):
        mlp_order = torch.randperm(cfg.hidden_size, generator=gen) if act_order else None
        for lin in OFFICIAL_QUANTIZED:
            p = f"transformer.h.{i}.{lin}."
            w = sd[p + "weight"]
            order = mlp_order if lin in ("mlp.w1", "mlp.w2") else None
            qweight, qzeros, scales, g_idx, _ = quantize_official(w, bits, group_size, act_order, gen=gen, order=order)
            out.update({p + "qweight": qweight, p + "qzeros": qzeros, p + "scales": scales, p + "g_idx": g_idx,
                        p + "bias": (0.02 * torch.randn(w.shape[0], generator=gen)).half()})
    qcfg = dict(bits=bits, group_size=group_size, desc_act=act_order, sym=True, quant_method="gptq")
    official = write_official_checkpoint(folder / "official", tiny_config(**dims, quantization_config=qcfg), out,
                                         vocab_file=vocab_file)
    return convert(official, folder / "converted")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, golden, qwen_tiktoken):
    """Converted checkpoints: the golden tiny fp, int4, int8 models, and random GPTQ ones: 3 MLP groups (odd: an
    uneven split at N = 2), and act-order with 4 MLP groups."""
    base = tmp_path_factory.mktemp("tp_ckpts")
    out = {name: convert(golden / name / "checkpoint", base / name) for name in
           ("qwen-tiny", "qwen-tiny-int4", "qwen-tiny-int8")}
    small = dict(vocab_size=4096, hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2)
    out["gptq-odd-groups"] = write_gptq_checkpoint(base / "odd", 4, 32, False, 1, qwen_tiktoken,
                                                   intermediate_size=2 * 96, **small)
    out["gptq-act-order"] = write_gptq_checkpoint(base / "act", 8, 32, True, 2, qwen_tiktoken,
                                                  intermediate_size=2 * 128, **small)
    return out


# ----------------------------------------------------------------------------------------------- the split

def test_split_evenly():
    for n in (1, 7, 107, 128):
        for parts in (1, 2, 3, 4):
            if parts > n:
                continue
            ranges = split_evenly(n, parts)
            sizes = [b - a for a, b in ranges]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def qwen14b_int4_config() -> QwenConfig:
    """Qwen-14B-Chat-Int4's shape (its config.json values)."""
    return QwenConfig.from_dict(dict(hidden_size=5120, num_attention_heads=40, num_hidden_layers=40,
                                     kv_channels=128, intermediate_size=27392, vocab_size=152064, seq_length=2048,
                                     quantization_config=dict(bits=4, group_size=128, desc_act=False, sym=True,
                                                              quant_method="gptq")))


@pytest.mark.parametrize("world", [2, 4, 5, 8])
def test_qwen14b_int4_splits_on_group_boundaries(world):
    """vllm-project/vllm#2699: 13696 MLP features are 107 groups of 128 (prime): every rank gets whole groups,
    uneven where 107 does not divide (54 and 53 at N = 2), and attention c_proj's groups fall on head boundaries."""
    cfg = qwen14b_int4_config()
    plans = [ShardPlan.make(cfg, world, r) for r in range(world)]
    ranges = [p.mlp for p in plans]
    assert ranges[0][0] == 0 and ranges[-1][1] == cfg.mlp_width == 13696
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(a % 128 == 0 for a, _ in ranges)
    groups = [-(-(b - a) // 128) for a, b in ranges]
    assert sum(groups) == 107 and max(groups) - min(groups) == 1
    if world == 2:
        assert groups == [54, 53]
    assert all(p.attn_proj_aligned for p in plans)
    assert [p.heads for p in plans] == [(r * 40 // world, (r + 1) * 40 // world) for r in range(world)]
    assert plans[-1].vocab[1] == cfg.vocab_size and all(p.vocab_shard * world >= cfg.vocab_size for p in plans)


def test_refusals():
    cfg = tiny_config()  # 4 heads, MLP width 128
    with pytest.raises(ValueError, match=r"does not divide the model's 4 attention heads.*use one of 1, 2, 4"):
        check_tensor_parallel(cfg, 3)
    q = tiny_config(quantization_config=dict(bits=4, group_size=64, quant_method="gptq"))  # 2 MLP groups
    with pytest.raises(ValueError, match="has 2 quantization groups, fewer than tensor_parallel_size 4"):
        check_tensor_parallel(q, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_slice_planar_rows(bits):
    """Any group-aligned row range of planar words, chunk-aligned or not, holds exactly those rows."""
    K, N = 448, 24
    q = torch.randint(0, 2 ** bits, (K, N), dtype=torch.int32)
    words = pack_planar(q, bits)
    for start, stop in [(0, 128), (32, 96), (64, 448), (128, 448), (416, 448), (96, 352)]:
        a, b = planar_word_rows(start, stop, bits)
        got = slice_planar_rows(words[a:b], bits, start, stop, K)
        assert torch.equal(unpack_planar(got, bits, stop - start), q[start:stop]), (start, stop)
        assert got.shape == GPTQLinear(stop - start, N, bits, 32).qweight_planar.shape


# ----------------------------------------------------------------------------------------------- each rank's slices

def weight(m) -> torch.Tensor:
    return m.dequantize() if isinstance(m, GPTQLinear) else m.weight.float()


@pytest.mark.parametrize("name,world", [("qwen-tiny", 2), ("qwen-tiny", 4), ("qwen-tiny-int4", 2),
                                        ("qwen-tiny-int4", 4), ("gptq-odd-groups", 2), ("gptq-act-order", 2)])
def test_shards_are_exact_slices(ckpts, name, world):
    """Every rank's weights are exactly the single-process model's rows and columns (dequantized: bit for bit), the
    ranks' MLP features cover each feature once, whole GPTQ groups each, and biases of row-parallel layers are on
    rank 0 only. No process group is needed to load a shard (only its forward communicates)."""
    full = Qwen.from_pretrained(ckpts[name], device="cpu", dtype=torch.float32)
    cfg = full.config
    H, F, hd = cfg.hidden_size, cfg.mlp_width, cfg.head_dim
    gs = (cfg.quantization_config or {}).get("group_size")
    features = [[] for _ in full.transformer.h]
    for rank in range(world):
        plan = ShardPlan.make(cfg, world, rank)
        shard = load_model(ckpts[name], "cpu", torch.float32, tp=TPGroup(rank, world, "cpu"))
        h0, h1 = plan.heads
        qkv = torch.cat([torch.arange(j * H + h0 * hd, j * H + h1 * hd) for j in range(3)])
        for i, (fb, sb) in enumerate(zip(full.transformer.h, shard.transformer.h)):
            assert sb.attn.n_head == h1 - h0
            assert torch.equal(weight(sb.attn.c_attn), weight(fb.attn.c_attn)[qkv])
            assert torch.equal(sb.attn.c_attn.bias, fb.attn.c_attn.bias[qkv])
            proj = sb.attn.c_proj
            if proj.pad is None:
                assert torch.equal(weight(proj.linear), weight(fb.attn.c_proj)[:, h0 * hd:h1 * hd])
            else:  # the whole layer, this rank's features placed among zeros
                assert proj.pad == (h0 * hd, H) and torch.equal(weight(proj.linear), weight(fb.attn.c_proj))
            c_proj = fb.mlp.c_proj
            order = c_proj.perm.long() if isinstance(c_proj, GPTQLinear) and c_proj.perm is not None \
                else torch.arange(F)
            feats = order[plan.mlp[0]:plan.mlp[1]]
            features[i].append(feats)
            assert torch.equal(weight(sb.mlp.w2_w1), weight(fb.mlp.w2_w1)[torch.cat([feats, feats + F])])
            assert torch.equal(weight(sb.mlp.c_proj.linear), weight(c_proj)[:, feats])
            if isinstance(sb.mlp.c_proj.linear, GPTQLinear):
                assert sb.mlp.c_proj.linear.perm is None  # its rows arrive in kernel order
                assert plan.mlp[0] % gs == 0
            for row_parallel, ref in ((proj.linear, fb.attn.c_proj), (sb.mlp.c_proj.linear, c_proj)):
                if rank == 0 and ref.bias is not None:
                    assert torch.equal(row_parallel.bias, ref.bias)
                else:
                    assert row_parallel.bias is None
        v0, v1 = plan.vocab
        assert torch.equal(shard.transformer.wte.weight, full.transformer.wte.weight[v0:v1])
        head = shard.lm_head.weight
        assert head.shape[0] == plan.vocab_shard and torch.equal(head[:v1 - v0], full.lm_head.weight[v0:v1])
        assert not head[v1 - v0:].any()
    for per_rank in features:
        assert torch.equal(torch.sort(torch.cat(per_rank)).values, torch.arange(F))
    if name == "gptq-odd-groups":  # 3 groups of 32 over 2 ranks
        assert [len(f) for f in features[0]] == [64, 32]
    if name == "gptq-act-order":
        assert any(not torch.equal(f, torch.arange(len(f)) + f.min()) for f in features[0])  # a real permutation


@pytest.mark.parametrize("name", ["qwen-tiny", "qwen-tiny-int4", "gptq-odd-groups"])
def test_each_rank_reads_only_its_slices(ckpts, name, monkeypatch):
    """No rank reads a whole copy: over both ranks every split tensor is read once, the norms twice (replicated),
    and a row split's planar words once plus the one chunk of words the two ranks' rows share at their border."""
    from nanoqwen.checkpoint import ST_DTYPES, SliceReader
    from nanoqwen.kernels.gptq_matmul import _PLANE
    read = {}
    original = SliceReader.read

    def counting(self, tensor, dim=0, parts=None):
        t = original(self, tensor, dim, parts)
        read[tensor] = read.get(tensor, 0) + t.numel() * t.element_size()
        return t
    monkeypatch.setattr(SliceReader, "read", counting)
    for rank in range(2):
        load_model(ckpts[name], "cpu", torch.float32, tp=TPGroup(rank, 2, "cpu"))
    meta = SliceReader(ckpts[name], QwenConfig.from_json(ckpts[name])).meta
    assert set(read) == set(meta)
    for tensor, nbytes in read.items():
        dtype, shape = meta[tensor]
        full = ST_DTYPES[dtype] * torch.Size(shape).numel()
        if tensor.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert nbytes == 2 * full, tensor
        elif tensor.endswith("c_proj.qweight_planar"):
            assert full <= nbytes <= full + _PLANE * shape[1] * 4, tensor
        else:
            assert nbytes == full, tensor


def test_official_folder_refused(golden):
    from nanoqwen.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="convert it once"):
        load_model(golden / "qwen-tiny" / "checkpoint", "cpu", torch.float32, tp=TPGroup(0, 2, "cpu"))


# ----------------------------------------------------------------------------------------------- sharded forward

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forward_cases(name: str) -> dict[str, list[int]]:
    """The golden forward cases of a golden model, else two random id lists."""
    if name.startswith("qwen-tiny"):
        from conftest import golden_dir
        cases = json.loads((golden_dir() / name / "reference.json").read_text())["cases"]
        return {k: c["input_ids"] for k, c in cases.items() if c["kind"] == "forward" and not k.startswith("kv_int8")}
    g = torch.Generator().manual_seed(len(name))
    return {f"random{n}": torch.randint(0, 4096, (n,), generator=g).tolist() for n in (9, 40)}


def _rank_main(rank, world, port, jobs, out_dir):
    """One rank of a sharded forward: every job's cases in fp32 and fp64; rank 0 saves the logits."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, folder, cases in jobs:
            results = {}
            for dtype in (torch.float32, torch.float64):
                model = load_model(folder, "cpu", dtype, tp=TPGroup.from_default_group("cpu"))  # (torchrun's way)
                with torch.no_grad():
                    for case, ids in cases.items():
                        results[f"{case}/{dtype}"] = model(torch.tensor([ids]))[0]
            if rank == 0:
                save_file(results, os.path.join(out_dir, f"{name}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["N2", "N4"])
def sharded(request, ckpts, tmp_path_factory):
    """Sharded forwards on `world` gloo processes: N=2 every model, N=4 the golden fp model (the int4 model's split
    at N=4 is checked slice by slice above)."""
    import torch.multiprocessing as mp
    world = request.param
    names = list(ckpts) if world == 2 else ["qwen-tiny"]
    jobs = [(n, ckpts[n], forward_cases(n)) for n in names]
    out = tmp_path_factory.mktemp(f"sharded{world}")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children read it at start-up
    mp.start_processes(_rank_main, args=(world, free_port(), jobs, str(out)), nprocs=world, join=True,
                       start_method="spawn")
    return world, {n: (ckpts[n], cases, load_file(str(out / f"{n}.safetensors"))) for n, _, cases in jobs}


def test_sharded_logits_match_single_process(sharded):
    world, results = sharded
    for name, (folder, cases, tp) in results.items():
        single = {dtype: Qwen.from_pretrained(folder, device="cpu", dtype=dtype)
                  for dtype in (torch.float32, torch.float64)}
        ref = {}
        with torch.no_grad():
            for case, ids in cases.items():
                for dtype, model in single.items():
                    ref[f"{case}/{dtype}"] = model(torch.tensor([ids]))[0]
        e32 = max((ref[f"{c}/torch.float32"].double() - ref[f"{c}/torch.float64"]).abs().max() for c in cases)
        assert 0 < e32 < 1e-3, f"{name}: fp32 rounding level {e32}"
        for case in cases:
            d32 = (tp[f"{case}/torch.float32"] - ref[f"{case}/torch.float32"]).abs().max()
            d64 = (tp[f"{case}/torch.float64"] - ref[f"{case}/torch.float64"]).abs().max()
            assert d32 <= 2 * e32, f"{name} {case} N={world}: fp32 differs by {d32}, rounding level {e32}"
            assert d64 <= 2 * e32 * FP64_OVER_FP32, f"{name} {case} N={world}: fp64 differs by {d64}"
            assert tp[f"{case}/torch.float32"].shape == ref[f"{case}/torch.float32"].shape


def test_sharded_logits_match_golden(sharded, golden):
    """The golden reference's own tolerance (fp32: 1e-4, argmax exact), as the single-process tests use."""
    world, results = sharded
    for name, (folder, cases, tp) in results.items():
        if not name.startswith("qwen-tiny"):
            continue
        ref = json.loads((golden / name / "reference.json").read_text())["cases"]
        tensors = load_file(str(golden / name / "reference.safetensors"))
        for case in cases:
            logits = tp[f"{case}/torch.float32"]
            torch.testing.assert_close(logits[ref[case]["positions"]], tensors[f"{case}/logits"], atol=1e-4, rtol=0)
            assert logits.argmax(-1).tolist() == ref[case]["argmax"]
