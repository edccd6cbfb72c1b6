"""The training loop: LoRA, Q-LoRA or full fine-tuning of a Qwen (v1) model on Qwen-format conversations.

Numerics, and where they differ from Qwen's finetune.py on the HF Trainer (on purpose):
- Loss: cross-entropy of each position's logits against the next label, over the labels that are not -100, summed
  and divided by the number of such labels in the whole optimizer step (all micro-batches of the gradient
  accumulation, all processes). On one batch that is the Trainer's loss exactly (a token-weighted mean, not a mean
  over sequences). The Trainer (4.36) instead averages per-micro-batch means, so its gradient depends on how the
  tokens fall into micro-batches; here one process with batch 2b equals two processes with b, or b with 2 accumulation
  steps (up to float summation order). Logits are computed only at the trained positions (`logits_indices`): the
  same values, without a [tokens, 151936] tensor for the padding and the prompts.
- Padding: finetune.py pads every row to max_len and passes attention_mask = input_ids != <|endoftext|>. Rows are
  right-padded, attention is causal, and padded positions have label -100, so the mask only changes the outputs of
  the padded positions themselves, which no loss term reads. Batches here are cut to their longest row and use no
  mask: the same loss. (The reference's mask also hides a real <|endoftext|> typed inside a message from later
  tokens: a side effect of finding padding by token id, not followed.)
- model.train() turns off dynamic NTK and LogN, as the reference's training mode does; the eval loss runs in eval
  mode, as the Trainer's evaluate (NTK from each row's real length).
- AdamW (betas 0.9/0.95, eps 1e-8) on fp32 master weights, weight decay on matrices only (not on biases and norm
  weights; the Trainer decays Qwen's RMSNorm weights too, its exclusion list not knowing that class); bf16/fp16 by
  autocast (fp16 with a gradient scaler); gradients clipped to --max-grad-norm (1.0, the Trainer's default).
- Learning rate: warm-up over w = ceil(warmup_ratio * steps) steps, lr * (k + 1) / (w + 1) at step k, then the
  Trainer's cosine from the peak to 0. (The Trainer's warm-up starts at exactly 0: its first step changes nothing.)
- Data order: one seeded permutation per epoch (seed + epoch), global batches of batch_size * processes * grad_accum
  rows taken in order, process r getting rows r, r + N, ... of each; the last, shorter batch of an epoch is kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata
from ..checkpoint import gptq_config, load_model, parse_dtype, resolve_checkpoint
from ..config import QwenConfig
from ..lora import (DEFAULT_TARGETS, add_trainable_lora, merge_adapter, remove_trainable_lora, save_adapter,
                    trainable_lora_adapter)
from ..rope import ntk_index
from ..tokenizer import Tokenizer
from . import parallel
from .data import IGNORE_INDEX, SupervisedData, load_conversations
from .export import base_model_name, copy_side_files, save_official

SAVED_MODULES = ("transformer.wte.weight", "lm_head.weight")  # finetune.py's modules_to_save for a base model


@dataclass
class FinetuneArgs:
    """Every option of `python -m nanoqwen.finetune`; defaults are Qwen's LoRA recipe (finetune_lora_single_gpu.sh)."""
    ckpt: str
    data: str
    out: str
    full: bool = False  # full-parameter fine-tuning instead of LoRA
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target: tuple[str, ...] = DEFAULT_TARGETS
    modules_to_save: str = "auto"  # auto (finetune.py: wte,lm_head for base models), none, or "wte,lm_head"
    lr: float | None = None  # 3e-4 for LoRA, 1e-5 for full (the recipes')
    epochs: int = 5
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 2  # rows per process per micro-batch
    grad_accum: int = 8
    max_len: int = 512
    warmup_ratio: float = 0.01
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    gradient_checkpointing: bool = True
    dtype: str | None = None  # compute dtype: bfloat16 (float16 on a GPTQ base, as the Q-LoRA recipe); float32: none
    eval_data: str | None = None
    save_steps: int = 1000
    save_total_limit: int | None = 10
    resume: str | None = None
    merge: bool = False
    seed: int = 42
    device: str | None = None
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.full else 3e-4)


# options that must not change when a run is resumed: they define the data order, the model or the schedule
RESUME_KEYS = ("full", "lora_r", "lora_alpha", "lora_dropout", "lora_target", "modules_to_save", "epochs", "max_steps",
               "batch_size", "grad_accum", "max_len", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2",
               "adam_eps", "max_grad_norm", "seed", "learning_rate", "dtype")
STATE_FILE, TRAINER_STATE = "state.safetensors", "trainer_state.json"


# ----------------------------------------------------------------------------------------------- loss

def batch_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, lengths=None,
              reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """(summed NLL, number of trained labels) of a right-padded batch [B, S]: the logits at position t against
    labels[t + 1], over the labels that are not -100 (reduction "none": one NLL per trained label, row-major).
    Only those positions' logits are computed. `lengths` (real tokens per row) picks each row's NTK row in eval
    mode; train mode uses none, as the reference."""
    core = parallel.unwrap(model)
    cfg: QwenConfig = core.config
    B, S = input_ids.shape
    keep = labels[:, 1:] != IGNORE_INDEX
    b, t = keep.nonzero(as_tuple=True)
    lengths = [S] * B if lengths is None else [int(n) for n in lengths]
    ntk = [ntk_index(n, cfg.seq_length, cfg.use_dynamic_ntk and not core.training) for n in lengths]
    meta = AttentionMetadata.for_prefill([S] * B, input_ids.device, ntk, logits_indices=b * S + t)
    logits = model(input_ids.reshape(-1), meta)
    return F.cross_entropy(logits.float(), labels[b, t + 1], reduction=reduction), int(b.numel())


# ----------------------------------------------------------------------------------------------- optimizer, schedule

def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW over the trainable parameters: matrices decayed, vectors (biases, norm weights) not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up to the peak, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def split_rows(rows: torch.Tensor, rank: int, world_size: int, batch_size: int) -> list[tuple[torch.Tensor, float]]:
    """Process `rank`'s micro-batches of a global batch, each with its weight (1, or 0 for a stand-in): the process
    takes rows rank, rank + world_size, ... in micro-batches of batch_size. Every process gets as many micro-batches
    (FSDP gathers weights in every forward, DDP reduces in the last backward); one short of rows at the end of an
    epoch runs a real row with weight 0."""
    mine = rows[rank::world_size]
    n = math.ceil(math.ceil(len(rows) / world_size) / batch_size)
    chunks = [mine[i * batch_size:(i + 1) * batch_size] for i in range(n)]
    return [(c, 1.0) if len(c) else (rows[:1], 0.0) for c in chunks]


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    out: Path
    history: list[dict] = field(default_factory=list)  # one record per optimizer step (and per eval)
    steps: int = 0


class Trainer:
    """One fine-tuning run (all of `FinetuneArgs`); `run()` trains, checkpoints, evaluates and writes the outputs."""

    def __init__(self, args: FinetuneArgs):
        self.args = args
        self.world = parallel.init_world(args.device)
        self.out = Path(args.out)
        self.folder = self._resolve(args.ckpt)
        self.cfg = QwenConfig.from_json(self.folder)
        self.gptq = gptq_config(self.cfg) is not None
        self._check_args()
        self.dtype = parse_dtype(args.dtype) or (torch.float16 if self.gptq else torch.bfloat16)
        self.tokenizer = Tokenizer.from_pretrained(self.folder)
        raw = Path(args.data).read_bytes() if Path(args.data).is_file() else b""
        self.data_hash = hashlib.sha256(raw).hexdigest()
        self.train_data = SupervisedData.build(load_conversations(args.data), self.tokenizer, args.max_len)
        self.eval_data = SupervisedData.build(load_conversations(args.eval_data, "eval data"), self.tokenizer,
                                              args.max_len) if args.eval_data else None
        self.save_modules = self._saved_modules()
        self.model = self._build_model()
        self.core = parallel.unwrap(self.model)
        self.trainable = [(n, p) for n, p in self.core.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.core, args.learning_rate, args.weight_decay,
                                        (args.adam_beta1, args.adam_beta2), args.adam_eps)
        self.scaler = torch.amp.GradScaler(self.world.device.type) if self.dtype == torch.float16 else None
        G = args.batch_size * self.world.size * args.grad_accum
        self.global_batch = G
        self.steps_per_epoch = -(-len(self.train_data) // G)
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        self.warmup = math.ceil(args.warmup_ratio * self.total_steps)
        self.step, self.history = 0, []
        self._perm_epoch, self._perm = None, None

    # -- setup
    def _resolve(self, ckpt: str) -> Path:
        """A folder as it is; a name or repo id downloaded and converted once into the cache, by the main process
        first (the others then find it there instead of converting it at the same time)."""
        path = Path(ckpt).expanduser()
        if path.is_dir():
            return path
        folder = resolve_checkpoint(ckpt, progress=True) if self.world.main else None
        parallel.barrier(self.world)
        return folder or resolve_checkpoint(ckpt, progress=False)

    def _check_args(self) -> None:
        a = self.args
        positive = {"batch_size": a.batch_size, "grad_accum": a.grad_accum, "epochs": a.epochs,
                    "save_steps": a.save_steps, "lora_r": a.lora_r}
        bad = [f"--{k.replace('_', '-')} {v!r}" for k, v in positive.items() if not isinstance(v, int) or v < 1]
        if a.max_steps is not None and (not isinstance(a.max_steps, int) or a.max_steps < 1):
            bad.append(f"--max-steps {a.max_steps!r}")
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be a positive integer")
        if not 0.0 <= a.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup-ratio {a.warmup_ratio} must be between 0 and 1")
        if a.full and self.gptq:
            raise ValueError(f"{a.ckpt} is a GPTQ-quantized checkpoint: its weights cannot be trained in full. Use "
                             "LoRA on it (Q-LoRA: drop --full), or fine-tune the fp checkpoint it was made from")
        if a.merge and a.full:
            raise ValueError("--merge writes a LoRA run's merged checkpoint; a --full run writes a checkpoint anyway")
        if a.merge and self.gptq:
            raise ValueError(f"--merge: {a.ckpt} is GPTQ-quantized, and W + scaling * B @ A has no exact quantized "
                             "form. Train without --merge, then merge the adapter into the fp model the Int4/Int8 "
                             "one was made from: nanoqwen.Qwen.from_pretrained(FP_CKPT, lora=OUT_DIR)")
        if a.modules_to_save not in ("auto", "none") and \
                set(a.modules_to_save.split(",")) - {"wte", "lm_head"}:
            raise ValueError(f"--modules-to-save {a.modules_to_save!r}: use auto, none, or a comma list of wte and "
                             "lm_head")

    def _saved_modules(self) -> list[str]:
        """finetune.py trains full copies of wte and lm_head for a base (non-chat) model with plain LoRA: a base model
        never saw the ChatML tokens. auto follows its rule (by the checkpoint's name); none and a list are explicit."""
        a = self.args
        if a.full or a.modules_to_save == "none":
            return []
        if a.modules_to_save == "auto":
            return [] if self.gptq or "chat" in a.ckpt.lower() else list(SAVED_MODULES)
        chosen = set(a.modules_to_save.split(","))
        return [n for n in SAVED_MODULES if n.split(".")[-2] in chosen]

    def _build_model(self) -> nn.Module:
        a, world = self.args, self.world
        if a.full:
            model = parallel.build_sharded(self.folder, self.cfg, world) if world.distributed else \
                load_model(self.folder, world.device, torch.float32)  # fp32 master weights, autocast computes
            model.requires_grad_(True)
        else:
            model = load_model(self.folder, world.device, self.dtype)  # frozen
            add_trainable_lora(model, a.lora_r, a.lora_alpha, a.lora_dropout, a.lora_target,
                               generator=torch.Generator().manual_seed(a.seed))
            for name in self.save_modules:  # trainable fp32 copies
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                owner.weight = nn.Parameter(owner.weight.detach().float())
        model.gradient_checkpointing = a.gradient_checkpointing
        model.train()
        return model if a.full else parallel.wrap_ddp(model, world)

    # -- data
    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.args.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.train_data), generator=g), epoch
        return self._perm

    def global_rows(self, step: int) -> torch.Tensor:
        """The dataset rows of optimizer step `step` (0-based, counted over all epochs), every process's together."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def autocast(self):
        return torch.autocast(self.world.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _sync(self, last: bool):
        """Gradients are reduced across processes only in the last micro-batch's backward."""
        if not self.world.distributed:
            return contextlib.nullcontext()
        if self.args.full:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.model.no_sync()

    # -- one optimizer step
    def train_step(self, step: int) -> dict:
        a, data, world = self.args, self.train_data, self.world
        rows = self.global_rows(step)
        count = max(int(data.n_labels[rows].sum()), 1)  # trained labels in the whole step, known to every process
        t0 = time.perf_counter()
        nll_sum = torch.zeros((), dtype=torch.float64, device=world.device)
        micro = split_rows(rows, world.rank, world.size, a.batch_size)
        for i, (mine, weight) in enumerate(micro):
            ids, labels, lengths = data.batch(mine, world.device)
            with self._sync(i == len(micro) - 1):
                with self.autocast():
                    nll, _ = batch_nll(self.model, ids, labels, lengths)
                # DDP and FSDP average the processes' gradients: scaled by their number, the sum over all is left
                loss = nll * (weight * world.size / count)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            nll_sum += nll.detach().double() * weight
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.trainable]
        norm = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm if a.max_grad_norm > 0 else float("inf"))
        lr = lr_at(step, a.learning_rate, self.warmup, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, norm = parallel.all_sum(world, [float(nll_sum)])[0], float(parallel.full_tensor(norm))
        tokens = int(data.lengths[rows].sum())
        seconds = time.perf_counter() - t0
        epoch = step / self.steps_per_epoch
        return {"step": step + 1, "epoch": round(epoch + 1 / self.steps_per_epoch, 4), "loss": total / count,
                "lr": lr, "grad_norm": norm, "tokens": tokens, "tokens_per_s": tokens / seconds}

    @torch.no_grad()
    def evaluate(self) -> float:
        """The eval data's loss (token-weighted over all of it), in eval mode as the Trainer's evaluate."""
        data, world, bs = self.eval_data, self.world, self.args.batch_size
        self.model.eval()
        nll_sum, count = 0.0, 0
        for chunk, weight in split_rows(torch.arange(len(data)), world.rank, world.size, bs):
            ids, labels, lengths = data.batch(chunk, world.device)
            with self.autocast():
                nll, k = batch_nll(self.model, ids, labels, lengths)
            nll_sum, count = nll_sum + float(nll) * weight, count + k * int(weight)
        self.model.train()
        nll_sum, count = parallel.all_sum(world, [nll_sum, count])
        return nll_sum / max(count, 1)

    # -- the whole run
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm
        a, world = self.args, self.world
        if a.resume:
            from .state import load_checkpoint
            load_checkpoint(self, Path(a.resume))
        if world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        parallel.barrier(world)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="fine-tuning", unit="step", dynamic_ncols=True,
                   disable=not (world.main and a.progress))
        while self.step < self.total_steps:
            record = self.train_step(self.step)
            self.step += 1
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if self.eval_data is not None and end_of_epoch:
                loss = self.evaluate()
                self._log({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "eval_loss": loss})
                if world.main and a.progress:
                    bar.write(f"epoch {self.step / self.steps_per_epoch:.2f}: eval loss {loss:.4f}")
            if self.step % a.save_steps == 0 and self.step < self.total_steps:
                from .state import save_checkpoint
                save_checkpoint(self)
        bar.close()
        self.save_outputs()
        parallel.barrier(world)
        parallel.close_world(world)
        return TrainResult(self.out, self.history, self.step)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.world.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- outputs
    def sources(self) -> list[Path]:
        """Where the side files (config, tokenizer, generation config, remote code) come from."""
        given = Path(self.args.ckpt).expanduser()
        return [p for p in (given, self.folder) if p.is_dir()]

    def save_adapter(self, folder: Path) -> None:
        """The LoRA run's adapter as peft writes it (main process only)."""
        if not self.world.main:
            return
        a = self.args
        adapter = trainable_lora_adapter(self.core)
        saved = {n: self.core.get_parameter(n).detach().float().cpu() for n in self.save_modules}
        save_adapter(folder, adapter.weights, a.lora_r, a.lora_alpha, modules_to_save=saved,
                     lora_dropout=a.lora_dropout, target_modules=list(a.lora_target),
                     base_model_name_or_path=base_model_name(a.ckpt))
        copy_side_files(self.sources(), folder, ("qwen.tiktoken", "tokenizer_config.json"))

    def save_outputs(self) -> None:
        a = self.args
        if a.full:
            save_official(self.core, self.out, self.dtype, self.sources(), self.world)
            return
        self.save_adapter(self.out)
        if a.merge and self.world.main:
            adapter = remove_trainable_lora(self.core)  # the trained wte/lm_head copies are already in place
            merge_adapter(self.core, adapter)
            save_official(self.core, self.out / "merged", self.dtype, self.sources())


def config_for_resume(trainer: Trainer) -> dict:
    a = asdict(trainer.args)
    a["learning_rate"] = trainer.args.learning_rate
    a["lora_target"] = list(a["lora_target"])
    out = {k: a[k] for k in RESUME_KEYS}
    out.update(world_size=trainer.world.size, data_sha256=trainer.data_hash, ckpt=str(trainer.folder.resolve()))
    return out

