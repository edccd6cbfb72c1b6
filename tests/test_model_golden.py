"""Parity with the original Hugging Face Qwen code on the golden tiny checkpoint (fp32, CPU)."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, prefill_then_decode
from nanoqwen import Qwen

FORWARD = ["fp32/forward/text", "fp32/forward/random", "fp32/forward/long"]
DECODE = ["fp32/decode/random", "fp32/decode/long_cross_seq_length", "fp32/decode/long_prefill_beyond"]


@pytest.fixture(scope="module", params=["official", "converted"])
def model(request, tiny_ckpt, tmp_path_factory):
    if request.param == "official":
        return Qwen.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    out = tmp_path_factory.mktemp("converted") / "qwen-tiny"
    subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), str(tiny_ckpt), str(out), "--dtype", "float32"],
                   check=True, capture_output=True)
    return Qwen.from_pretrained(out, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("name", FORWARD)
def test_forward_logits(model, tiny_ref, tiny_ref_tensors, name):
    case = tiny_ref["cases"][name]
    with torch.no_grad():
        logits = model(torch.tensor([case["input_ids"]]))[0]
    assert logits.shape == (len(case["input_ids"]), model.config.vocab_size)
    torch.testing.assert_close(logits[case["positions"]], tiny_ref_tensors[f"{name}/logits"], atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == case["argmax"]


def test_forward_batch_rows_independent(model, tiny_ref, tiny_ref_tensors):
    """Each row of a [B, S] batch is its own sequence: a batch of two equals the single-row runs."""
    a, b = tiny_ref["prompts"]["text"][:20], tiny_ref["prompts"]["random"][:20]
    with torch.no_grad():
        both = model(torch.tensor([a, b]))
        single = torch.cat([model(torch.tensor([a])), model(torch.tensor([b]))])
    torch.testing.assert_close(both, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODE)
def test_prefill_then_decode(model, tiny_ref, tiny_ref_tensors, name):
    case = tiny_ref["cases"][name]
    steps = prefill_then_decode(model, case["input_ids"], case["n_prefill"])
    assert len(steps) == len(case["top10_ids"])
    full = tiny_ref_tensors[f"{name}/step_logits"]
    torch.testing.assert_close(steps[case["steps_with_full_logits"]], full, atol=1e-4, rtol=0)
    for i, (ids, vals) in enumerate(zip(case["top10_ids"], case["top10_logits"])):
        torch.testing.assert_close(steps[i][ids], torch.tensor(vals), atol=1e-4, rtol=0)
        assert int(steps[i].argmax()) == ids[0], f"step {i}"


def test_ntk_alpha_frozen_at_prefill(model, tiny_ref):
    """Decoding past seq_length keeps alpha 1 from a short prefill: it differs from a fresh long forward (alpha 3)."""
    ids = tiny_ref["cases"]["fp32/decode/long_cross_seq_length"]["input_ids"]  # 48 tokens, seq_length 32
    steps = prefill_then_decode(model, ids, 24)
    with torch.no_grad():
        fresh = model(torch.tensor([ids]))[0, -1]
    assert (steps[-1] - fresh).abs().max() > 1e-3
