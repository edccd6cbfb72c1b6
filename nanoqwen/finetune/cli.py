"""The command line of nanoqwen.finetune (`python -m nanoqwen.finetune`, `nanoqwen finetune`, or under torchrun)."""
from __future__ import annotations

import argparse
import sys

from .trainer import FinetuneArgs

EXAMPLES = """examples:
  python -m nanoqwen.finetune --ckpt qwen-7b-chat --data train.json --out out/lora          # LoRA (Qwen's recipe)
  python -m nanoqwen.finetune --ckpt qwen-7b-chat-int4 --data train.json --out out/qlora    # Q-LoRA
  torchrun --nproc-per-node 8 -m nanoqwen.finetune --full --ckpt qwen-14b-chat --data train.json --out out/full
data: a JSON list of {"id": ..., "conversations": [{"from": "user", "value": ...}, {"from": "assistant", ...}]},
optionally with "system": "..." per record (default "You are a helpful assistant.")."""


def parse_args(argv=None, prog="python -m nanoqwen.finetune") -> FinetuneArgs:
    d = FinetuneArgs("", "", "")
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune a Qwen (v1) model: LoRA, Q-LoRA or full, on one "
                                "device or under torchrun.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="qwen-7b, qwen-7b-chat, qwen-14b(-chat), -int4/-int8 names, an "
                   "Org/Name repo, or a checkpoint folder (official or converted)")
    p.add_argument("--data", required=True, help="training data: a JSON list of conversations (Qwen's format)")
    p.add_argument("--out", required=True, help="output folder: the adapter (LoRA) or the checkpoint (full), "
                   "checkpoint-STEP folders, log.jsonl")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="train a LoRA adapter (the default; Q-LoRA on a GPTQ "
                      "checkpoint)")
    mode.add_argument("--full", action="store_true", help="train every parameter (FSDP under torchrun)")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="scaling = alpha / r (default %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="default %(default)s")
    p.add_argument("--lora-target", default=",".join(d.lora_target),
                   help="comma-separated linears to adapt, peft's rule (default %(default)s)")
    p.add_argument("--modules-to-save", default=d.modules_to_save,
                   help="LoRA: also train full copies of wte and lm_head. auto (finetune.py's rule: yes for a base "
                   "model, no for a chat or GPTQ one, by the --ckpt name), none, or wte,lm_head")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4 for LoRA, 1e-5 for --full)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per device per micro-batch "
                   "(default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step "
                   "(default %(default)s)")
    p.add_argument("--max-len", type=int, default=d.max_len, help="tokens per row: longer ones are cut "
                   "(default %(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="default %(default)s")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    p.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="default %(default)s")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping (default "
                   "%(default)s)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=d.gradient_checkpointing, help="recompute each block in the backward (default: on, as "
                   "the recipe)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="compute dtype (autocast; trained weights stay fp32). Default bfloat16, float16 for a GPTQ "
                   "checkpoint")
    p.add_argument("--eval-data", help="same format: its loss is printed after every epoch")
    p.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (default "
                   "%(default)s)")
    p.add_argument("--save-total-limit", type=int, default=d.save_total_limit, help="keep the last N checkpoints "
                   "(default %(default)s)")
    p.add_argument("--resume", help="continue from OUT/checkpoint-STEP (same options, as many processes)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write OUT/merged, the merged model in the "
                   "official layout")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--device", help="cuda, cpu, cuda:1 (default: cuda when available; torchrun: one GPU per process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    targets = tuple(t.strip() for t in a.lora_target.split(",") if t.strip())
    return FinetuneArgs(
        ckpt=a.ckpt, data=a.data, out=a.out, full=a.full, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout, lora_target=targets, modules_to_save=a.modules_to_save, lr=a.lr,
        epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, max_len=a.max_len,
        warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay, adam_beta2=a.adam_beta2,
        max_grad_norm=a.max_grad_norm, gradient_checkpointing=a.gradient_checkpointing, dtype=a.dtype,
        eval_data=a.eval_data, save_steps=a.save_steps, save_total_limit=a.save_total_limit, resume=a.resume,
        merge=a.merge, seed=a.seed, device=a.device, progress=not a.no_progress)


def main(argv=None, prog="python -m nanoqwen.finetune") -> int:
    args = parse_args(argv, prog or "python -m nanoqwen.finetune")
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from . import train
    try:
        result = train(args)
    except (CheckpointError, ConfigError, OSError, ValueError, TypeError) as e:  # DataError, AdapterError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:  # under torchrun a failed run leaves its process group behind otherwise
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    last = next((r for r in reversed(result.history) if "loss" in r), None)
    if last is not None:
        print(f"done: {result.steps} steps, last loss {last['loss']:.4f}; wrote {result.out}", file=sys.stderr)
    return 0
