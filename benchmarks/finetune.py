"""Fine-tuning speed and memory: one LoRA training step (forward, backward, clipping, AdamW) at Qwen-7B shapes, as
nanoqwen.finetune runs it, against the same step in Hugging Face transformers + peft when both are importable.

    python benchmarks/finetune.py                    # Qwen-7B shapes, random bf16 weights, LoRA r64 on c_attn,
                                                     # c_proj, w1, w2 (Qwen's recipe), batch 2 x 512, checkpointing
    python benchmarks/finetune.py --bits 4           # Q-LoRA: a GPTQ int4 base (fp16, as the recipe; no HF row)
    python benchmarks/finetune.py --full --layers 8  # full fine-tuning (fp32 master weights, bf16 autocast)
    python benchmarks/finetune.py --tiny             # CPU smoke run (tiny model, fp32; HF + peft too when present)

Rows are random tokens; the first half of every row is a "prompt" (labels -100), as Qwen's chat data masks the user
turns. nanoqwen computes logits only where a label is trained; HF computes them everywhere (that is its loss API).
The HF model is transformers' Qwen2ForCausalLM holding the same weights (its decoder math equals Qwen v1's below
seq_length), with peft's LoRA on q/k/v/o/gate/up/down_proj (c_attn's one A becomes three: slightly more LoRA
parameters than nanoqwen's), SDPA attention, bf16 weights under bf16 autocast, gradient checkpointing as the Trainer
enables it. Both start from B = 0, so their first losses must agree (to bf16 rounding): printed as a check.
tokens/s counts every token of the batch (padding included: there is none here). Peak memory is
torch.cuda.max_memory_allocated over the timed steps (weights included). Writes JSON to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nanoqwen import QwenConfig  # noqa: E402
from nanoqwen.finetune import batch_nll, make_optimizer  # noqa: E402
from nanoqwen.lora import DEFAULT_TARGETS, add_trainable_lora  # noqa: E402
from decode import random_model  # noqa: E402
from throughput import QWEN_7B, TINY, hf_from_nanoqwen  # noqa: E402

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = c_attn, c_proj, w2, w1


def batch(cfg: QwenConfig, rows: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(cfg.vocab_size, 151643), (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :seq // 2] = -100
    return ids.to(device), labels.to(device)


def timed_steps(step, steps: int, device) -> tuple[float, float, list[float]]:
    """(seconds per step, peak GB, losses) over `steps` steps after 2 warm-up steps."""
    cuda = device.type == "cuda"
    losses = [step(), step()]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return seconds, torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"), losses


def nanoqwen_step(model, ids, labels, dtype, full: bool, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, lr, 0.1)
    device_type = ids.device.type
    scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None

    def step() -> float:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            nll, count = batch_nll(model, ids, labels)
        loss = nll / count
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def hf_step(model, ids, labels, dtype, rank: int, lr: float):
    import peft
    hf = hf_from_nanoqwen(model)
    hf.config.use_cache = False
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05, target_modules=HF_TARGETS,
                                                 task_type="CAUSAL_LM"))
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    device_type = ids.device.type

    def step() -> float:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = hf(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def run_nanoqwen(args, cfg, dtype, device, ids, labels, steps, lr) -> dict:
    """Build, train `steps` steps, and let everything go (the next row's peak memory must not hold this model)."""
    model = random_model(cfg, torch.float32 if args.full else dtype, device, args.bits,
                         group_size=32 if args.tiny else 128)
    if args.full:
        model.requires_grad_(True)  # fp32 master weights, autocast computes
    else:
        add_trainable_lora(model, args.rank, 16, 0.05, DEFAULT_TARGETS, generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing = not args.no_checkpointing
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s, peak, losses = timed_steps(nanoqwen_step(model, ids, labels, dtype, args.full, lr), steps, device)
    return {"impl": "nanoqwen", "s_per_step": s, "tok_s": ids.numel() / s, "peak_GB": peak,
            "trainable_params": trainable, "first_loss": losses[0]}


def run_hf(args, cfg, dtype, device, ids, labels, steps, lr) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = random_model(cfg, dtype, device, None, seed=0)  # the same random weights (same seed), frozen
    step, trainable = hf_step(base, ids, labels, dtype, args.rank, lr)
    s, peak, losses = timed_steps(step, steps, device)
    return {"impl": "transformers + peft", "s_per_step": s, "tok_s": ids.numel() / s, "peak_GB": peak,
            "trainable_params": trainable, "first_loss": losses[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke run)")
    ap.add_argument("--batch-size", type=int, default=2, help="rows per step (the recipe's per-device batch)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per row (the recipe's model_max_length)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--bits", type=int, choices=[4, 8], help="Q-LoRA on a GPTQ base with these bits")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--layers", type=int, help="fewer layers than Qwen-7B's 32 (e.g. for --full on a small GPU)")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep every activation (no recomputation)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers + peft row")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shape = dict(TINY if args.tiny else QWEN_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = QwenConfig.from_dict(shape)
    dtype = (torch.float16 if args.bits else torch.bfloat16) if device.type == "cuda" else torch.float32
    rows, seq = args.batch_size, min(args.seq_len, 64) if args.tiny else args.seq_len
    steps = 3 if args.tiny else args.steps
    ids, labels = batch(cfg, rows, seq, device)
    lr = 1e-5 if args.full else 3e-4

    results = [run_nanoqwen(args, cfg, dtype, device, ids, labels, steps, lr)]

    hf_note = None
    if args.no_hf or args.bits or args.full:
        why = "--no-hf" if args.no_hf else "GPTQ needs auto-gptq" if args.bits else "LoRA only"
        hf_note = f"skipped ({why})"
    else:
        import importlib.util
        missing = [m for m in ("peft", "transformers") if importlib.util.find_spec(m) is None]
        hf_note = f"skipped ({missing[0]} not installed)" if missing else None
    if hf_note is None:
        results.append(run_hf(args, cfg, dtype, device, ids, labels, steps, lr))

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    what = "full" if args.full else f"Q-LoRA int{args.bits}" if args.bits else "LoRA"
    print(f"\n{name}  {'tiny' if args.tiny else 'Qwen-7B shapes'} ({cfg.num_hidden_layers} layers)  {what}"
          f"{'' if args.full else f' r{args.rank}'}  {str(dtype).removeprefix('torch.')}  batch {rows} x {seq}  "
          f"{'no ' if args.no_checkpointing else ''}gradient checkpointing")
    print(f"{'implementation':<22}{'tok/s':>10}{'s/step':>9}{'peak GB':>9}{'trainable':>13}{'first loss':>12}")
    for r in results:
        print(f"{r['impl']:<22}{r['tok_s']:>10.0f}{r['s_per_step']:>9.3f}{r['peak_GB']:>9.2f}"
              f"{r['trainable_params']:>13,}{r['first_loss']:>12.4f}")
    if len(results) == 2:
        print(f"nanoqwen / HF+peft tokens/s: {results[0]['tok_s'] / results[1]['tok_s']:.2f}x;  first-loss gap "
              f"{abs(results[0]['first_loss'] - results[1]['first_loss']):.2e} (same weights, B = 0)")
    else:
        print(f"transformers + peft: {hf_note}")
    if os.environ.get("OUT"):
        res = {"device": name, "what": what, "dtype": str(dtype), "batch": rows, "seq_len": seq,
               "layers": cfg.num_hidden_layers, "rank": None if args.full else args.rank,
               "gradient_checkpointing": not args.no_checkpointing, "rows": results, "hf": hf_note or "ran"}
        Path(os.environ["OUT"], f"finetune_{what.replace(' ', '_')}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
