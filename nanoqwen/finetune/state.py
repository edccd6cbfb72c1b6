"""Checkpoints every --save-steps steps, and resuming from one: safetensors and JSON only.

OUT/checkpoint-{step}/ holds
- trainer_state.json: the step reached, the log so far, the options that must not change on resume (data order,
  model, schedule), the process count and the data file's hash, the gradient scaler's state;
- state.safetensors: the trainable parameters ("param.NAME") and AdamW's state ("exp_avg.NAME", "exp_avg_sq.NAME",
  "step.NAME"). Under FSDP every process writes its own shards instead, state-rank{r}.safetensors;
- rng-rank{r}.safetensors: each process's random state (LoRA dropout), so a resumed run draws the same masks;
- for LoRA, the adapter at that step (adapter_config.json, adapter_model.safetensors): usable as it is.
A checkpoint is written into checkpoint-{step}.tmp and renamed when complete; the oldest beyond --save-total-limit
are removed. Resuming needs the same number of processes (the data each one reads depends on it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import parallel

FORMAT = 1


def _sharded(trainer) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for _, p in trainer.trainable)


def _state_file(trainer, rank: int) -> str:
    return f"state-rank{rank}.safetensors" if _sharded(trainer) else "state.safetensors"


def save_checkpoint(trainer) -> Path:
    from .trainer import config_for_resume
    world = trainer.world
    final = trainer.out / f"checkpoint-{trainer.step}"
    tmp = final.with_name(final.name + ".tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier(world)
    if world.main or _sharded(trainer):
        tensors = {}
        for name, p in trainer.trainable:
            tensors[f"param.{name}"] = parallel.local_tensor(p.detach()).cpu().contiguous()
            for key, value in trainer.optimizer.state.get(p, {}).items():  # step, exp_avg, exp_avg_sq
                tensors[f"{key}.{name}"] = parallel.local_tensor(value).detach().cpu().contiguous()
        save_file(tensors, str(tmp / _state_file(trainer, world.rank)))
    rng = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(world.device)
    save_file(rng, str(tmp / f"rng-rank{world.rank}.safetensors"))
    if world.main:
        state = {"format": FORMAT, "step": trainer.step, "config": config_for_resume(trainer),
                 "scaler": trainer.scaler.state_dict() if trainer.scaler else None, "log": trainer.history}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if not trainer.args.full:
            trainer.save_adapter(tmp)
    parallel.barrier(world)
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(trainer.out, trainer.args.save_total_limit)
    parallel.barrier(world)
    return final


def _prune(out: Path, limit: int | None) -> None:
    if not limit:
        return
    done = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                  if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, path in done[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(trainer, folder: Path) -> None:
    """Put a checkpoint's parameters, optimizer state, random state and position into a freshly built trainer."""
    from .trainer import config_for_resume
    world = trainer.world
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"--resume {folder}: no trainer_state.json there; pass a checkpoint-STEP folder that "
                                "a run with --save-steps wrote (its .tmp folders are incomplete)")
    state = json.loads(state_path.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"--resume {folder}: checkpoint format {state.get('format')}, this nanoqwen reads {FORMAT}")
    saved, now = state["config"], config_for_resume(trainer)
    diff = [f"{k}: {saved.get(k)!r} then, {now[k]!r} now" for k in now if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"--resume {folder}: the run was started with other settings, so it cannot continue the "
                         "same way:\n  " + "\n  ".join(diff) + "\nresume with the same options (and as many "
                         "processes), or start a new run")
    tensors = load_file(str(folder / _state_file(trainer, world.rank)))
    with torch.no_grad():
        for name, p in trainer.trainable:
            parallel.local_tensor(p).copy_(tensors[f"param.{name}"])
            if f"step.{name}" in tensors:
                trainer.optimizer.state[p] = {
                    "step": tensors[f"step.{name}"].clone(),
                    "exp_avg": parallel.like(p, tensors[f"exp_avg.{name}"]),
                    "exp_avg_sq": parallel.like(p, tensors[f"exp_avg_sq.{name}"])}
    rng = load_file(str(folder / f"rng-rank{world.rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and world.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], world.device)
    if trainer.scaler and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.history = state["step"], list(state["log"])
