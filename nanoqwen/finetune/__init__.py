"""Fine-tuning Qwen (v1) in plain PyTorch: LoRA, Q-LoRA (LoRA on a GPTQ Int4/Int8 base) and full-parameter, in one
process or under torchrun (DDP for LoRA, FSDP for full), from Qwen's JSON conversation format.

    python -m nanoqwen.finetune --ckpt qwen-7b-chat --data train.json --out out/        (LoRA, Qwen's recipe)
    torchrun --nproc-per-node 8 -m nanoqwen.finetune --ckpt qwen-14b --full --data train.json --out out/

data.py: the data format and finetune.py's preprocess; trainer.py: the loop; state.py: checkpoints and resume;
parallel.py: DDP/FSDP; export.py: the adapter and official-layout checkpoints it writes.
"""
from .data import DataError, SupervisedData, encode_conversation, load_conversations, preprocess
from .trainer import FinetuneArgs, Trainer, TrainResult, batch_nll, lr_at, make_optimizer, split_rows


def train(args: FinetuneArgs | None = None, **kwargs) -> TrainResult:
    """Run one fine-tuning: `train(FinetuneArgs(...))` or `train(ckpt=..., data=..., out=..., ...)`."""
    return Trainer(args if args is not None else FinetuneArgs(**kwargs)).run()


def main(argv=None, prog: str = "python -m nanoqwen.finetune") -> int:
    from .cli import main as cli_main
    return cli_main(argv, prog)


__all__ = ["DataError", "FinetuneArgs", "SupervisedData", "TrainResult", "Trainer", "batch_nll", "encode_conversation",
           "load_conversations", "lr_at", "main", "make_optimizer", "preprocess", "split_rows", "train"]
