"""`LLM`: the public API over the scheduler and the model runner (requests, steps, streaming, chat).

A step: the scheduler picks the batch, the runner queues its device work, and the engine turns sampled tokens into
outputs (stop checks, detokenization). With `overlap` (the default on CUDA) step n + 1 is scheduled and launched
before the engine reads step n's tokens, so the host work of one step runs while the GPU computes the next; a
sequence that step n finished has one token computed in vain in step n + 1, and is dropped. Outputs are the same
either way; only `step()` reports each step's tokens one call later.
"""
from __future__ import annotations

import atexit
import functools
import gc
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch
from tqdm.auto import tqdm

from ..attention import AttentionMetadata
from ..chat import DEFAULT_SYSTEM, make_context, stop_token_ids
from ..checkpoint import load_model, resolve_checkpoint, resolve_device
from ..kv_cache import BlockManager, KVCache
from ..model import Qwen
from ..sampling import SamplingParams, random_seed
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .runner import LaunchedStep, ModelRunner
from .scheduler import FINISHED, Scheduler, Sequence


def _freeze_heap() -> None:
    """What exists once an engine is built lives as long as it: move it out of the collector's sight, so no step pays
    for scanning it (gc.freeze). Unfrozen at exit, so that extension modules see their objects released."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True


_unfreeze_registered = False


def profile_kv_blocks(model, n: int, utilization: float, per_block: int, useful: int, lora=None) -> int:
    """KV-cache blocks that fit on the model's GPU: a `utilization` fraction of its memory, less what is in use and
    the activations of the largest prefill the scheduler can build (`n` tokens, logits of the last row), profiled."""
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    meta = AttentionMetadata.for_prefill([n], device, [0], logits_indices=torch.tensor([n - 1], device=device))
    if lora is not None:
        lora.set_token_indices(torch.full((n,), -1, dtype=torch.int32))
    with torch.no_grad():
        model(torch.zeros(n, dtype=torch.long, device=device), meta)
        # and the prompt logprobs of a scoring step: n final hidden states, the head a slice of rows at a time
        model.token_logprobs(torch.zeros(n, model.config.hidden_size, dtype=model.dtype, device=device),
                             torch.zeros(n, dtype=torch.long, device=device), top_k=20)
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - before
    free, total = torch.cuda.mem_get_info(device)
    budget = total * utilization - (total - free) - activations
    return min(int(budget // per_block), useful)


def _stop_workers_on_error(init):
    """A constructor that fails after starting tensor-parallel workers stops them before raising."""
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "tp", None) is not None:
                self.tp.shutdown()
            raise
    return wrapper


class RequestOutput:
    """What a step produced for one request: the new tokens and text (deltas), and views of everything so far.

    `token_ids`, `text`, `prompt_token_ids` and `logprobs` are read from the request on access (nothing is copied
    per step); they show the request as it was when this output was made. `metrics` (arrival, first_token and
    finished times from time.perf_counter, cached_tokens) is the request's live record.
    """

    __slots__ = ("request_id", "new_token_ids", "new_text", "finished", "finish_reason", "metrics", "_seq", "_n",
                 "_chars")

    def __init__(self, seq: Sequence, new_token_ids: list[int], new_text: str):
        self.request_id, self.new_token_ids, self.new_text = seq.request_id, new_token_ids, new_text
        self.finished, self.finish_reason = seq.status == FINISHED, seq.finish_reason
        self.metrics = seq.metrics
        self._seq, self._n, self._chars = seq, len(seq.token_ids) - seq.num_prompt, seq.emitted_chars

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._seq.token_ids[:self._seq.num_prompt]

    @property
    def token_ids(self) -> list[int]:
        """Every generated token so far (a stop token included, as the last one)."""
        s = self._seq
        return s.token_ids[s.num_prompt:s.num_prompt + self._n]

    @property
    def text(self) -> str:
        """The generated text so far (stop tokens and stop strings excluded; text that could still become a stop
        string is held back until it cannot)."""
        return self._seq.text[:self._chars]

    @property
    def logprobs(self) -> list[dict] | None:
        """Per generated token {"token_id", "logprob", "top": [(id, logprob), ...]} when the request asked."""
        return None if self._seq.logprobs is None else self._seq.logprobs[:self._n]

    @property
    def prompt_logprobs(self) -> list[dict | None] | None:
        """When the request asked (SamplingParams.prompt_logprobs=k), vLLM's: one entry per prompt token, None for
        the first, then {token_id: logprob} holding the prompt token (first) and the k most likely tokens at that
        position, fp32 log-softmax of the model's logits. Complete in every output of the request (an abort's may
        come before the prompt was)."""
        return self._seq.prompt_logprobs

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, new_token_ids={self.new_token_ids}, "
                f"new_text={self.new_text!r}, finished={self.finished}, finish_reason={self.finish_reason!r})")


@dataclass
class Score:
    """A sequence's log-likelihood under the model. token_logprobs[i] = log p(token_ids[i + 1] | token_ids[:i + 1])
    (the first token has nothing before it: n - 1 entries); `logprob` is their sum."""
    token_ids: list[int]
    token_logprobs: list[float]

    @property
    def logprob(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        """exp(-mean token logprob); nan for a single token (nothing is predicted)."""
        n = len(self.token_logprobs)
        return math.exp(-self.logprob / n) if n else math.nan


class LLM:
    """A Qwen model with its tokenizer, a paged KV cache and a continuous-batching scheduler.

    `ckpt`: a name (`qwen-7b-chat`, ...), a Hugging Face repo id, an official checkpoint folder or a converted one.
    `ckpt` may also be a `Qwen` model already built, with `tokenizer=` a `Tokenizer` or a folder holding qwen.tiktoken.
    `device` / `dtype`: default cuda + bf16 (fp16 for GPTQ) when a GPU is there, else cpu + fp32.
    `kv_cache_dtype="int8"` stores K and V as uint8 with a scale and zero per (token, head): half the memory;
    `kv_quant_mode="qwen"` reproduces the reference's `use_cache_quantization` exactly (nanoqwen.quant.kv_int8); then
    a prompt is prefilled as one chunk and prefix caching is off, so outputs never depend on the rest of the batch.
    `progress` shows progress bars (conversion, loading, `generate` of 8 or more prompts) on stderr.
    `cuda_graphs` (default: on CUDA) runs decode steps as CUDA graphs per batch-size bucket, all captured when the
    engine is built; True on the CPU runs the same padded static path without capture (for tests).
    `overlap` (default: on CUDA) launches each step before reading the previous step's tokens (see the module doc).
    `use_dynamic_ntk` / `use_logn_attn` (None: config.json's) switch Qwen's long-context tricks for this engine's
    model (a load-time override: checkpoint.load_model).
    Scoring: `score` (each sequence's token logprobs), `loglikelihood` ((logprob, is_greedy) of continuations) and
    SamplingParams(prompt_logprobs=k) on any request.
    LoRA adapters (PEFT folders, as Qwen's finetune.py writes them): `lora=PATH` merges one into the weights at load
    time (fp checkpoints; no cost per token); `enable_lora=True` serves up to `max_loras` unmerged adapters of rank
    up to `max_lora_rank` at once, on fp and GPTQ models: `add_lora(name, path)`, then `SamplingParams(lora=name)`
    per request (requests with different adapters, or none, share batches; the prefix cache never shares blocks
    between adapters).
    KV cache size: `num_kv_blocks` blocks of `block_size` tokens if given; else on CUDA a `gpu_memory_utilization`
    fraction of the GPU memory left after the weights and a profiled forward; on the CPU `cpu_kv_cache_gib` GiB.
    `tensor_parallel_size=N` splits every layer over N GPUs (cuda:0..N-1 from `device`'s index; on the CPU N
    processes, for tests): this process is rank 0 and starts N - 1 workers (or joins the ranks torchrun started;
    see nanoqwen.distributed), rendezvous at `dist_addr`:`dist_port` (default 127.0.0.1 and a free port). Every
    size (num_kv_blocks, gpu_memory_utilization, cpu_kv_cache_gib) is per rank, and a rank's cache holds only its
    heads. Not with LoRA adapters. Scripts that build one must guard their top level with
    `if __name__ == "__main__":` (the workers are spawned processes that import the main module).
    """

    @_stop_workers_on_error
    def __init__(self, ckpt, device=None, dtype=None, *, block_size: int = 16, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, cpu_kv_cache_gib: float = 0.5, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int = 32768, enable_prefix_caching: bool = True,
                 kv_cache_dtype: str | None = None, kv_quant_mode: str = "default", cuda_graphs: bool | None = None,
                 overlap: bool | None = None, progress: bool = True, tokenizer=None, lora=None,
                 enable_lora: bool = False, max_loras: int = 4, max_lora_rank: int = 16,
                 use_dynamic_ntk: bool | None = None, use_logn_attn: bool | None = None,
                 tensor_parallel_size: int = 1, dist_addr: str | None = None, dist_port: int | None = None):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", max_model_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or \
                tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer (GPUs to split the model over), got "
                             f"{tensor_parallel_size!r}")
        self.tp = None
        if tensor_parallel_size > 1:
            if isinstance(ckpt, Qwen):
                raise ValueError("tensor_parallel_size > 1 loads each rank's shard from the checkpoint: pass the "
                                 "checkpoint's name or folder, not a model already built")
            if lora is not None or enable_lora:
                raise ValueError("LoRA adapters are not supported with tensor_parallel_size > 1: run on one GPU "
                                 "(tensor_parallel_size=1) to use them")
            from ..distributed import serve_if_torchrun_worker
            serve_if_torchrun_worker(tensor_parallel_size, device)  # under torchrun, ranks > 0 never return
        if isinstance(ckpt, Qwen):  # an already built model (benchmarks, research code); tokenizer= names its vocab
            want = resolve_device(device) if device is not None else ckpt.device
            if want.type != ckpt.device.type or want.index not in (None, ckpt.device.index):
                raise ValueError(f"the model given is on {ckpt.device}, but device={device!r} was asked for: move "
                                 "the model first (model.to(device)) or leave device unset")
            if lora is not None:
                raise ValueError("lora= merges an adapter while loading a checkpoint; for a model already built, "
                                 "merge it yourself (nanoqwen.lora.merge_adapter) or pass enable_lora=True")
            if use_dynamic_ntk is not None or use_logn_attn is not None:
                raise ValueError("use_dynamic_ntk / use_logn_attn are load-time overrides: pass them to "
                                 "Qwen.from_pretrained when building the model (or give LLM the checkpoint)")
            self.model, folder = ckpt, None
        else:
            device = resolve_device(device)  # before any download or conversion: a bad device fails at once
            folder = resolve_checkpoint(ckpt, progress=progress, need_tokenizer=tokenizer is None)
            if tensor_parallel_size > 1:
                if use_dynamic_ntk is not None or use_logn_attn is not None:
                    raise ValueError("use_dynamic_ntk / use_logn_attn are not supported with tensor_parallel_size > "
                                     "1 yet: run the comparison on one GPU, or edit the converted config.json")
                self.model = self._start_tensor_parallel(folder, device, dtype, tensor_parallel_size, dist_addr,
                                                         dist_port)
            else:
                self.model = load_model(folder, device, dtype, lora=lora, use_dynamic_ntk=use_dynamic_ntk,
                                        use_logn_attn=use_logn_attn)  # default: bf16 on CUDA (fp16 GPTQ), fp32 CPU
        self.device, self.dtype = self.model.device, self.model.dtype
        self.config, self.progress = self.model.config, progress
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer or folder)
        gen_file = Path(folder) / "generation_config.json" if folder is not None else None
        self.generation_config = json.loads(gen_file.read_text()) if gen_file and gen_file.is_file() else {}
        self.chat_format = self.generation_config.get("chat_format", "raw")
        self.default_params = SamplingParams.from_generation_config(self.generation_config)
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.max_num_batched_tokens, self.max_model_len = max_num_batched_tokens, max_model_len
        cfg = self.config
        self.kv_cache_dtype = None if kv_cache_dtype in (None, "auto") else kv_cache_dtype
        self.lora = None
        if enable_lora:  # before sizing the cache (the LoRA layers' buffers count) and before capturing graphs
            from ..lora import LoraManager
            self.lora = LoraManager(self.model, max_loras, max_lora_rank,
                                    max_num_tokens=max(max_num_batched_tokens, max_num_seqs))
        if num_kv_blocks is None:
            num_kv_blocks = self._auto_num_blocks(gpu_memory_utilization, cpu_kv_cache_gib)
        if num_kv_blocks < 1:
            raise ValueError(f"the KV cache got {num_kv_blocks} blocks: there is no memory left for it; lower "
                             "max_num_batched_tokens, raise gpu_memory_utilization or pass num_kv_blocks")
        if self.tp is not None:
            self.tp.setup_cache(num_blocks=num_kv_blocks, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                                kv_quant_mode=kv_quant_mode, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                cuda_graphs=self.device.type == "cuda" if cuda_graphs is None else cuda_graphs)
        self.kv_cache = KVCache(cfg.num_hidden_layers, num_kv_blocks, block_size, self.num_kv_heads,
                                cfg.head_dim, self.dtype, self.device, kv_cache_dtype, kv_quant_mode)
        qwen_mode = self.kv_cache.quant_mode == "qwen"
        # qwen int8 mode quantizes each written chunk as one unit: a shared prefix block would carry another
        # request's chunk, so prefix caching is off there
        self.blocks = BlockManager(num_kv_blocks, block_size, enable_prefix_caching and not qwen_mode)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                   seq_length=cfg.seq_length, use_dynamic_ntk=cfg.use_dynamic_ntk,
                                   whole_prompt_chunks=qwen_mode)
        on_cuda = self.device.type == "cuda"
        self.runner = ModelRunner(self.model, self.kv_cache, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                  block_size=block_size, cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs,
                                  tp=self.tp)
        self.runner.lora = self.lora
        self.overlap = on_cuda if overlap is None else overlap
        self.requests: dict[int, Sequence] = {}
        self._aborted: list[RequestOutput] = []  # reported by the next step()
        self._inflight: LaunchedStep | None = None
        self._ids = itertools.count()
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all(progress)
        _freeze_heap()

    # views kept for callers (tests, benchmarks, the server's metrics)
    waiting = property(lambda self: self.scheduler.waiting)
    running = property(lambda self: self.scheduler.running)
    num_preemptions = property(lambda self: self.scheduler.num_preemptions)
    graphs = property(lambda self: self.runner.graphs)
    num_kv_heads = property(lambda self: self.model.transformer.h[0].attn.n_head)  # this rank's, under TP

    def _start_tensor_parallel(self, folder, device, dtype, world: int, addr, port) -> Qwen:
        """Start (or join) the workers and load rank 0's shard."""
        from ..checkpoint import default_dtype, gptq_config, parse_dtype
        from ..config import QwenConfig
        from ..distributed import TensorParallel, check_tensor_parallel, torchrun_rank
        cfg = QwenConfig.from_json(folder)
        check_tensor_parallel(cfg, world)  # before any process starts
        spawned = torchrun_rank() is None  # (torchrun places one rank per GPU, over nodes)
        if spawned and device.type == "cuda" and (device.index or 0) + world > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs from {device} on, but this machine has "
                             f"{torch.cuda.device_count()}: lower it, or start the ranks with torchrun over nodes")
        dtype = parse_dtype(dtype) or default_dtype(device, quantized=gptq_config(cfg) is not None)
        self.tp = TensorParallel(world, device, addr, port)
        return self.tp.load(folder, dtype)

    def close(self) -> None:
        """Free the KV cache and the CUDA graphs now (the model stays usable by its other owners); under tensor
        parallelism, stop the workers."""
        self.runner.close()
        if self.tp is not None:
            self.tp.shutdown()
        self.kv_cache = self.runner.kv_cache = None
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        self.requests.clear()
        self._inflight = None
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ sizing
    def _auto_num_blocks(self, utilization: float, cpu_gib: float) -> int:
        cfg = self.config
        per_block = KVCache.bytes_per_token(cfg.num_hidden_layers, self.num_kv_heads, cfg.head_dim,
                                            self.dtype, self.kv_cache_dtype) * self.block_size
        useful = self.max_num_seqs * -(-self.max_model_len // self.block_size)
        if self.device.type != "cuda":
            return max(1, min(int(cpu_gib * (1 << 30)) // per_block, useful))
        n = min(self.max_num_batched_tokens, self.max_model_len)
        if self.tp is None:
            return profile_kv_blocks(self.model, n, utilization, per_block, useful, self.lora)
        with self.tp.step("profile", n, utilization, per_block, useful):  # every rank profiles; the least fits all
            return self.tp.group.min_over_ranks(profile_kv_blocks(self.model, n, utilization, per_block, useful))

    # ------------------------------------------------------------------------------------------------ requests
    def encode(self, prompt, special_tokens: bool = True) -> list[int]:
        """Text is encoded as the reference tokenizer does by default: the text of a special token becomes that
        token (`a<|endoftext|>b` is 3 tokens, and a raw ChatML string works); `special_tokens=False` encodes such
        text as plain text. Id lists are used as they are."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, allowed_special="all" if special_tokens else set())
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def add_request(self, prompt, params: SamplingParams | None = None, *, special_tokens: bool = True) -> int:
        """Queue a prompt (text or token ids); returns its request id. It runs on the following `step()` calls.
        Text is tokenized as `encode` says (`special_tokens=False`: special-token text stays plain text)."""
        params = params if params is not None else self.default_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.prompt_logprobs is not None and self.tp is not None:
            raise ValueError("prompt logprobs (SamplingParams.prompt_logprobs, score, loglikelihood) are not "
                             "supported with tensor_parallel_size > 1 yet: score on one GPU")
        lora_slot, lora_id = -1, None
        if params.lora is not None:
            if self.lora is None:
                raise ValueError(f"the request asks for LoRA adapter {params.lora!r}, but this engine serves none: "
                                 "build it with LLM(..., enable_lora=True) and add the adapter with add_lora")
            if params.lora not in self.lora.names:
                raise ValueError(f"no LoRA adapter named {params.lora!r} (loaded: {self.lora.names or 'none'}); "
                                 "add it first with add_lora(name, path)")
            lora_slot, lora_id = self.lora.slot(params.lora), self.lora.adapter_id(params.lora)
        ids = self.encode(prompt, special_tokens)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token (or a non-empty string)")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_model_len = {self.max_model_len}; "
                             "shorten it (or raise max_model_len, up to what the model supports)")
        longest = min(len(ids) + params.max_new_tokens, self.max_model_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise ValueError(f"this request can grow to {longest} tokens ({self.blocks.blocks_for(longest)} blocks of "
                             f"{self.block_size}), more than the whole KV cache ({self.blocks.num_blocks} blocks); "
                             "lower max_new_tokens or give the cache more memory (num_kv_blocks / "
                             "gpu_memory_utilization)")
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(stop_token_ids(self.chat_format))
        seq = Sequence(next(self._ids), ids, params, params.seed if params.seed is not None else random_seed(),
                       frozenset(stops))
        seq.detok = IncrementalDetokenizer(self.tokenizer)
        seq.lora_slot, seq.lora_id = lora_slot, lora_id
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def add_lora(self, name: str, path) -> None:
        """Load a PEFT adapter folder (or a nanoqwen.lora.LoraAdapter) under `name`, for SamplingParams(lora=name)."""
        if self.lora is None:
            raise ValueError("this engine was built without enable_lora=True: it cannot add adapters (pass lora=PATH "
                             "to merge one at load time, or build it with enable_lora=True)")
        self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused while a queued or running request uses it."""
        if self.lora is None or name not in self.lora.names:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        users = [s.request_id for s in self.requests.values() if s.params.lora == name]
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by request(s) {users[:5]}: wait for them or abort "
                             "them first")
        self.lora.remove(name)

    def abort(self, request_id: int) -> None:
        """Stop a request now; the next `step()` reports it finished with reason "abort". Unknown ids are ignored."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.status == FINISHED:
            return
        self.scheduler.finish(seq, "abort")
        self._aborted.append(RequestOutput(seq, [], ""))

    def has_unfinished(self) -> bool:
        live_inflight = self._inflight is not None and any(s.status != FINISHED for s in self._inflight.sampled)
        return bool(self.scheduler.has_work() or self._aborted or live_inflight)

    # ------------------------------------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced tokens or finished (with `overlap`,
        the tokens of the step before: each step's tokens are reported by the next call)."""
        outputs, self._aborted = self._aborted, []
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            launched = self.runner.launch(batch)  # nothing is committed if this raises: the engine stays as it was
            self.scheduler.commit(batch, launched.sampled)
        elif self._inflight is None and self.scheduler.waiting:  # unreachable with add_request's checks
            raise RuntimeError(f"{len(self.scheduler.waiting)} request(s) cannot be scheduled: the KV cache "
                               f"({self.blocks.num_blocks} blocks) is too small for them")
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            outputs += self._process(done)
        if launched is not None:
            if self.overlap:
                self._inflight = launched
            else:
                outputs += self._process(launched)
        return outputs

    def _process(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens and turn them into outputs: stop checks, detokenization."""
        ids, lp, plp = self.runner.collect(step)
        if plp is not None:  # before the tokens: a request's prompt logprobs are complete when it first shows
            self._store_prompt_logprobs(*plp)
        now = time.perf_counter()
        outputs = []
        for i, (seq, tok) in enumerate(zip(step.sampled, ids)):
            seq.num_pending -= 1
            if seq.status == FINISHED:  # aborted, or finished by the step before (overlap): this token is void
                continue
            seq.metrics.setdefault("first_token", now)
            seq.token_ids.append(tok)
            if seq.logprobs is not None:
                k = seq.params.logprobs
                seq.logprobs.append({"token_id": tok, "logprob": lp[0][i], "top": list(zip(lp[2][i][:k], lp[1][i][:k]))})
            outputs.append(self._emit(seq, tok))  # (a sequence preempted meanwhile keeps it and recomputes later)
        return outputs

    @staticmethod
    def _store_prompt_logprobs(scored, chosen, top_values, top_ids) -> None:
        """Append a step's prompt logprobs to their requests as vLLM has them: {token_id: logprob} holding the
        prompt token and the top k, per prompt token."""
        row = 0
        for seq, first, n in scored:
            k = seq.params.prompt_logprobs
            if seq.status != FINISHED:  # (an aborted request: nothing)
                for r in range(row, row + n):
                    entry = {seq.token_ids[first + r - row]: chosen[r]}
                    entry.update(zip(top_ids[r][:k], top_values[r][:k]))
                    seq.prompt_logprobs.append(entry)
            row += n

    def _emit(self, seq: Sequence, tok: int) -> RequestOutput:
        """Stop checks and detokenization for a newly sampled token."""
        reason, stop = None, seq.params.stop
        if tok in seq.stop_ids:
            reason = "stop"
        else:
            before = len(seq.text)
            seq.text += seq.detok.push(tok)
            if stop:  # a stop string may end in the new text and start up to its length before it
                start = max(0, before - max(map(len, stop)) + 1)
                hits = [i for i in (seq.text.find(s, start) for s in stop) if i >= 0]
                if hits:
                    seq.text, reason = seq.text[:min(hits)], "stop"
        read = len(seq.token_ids)  # (a token of a step launched since may be pending: not counted here)
        if reason is None and (read - seq.num_prompt >= seq.params.max_new_tokens or read >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if not (reason == "stop" and tok not in seq.stop_ids):
                seq.text += seq.detok.flush()  # bytes of a character the stop cut short become U+FFFD
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
        hold = 0 if seq.status == FINISHED or not stop else max(map(len, stop)) - 1
        upto = max(seq.emitted_chars, len(seq.text) - hold)
        new_text, seq.emitted_chars = seq.text[seq.emitted_chars:upto], upto
        return RequestOutput(seq, [tok], new_text)

    # ------------------------------------------------------------------------------------------------ front ends
    def stream(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding each step's outputs (partial and final)."""
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 special_tokens: bool = True) -> list[RequestOutput]:
        """Run prompts (a string, a list of token ids, or a list of either) batched together; outputs in order.
        Text prompts are tokenized as `encode` says: special-token text such as `<|endoftext|>` becomes the special
        token, as Qwen's tokenizer does; `special_tokens=False` keeps it plain text.

        Requests queued earlier with `add_request` run in the same batches, but their outputs are not returned here:
        drive those with `step()`/`stream()` instead."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                              all(isinstance(t, int) for t in prompts))
        prompts = [prompts] if single else list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: pass one, or one each")
        else:
            params = [params] * len(prompts)
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p, special_tokens=special_tokens))
        except Exception:
            for i in ids:
                self.abort(i)
            self._aborted = [o for o in self._aborted if o.request_id not in ids]
            raise
        results = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not self.progress or len(ids) < 8) as bar:
            while wanted - results.keys():
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        outs = [results[i] for i in ids]
        return outs[0] if single else outs

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, prompts, *, special_tokens: bool = True) -> "Score | list[Score]":
        """Each sequence's log-likelihood under the model (a string, a list of token ids, or a list of either;
        batched through the engine, one full forward of each sequence): a `Score` each, in order. Text is tokenized
        as `encode` says."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                              all(isinstance(t, int) for t in prompts))
        prompts = [prompts] if single else list(prompts)
        id_lists = [self.encode(p, special_tokens) for p in prompts]
        scored = self._prompt_logprobs(id_lists, [1] * len(id_lists), top_k=0, desc="scoring")
        outs = [Score(ids, [entry[tok] for tok, entry in zip(ids[1:], lp[1:])]) for ids, lp in zip(id_lists, scored)]
        return outs[0] if single else outs

    def loglikelihood(self, requests, *, special_tokens: bool = True) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each (context, continuation) pair, as lm-evaluation-harness
        asks: the sum of the continuation tokens' logprobs, and whether each of them is the argmax at its position
        (a tie counts as greedy). Each element is a string or a list of token ids; strings are tokenized apart (the
        continuation's tokens are `encode(continuation)`): pass ids to split a text your way. The pairs are batched
        through the engine (one full forward of context + continuation each); the prefix cache may serve a context
        shared with an earlier request, never the continuation."""
        pairs = []
        for i, pair in enumerate(requests):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError(f"loglikelihood takes (context, continuation) pairs; item {i} is {pair!r:.80}")
            context, continuation = (self.encode(x, special_tokens) for x in pair)
            if not context:
                raise ValueError(f"pair {i} has an empty context: the first token has nothing to be predicted from; "
                                 "start it with a token, e.g. '<|endoftext|>' (what lm-evaluation-harness does)")
            if not continuation:
                raise ValueError(f"pair {i} has an empty continuation: give at least one token to score")
            pairs.append((context, continuation))
        scored = self._prompt_logprobs([c + t for c, t in pairs], [len(c) for c, _ in pairs], top_k=1,
                                       desc="log-likelihoods")
        results = []
        for (context, continuation), lp in zip(pairs, scored):
            entries = lp[len(context):]
            results.append((math.fsum(e[t] for t, e in zip(continuation, entries)),
                            all(e[t] >= max(e.values()) for t, e in zip(continuation, entries))))
        return results

    def _prompt_logprobs(self, id_lists: list[list[int]], firsts: list[int], top_k: int,
                         desc: str) -> list[list[dict | None]]:
        """Run each id list as a prompt with prompt logprobs (top_k) from token firsts[i] on (earlier tokens: None;
        the prefix cache may serve them) and one greedy token; returns their `prompt_logprobs` in order."""
        params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=top_k, ignore_eos=True)
        ids = []
        try:
            for tokens, first in zip(id_lists, firsts):
                ids.append(self.add_request(tokens, params))
                seq = self.requests[ids[-1]]  # still waiting: no step has seen it
                seq.prompt_logprobs, seq.prompt_logprobs_next = [None] * first, first
        except Exception:
            for i in ids:
                self.abort(i)
            self._aborted = [o for o in self._aborted if o.request_id not in ids]
            raise
        results, wanted = {}, set(ids)
        with tqdm(total=len(ids), desc=desc, unit="seq", disable=not self.progress or len(ids) < 8) as bar:
            while wanted - results.keys():
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out.prompt_logprobs
                        bar.update(1)
        return [results[i] for i in ids]

    def chat_params(self, params: SamplingParams | None) -> SamplingParams:
        return params if params is not None else self.default_params

    def chat_context(self, query: str, history=None, system: str = DEFAULT_SYSTEM) -> list[int]:
        """The ChatML prompt ids of a chat turn (history truncated to the generation_config's max_window_size)."""
        if self.chat_format != "chatml":
            raise ValueError("this is a base model (its generation_config.json has chat_format "
                             f"{self.chat_format!r}): use generate() to complete text, or load a chat model")
        window = self.generation_config.get("max_window_size", 6144)
        return make_context(self.tokenizer, query, history, system, window)[1]

    def chat(self, query: str, history=None, system: str = DEFAULT_SYSTEM, params: SamplingParams | None = None):
        """One chat turn: returns (response, history + [(query, response)]). The response is stripped of surrounding
        whitespace like the reference's, but keeps its last token (the reference drops it when no stop token was
        generated: a bug, spec 11.9)."""
        ids = self.chat_context(query, history, system)
        out = self.generate([ids], [self.chat_params(params)])[0]
        response = out.text.strip()
        return response, list(history or []) + [(query, response)]

    def chat_stream(self, query: str, history=None, system: str = DEFAULT_SYSTEM,
                    params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the response's text deltas as they are generated (the reference yields the whole text so far).
        Meant for one conversation at a time: other queued requests advance too, but their outputs are dropped."""
        rid = self.add_request(self.chat_context(query, history, system), self.chat_params(params))
        try:
            done = False
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        if out.new_text:
                            yield out.new_text
                        done = out.finished
        finally:
            self.abort(rid)
            self._aborted = [o for o in self._aborted if o.request_id != rid]
