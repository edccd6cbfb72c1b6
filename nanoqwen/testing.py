"""Random Qwen checkpoints in the official layout, for tests and benchmarks (no weights can be downloaded there)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import QwenConfig

CHAT_GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                          "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
                          "top_p": 0.8, "repetition_penalty": 1.1}


def tiny_config(**overrides) -> QwenConfig:
    """A small config with the real vocabulary size (so the real tokenizer works with it)."""
    d = dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16,
             intermediate_size=256, seq_length=32, rotary_emb_base=10000, layer_norm_epsilon=1e-6)
    d.update(overrides)
    return QwenConfig.from_dict(d)


def random_official_state_dict(cfg: QwenConfig, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights under the official tensor names, drawn like the reference's init (biases made non-zero so
    that a bias bug cannot hide; norms near 1)."""
    from .checkpoint import official_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in official_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith("c_proj.weight") else 0.02
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


def write_official_checkpoint(folder, cfg: QwenConfig | dict, state_dict: dict | None = None, seed: int = 0,
                              dtype=torch.bfloat16, num_shards: int = 2, vocab_file=None,
                              generation_config: dict | None = None) -> Path:
    """Write `folder` as the official Hugging Face Qwen layout: config.json, sharded safetensors + index,
    generation_config.json, and qwen.tiktoken when `vocab_file` is given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg, dict):
        cfg = QwenConfig.from_dict(cfg)
    sd = state_dict if state_dict is not None else random_official_state_dict(cfg, seed, dtype)
    names = list(sd)
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        chunk = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in chunk}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
        total += sum(sd[n].numel() * sd[n].element_size() for n in chunk)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    d = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", **cfg.to_dict()}
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config or CHAT_GENERATION_CONFIG, indent=2))
    if vocab_file is not None:
        shutil.copyfile(vocab_file, folder / "qwen.tiktoken")
    return folder
