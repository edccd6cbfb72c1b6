"""The engine, split by job as nano-vllm does: `scheduler` (queues, admission, token budget, preemption, prefix
cache; plain Python), `runner` (metadata, CUDA graphs, forward, sampling), `llm` (`LLM`, the public API)."""
from .llm import LLM, RequestOutput
from .runner import ModelRunner
from .scheduler import Scheduler, Sequence

__all__ = ["LLM", "ModelRunner", "RequestOutput", "Scheduler", "Sequence"]
