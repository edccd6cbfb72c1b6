"""nanoqwen: Qwen (v1) inference in plain PyTorch with its own Triton kernels."""
from .config import QwenConfig
from .model import Qwen
from .tokenizer import Tokenizer

__all__ = ["Qwen", "QwenConfig", "Tokenizer"]
