"""nanoqwen: Qwen (v1) inference in plain PyTorch with its own Triton kernels."""
from .config import QwenConfig
from .engine import LLM, RequestOutput
from .model import Qwen
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["LLM", "Qwen", "QwenConfig", "RequestOutput", "SamplingParams", "Tokenizer"]
