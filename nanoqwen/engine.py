"""`LLM`: requests, the scheduler (continuous batching, chunked prefill, prefix caching, preemption), the step loop
and streaming.

Each `step()` schedules a batch: running sequences first (oldest first: a decode token each, or the next chunk of a
long prompt), then waiting requests while blocks, `max_num_seqs` and the token budget `max_num_batched_tokens` allow.
The batch is the concatenation of every scheduled sequence's new tokens (no padding) and goes through the model once;
sequences whose chunk reaches their last token are sampled. When blocks run out, the most recently admitted sequence
is preempted: its blocks are freed and it is recomputed later from its tokens, keeping its NTK alpha.
"""
from __future__ import annotations

import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch
from tqdm.auto import tqdm

from .attention import AttentionMetadata
from .chat import DEFAULT_SYSTEM, make_context, stop_token_ids
from .checkpoint import load_model, resolve_checkpoint, resolve_device
from .kv_cache import BlockManager, KVCache
from .model import Qwen
from .rope import ntk_index
from .sampling import Sampler, SamplingParams, SamplingTensors, random_seed
from .tokenizer import IncrementalDetokenizer, Tokenizer

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far (a stop token included, as the last one)
    text: str  # generated text so far (stop tokens and stop strings excluded)
    new_token_ids: list[int] = field(default_factory=list)  # generated in this step
    new_text: str = ""  # text released in this step (held back while it could still become a stop string)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, logprob), ...]}
    metrics: dict = field(default_factory=dict)  # arrival, first_token and finished times (time.perf_counter)


class Sequence:
    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, seed: int,
                 stop_ids: frozenset, detok: IncrementalDetokenizer):
        self.request_id, self.params, self.seed, self.stop_ids = request_id, params, seed, stop_ids
        self.token_ids = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.prefix_hashes: list[int] = []
        self.ntk_index: int | None = None  # frozen at the first prefill, kept through preemption
        self.seen_row: int | None = None  # row of the engine's repetition-penalty mask
        self.status = WAITING
        self.detok = detok
        self.text, self.emitted_chars, self.emitted_tokens = "", 0, 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.metrics = {"arrival": time.perf_counter()}

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]


class DecodeGraphs:
    """The decode step in CUDA graphs: one graph per batch-size bucket, captured on first use, over static buffers.

    A decode batch of b sequences is padded to the next bucket (pad rows: slot -1, context length 0, logits ignored),
    its metadata copied into the static buffers, and the bucket's graph replayed; attention launches a grid fixed by
    the static `max_context_len`. On the CPU (or when capture fails) the same padded static path runs eagerly, which
    is how the tests check it.
    """

    def __init__(self, llm: "LLM", capture: bool):
        self.llm, self.capture = llm, capture
        n, dev = llm.max_num_seqs, llm.device
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if b < n} | {n})
        self.max_blocks = -(-llm.max_model_len // llm.block_size)
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.ntk = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32, device=self.tokens.device), max_seqlen_q=1,
            positions=self.positions[:b], ntk_index=self.ntk[:b], slot_mapping=self.slots[:b],
            block_tables=self.block_tables[:b], context_lens=self.context_lens[:b],
            max_context_len=self.max_blocks * self.llm.block_size, is_decode=True, logits_indices=None)

    def _forward(self, b: int) -> torch.Tensor:
        return self.llm.model(self.tokens[:b], self._meta(b), self.llm.kv_cache)

    def run(self, tokens: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = tokens.shape[0]
        bucket = next(x for x in self.buckets if x >= b)
        self.slots[b:bucket].fill_(-1)
        self.context_lens[b:bucket].zero_()
        for static, value in ((self.tokens, tokens), (self.positions, meta.positions), (self.ntk, meta.ntk_index),
                              (self.slots, meta.slot_mapping), (self.context_lens, meta.context_lens)):
            static[:b].copy_(value)
        self.block_tables[:b, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if not self.capture:
            return self._forward(bucket)[:b]
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = self._capture(bucket)
            except Exception as e:  # never fail a request because a graph could not be captured
                import warnings
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs")
                self.capture = False
                return self._forward(bucket)[:b]
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]

    def _capture(self, bucket: int):
        with torch.no_grad():
            self._forward(bucket)  # compile every kernel variant before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(bucket)
            self.pool = graph.pool()
        return graph, out


class LLM:
    """A Qwen model with its tokenizer, a paged KV cache and a continuous-batching scheduler.

    `ckpt`: a name (`qwen-7b-chat`, ...), a Hugging Face repo id, an official checkpoint folder or a converted one.
    `ckpt` may also be a `Qwen` model already built, with `tokenizer=` a `Tokenizer` or a folder holding qwen.tiktoken.
    `kv_cache_dtype="int8"` stores K and V as uint8 with a scale and zero per (token, head): half the memory;
    `kv_quant_mode="qwen"` reproduces the reference's `use_cache_quantization` exactly (nanoqwen.quant.kv_int8).
    `progress` shows progress bars (conversion, loading, `generate` of 8 or more prompts) on stderr.
    `cuda_graphs` (default: on CUDA) runs decode steps as CUDA graphs per batch-size bucket; True on the CPU runs the
    same padded static path without capture (for tests).
    KV cache size: `num_kv_blocks` blocks of `block_size` tokens if given; else on CUDA a `gpu_memory_utilization`
    fraction of the GPU memory left after the weights and a profiled forward; on the CPU `cpu_kv_cache_gib` GiB.
    """

    def __init__(self, ckpt, device=None, dtype=None, *, block_size: int = 16, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, cpu_kv_cache_gib: float = 0.5, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int = 32768, enable_prefix_caching: bool = True,
                 kv_cache_dtype: str | None = None, kv_quant_mode: str = "default", cuda_graphs: bool | None = None,
                 progress: bool = True, tokenizer=None):
        if isinstance(ckpt, Qwen):  # an already built model (benchmarks, research code); tokenizer= names its vocab
            want = resolve_device(device) if device is not None else ckpt.device
            if want.type != ckpt.device.type or want.index not in (None, ckpt.device.index):
                raise ValueError(f"the model given is on {ckpt.device}, but device={device!r} was asked for: move "
                                 "the model first (model.to(device)) or leave device unset")
            self.model, folder = ckpt, None
            self.device, self.dtype = ckpt.device, ckpt.dtype
        else:
            device = resolve_device(device)  # before any download or conversion: a bad device fails at once
            folder = resolve_checkpoint(ckpt, progress=progress, need_tokenizer=tokenizer is None)
            self.model = load_model(folder, device, dtype)  # default dtype: bf16 on CUDA (fp16 for GPTQ), fp32 CPU
            self.device, self.dtype = self.model.device, self.model.dtype
        self.config, self.progress = self.model.config, progress
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer = tokenizer
        else:
            self.tokenizer = Tokenizer.from_pretrained(tokenizer or folder)
        gen_file = Path(folder) / "generation_config.json" if folder is not None else None
        self.generation_config = json.loads(gen_file.read_text()) if gen_file and gen_file.is_file() else {}
        self.chat_format = self.generation_config.get("chat_format", "raw")
        self.default_params = SamplingParams.from_generation_config(self.generation_config)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", max_model_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.max_num_batched_tokens, self.max_model_len = max_num_batched_tokens, max_model_len
        cfg = self.config
        self.kv_cache_dtype = None if kv_cache_dtype in (None, "auto") else kv_cache_dtype
        if num_kv_blocks is None:
            num_kv_blocks = self._auto_num_blocks(gpu_memory_utilization, cpu_kv_cache_gib)
        if num_kv_blocks < 1:
            raise ValueError(f"the KV cache got {num_kv_blocks} blocks: there is no memory left for it; lower "
                             "max_num_batched_tokens, raise gpu_memory_utilization or pass num_kv_blocks")
        self.kv_cache = KVCache(cfg.num_hidden_layers, num_kv_blocks, block_size, cfg.num_attention_heads,
                                cfg.head_dim, self.dtype, self.device, kv_cache_dtype, kv_quant_mode)
        # "qwen" int8 mode quantizes whatever chunk a step writes as one unit, so a shared prefix block would carry
        # another request's chunking: prefix caching is off there to keep outputs independent of other requests
        self.blocks = BlockManager(num_kv_blocks, block_size, enable_prefix_caching and kv_quant_mode != "qwen")
        self.sampler = Sampler()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.requests: dict[int, Sequence] = {}
        self._finished_outputs: list[RequestOutput] = []  # aborted requests, reported by the next step()
        self._ids = itertools.count()
        self.num_preemptions = 0
        self._seen: torch.Tensor | None = None  # [max_num_seqs, vocab] bool, rows handed to running sequences
        self._free_seen_rows = list(range(max_num_seqs))[::-1]
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.graphs = DecodeGraphs(self, capture=self.device.type == "cuda") if cuda_graphs else None

    def close(self) -> None:
        """Free the KV cache and the CUDA graphs now (the model stays usable by its other owners)."""
        self.graphs = self.kv_cache = self._seen = None
        self.waiting.clear()
        self.running.clear()
        self.requests.clear()
        if self.device.type == "cuda":
            import gc
            gc.collect()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ sizing
    def _auto_num_blocks(self, utilization: float, cpu_gib: float) -> int:
        cfg = self.config
        per_block = KVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim,
                                            self.dtype, self.kv_cache_dtype) * self.block_size
        useful = self.max_num_seqs * -(-self.max_model_len // self.block_size)
        if self.device.type != "cuda":
            return max(1, min(int(cpu_gib * (1 << 30)) // per_block, useful))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        n = min(self.max_num_batched_tokens, self.max_model_len)
        meta = AttentionMetadata.for_prefill([n], self.device, [0], logits_indices=torch.tensor([n - 1],
                                                                                                device=self.device))
        with torch.no_grad():  # profile the largest prefill the scheduler can build (logits of its last row only)
            self.model(torch.zeros(n, dtype=torch.long, device=self.device), meta)
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * utilization - (total - free) - activations
        return min(int(budget // per_block), useful)

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
                       frozenset(stops), IncrementalDetokenizer(self.tokenizer))
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        return seq.request_id

    def abort(self, request_id: int) -> None:
        """Stop a request now; the next `step()` reports it finished with reason "abort". Unknown ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is None or seq.status == FINISHED:
            return
        if seq.status == WAITING:
            self.waiting.remove(seq)
        self._finish(seq, "abort")
        self._finished_outputs.append(self._output(seq, []))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._finished_outputs)

    # ------------------------------------------------------------------------------------------------ scheduling
    def _admit(self, seq: Sequence) -> bool:
        if not self.blocks.can_allocate(len(seq.token_ids)) or not self._free_seen_rows:
            return False
        if seq.ntk_index is None:
            seq.ntk_index = ntk_index(seq.num_prompt, self.config.seq_length, self.config.use_dynamic_ntk)
            seq.prefix_hashes = self.blocks.prefix_hashes(seq.token_ids, seq.num_prompt, seq.ntk_index)
        seq.block_table, seq.num_computed = self.blocks.allocate(seq.token_ids, seq.prefix_hashes)
        seq.metrics.setdefault("cached_tokens", seq.num_computed)
        seq.seen_row = self._free_seen_rows.pop()
        if seq.params.repetition_penalty != 1.0:
            seen = self._seen_rows()
            seen[seq.seen_row] = False
            seen[seq.seen_row, torch.tensor(seq.token_ids, device=self.device)] = True
        seq.status = RUNNING
        self.running.append(seq)
        return True

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_blocks(seq.block_table)
        if seq.seen_row is not None:
            self._free_seen_rows.append(seq.seen_row)
            seq.seen_row = None
        if seq in self.running:
            self.running.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._release(seq)
        seq.num_computed, seq.status = 0, WAITING
        self.waiting.appendleft(seq)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch, preempted = self.max_num_batched_tokens, [], False
        # decodes first (one token each, steady inter-token latency), then the next chunks of running prefills
        order = sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed > 1)
        for seq in order:
            if seq.status != RUNNING or budget == 0:
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            while not self.blocks.grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]  # the most recently admitted, even if already scheduled this step
                self._preempt(victim)
                preempted = True
                for i, (s, k) in enumerate(batch):
                    if s is victim:
                        del batch[i]
                        budget += k
                        break
                if victim is seq:
                    break
            if seq.status == RUNNING:
                batch.append((seq, n))
                budget -= n
        # no admissions in a step that had to preempt (the freed blocks go to the running sequences first), unless
        # nothing at all was scheduled
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not (preempted and batch):
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    # ------------------------------------------------------------------------------------------------ the step
    def _prepare(self, batch) -> tuple[torch.Tensor, AttentionMetadata, list[Sequence]]:
        bs = self.block_size
        tokens, positions, slots, ntk, cu, ctx, logits_rows, to_sample = [], [], [], [], [0], [], [], []
        for seq, n in batch:
            start = seq.num_computed
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            ntk += [seq.ntk_index] * n
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            if start + n == len(seq.token_ids):
                logits_rows.append(cu[-1] - 1)
                to_sample.append(seq)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = [b for seq, _ in batch for b in seq.block_table + [0] * (width - len(seq.block_table))]
        # two host-to-device copies per step (one per integer width), from pinned memory on CUDA
        longs = self._to_device(tokens + positions + ntk + slots + logits_rows, torch.int64)
        ints = self._to_device(cu + ctx + tables, torch.int32)
        T, B = len(tokens), len(batch)
        tokens_d, positions_d, ntk_d, slots_d, rows_d = longs.split([T, T, T, T, len(logits_rows)])
        cu_d, ctx_d, tables_d = ints.split([B + 1, B, B * width])
        meta = AttentionMetadata(
            cu_seqlens_q=cu_d, max_seqlen_q=max(n for _, n in batch), positions=positions_d, ntk_index=ntk_d,
            slot_mapping=slots_d, block_tables=tables_d.view(B, width), context_lens=ctx_d, max_context_len=max(ctx),
            is_decode=all(n == 1 for _, n in batch), logits_indices=rows_d)
        return tokens_d, meta, to_sample

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced tokens or finished in it."""
        outputs, self._finished_outputs = self._finished_outputs, []
        batch = self._schedule()
        if not batch:
            if self.waiting:  # unreachable with the admission checks of add_request; never hang silently
                raise RuntimeError(f"{len(self.waiting)} request(s) cannot be scheduled: the KV cache "
                                   f"({self.blocks.num_blocks} blocks) is too small for them")
            return outputs
        tokens, meta, to_sample = self._prepare(batch)
        with torch.no_grad():
            if self.graphs is not None and meta.is_decode:
                logits = self.graphs.run(tokens, meta)
            else:
                logits = self.model(tokens, meta, self.kv_cache)
        for seq, n in batch:
            seq.num_computed += n
            self.blocks.register(seq.block_table, seq.token_ids, seq.prefix_hashes, seq.num_computed)
        if to_sample:
            outputs += self._sample(logits, to_sample)
        return outputs

    def _seen_rows(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(self.max_num_seqs, self.config.vocab_size, dtype=torch.bool, device=self.device)
        return self._seen

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[RequestOutput]:
        params = [s.params for s in seqs]
        penalty = any(p.repetition_penalty != 1.0 for p in params)
        lp = None
        if all(p.greedy and p.logprobs is None for p in params) and not penalty:
            next_ids = logits.argmax(-1).tolist()  # plain greedy: no sampler state to build
        else:
            rows = torch.tensor([s.seen_row for s in seqs], device=self.device)
            state = SamplingTensors.from_params(params, self.device, seeds=[s.seed for s in seqs],
                                                steps=[s.num_output for s in seqs],
                                                seen=self._seen_rows()[rows] if penalty else None)
            out = self.sampler(logits, state)
            if penalty:
                self._seen[rows, out.next_ids] = True
            next_ids = out.next_ids.tolist()  # the one host sync of a step: the stop check needs the tokens
            if state.num_logprobs is not None:
                lp = (out.chosen_logprobs.tolist(), out.top_logprobs.tolist(), out.top_ids.tolist())
        now = time.perf_counter()
        outputs = []
        for i, (seq, tok) in enumerate(zip(seqs, next_ids)):
            seq.metrics.setdefault("first_token", now)
            seq.token_ids.append(tok)
            if seq.logprobs is not None:
                k = seq.params.logprobs
                seq.logprobs.append({"token_id": tok, "logprob": lp[0][i],
                                     "top": list(zip(lp[2][i][:k], lp[1][i][:k]))})
            outputs.append(self._advance(seq, tok))
        return outputs

    def _advance(self, seq: Sequence, tok: int) -> RequestOutput:
        """Stop checks and detokenization for a newly sampled token."""
        reason = None
        if tok in seq.stop_ids:
            reason = "stop"
        else:
            before = len(seq.text)
            seq.text += seq.detok.push([tok])
            if seq.params.stop:  # a stop string may end in the new text and start up to its length before it
                start = max(0, before - max(map(len, seq.params.stop)) + 1)
                hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
                if hits:
                    seq.text, reason = seq.text[:min(hits)], "stop"
        if reason is None and (seq.num_output >= seq.params.max_new_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if seq.detok is not None and not (reason == "stop" and tok not in seq.stop_ids):
                seq.text += seq.detok.flush()  # bytes of a character the stop cut short become U+FFFD
            self._finish(seq, reason)
        return self._output(seq, [tok])

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason, seq.status = reason, FINISHED
        seq.metrics["finished"] = time.perf_counter()
        self._release(seq)
        self.requests.pop(seq.request_id, None)

    def _output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        finished = seq.status == FINISHED
        hold = 0 if finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        upto = max(seq.emitted_chars, len(seq.text) - hold)
        new_text, seq.emitted_chars = seq.text[seq.emitted_chars:upto], upto
        return RequestOutput(seq.request_id, seq.token_ids[:seq.num_prompt], seq.output_ids, seq.text[:upto],
                             new_ids, new_text, finished, seq.finish_reason,
                             list(seq.logprobs) if seq.logprobs is not None else None, dict(seq.metrics))

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
            self._finished_outputs = [o for o in self._finished_outputs if o.request_id not in ids]
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
            self._finished_outputs = [o for o in self._finished_outputs if o.request_id != rid]
