"""Opt-in: NANOQWEN_REAL_CKPT=/path/to/Qwen-7B (an official or converted folder) loads the real model and runs it."""
import os
from pathlib import Path

import pytest
import torch

from nanoqwen import Qwen
from nanoqwen.checkpoint import official_shapes

KNOWN_PARAMS = {(4096, 32, 151936): 7_721_324_544, (5120, 40, 152064): 14_167_290_880}


@pytest.fixture(scope="module")
def real_model():
    path = os.environ.get("NANOQWEN_REAL_CKPT")
    if not path:
        pytest.skip("set NANOQWEN_REAL_CKPT to a real Qwen checkpoint folder to run this test")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Qwen.from_pretrained(Path(path), device=device)


def test_shapes_and_parameter_count(real_model):
    cfg = real_model.config
    n = sum(p.numel() for p in real_model.parameters())
    assert n == sum(torch.Size(s).numel() for s in official_shapes(cfg).values())
    key = (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size)
    if key in KNOWN_PARAMS:
        assert n == KNOWN_PARAMS[key]


def test_forward(real_model):
    ids = torch.tensor([[9707, 1879, 0, 220, 108386]], device=real_model.device)  # "Hello world! 你好"
    with torch.no_grad():
        logits = real_model(ids)
    assert logits.shape == (1, 5, real_model.config.vocab_size)
    assert torch.isfinite(logits.float()).all()
    # a trained model puts the next token among its real vocabulary, never on the padding rows
    assert int(logits[0, -1].argmax()) < 151851
