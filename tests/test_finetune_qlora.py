"""Q-LoRA: LoRA trained on a frozen GPTQ Int4/Int8 base (../shared/golden/qwen-tiny-int4, -int8), whose matmul is
differentiable through the dequantized weight (nanoqwen.quant.gptq.DequantMatmul).

The reference here is the same model with every GPTQ linear replaced by an nn.Linear holding its dequantized weight:
in fp32 the torch path computes exactly that matmul, so LoRA gradients agree to float summation order; through the
Triton GPTQ kernel (interpreter, fp32) the forward sums in another order: held to the golden README's gradient noise
(1e-5 of each tensor's largest value) twice, as in test_finetune.py.
"""

import pytest
import torch
import torch.nn.functional as F

from nanoqwen.checkpoint import load_model
from nanoqwen.finetune import Trainer, batch_nll
from nanoqwen.lora import LoraManager, _trained_layers, add_trainable_lora, read_adapter, set_trainable_lora
from conftest import dequantized_copy
from test_finetune import GRAD_NOISE, MERGED_ATOL, golden_rows, logits_of, qa_records, train_args, write_json

BITS = ["int4", "int8"]


def gptq_ckpt(golden, bits):
    return golden / f"qwen-tiny-{bits}" / "checkpoint"


def lora_grads(model, lora_dir, lora_ref):
    add_trainable_lora(model, 8, 16, 0.0)
    set_trainable_lora(model, read_adapter(lora_dir, model.config))
    model.train()
    rows = golden_rows(lora_ref)
    nll, count = batch_nll(model, torch.tensor([r["input_ids"] for r in rows]),
                           torch.tensor([r["labels"] for r in rows]))
    (nll / count).backward()
    return {f"{o}.{p}": getattr(lin, f"lora_{p}")[n].grad for o, lin, n in _trained_layers(model) for p in "AB"}


def saved_tensor_sizes(fn):
    """The numel of every tensor autograd keeps for the backward while `fn()` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("bits", BITS)
def test_dequant_matmul_gradient_without_keeping_the_weight(golden, bits):
    model = load_model(gptq_ckpt(golden, bits), "cpu", torch.float32)
    lin = model.transformer.h[0].mlp.w2_w1
    w = lin.dequantize()
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    dy = torch.randn(5, lin.out_features, generator=torch.Generator().manual_seed(1))
    y, sizes = saved_tensor_sizes(lambda: lin(x))
    assert w.numel() not in sizes  # nothing as big as W kept until the backward
    (dx,) = torch.autograd.grad(y, x, dy)
    x2 = x.detach().clone().requires_grad_(True)
    y2, naive_sizes = saved_tensor_sizes(lambda: F.linear(x2, w, lin.bias.float()))
    assert w.numel() in naive_sizes  # the check sees a kept weight
    (dx2,) = torch.autograd.grad(y2, x2, dy)
    torch.testing.assert_close(y, y2, atol=0, rtol=0)
    torch.testing.assert_close(dx, dx2)  # dy @ W both ways: fp32 rounding
    with torch.no_grad():
        assert lin(x).grad_fn is None  # inference: the plain path


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("bits", BITS)
def test_qlora_gradients_equal_those_through_the_dequantized_weights(golden, lora_ref, bits, kernels, monkeypatch):
    if kernels == "triton":
        from nanoqwen.kernels import HAVE_TRITON
        if not HAVE_TRITON:
            pytest.skip("Triton is not installed")
    monkeypatch.setenv("NANOQWEN_KERNELS", kernels)
    adapter = golden / "qwen-tiny" / "lora" / "adapter"
    quantized = load_model(gptq_ckpt(golden, bits), "cpu", torch.float32)
    reference = dequantized_copy(quantized)
    monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
    want = lora_grads(reference, adapter, lora_ref)
    monkeypatch.setenv("NANOQWEN_KERNELS", kernels)
    got = lora_grads(quantized, adapter, lora_ref)
    assert set(got) == set(want) and len(got) == 20
    for key, g in want.items():
        atol = 0 if kernels == "torch" else 2 * GRAD_NOISE * g.abs().max().item()
        torch.testing.assert_close(got[key], g, atol=atol, rtol=0 if kernels == "torch" else 1.3e-6,
                                   msg=lambda m: key + m)


def test_qlora_run_saves_an_adapter_the_gptq_base_serves(golden, tmp_path):
    ckpt = gptq_ckpt(golden, "int4")
    data = write_json(tmp_path / "train.json", qa_records(4))
    trainer = Trainer(train_args(ckpt, data, tmp_path / "out", max_steps=3, lr=5e-3))
    assert trainer.save_modules == []  # finetune.py: no modules_to_save with Q-LoRA
    assert all(not p.requires_grad for n, p in trainer.core.named_parameters() if "lora_" not in n)
    result = trainer.run()
    ids = trainer.train_data.batch([0, 1], "cpu")[0]
    trained = logits_of(trainer.core, ids)
    served = load_model(ckpt, "cpu", torch.float32)
    manager = LoraManager(served, max_loras=1, max_lora_rank=8)
    manager.add("q", result.out)
    manager.set_token_indices(manager.token_indices(["q"] * ids.shape[0], [ids.shape[1]] * ids.shape[0]))
    torch.testing.assert_close(logits_of(served, ids), trained, atol=MERGED_ATOL, rtol=0)
    base = logits_of(load_model(ckpt, "cpu", torch.float32), ids)
    assert (base - trained).abs().max() > 100 * MERGED_ATOL
