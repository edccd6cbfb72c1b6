"""int8 KV cache: the reference's use_cache_quantization in "qwen" mode (golden kv_int8 cases), and the default
per-(token, head) rounding mode, more accurate than the reference's."""
import pytest
import torch

from conftest import run_paged
from nanoqwen import LLM, Qwen, SamplingParams
from nanoqwen.kv_cache import KVCache
from nanoqwen.quant.kv_int8 import dequantize, quantize_per_token, quantize_qwen


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return Qwen.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


def run_int8(model, ids, n_prefill, mode, all_logits=False):
    """Prefill then one token per step through an int8 paged cache (conftest.run_paged)."""
    return run_paged(model, ids, n_prefill, kv_cache_dtype="int8", quant_mode=mode, all_logits=all_logits)


def test_qwen_mode_forward(model, tiny_ref, tiny_ref_tensors):
    case = tiny_ref["cases"]["kv_int8/forward/text"]
    logits = run_int8(model, case["input_ids"], len(case["input_ids"]), "qwen", all_logits=True)[0]
    torch.testing.assert_close(logits[case["positions"]], tiny_ref_tensors["kv_int8/forward/text/logits"],
                               atol=1e-3, rtol=0)
    assert logits.argmax(-1).tolist() == case["argmax"]


def test_qwen_mode_decode(model, tiny_ref, tiny_ref_tensors):
    """Decode steps: one scale per token, so a one-ulp rounding difference can move a value to the next integer
    (golden README: a few 1e-2 on the logits); the argmax of every step must agree."""
    case = tiny_ref["cases"]["kv_int8/decode/random"]
    steps = torch.cat(run_int8(model, case["input_ids"], case["n_prefill"], "qwen"))
    torch.testing.assert_close(steps[case["steps_with_full_logits"]],
                               tiny_ref_tensors["kv_int8/decode/random/step_logits"], atol=5e-2, rtol=0)
    assert [int(s.argmax()) for s in steps] == [ids[0] for ids in case["top10_ids"]]


def test_qwen_mode_generate(tiny_ckpt, tiny_ref):
    case = tiny_ref["cases"]["kv_int8/generate/text"]
    llm = LLM(tiny_ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=64, kv_cache_dtype="int8",
              kv_quant_mode="qwen")
    out = llm.generate(case["input_ids"], SamplingParams(temperature=0, repetition_penalty=case["repetition_penalty"],
                                                         max_new_tokens=case["max_new_tokens"]))
    assert out.token_ids == case["output_ids"]


def test_default_mode_more_accurate(model, tiny_ref, tiny_ref_tensors, capsys):
    """Logit error against the fp KV cache on the golden prompts: default mode (per token, rounded) must beat the
    reference's qwen mode (chunk-wide, truncated). The numbers are printed for the record."""
    rows = []
    for name in ("fp32/forward/text", "fp32/forward/random", "fp32/forward/long"):
        case = tiny_ref["cases"][name]
        exact = tiny_ref_tensors[f"{name}/logits"]
        err = {}
        for mode in ("qwen", "default"):
            logits = run_int8(model, case["input_ids"], len(case["input_ids"]), mode, all_logits=True)[0]
            err[mode] = (logits[case["positions"]] - exact).abs().max().item()
        rows.append((name, err["qwen"], err["default"]))
        assert err["default"] < err["qwen"], (name, err)
    with capsys.disabled():
        for name, q, d in rows:
            print(f"\n  int8 KV max logit error vs fp cache, {name}: qwen mode {q:.4f}, default mode {d:.4f}")


def test_quantizers():
    x = torch.randn(7, 3, 16) * 3
    q, s, z = quantize_per_token(x, torch.float32)
    assert q.dtype == torch.uint8 and s.shape == (7, 3)
    assert ((dequantize(q, s, z, torch.float32) - x).abs() <= s[..., None] / 2 + 1e-5).all()  # rounding: half a step
    const = torch.full((2, 1, 16), 0.5)
    q, s, z = quantize_per_token(const, torch.float32)
    torch.testing.assert_close(dequantize(q, s, z, torch.float32), const)  # no NaN for a constant row
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    q, s, z = quantize_qwen(x, cu, torch.float32)
    assert torch.equal(s[0], s[3]) and torch.equal(s[4], s[6]) and not torch.equal(s[0], s[4])  # one scale a chunk
    err = dequantize(q, s, z, torch.float32) - x
    assert (err <= 1e-5).all() and (err > -s[..., None] - 1e-5).all()  # truncation: always rounds down


def test_memory():
    bf16 = KVCache.bytes_per_token(32, 32, 128, torch.bfloat16)
    int8 = KVCache.bytes_per_token(32, 32, 128, torch.bfloat16, "int8")
    assert bf16 == 512 * 1024 and int8 / bf16 <= 0.53
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache(1, 1, 16, 1, 16, torch.float32, "cpu", "int4")
    with pytest.raises(ValueError, match="kv_quant_mode"):
        KVCache(1, 1, 16, 1, 16, torch.float32, "cpu", "int8", "fast")


def test_constant_rows_stay_finite():
    """A nearly constant non-zero row: the zero point must fit fp16 (the storage of bf16/fp16 models)."""
    x = torch.full((3, 2, 16), -3.25)
    x[1, 0, 5] += 1e-4
    q, s, z = quantize_per_token(x, torch.float16)
    assert torch.isfinite(z).all() and torch.isfinite(s).all()
    torch.testing.assert_close(dequantize(q, s, z, torch.float32), x, atol=3.25 * 2e-3, rtol=0)
