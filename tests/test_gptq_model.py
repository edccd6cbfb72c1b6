"""GPTQ Int4/Int8 checkpoints end to end against the golden reference (AutoGPTQ's own packer, fp32 reference)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoqwen import LLM, Qwen, SamplingParams
from nanoqwen.checkpoint import CheckpointError, convert
from nanoqwen.quant.gptq import GPTQLinear


@pytest.fixture(scope="module", params=["int4", "int8"])
def gptq(request, golden, tmp_path_factory):
    folder = golden / f"qwen-tiny-{request.param}"
    ref = json.loads((folder / "reference.json").read_text())
    converted = convert(folder / "checkpoint", tmp_path_factory.mktemp("conv") / request.param, dtype=None)
    return request.param, folder / "checkpoint", converted, ref, load_file(str(folder / "reference.safetensors"))


@pytest.mark.parametrize("source", ["official", "converted"])
def test_forward(gptq, source):
    bits, official, converted, ref, tensors = gptq
    model = Qwen.from_pretrained(official if source == "official" else converted, device="cpu", dtype=torch.float32)
    assert isinstance(model.transformer.h[0].mlp.w2_w1, GPTQLinear)
    assert model.transformer.h[0].attn.c_attn.bits == int(bits[-1])
    for name, case in ref["cases"].items():
        if case["kind"] != "forward":
            continue
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]]))[0]
        torch.testing.assert_close(logits[case["positions"]], tensors[f"{name}/logits"], atol=1e-4, rtol=0)
        assert logits.argmax(-1).tolist() == case["argmax"]


def test_dequantized_weight(gptq):
    bits, official, converted, ref, tensors = gptq
    for src in (official, converted):
        model = Qwen.from_pretrained(src, device="cpu", dtype=torch.float32)
        w = model.transformer.h[0].attn.c_attn.dequantize()
        assert torch.equal(w, tensors["dequant/transformer.h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("source", ["official", "converted"])
def test_generate(gptq, source):
    bits, official, converted, ref, tensors = gptq
    llm = LLM(official if source == "official" else converted, device="cpu", num_kv_blocks=64)
    cases = [c for c in ref["cases"].values() if c["kind"] == "greedy_generate"]
    outs = llm.generate([c["input_ids"] for c in cases],
                        [SamplingParams(temperature=0, repetition_penalty=c["repetition_penalty"],
                                        max_new_tokens=c["max_new_tokens"]) for c in cases])
    assert [o.token_ids for o in outs] == [c["output_ids"] for c in cases]


def test_converted_layout(gptq):
    bits, official, converted, ref, tensors = gptq
    marker = json.loads((converted / "nanoqwen.json").read_text())
    assert marker["dtype"] == "float16"
    sd = load_file(str(converted / "model.safetensors"))
    assert sd["transformer.h.0.mlp.w2_w1.qweight_planar"].dtype == torch.int32
    assert sd["transformer.h.0.mlp.w2_w1.scales"].dtype == torch.float16
    assert "transformer.h.0.mlp.w1.qweight" not in sd


def test_float_cast_qweight_refused(golden, tmp_path):
    import shutil
    src = golden / "qwen-tiny-int4" / "checkpoint"
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    f = dst / "model-00001-of-00002.safetensors"
    sd = load_file(str(f))
    sd["transformer.h.0.attn.c_attn.qweight"] = sd["transformer.h.0.attn.c_attn.qweight"].float()
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.qweight is F32.*int32"):
        Qwen.from_pretrained(dst, device="cpu")


def test_unsupported_quantization_refused(golden, tmp_path):
    import shutil
    dst = tmp_path / "awq"
    shutil.copytree(golden / "qwen-tiny-int4" / "checkpoint", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits = 3: nanoqwen supports 4 and 8 bits"):
        Qwen.from_pretrained(dst, device="cpu")


def test_forward_through_kernels(gptq, monkeypatch):
    """The whole GPTQ model through the Triton kernels (interpreter on the CPU): GEMV rows and GEMM prefill."""
    bits, official, converted, ref, tensors = gptq
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    model = Qwen.from_pretrained(converted, device="cpu", dtype=torch.float32)
    case = ref["cases"]["gptq/forward/text"]
    with torch.no_grad():
        logits = model(torch.tensor([case["input_ids"]]))[0]
    torch.testing.assert_close(logits[case["positions"]], tensors["gptq/forward/text/logits"], atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == case["argmax"]
    with torch.no_grad():  # 1 row: the GEMV path
        one = model(torch.tensor([case["input_ids"][:1]]))[0, 0]
    torch.testing.assert_close(one, logits[0], atol=1e-4, rtol=0)
