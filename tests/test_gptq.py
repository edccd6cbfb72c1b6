"""GPTQ format: unpacking against the golden reference, repacking, GPTQLinear (torch path), cat, act-order, config."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoqwen.kernels.gptq_matmul import pack_planar, unpack_planar
from nanoqwen.quant.gptq import (GPTQFormatError, GPTQLinear, dequantize_gptq, read_quantize_config, repack,
                                 unpack_int32)

GOLDEN_LAYER = "transformer.h.0.attn.c_attn"


def pack_lsb_first(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ints in 0 .. 2^bits - 1 into int32 words along `dim`, value 32/bits * r + j at bits j*bits.. of word r."""
    pack = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    v = v.reshape(v.shape[0] // pack, pack, *v.shape[1:])
    words = torch.zeros(v.shape[0], *v.shape[2:], dtype=torch.int64)
    for j in range(pack):
        words |= v[:, j] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def quantize_official(w: torch.Tensor, bits: int, group_size: int, act_order: bool = False, sym: bool = True,
                      gen: torch.Generator | None = None, order: torch.Tensor | None = None):
    """Quantize fp w [N out, K in] the AutoGPTQ way into the official tensors.

    Returns (qweight, qzeros, scales fp16, g_idx, W) with W [N, K] fp32 = scales[g] * (q - z) computed here from
    the unpacked values, independently of nanoqwen's unpacking. act_order: a random permutation-based g_idx
    (g_idx[order[i]] = i // group_size, as desc_act=True writes it; `order` random unless given).
    """
    N, K = w.shape
    maxq = 2**bits - 1
    G = K if group_size == -1 else group_size
    n_groups = -(-K // G)
    if order is None:
        order = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // G).to(torch.int32)
    wt = w.t().float()  # [K, N]
    scales = torch.empty(n_groups, N, dtype=torch.float16)
    zeros = torch.empty(n_groups, N, dtype=torch.int64)
    q = torch.empty(K, N, dtype=torch.int64)
    for g in range(n_groups):
        rows = (g_idx == g).nonzero().flatten()
        wg = wt[rows]
        if sym:
            scale = (2 * wg.abs().amax(0) / maxq).clamp_min(1e-6)
            zero = torch.full((N,), (maxq + 1) // 2, dtype=torch.int64)
        else:  # zero in 1..maxq: AutoGPTQ's v1 format cannot store a zero point of 0
            lo, hi = wg.amin(0).clamp(max=0), wg.amax(0).clamp(min=0)
            scale = ((hi - lo) / maxq).clamp_min(1e-6)
            zero = torch.round(-lo / scale).to(torch.int64).clamp(1, maxq)
        scales[g] = scale.half()
        zeros[g] = zero
        q[rows] = (torch.round(wg / scales[g].float()) + zero).clamp(0, maxq).to(torch.int64)
    qweight = pack_lsb_first(q, bits, dim=0)
    qzeros = pack_lsb_first(zeros - 1, bits, dim=1)
    gi = g_idx.long()
    W = (scales.float()[gi] * (q - zeros[gi]).float()).t().contiguous()
    return qweight, qzeros, scales, g_idx, W


def random_official(N, K, bits, group_size, act_order=False, sym=True, order=None):
    """Fresh random weights each call (torch's global generator, seeded differently every run by pytest)."""
    w = torch.randn(N, K) * 0.05
    return quantize_official(w, bits, group_size, act_order, sym, order=order)


def golden_layer(golden, bits):
    folder = golden / f"qwen-tiny-int{bits}"
    index = json.loads((folder / "checkpoint" / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        key = f"{GOLDEN_LAYER}.{name}"
        with safe_open(str(folder / "checkpoint" / index[key]), "pt") as f:
            tensors[name] = f.get_tensor(key)
    ref = load_file(str(folder / "reference.safetensors"))[f"dequant/{GOLDEN_LAYER}.weight"]
    config = json.loads((folder / "checkpoint" / "quantize_config.json").read_text())
    return tensors, ref, config


# ----------------------------------------------------------------------------------------------- golden

@pytest.mark.parametrize("bits", [4, 8])
def test_golden_dequant_exact(golden, bits):
    t, ref, config = golden_layer(golden, bits)
    cfg = read_quantize_config(config)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == (bits, 32, True, False)
    W = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert W.dtype == torch.float32 and W.shape == ref.shape
    assert torch.equal(W, ref)  # bit for bit
    m = GPTQLinear.from_official(**t, bits=bits, group_size=cfg.group_size)
    assert torch.equal(m.dequantize(), ref)
    loaded = GPTQLinear(ref.shape[1], ref.shape[0], bits, cfg.group_size)
    loaded.load_state_dict(t)  # the official tensors, repacked on load
    assert torch.equal(loaded.dequantize(), ref)
    model = torch.nn.ModuleDict({"c_attn": GPTQLinear(ref.shape[1], ref.shape[0], bits, cfg.group_size)})
    model.load_state_dict({f"c_attn.{k}": v for k, v in t.items()})  # nested, as a model loads it
    assert torch.equal(model["c_attn"].dequantize(), ref)
    x = torch.randn(3, 5, ref.shape[1])
    torch.testing.assert_close(m(x), x @ ref.t() + t["bias"].float(), rtol=1e-5, atol=1e-5)


def test_golden_zero_words(golden):
    t4, _, _ = golden_layer(golden, 4)
    assert (t4["qzeros"] == 0x77777777).all()  # sym 4-bit: stored zero 7, true zero 8
    m = GPTQLinear.from_official(**t4, bits=4, group_size=32)
    assert (m.zeros == 8).all()


# ----------------------------------------------------------------------------------------------- unpacking

def test_unpack_int32_lsb_first():
    words = torch.tensor([[0x76543210, 0x0FEDCBA9]], dtype=torch.int32)
    assert unpack_int32(words, 4, dim=1).tolist() == [list(range(8)) + [9, 10, 11, 12, 13, 14, 15, 0]]
    neg = torch.tensor([[0xF0E1D2C3 - 2**32]], dtype=torch.int32)  # top bit set: arithmetic shifts must be masked
    assert unpack_int32(neg, 8, dim=1).tolist() == [[0xC3, 0xD2, 0xE1, 0xF0]]
    assert unpack_int32(neg, 4, dim=0).flatten().tolist() == [3, 0xC, 2, 0xD, 1, 0xE, 0, 0xF]
    with pytest.raises(GPTQFormatError, match="int32"):
        unpack_int32(words.float(), 4, dim=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (64, 24))
    for dim in (0, 1):
        assert torch.equal(unpack_int32(pack_lsb_first(q, bits, dim), bits, dim), q.to(torch.int32))
    for K in (1, 8, 100, 128, 200):  # the planar layout takes any K (padded to whole chunks)
        qk = torch.randint(0, 2**bits, (K, 40))
        assert torch.equal(unpack_planar(pack_planar(qk, bits), bits, K), qk.to(torch.int32))


@pytest.mark.parametrize("bits,group_size,act_order,sym", [
    (4, 32, False, True), (4, 64, True, True), (4, -1, False, False), (8, 32, True, False), (8, 128, False, True),
    (8, 16, True, True)])
def test_dequantize_random(bits, group_size, act_order, sym):
    qweight, qzeros, scales, g_idx, W = random_official(72, 256, bits, group_size, act_order, sym)
    assert torch.equal(dequantize_gptq(qweight, qzeros, scales, g_idx, bits), W)


# ----------------------------------------------------------------------------------------------- repacking

@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 128, True), (8, 64, True),
                                                       (8, -1, False), (4, 24, True)])
def test_repack_round_trip(tmp_path, bits, group_size, act_order):
    K, N = 264, 40  # K not a multiple of a chunk (128 / 64 rows)
    qweight, qzeros, scales, g_idx, W = random_official(N, K, bits, group_size, act_order)
    bias = torch.randn(N).half()
    m = GPTQLinear.from_official(qweight, qzeros, scales, g_idx, bias, bits, group_size)
    assert torch.equal(m.dequantize(), W)
    sd = m.state_dict()
    assert set(sd) == {"qweight_planar", "scales", "zeros", "bias"} | ({"perm"} if act_order else set())
    assert sd["qweight_planar"].dtype == torch.int32 and sd["scales"].dtype == torch.float16
    assert sd["zeros"].dtype == torch.float16
    if act_order:
        assert sd["perm"].dtype == torch.int32 and sorted(sd["perm"].tolist()) == list(range(K))
    save_file(sd, str(tmp_path / "layer.safetensors"))
    loaded_sd = load_file(str(tmp_path / "layer.safetensors"))
    again = GPTQLinear(K, N, bits, group_size, bias=True, act_order=act_order)
    again.load_state_dict(loaded_sd)
    for k, v in m.state_dict().items():
        assert again.state_dict()[k].dtype == v.dtype and torch.equal(again.state_dict()[k], v), k
    built = GPTQLinear.from_planar(loaded_sd, bits, group_size, in_features=K)
    assert torch.equal(built.dequantize(), W)
    # a module made without act_order still takes act-order tensors (perm comes with the state dict)
    plain = GPTQLinear(K, N, bits, group_size)
    plain.load_state_dict(loaded_sd)
    assert torch.equal(plain.dequantize(), W)


def test_int32_cast_to_float_is_refused():
    qweight, qzeros, scales, g_idx, _ = random_official(32, 128, 4, 32)
    with pytest.raises(GPTQFormatError, match="never be cast"):
        repack(qweight.float(), qzeros, scales, g_idx, 4, 32)
    m = GPTQLinear.from_official(qweight, qzeros, scales, g_idx, None, 4, 32)
    sd = m.state_dict()
    sd["qweight_planar"] = sd["qweight_planar"].float()
    with pytest.raises(RuntimeError, match="must be int32"):
        GPTQLinear(128, 32, 4, 32, bias=False).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="shape"):
        GPTQLinear(256, 32, 4, 32, bias=False).load_state_dict(m.state_dict())
    with pytest.raises(GPTQFormatError, match="groups"):
        repack(qweight, qzeros, scales, g_idx, 4, 64)  # wrong group size for these scales


def test_uneven_g_idx_is_refused():
    qweight, qzeros, scales, g_idx, _ = random_official(32, 128, 4, 32)
    g_idx = g_idx.clone()
    g_idx[0] = 1  # group 0 loses a row, group 1 gains one
    with pytest.raises(GPTQFormatError, match="g_idx"):
        repack(qweight, qzeros, scales, g_idx, 4, 32)


# ----------------------------------------------------------------------------------------------- forward (torch path)

@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("NANOQWEN_KERNELS", "torch")


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 64, True), (8, 128, False),
                                                       (8, -1, True)])
def test_forward_reference(torch_path, bits, group_size, act_order):
    K, N = 192, 56
    qweight, qzeros, scales, g_idx, W = random_official(N, K, bits, group_size, act_order)
    bias = torch.randn(N).half()
    m = GPTQLinear.from_official(qweight, qzeros, scales, g_idx, bias, bits, group_size)
    x = torch.randn(2, 7, K)
    torch.testing.assert_close(m(x), x @ W.t() + bias.float(), rtol=1e-5, atol=1e-5)
    y16 = m(x.half())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), x @ W.t() + bias.float(), rtol=2e-2, atol=2e-2)
    no_bias = GPTQLinear.from_official(qweight, qzeros, scales, g_idx, None, bits, group_size)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()
    torch.testing.assert_close(no_bias(x), x @ W.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=str(K)):
        m(torch.randn(3, K + 1))


@pytest.mark.parametrize("act_order", [False, True])
def test_cat(torch_path, act_order):
    K = 128
    # w2 and w1 see the same input, so act-order quantization gives them the same g_idx
    order = torch.randperm(K) if act_order else None
    w2 = GPTQLinear.from_official(*random_official(48, K, 4, 32, act_order, order=order)[:4],
                                  torch.randn(48).half(), 4, 32)
    w1 = GPTQLinear.from_official(*random_official(64, K, 4, 32, act_order, order=order)[:4], None, 4, 32)
    fused = GPTQLinear.cat([w2, w1])
    assert fused.out_features == 48 + 64 and fused.bias is not None and (fused.perm is not None) == act_order
    assert torch.equal(fused.bias[48:], torch.zeros(64, dtype=torch.float16))
    x = torch.randn(5, K)
    torch.testing.assert_close(fused(x), torch.cat([w2(x), w1(x)], -1), rtol=0, atol=0)
    if act_order:
        other = GPTQLinear.from_official(*random_official(48, K, 4, 32, True)[:4], None, 4, 32)
        with pytest.raises(GPTQFormatError, match="g_idx"):
            GPTQLinear.cat([w2, other])
    with pytest.raises(GPTQFormatError, match="in_features"):
        GPTQLinear.cat([w2, GPTQLinear.from_official(*random_official(48, 256, 4, 32)[:4], None, 4, 32)])


def test_act_order_permutation(torch_path):
    K, N = 256, 32
    qweight, qzeros, scales, g_idx, W = random_official(N, K, 4, 64, act_order=True)
    assert not torch.equal(g_idx, torch.arange(K, dtype=torch.int32) // 64)
    m = GPTQLinear.from_official(qweight, qzeros, scales, g_idx, None, 4, 64)
    assert m.perm is not None
    assert torch.equal(g_idx[m.perm.long()].long(), torch.arange(K) // 64)  # kernel rows sorted by group
    x = torch.randn(4, K)
    torch.testing.assert_close(m(x), x @ W.t(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- quantize_config

def test_read_quantize_config():
    base = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
            "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
    cfg = read_quantize_config(base)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == (4, 128, True, False)
    assert read_quantize_config({"quantization_config": {**base, "bits": 8, "quant_method": "gptq"}}).bits == 8
    assert read_quantize_config({**base, "group_size": -1}).group_size == -1
    assert read_quantize_config({**base, "desc_act": True, "sym": False}).desc_act
    for bad, match in [({"bits": 3}, "bits"), ({"bits": "4"}, "bits"), ({"bits": True}, "bits"),
                       ({"group_size": 0}, "group_size"), ({"group_size": -2}, "group_size"),
                       ({"group_size": 12.5}, "group_size"), ({"sym": "yes"}, "sym"), ({"desc_act": 1}, "desc_act"),
                       ({"checkpoint_format": "gptq_v2"}, "checkpoint_format"), ({"quant_method": "awq"}, "awq")]:
        with pytest.raises(GPTQFormatError, match=match):
            read_quantize_config({**base, **bad})
    with pytest.raises(GPTQFormatError):
        read_quantize_config([4, 128])
