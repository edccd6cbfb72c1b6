"""Data parallelism with torch's own tools, for `torchrun --nproc-per-node N -m nanoqwen.finetune ...`.

One process per device: NCCL on GPUs, gloo on the CPU. LoRA (and Q-LoRA) replicate the frozen model on every
process and wrap it in DistributedDataParallel, which all-reduces the small LoRA gradients. Full fine-tuning shards
every block (and the embeddings and head) across the processes with FSDP2 (`fully_shard`): parameters, gradients and
AdamW state live in 1/N pieces, so a 14B model that no single GPU can train fits on several. The model is built on
the meta device and each process copies only its own shard of each checkpoint tensor (read one tensor at a time), so
no process ever holds the whole model.
Without torchrun (no WORLD_SIZE) everything runs in the one process, with no process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str | None = None) -> World:
    """This process's place: under torchrun, join the process group (NCCL on CUDA, gloo on the CPU) and take the
    GPU of its LOCAL_RANK; else one process on `device` (default: cuda when available)."""
    from ..checkpoint import resolve_device
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise RuntimeError(f"process {rank} (LOCAL_RANK {local}) needs a GPU of its own, but this machine shows "
                               f"{torch.cuda.device_count()}: use --nproc-per-node <= the number of GPUs")
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return World(rank, size, local, want)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Sums over the processes (float64, on the process's device as NCCL wants)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """DDP over the trainable parameters. Every process loaded the same checkpoint and drew the same LoRA init from
    the same seed, so the first broadcast (of the whole frozen model) is skipped; buffers never change."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, init_sync=False, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The Qwen inside a DDP wrapper (FSDP2 modules are the Qwen itself)."""
    return getattr(model, "module", model)


def build_sharded(folder, cfg, world: World) -> nn.Module:
    """A Qwen for full fine-tuning under FSDP2: built on the meta device, every block and then the root sharded over
    the processes, fp32 storage (the master weights), each process filling only its shard from the checkpoint."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ..checkpoint import is_converted, iter_converted, iter_official
    from ..model import Qwen

    mesh = init_device_mesh(world.device.type, (world.size,))
    with torch.device("meta"):
        model = Qwen(cfg)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=world.device)
    model.rotary = type(model.rotary)(cfg.rotary_dim, cfg.rotary_emb_base).to(world.device)  # buffers were meta
    params = dict(model.named_parameters())
    tensors = iter_converted(folder, cfg, torch.float32) if is_converted(folder) else \
        iter_official(folder, cfg, torch.float32, desc=f"loading {folder.name}")
    seen = set()
    with torch.no_grad():
        for name, full in tensors:
            p = params[name]
            local = p.to_local() if isinstance(p, DTensor) else p
            pieces = full.chunk(world.size, dim=0)  # FSDP2 shards dim 0 as torch.chunk does
            piece = pieces[world.rank] if world.rank < len(pieces) else full[:0]
            if piece.shape != local.shape:
                raise RuntimeError(f"{name}: this process's FSDP shard is {list(local.shape)}, the checkpoint's "
                                   f"piece {list(piece.shape)} (torch's FSDP2 sharding changed?)")
            local.copy_(piece)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise RuntimeError(f"the checkpoint did not fill {', '.join(missing[:5])}")
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter: a collective when sharded (every process calls it)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a (possibly sharded) tensor."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this process's piece) as a tensor shaped and placed like `param` (a DTensor when param is one)."""
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor):
        return DTensor.from_local(local.to(param.device), param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride())
    return local.to(param.device)
