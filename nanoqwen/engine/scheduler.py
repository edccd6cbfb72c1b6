"""The scheduler: which sequences run in the next step, and how many of their tokens (plain Python, no torch).

Each step takes running sequences first, decodes before prefill chunks (a steady inter-token latency), oldest first:
one token each for a decode, the next chunk of a prompt (or of a recomputation) otherwise; then waiting requests while
the KV blocks, `max_num_seqs` and the token budget `max_num_batched_tokens` allow. When blocks run out, the most
recently admitted sequence is preempted: its blocks are freed and it is later recomputed from its tokens, keeping its
NTK alpha. Full prompt blocks enter the prefix cache as soon as the step that computes them is scheduled.

The engine may run a step before it has read the tokens sampled by the previous one (overlap scheduling): a sampled
token whose value the host does not know yet is counted in `Sequence.num_pending`, so every count the scheduler needs
(tokens to compute, outputs so far) is exact anyway; only the values arrive later.

`whole_prompt_chunks` (the int8 KV cache in "qwen" mode, which quantizes whatever chunk a step writes as one unit):
a prompt is never split (one chunk, even beyond the token budget, alone in its step if need be) and a recomputation
repeats the original chunks (the prompt, then one token at a time), so outputs do not depend on the rest of the batch.
"""
from __future__ import annotations

import itertools
import time
from collections import deque

from ..kv_cache import BlockManager
from ..rope import ntk_index
from ..sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    """One request: its tokens, where its K/V live, and what the engine has done with it."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, seed: int,
                 stop_ids: frozenset = frozenset()):
        self.request_id, self.params, self.seed, self.stop_ids = request_id, params, seed, stop_ids
        self.token_ids = list(prompt_ids)  # prompt + generated tokens whose values the host has read
        self.num_prompt = len(prompt_ids)
        self.num_pending = 0  # sampled on the device, value not read yet (overlap scheduling)
        self.num_computed = 0  # tokens whose K/V are in the cache (or being written by a launched step)
        self.block_table: list[int] = []
        self.prefix_hashes: list[int] | None = None
        self.num_registered = 0  # prompt blocks handed to the prefix cache so far
        self.ntk_index: int | None = None  # frozen at the first prefill, kept through preemption
        self.slot: int | None = None  # row of the runner's per-sequence buffers while running
        self.lora_id: int | None = None  # the LoRA adapter's unique id (LoraManager.adapter_id), None: none
        self.lora_slot = -1  # its slot in the LoraManager's buffers (fixed while the adapter is in use)
        self.admissions = 0  # the runner re-initialises a slot when this changes
        self.status = WAITING
        self.finish_reason: str | None = None
        self.metrics = {"arrival": time.perf_counter()}
        # the engine's bookkeeping for outputs
        self.detok = None
        self.text, self.emitted_chars = "", 0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # prompt logprobs (params.prompt_logprobs): one entry per prompt token, None for the first; the next token
        # whose entry a launched step has not computed yet (scoring requests may start later: earlier ones None)
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_next: int | None = 1 if params.prompt_logprobs is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 seq_length: int, use_dynamic_ntk: bool, whole_prompt_chunks: bool = False):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.seq_length, self.use_dynamic_ntk = seq_length, use_dynamic_ntk
        self.whole_prompt_chunks = whole_prompt_chunks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.free_slots = list(range(max_num_seqs))[::-1]
        self.num_preemptions = 0
        self._admission_ids = itertools.count(1)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def wants_more(self, seq: Sequence) -> bool:
        """Whether a running sequence may be scheduled again: a pending token that ends it by length ends it."""
        if seq.num_pending == 0:
            return True
        return seq.num_output < seq.params.max_new_tokens and seq.num_tokens < self.max_model_len

    def chunk(self, seq: Sequence, budget: int, oversize_ok: bool) -> int:
        """How many of the sequence's uncomputed tokens to run now (0: none this step)."""
        todo = seq.num_tokens - seq.num_computed
        if not self.whole_prompt_chunks:
            return min(todo, budget)
        if seq.num_computed >= seq.num_prompt:
            return min(todo, 1, budget)  # generated tokens were computed one at a time: recompute them so
        n = seq.num_prompt - seq.num_computed  # the whole prompt, within the budget or as the step's one big chunk
        return n if n <= budget or oversize_ok else 0

    # ------------------------------------------------------------------------------------------------ a step
    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next batch: (sequence, number of its tokens to compute from `num_computed` on), decodes first."""
        budget, batch, preempted = self.max_num_batched_tokens, [], False
        oversize_ok = True  # whole-prompt chunks: one prompt per step may exceed the budget
        decodes, chunks = [], []
        for s in self.running:
            todo = len(s.token_ids) + s.num_pending - s.num_computed
            if todo == 1:
                decodes.append(s)
            elif s.num_pending == 0 or self.wants_more(s):
                chunks.append(s)
        if any(s.num_pending for s in decodes):  # a pending token may already end a sequence by length
            decodes = [s for s in decodes if self.wants_more(s)]
        bs = self.blocks.block_size
        for seq in decodes + chunks:
            if seq.status != RUNNING or budget <= 0:
                continue
            # a sequence with one token to compute runs exactly it (in whole-prompt mode too: a prompt's last token)
            n = 1 if len(seq.token_ids) + seq.num_pending - seq.num_computed == 1 else \
                self.chunk(seq, budget, oversize_ok)
            if n == 0:
                continue
            while seq.num_computed + n > len(seq.block_table) * bs and \
                    not self.blocks.grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]  # the most recently admitted, even if already scheduled this step
                self.preempt(victim)
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
                oversize_ok = oversize_ok and n == 1
        # no admissions in a step that had to preempt (the freed blocks go to the running sequences first), unless
        # nothing at all was scheduled
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not (preempted and batch):
            seq = self.waiting[0]
            # a preempted sequence waits for its last token's value; a whole prompt for a step with room for it
            if seq.num_pending or self.chunk(seq, budget, oversize_ok) == 0 or not self._admit(seq):
                break
            self.waiting.popleft()
            n = self.chunk(seq, budget, oversize_ok)  # after the prefix cache had its say
            batch.append((seq, n))
            budget -= n
            oversize_ok = False
        return batch

    def commit(self, batch: list[tuple[Sequence, int]], sampled: list[Sequence]) -> None:
        """The batch was launched: its tokens count as computed (their prompt blocks enter the prefix cache) and
        each sampled sequence has a token pending. Not called when the launch failed, so a failed step changes
        nothing but the blocks it reserved, which the next schedule reuses."""
        bs = self.blocks.block_size
        for seq, n in batch:
            seq.num_computed += n
            if seq.num_computed // bs > seq.num_registered:  # a block may have just filled up
                self._register(seq)
            if seq.prompt_logprobs_next is not None:  # the runner computed the prompt logprobs up to here
                seq.prompt_logprobs_next = max(seq.prompt_logprobs_next, min(seq.num_computed + 1, seq.num_prompt))
        for seq in sampled:
            seq.num_pending += 1

    def _register(self, seq: Sequence) -> None:
        """Hand the prompt blocks that this step completes to the prefix cache (only those: no rescan)."""
        full = min(seq.num_computed // self.blocks.block_size, len(seq.prefix_hashes))
        if full > seq.num_registered:
            self.blocks.register(seq.block_table, seq.token_ids, seq.prefix_hashes, seq.num_registered, full)
            seq.num_registered = full

    def _admit(self, seq: Sequence) -> bool:
        if not self.free_slots or not self.blocks.can_allocate(seq.num_tokens):
            return False
        if seq.ntk_index is None:
            seq.ntk_index = ntk_index(seq.num_prompt, self.seq_length, self.use_dynamic_ntk)
            # cached K/V depend on the NTK row and the adapter: blocks are shared only between equal ones
            seq.prefix_hashes = self.blocks.prefix_hashes(seq.token_ids, seq.num_prompt, (seq.ntk_index, seq.lora_id))
        usable = seq.prefix_hashes
        if seq.prompt_logprobs_next is not None:
            # a cached block has no logits: the prefix cache serves only the blocks before the first position whose
            # prompt logprobs are still to be computed (none for a fresh request: its whole prompt is recomputed)
            usable = usable[:(seq.prompt_logprobs_next - 1) // self.blocks.block_size]
        seq.block_table, seq.num_computed = self.blocks.allocate(seq.token_ids, usable)  # every token
        seq.num_registered = seq.num_computed // self.blocks.block_size
        seq.metrics.setdefault("cached_tokens", seq.num_computed)
        seq.slot = self.free_slots.pop()
        seq.admissions = next(self._admission_ids)
        seq.status = RUNNING
        self.running.append(seq)
        return True

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_blocks(seq.block_table)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._release(seq)
        seq.num_computed, seq.num_registered, seq.status = 0, 0, WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length, abort): its blocks and slot are free for the next step."""
        if seq.status == WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish_reason, seq.status = reason, FINISHED
        seq.metrics["finished"] = time.perf_counter()
        self._release(seq)
