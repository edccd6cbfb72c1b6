"""What a fine-tuning run leaves behind: a PEFT adapter (LoRA) or a checkpoint in the official Qwen layout (full
fine-tuning, or LoRA with --merge), which nanoqwen, transformers (trust_remote_code) and peft all load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import SHARD_BYTES, SIDE_FILES, KNOWN_CHECKPOINTS
from .parallel import World, full_tensor

CODE_SUFFIXES = (".py",)  # the official repos' remote code (modeling_qwen.py, ...): copied when the source has it


def official_tensors(model: nn.Module):
    """(official name, tensor) of a plain Qwen's weights: mlp.w2_w1 split back into mlp.w2 and mlp.w1 (w2's rows
    first). A generator: with FSDP every process must run it (each sharded tensor is gathered when reached)."""
    for name, p in model.named_parameters():
        t = full_tensor(p.detach())
        if ".mlp.w2_w1." in name:
            w2, w1 = t.chunk(2, dim=0)
            yield name.replace(".w2_w1.", ".w2."), w2
            yield name.replace(".w2_w1.", ".w1."), w1
        else:
            yield name, t


def save_official(model: nn.Module, folder, dtype: torch.dtype, sources: list[Path], world: World | None = None,
                  shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` (a plain Qwen: no LoRA layers, no GPTQ) as an official checkpoint folder: sharded
    model-0000k-of-0000n.safetensors + model.safetensors.index.json, config.json and the tokenizer and generation
    files (and remote-code *.py) of the first `sources` folder that has each. Only the main process writes."""
    world = world or World()
    folder = Path(folder)
    shards, current, size, total = [], {}, 0, 0
    for name, t in official_tensors(model):
        if not world.main:
            continue
        t = t.to(device="cpu", dtype=dtype).contiguous()
        current[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if not world.main:
        return folder
    if current or not shards:
        shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model*.safetensors"):  # a previous run's shards would confuse every loader
        old.unlink()
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    copy_side_files(sources, folder, ("config.json",) + SIDE_FILES)
    return folder


def copy_side_files(sources: list[Path], folder: Path, names=SIDE_FILES) -> None:
    """Copy each of `names` (and remote-code *.py) from the first source folder holding it."""
    wanted = list(names) + sorted({p.name for s in sources if s.is_dir() for p in s.iterdir()
                                   if p.suffix in CODE_SUFFIXES})
    for name in wanted:
        for src in sources:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
                break


def base_model_name(ckpt: str) -> str:
    """What adapter_config.json's base_model_name_or_path records, so that peft (AutoPeftModelForCausalLM) finds the
    base: the Hugging Face repo of a known name, a repo id as given, or a folder's absolute path."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return KNOWN_CHECKPOINTS.get(ckpt.lower(), ckpt)
