"""`ModelRunner`: turns a scheduled batch into device work (metadata, forward, sampling) and sampled tokens.

Per-sequence state lives in persistent buffers indexed by the sequence's slot (a row per running sequence, plus a
trash row for padding): the block table (updated with only the blocks a step appends), the NTK row, the last sampled
token and the sampler's per-request settings. So a decode step uploads a few integers per sequence (slot, position,
cache slot, NTK row, context length, LoRA slot) in one copy, whatever the context length, and its input tokens never
travel through the host: each decode reads its slot's last sampled token on the device. That is what lets the engine
launch step n + 1 before it has read step n's tokens (overlap scheduling).

Decode-only steps run through a static path padded to a batch-size bucket (pad rows: trash slot, cache slot -1,
context 0), captured as CUDA graphs (forward + sampler + token store) per bucket and sampler variant; on the CPU the
same static path runs eagerly (tests). Every other step (prefill chunks, mixed batches) runs eagerly, exact shapes.

Under tensor parallelism (`tp`, a nanoqwen.distributed.TensorParallel) this runner is rank 0's: each forward is
mirrored on the workers from the same host arrays (`EagerStep`, the decode rows), sent just before it.
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import AttentionMetadata
from ..kv_cache import KVCache
from ..sampling import DeviceSampler, SamplerFlags, SamplerOutput
from .scheduler import Sequence

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class LaunchedStep:
    """A step whose device work is queued: the sequences it samples for (in row order) and where their tokens land."""
    sampled: list[Sequence]
    token_ids: torch.Tensor | list[int] | None = None  # [N] on the host (pinned on CUDA), valid once `event` is done
    logprobs: tuple | None = None  # (chosen [N], top values [N, k], top ids [N, k]) on the host
    # prompt logprobs: ([(sequence, index of its first prompt token scored here, count), ...], chosen [R],
    # top values [R, k], top ids [R, k]) on the device, rows in that order; None when the step scored none
    prompt_logprobs: tuple | None = None
    event: torch.cuda.Event | None = None


@dataclass
class EagerStep:
    """The host arrays of an eager step (two uploads) and its shape: what every tensor-parallel rank builds its
    metadata from. `longs` = tokens, positions, slot mapping, NTK rows ([T] each), logits rows, slots, slots of the
    sampled rows, LoRA adapter slots (sizes in `sizes`); `ints` = cu_seqlens [B + 1], context lengths [B]."""
    longs: np.ndarray
    ints: np.ndarray
    sizes: list[int]
    max_seqlen_q: int
    max_context_len: int
    is_decode: bool
    width: int  # block-table columns the batch's longest context needs

    def inputs(self, tables: torch.Tensor, upload) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor,
                                                            torch.Tensor, torch.Tensor]:
        """(tokens, metadata, slots of the sampled rows, LoRA slot of every token, the prompt tokens scored by the
        logits rows after the sampled ones) on the device."""
        longs, ints = upload(self.longs), upload(self.ints)
        tokens, positions, slot_mapping, ntk, rows, slots, sampled_slots, lora, targets = longs.split(self.sizes)
        B = self.sizes[5]
        meta = AttentionMetadata(
            cu_seqlens_q=ints[:B + 1], max_seqlen_q=self.max_seqlen_q, positions=positions, ntk_index=ntk,
            slot_mapping=slot_mapping, block_tables=tables[slots, :self.width], context_lens=ints[B + 1:],
            max_context_len=self.max_context_len, is_decode=self.is_decode, logits_indices=rows)
        return tokens, meta, sampled_slots, lora, targets


def decode_inputs(rows: torch.Tensor, b: int, tables: torch.Tensor, cu: torch.Tensor,
                  max_context_len: int) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(slots, metadata, LoRA slots) of a padded decode step of `b` rows from its static [6, >= b] integer rows
    (slot, position, cache slot, NTK row, context length, LoRA slot): the same on every tensor-parallel rank."""
    slot_ids, positions, slot_mapping, ntk, ctx, lora = rows[:, :b].unbind(0)
    meta = AttentionMetadata(
        cu_seqlens_q=cu[:b + 1], max_seqlen_q=1, positions=positions, ntk_index=ntk, slot_mapping=slot_mapping,
        block_tables=tables[slot_ids], context_lens=ctx.int(), max_context_len=max_context_len, is_decode=True,
        logits_indices=None)
    return slot_ids, meta, lora


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, *, max_num_seqs: int, max_model_len: int, block_size: int,
                 cuda_graphs: bool, tp=None):
        self.model, self.kv_cache, self.tp = model, kv_cache, tp
        self.device = model.device
        self.block_size, self.max_model_len = block_size, max_model_len
        self.num_slots = max_num_seqs + 1  # the last row is the trash slot of pad rows
        self.trash = max_num_seqs
        self.max_blocks = -(-max_model_len // block_size)
        dev, S = self.device, self.num_slots
        # block tables: a host mirror (the host computes cache slots from it) and its device copy, kept in step by
        # uploading only what changed; on the CPU they are the same memory
        self.tables_host = np.zeros((S, self.max_blocks), dtype=np.int32)
        self.tables = torch.from_numpy(self.tables_host) if dev.type == "cpu" else torch.zeros(
            S, self.max_blocks, dtype=torch.int32, device=dev)
        self.synced = [0] * S  # blocks of each slot's row present in `tables`
        self.owner = [0] * S  # admission id of the sequence a slot was set up for
        self.last_tokens = torch.zeros(S, dtype=torch.long, device=dev)
        self.sampler = DeviceSampler(max_num_seqs, model.config.vocab_size, dev)  # its pad_slot is our trash slot
        self.lora = None  # a nanoqwen.lora.LoraManager when the engine serves unmerged adapters
        self.pinned = dev.type == "cuda"
        self._token_bufs = [torch.zeros(S, dtype=torch.long, pin_memory=self.pinned) for _ in range(2)]
        self._flip = 0
        self.graphs = DecodeGraphs(self, max_num_seqs, capture=cuda_graphs and dev.type == "cuda") \
            if cuda_graphs else None

    # ------------------------------------------------------------------------------------------- host -> device
    def _upload(self, values: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(values)
        if not self.pinned:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _prepare_slots(self, batch) -> None:
        """Set up the slots of newly admitted sequences and push every appended block to the device table."""
        fresh, cols, vals = [], [], []
        for seq, _ in batch:
            slot = seq.slot
            if self.owner[slot] != seq.admissions:
                self.owner[slot], self.synced[slot] = seq.admissions, 0
                fresh.append(seq)
                self.sampler.add(slot, seq.params, seq.seed, seq.token_ids[:seq.num_prompt],
                                 seq.token_ids[seq.num_prompt:])
            n, table = self.synced[slot], seq.block_table
            if len(table) > n:
                self.tables_host[slot, n:len(table)] = table[n:]
                cols.extend(range(slot * self.max_blocks + n, slot * self.max_blocks + len(table)))
                vals.extend(table[n:])
                self.synced[slot] = len(table)
        if fresh:  # a sequence's first decode reads its last token from the device: put the known one there
            slots = torch.tensor([s.slot for s in fresh], device=self.device)
            self.last_tokens.index_copy_(0, slots, torch.tensor([s.token_ids[-1] for s in fresh], device=self.device))
        if cols and self.device.type != "cpu":
            flat = self._upload(np.array([cols, vals], dtype=np.int64))
            self.tables.view(-1).index_copy_(0, flat[0], flat[1].int())
        if cols and self.tp is not None:
            self.tp.stage_tables(cols, vals)

    def _mirror(self, *message):
        """Under tensor parallelism the workers run the forward inside this context too (nanoqwen.distributed)."""
        return self.tp.step(*message) if self.tp is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------- a step
    def launch(self, batch: list[tuple[Sequence, int]]) -> LaunchedStep:
        """Queue the device work of a batch (each sequence computes its `n` tokens from `num_computed` on) and the
        copy of the sampled tokens to the host. A batch returns without waiting for either unless the sampler left
        rows pending (the torch sampler's top-p rows past its candidates; the fused draw, the CUDA default, never
        does): then it waits for its tokens here, since `DeviceSampler.complete` must draw those rows before the
        next step may read them."""
        self._prepare_slots(batch)
        sampled = [seq for seq, n in batch if seq.num_computed + n == seq.num_tokens]
        flags = self.sampler.flags([s.slot for s in sampled]) if sampled else None
        decode = len(sampled) == len(batch) and all(n == 1 for _, n in batch)
        prompt_logprobs = None  # (a decode step has no prompt rows)
        with torch.no_grad():
            if decode and self.graphs is not None:
                out, logits, slots = self.graphs.run(batch, flags)
            else:
                logits, slots, prompt_logprobs = self._forward_eager(batch, len(sampled))
                out = None
                if sampled:
                    out = self.sampler.sample(logits, slots, flags)
                    self.last_tokens.index_copy_(0, slots, out.next_ids)
        step = LaunchedStep(sampled, prompt_logprobs=prompt_logprobs)
        if out is None:
            return step
        n = len(sampled)
        if out.pending is None or not flags.top_p:  # nothing pending: the copy completes while the next step runs
            step.token_ids = self._to_host(out.next_ids[:n])
            if self.pinned:
                step.event = torch.cuda.Event()
                step.event.record()
        else:
            step.token_ids = self.sampler.complete(out, logits, slots, flags)[:n]
            self.last_tokens.index_copy_(0, slots, out.next_ids)  # with the rows `complete` drew
        if flags.logprobs is not None:
            step.logprobs = tuple(t[:n].cpu() for t in (out.chosen_logprobs, out.top_logprobs, out.top_ids))
        return step

    def _to_host(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return ids
        buf = self._token_bufs[self._flip][:ids.shape[0]]  # two buffers: step n + 1 writes while n is being read
        self._flip ^= 1
        return buf.copy_(ids, non_blocking=True)

    def collect(self, step: LaunchedStep) -> tuple[list[int], tuple | None, tuple | None]:
        """Wait for a launched step's tokens (only for that step: later launched work keeps running). Returns the
        tokens, their logprobs and the prompt logprobs, as lists (see LaunchedStep)."""
        if step.event is not None:
            step.event.synchronize()
        if self.tp is not None:
            self.tp.check()  # a worker lost meanwhile leaves this step's tokens unfinished
        ids = step.token_ids if isinstance(step.token_ids, list) else \
            step.token_ids.tolist() if step.token_ids is not None else []
        lp = tuple(t.tolist() for t in step.logprobs) if step.logprobs is not None else None
        plp = step.prompt_logprobs
        if plp is not None:
            plp = (plp[0], *(t.tolist() for t in plp[1:]))
        return ids, lp, plp

    def _forward_eager(self, batch, num_sampled: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Any batch, exact shapes: per-token metadata built on the host with numpy, two uploads. Returns the
        logits of the sampled rows, their slots (on the device) and the prompt logprobs this step computed (see
        LaunchedStep.prompt_logprobs)."""
        bs = self.block_size
        starts = np.array([seq.num_computed for seq, _ in batch], dtype=np.int64)
        lens = np.array([n for _, n in batch], dtype=np.int64)
        slots = np.array([seq.slot for seq, _ in batch], dtype=np.int64)
        ends = starts + lens
        cu = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        T = int(cu[-1])
        seq_of_token = np.repeat(np.arange(len(batch)), lens)
        positions = np.arange(T, dtype=np.int64) - np.repeat(cu[:-1] - starts, lens)
        token_slots = slots[seq_of_token]
        slot_mapping = self.tables_host[token_slots, positions // bs].astype(np.int64) * bs + positions % bs
        ntk = np.array([seq.ntk_index for seq, _ in batch], dtype=np.int64)[seq_of_token]
        lora = np.zeros(0, dtype=np.int64)
        if self.lora is not None:
            lora = np.repeat(np.array([seq.lora_slot for seq, _ in batch], dtype=np.int64), lens)
        tokens = np.zeros(T, dtype=np.int64)  # (the rows filled on the device stay valid ids for the workers)
        pending_rows = []  # rows whose input is a token sampled on the device and not read by the host yet
        for i, (seq, n) in enumerate(batch):
            a, b, known = int(starts[i]), int(ends[i]), len(seq.token_ids)
            tokens[cu[i]:cu[i] + min(b, known) - a] = seq.token_ids[a:min(b, known)]
            if b > known:
                pending_rows.append(i)
        sampled_rows = np.nonzero(ends == np.array([seq.num_tokens for seq, _ in batch]))[0]
        logits_rows = cu[1:][sampled_rows] - 1
        prompt_rows, targets, scored = self._prompt_logprob_rows(batch, starts, ends, cu)
        step = EagerStep(
            np.concatenate([tokens, positions, slot_mapping, ntk, logits_rows, prompt_rows, slots, slots[sampled_rows],
                            lora, targets]),
            np.concatenate([cu, ends]).astype(np.int32),
            [T, T, T, T, len(logits_rows) + len(prompt_rows), len(batch), len(sampled_rows), len(lora), len(targets)],
            max_seqlen_q=int(lens.max()), max_context_len=int(ends.max()),
            is_decode=bool((lens == 1).all()) and num_sampled == len(batch), width=max(-(-int(e) // bs) for e in ends))
        tokens_d, meta, sampled_slots, lora_d, targets_d = step.inputs(self.tables, self._upload)
        if self.lora is not None:
            self.lora.set_token_indices(lora_d)  # the adapter slot of every token row (-1: none)
        if pending_rows:  # decodes of sequences whose last token the host has not read: take it on the device
            rows = torch.tensor([int(cu[i + 1]) - 1 for i in pending_rows], device=self.device)
            src = torch.tensor([batch[i][0].slot for i in pending_rows], device=self.device)
            tokens_d = tokens_d.index_copy(0, rows, self.last_tokens[src])
        with self._mirror("eager", step):
            if not scored:  # (through forward: tests and benchmarks hook it)
                return self.model(tokens_d, meta, self.kv_cache), sampled_slots, None
            # the sampled rows' logits, then the prompt rows' logprobs a slice of rows at a time (the head's
            # [rows, vocab] logits of a long prompt must never exist at once)
            hidden = self.model.hidden_states(tokens_d, meta, self.kv_cache)
            k = min(max(seq.params.prompt_logprobs for seq, *_ in scored), self.model.config.vocab_size)
            prompt = self.model.token_logprobs(hidden[len(logits_rows):], targets_d, k)
            return self.model.logits(hidden[:len(logits_rows)]), sampled_slots, (scored, *prompt)

    def _prompt_logprob_rows(self, batch, starts, ends, cu) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
        """The rows of this step whose prompt logprobs are wanted: those of prompt tokens from each sequence's
        `prompt_logprobs_next` on (a row at position p scores prompt token p + 1; tokens already scored before a
        preemption are not scored again). Returns (rows [R], target token ids [R], [(sequence, first token, count)])."""
        rows, targets, scored = [], [], []
        for i, (seq, _) in enumerate(batch):
            first = seq.prompt_logprobs_next
            if first is None:
                continue
            lo, hi = max(int(starts[i]), first - 1), min(int(ends[i]), seq.num_prompt - 1)  # positions p in [lo, hi)
            if hi <= lo:
                continue
            rows.append(np.arange(lo, hi) - starts[i] + cu[i])
            targets.append(np.array(seq.token_ids[lo + 1:hi + 1], dtype=np.int64))
            scored.append((seq, lo + 1, hi - lo))
        if not scored:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), []
        return np.concatenate(rows), np.concatenate(targets), scored

    def close(self) -> None:
        self.graphs = None


# the sampler variants captured for every bucket at start-up: greedy, and Qwen chat's (temperature, top-p,
# repetition penalty); others (top-k, presence/frequency penalties, logprobs) are captured when first used
STARTUP_FLAGS = (SamplerFlags(greedy_only=True), SamplerFlags(repetition=True, temperature=True, top_p=True).for_graph())


class DecodeGraphs:
    """Decode-only steps, padded to a batch-size bucket, over static buffers; one CUDA graph per bucket and sampler
    variant (`SamplerFlags.for_graph()`), holding the forward, the sampler and the store of the sampled tokens.

    The host writes six integers per row (slot, position, cache slot, NTK row, context length, LoRA adapter slot)
    into one pinned buffer and uploads it with one copy; everything else the step needs is on the device already
    (input tokens, block tables, sampler state). Attention launches a grid fixed by the static `max_context_len`
    (max_model_len).
    """

    def __init__(self, runner: ModelRunner, max_num_seqs: int, capture: bool):
        self.runner, self.capture = runner, capture
        n, dev = max_num_seqs, runner.device
        self.buckets = sorted({b for b in BUCKETS if b < n} | {n})
        # the host side of the step's inputs; on CUDA two pinned buffers used in turn, since with overlap the next
        # step is written while this step's copy may still wait in the stream (the engine reads step n's tokens,
        # which waits for its copy, before it writes step n + 2)
        bufs = [torch.zeros(6, n, dtype=torch.long, pin_memory=runner.pinned) for _ in range(2 if runner.pinned else 1)]
        self.host_bufs, self._flip = bufs, 0
        self.last_host = bufs[0].numpy()  # the rows last written (what tensor-parallel workers are sent)
        self.meta = bufs[0] if dev.type == "cpu" else torch.zeros(6, n, dtype=torch.long, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple, tuple] = {}  # (bucket, flags) -> (graph, (out, logits))
        self.pool = None

    def _step(self, b: int, flags: SamplerFlags | None):
        r = self.runner
        slot_ids, meta, lora = decode_inputs(self.meta, b, r.tables, self.cu, r.max_blocks * r.block_size)
        if r.lora is not None:
            r.lora.set_token_indices(lora)  # inside the graph: a device-to-device copy into the layers' buffer
        logits = r.model(r.last_tokens[slot_ids], meta, r.kv_cache)
        out = r.sampler.sample(logits, slot_ids, flags)
        r.last_tokens.index_copy_(0, slot_ids, out.next_ids)
        return out, logits

    def run(self, batch, flags: SamplerFlags) -> tuple[SamplerOutput, torch.Tensor, torch.Tensor]:
        """(sampler output, logits, slots) of the padded bucket; the first len(batch) rows are the batch's."""
        r, b = self.runner, len(batch)
        bucket = next(x for x in self.buckets if x >= b)
        host = self.host_bufs[self._flip]
        self._flip = (self._flip + 1) % len(self.host_bufs)
        h, bs = host.numpy(), r.block_size
        self.last_host = h
        seqs = [seq for seq, _ in batch]
        h[0, :b] = slots = [s.slot for s in seqs]  # whole rows at once: per-row work stays in list comprehensions
        h[1, :b] = [s.num_computed for s in seqs]
        h[2, :b] = r.tables_host[slots, h[1, :b] // bs] * bs + h[1, :b] % bs
        h[3, :b] = [s.ntk_index for s in seqs]
        h[4, :b] = h[1, :b] + 1
        h[5, :b] = [s.lora_slot for s in seqs]
        h[:, b:bucket] = ((r.trash,), (0,), (-1,), (0,), (0,), (-1,))  # pads: trash slot, not stored, no context
        if self.meta is not host:
            self.meta[:, :bucket].copy_(host[:, :bucket], non_blocking=True)
        flags = flags.for_graph()
        key = (bucket, flags)
        if self.capture and key not in self.graphs:
            self.capture_one(bucket, flags)
        with r._mirror("decode", bucket, h[:, :bucket]):
            if key not in self.graphs:
                out, logits = self._step(bucket, flags)
            else:
                graph, (out, logits) = self.graphs[key]
                graph.replay()
        return out, logits, self.meta[0, :bucket]

    def capture_all(self, progress: bool) -> None:
        """Capture every bucket's greedy and chat-sampling graphs now (a server's first steps should not wait)."""
        if not self.capture:
            return
        t0 = time.perf_counter()
        for buf in self.host_bufs:  # every row a pad row while capturing
            buf.numpy()[:] = ((self.runner.trash,), (0,), (-1,), (0,), (0,), (-1,))
        self.last_host = self.host_bufs[0].numpy()
        if self.meta is not self.host_bufs[0]:
            self.meta.copy_(self.host_bufs[0])
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            for flags in STARTUP_FLAGS:
                self.capture_one(b, flags, live=False)
        if progress and self.capture:
            print(f"captured {len(self.graphs)} CUDA graphs ({len(self.buckets)} decode batch sizes x "
                  f"{len(STARTUP_FLAGS)} sampler variants) in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)

    def capture_one(self, bucket: int, flags: SamplerFlags, live: bool = True) -> None:
        """Capture one (bucket, sampler variant). A capture in the middle of a run (`live`: the buffers hold a real
        batch) first runs the step once outside the graph to compile its kernels: that run's writes to the input
        tokens and the sampler's state are undone (its KV writes are the ones the replay repeats)."""
        if not self.capture:
            return
        r, sampler = self.runner, self.runner.sampler
        if flags.counts and sampler.counts is None:
            return  # made when the first request with presence/frequency penalties arrives: eager until then
        state = [r.last_tokens, sampler.steps] + ([sampler.seen] if flags.repetition else []) + \
            ([sampler.counts] if flags.counts else [])
        saved = [t.clone() for t in state] if live else []
        try:
            with torch.no_grad():
                with r._mirror("decode", bucket, self.last_host[:, :bucket]):
                    self._step(bucket, flags)  # compile every kernel variant before capture
                for t, copy in zip(state, saved):
                    t.copy_(copy)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    outputs = self._step(bucket, flags)
                self.pool = graph.pool()
            self.graphs[(bucket, flags)] = (graph, outputs)
        except Exception as e:  # never fail a request because a graph could not be captured
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs")
            self.capture = False
            self.graphs.clear()
            for t, copy in zip(state, saved):
                t.copy_(copy)
