"""Tensor parallelism: every layer split over N processes (one per GPU), Megatron style, with torch.distributed.

Processes. Rank 0 is the process that builds `LLM(..., tensor_parallel_size=N)`: it owns the scheduler, the sampler
and the API. The N - 1 workers are spawned by it (torch.multiprocessing, "spawn"), or started by torchrun with rank
0 (every rank runs the same script; on ranks > 0 `LLM(...)` serves rank 0 and then exits the process). Collectives
use NCCL on CUDA and gloo on the CPU; a second, gloo, group carries rank 0's control messages.

Per step. Rank 0 sends one message just before each forward it runs (`TensorParallel.step`): the step's host arrays
(an eager step's `EagerStep`, or a padded decode step's six rows per sequence) and the block-table entries appended
since the last one; each worker keeps its own copy of the block tables and builds the same `AttentionMetadata` with
the same runner code. Token ids need no message: the vocab-parallel embedding broadcasts them from rank 0 on the
device at the start of every forward, so decode inputs (read on rank 0's device from the last sampled token of each
slot) reach the workers without the host seeing them, and rank 0 can launch step n + 1 before reading step n's
tokens (overlap scheduling). The broadcast sits inside the forward, so it is captured in the decode CUDA graphs with
the rest (NCCL; gloo runs without graphs). Workers capture a forward-only graph per batch bucket when they first run
it. Sampling (and its per-request state) exists on rank 0 only; the sampler draws with per-request seeds, so no RNG
state is shared.

Sharding (`ShardPlan`). c_attn is column parallel by heads (each rank keeps its heads' rows of q, k and v and their
bias), attention c_proj row parallel; the MLP's fused w2_w1 is column parallel (gate and up split alike) and
mlp.c_proj row parallel. A row-parallel layer adds its bias on rank 0 only and is followed by one all-reduce. The
embedding and lm_head are split by vocabulary rows: the embedding's partial rows are summed by an all-reduce, the
logits all-gathered (every rank gets them; rank 0 samples). Each rank's KV cache holds only its heads, so the cache
holds N times the tokens for the same memory per GPU. Each rank reads only its slices of the memory-mapped
safetensors of a converted checkpoint (`checkpoint.SliceReader`).

GPTQ. In nanoqwen's planar layout the output columns of a quantized linear are independent (zeros are unpacked), so
column splits are free; a row split must fall on quantization-group boundaries, and is uneven when the group count
does not divide: Qwen-14B's MLP has 13696 / 128 = 107 groups, so 54 and 53 at N = 2 (vLLM refuses it:
vllm-project/vllm#2699). With act-order (g_idx permuted) mlp.c_proj's rows are stored in group order with a `perm`
of the MLP features; since those features are internal to the MLP, each rank takes the features of whole groups in
that order (w2_w1's columns gathered by the same permutation: that tensor is read whole, a permutation being no
slice), and its c_proj slice needs no permutation at all. Attention c_proj's input features are tied to heads, so
when its groups do not fall on the heads' boundaries (act-order, or a group wider than a rank's heads) each rank
keeps the whole layer and multiplies its heads' features placed among zeros: exact, at the cost of the full layer's
weights on every rank (`RowParallel.pad`).

Failure. A monitor thread on rank 0 watches the spawned workers; a worker that raises reports its traceback and
exits; a worker that exits for any reason breaks the group: rank 0 aborts the collectives (NCCL) or sees gloo's
closed connection, and the step raises `TensorParallelError` naming the worker and its error; later calls raise at
once. Rank 0 defers Ctrl-C while a mirrored forward is in flight (the ranks must finish it together). Workers ignore
Ctrl-C, exit when rank 0 says stop (`close()`, or at interpreter exit) and on their own when rank 0 is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

START_TIMEOUT_S = 300  # spawned workers import torch and nanoqwen (and set up CUDA) before they join
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # generous (a CPU prefill can be slow); failures do not wait for it
IDLE_TIMEOUT = timedelta(days=365)  # a worker waits for rank 0's next message as long as the engine lives
FAILURE_GRACE_S = 3.0  # how long a failed step waits for the monitor to name the worker that died


class TensorParallelError(RuntimeError):
    """The tensor-parallel group cannot go on (a worker died or failed, or a step broke off); the message says which."""


# ----------------------------------------------------------------------------------------------- one rank's group

# the same collective under its newer name (the old one warns in recent PyTorch)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TPGroup:
    """One rank's view of the tensor-parallel group: the collectives the sharded forward uses (`group`: NCCL on CUDA,
    gloo on the CPU; None: the default group) and, for an engine, the gloo group of rank 0's messages (`ctrl`)."""

    def __init__(self, rank: int, world: int, device: torch.device, group=None, ctrl=None):
        self.rank, self.world, self.device, self.group, self.ctrl = rank, world, torch.device(device), group, ctrl

    @classmethod
    def from_default_group(cls, device=None) -> "TPGroup":
        """Every process of the initialised default group (research code under torchrun: one shard per process)."""
        if not dist.is_initialized():
            raise TensorParallelError("torch.distributed is not initialised: call dist.init_process_group first "
                                      "(torchrun sets the environment for it), or use LLM(tensor_parallel_size=N)")
        return cls(dist.get_rank(), dist.get_world_size(), device or "cpu")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place when `x` is contiguous)."""
        x = x.contiguous()
        dist.broadcast(x, group=self.group, src=0)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x, in rank order."""
        out = x.new_empty((self.world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather(out, x.contiguous(), group=self.group)
        return out.view((self.world,) + tuple(x.shape))

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


# ----------------------------------------------------------------------------------------------- the split

def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """n units cut into `parts` contiguous ranges, the first n % parts one unit longer."""
    size, extra = divmod(n, parts)
    bounds = [0]
    for r in range(parts):
        bounds.append(bounds[-1] + size + (r < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def check_tensor_parallel(cfg, world: int) -> None:
    """Refuse a tensor-parallel size the model cannot be split into, saying which sizes work."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {world}")
    heads = cfg.num_attention_heads
    if heads % world:
        ok = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(f"tensor_parallel_size {world} does not divide the model's {heads} attention heads (each "
                         f"rank keeps whole heads): use one of {', '.join(map(str, ok))}")
    g = _gptq(cfg)
    groups = cfg.mlp_width if g is None or g.group_size == -1 else -(-cfg.mlp_width // g.group_size)
    if groups < world:
        raise ValueError(f"the MLP's c_proj has {groups} quantization groups, fewer than tensor_parallel_size "
                         f"{world} (each rank keeps whole groups): use a tensor_parallel_size of at most {groups}")


def _gptq(cfg):
    from .checkpoint import gptq_config
    return gptq_config(cfg)


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` keeps (module docstring): its heads, its MLP features (whole quantization groups for
    GPTQ; in mlp.c_proj's kernel order), its vocabulary rows (every rank's slice is `vocab_shard` rows, the last one
    padded), and whether attention c_proj's groups fall on the heads' boundaries."""
    rank: int
    world: int
    heads: tuple[int, int]
    mlp: tuple[int, int]
    vocab: tuple[int, int]
    vocab_shard: int
    attn_proj_aligned: bool

    @classmethod
    def make(cls, cfg, world: int, rank: int) -> "ShardPlan":
        check_tensor_parallel(cfg, world)
        g = _gptq(cfg)
        unit = g.group_size if g is not None and g.group_size > 0 else 1
        F_ = cfg.mlp_width
        g0, g1 = split_evenly(-(-F_ // unit), world)[rank]
        per_rank = cfg.num_attention_heads // world
        shard = -(-cfg.vocab_size // world)
        aligned = g is None or g.group_size == -1 or (per_rank * cfg.head_dim) % g.group_size == 0
        return cls(rank, world, heads=(rank * per_rank, (rank + 1) * per_rank), mlp=(g0 * unit, min(g1 * unit, F_)),
                   vocab=(min(rank * shard, cfg.vocab_size), min((rank + 1) * shard, cfg.vocab_size)),
                   vocab_shard=shard, attn_proj_aligned=aligned)


# ----------------------------------------------------------------------------------------------- sharded modules

class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding table. The ids are rank 0's (broadcast first: the workers' inputs
    are placeholders); each rank embeds the ids in its range, zeros elsewhere, and the all-reduce adds the one
    non-zero row per token (exact)."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.tp.broadcast(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.weight.shape[0] - 1} of rank {self.tp.rank}/{self.tp.world}"


class VocabParallelHead(nn.Module):
    """lm_head rows of this rank's vocabulary slice (padded to the common slice size with zero rows); the slices'
    logits are all-gathered, so every rank returns the whole [..., vocab_size] logits."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        parts = self.tp.all_gather(F.linear(x.reshape(-1, x.shape[-1]), self.weight))  # [world, rows, shard]
        logits = parts.permute(1, 0, 2).reshape(-1, self.tp.world * self.weight.shape[0])
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, :self.vocab_size].contiguous()
        return logits.view(lead + (self.vocab_size,))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} vocabulary rows per rank, rank {self.tp.rank}/{self.tp.world}"


class RowParallel(nn.Module):
    """A linear whose input features are split over the ranks: each multiplies its slice and the partial outputs are
    summed by an all-reduce (the bias lives on rank 0 only, so it is added once). With `pad` = (start, in_features)
    the linear is the whole layer and this rank's features are placed at `start` among zeros (the others' terms are
    exact zeros): for GPTQ groups that do not fall on this rank's boundaries."""

    def __init__(self, linear: nn.Module, tp: TPGroup, pad: tuple[int, int] | None = None):
        super().__init__()
        self.linear, self.tp, self.pad = linear, tp, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            start, width = self.pad
            full = x.new_zeros(x.shape[:-1] + (width,))
            full[..., start:start + x.shape[-1]] = x
            x = full
        return self.tp.all_reduce(self.linear(x))

    def extra_repr(self) -> str:
        return "all-reduce" + (f", input placed at {self.pad[0]} of {self.pad[1]}" if self.pad else "")


def _nn_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class _ShardReader:
    """Reads one rank's slices of a converted checkpoint, cast as the model wants them, onto its device."""

    def __init__(self, folder: Path, cfg, device, dtype):
        from .checkpoint import SliceReader
        self.reader, self.device, self.dtype = SliceReader(folder, cfg), device, dtype
        self.gptq = _gptq(cfg)

    def has(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, dim: int = 0, parts=None) -> torch.Tensor:
        from .checkpoint import _cast
        t = self.reader.read(name, dim, parts)
        return _cast(name, t, self.dtype, self.gptq is not None).to(self.device)

    def column(self, prefix: str, in_features: int, parts) -> nn.Module:
        """The linear `prefix` keeping only the output features `parts` (ranges or an index tensor)."""
        if self.gptq is None:
            bias = self.get(prefix + "bias", 0, parts) if self.has(prefix + "bias") else None
            return _nn_linear(self.get(prefix + "weight", 0, parts), bias)
        from .quant.gptq import GPTQLinear
        t = {k: self.get(prefix + k, 1, parts) for k in ("qweight_planar", "scales", "zeros")}
        if self.has(prefix + "bias"):
            t["bias"] = self.get(prefix + "bias", 0, parts)
        if self.has(prefix + "perm"):
            t["perm"] = self.get(prefix + "perm")
        return GPTQLinear.from_planar(t, self.gptq.bits, self.gptq.group_size, in_features)

    def row(self, prefix: str, in_features: int, start: int, stop: int, bias: bool) -> nn.Module:
        """The linear `prefix` keeping only its input rows start..stop-1 (kernel order for GPTQ, where they must fall
        on group boundaries), with its bias when `bias`."""
        with_bias = bias and self.has(prefix + "bias")
        if self.gptq is None:
            return _nn_linear(self.get(prefix + "weight", 1, [(start, stop)]),
                              self.get(prefix + "bias") if with_bias else None)
        from .quant.gptq import GPTQLinear, planar_word_rows, slice_planar_rows
        bits, gs = self.gptq.bits, self.gptq.group_size
        words = self.get(prefix + "qweight_planar", 0, [planar_word_rows(start, stop, bits)])
        groups = None if gs == -1 else [(start // gs, -(-stop // gs))]
        t = {"qweight_planar": slice_planar_rows(words, bits, start, stop, in_features),
             "scales": self.get(prefix + "scales", 0, groups), "zeros": self.get(prefix + "zeros", 0, groups)}
        if with_bias:
            t["bias"] = self.get(prefix + "bias")
        return GPTQLinear.from_planar(t, bits, gs, stop - start)

    def whole(self, prefix: str, in_features: int, bias: bool) -> nn.Module:
        """The whole GPTQ linear `prefix` (its bias only when `bias`)."""
        from .quant.gptq import GPTQLinear
        t = {k: self.get(prefix + k) for k in ("qweight_planar", "scales", "zeros", "perm", "bias")
             if self.has(prefix + k) and (k != "bias" or bias)}
        return GPTQLinear.from_planar(t, self.gptq.bits, self.gptq.group_size, in_features)


def load_shard(folder: Path, cfg, device: torch.device, dtype: torch.dtype, tp: TPGroup):
    """This rank's shard of the converted checkpoint `folder` as a `Qwen` whose forward runs with the other ranks'
    (every rank calls it with the same inputs; the token ids are rank 0's). See the module docstring."""
    from .checkpoint import CheckpointError, is_converted
    from .model import Qwen

    if not is_converted(folder):
        raise CheckpointError(f"{folder} is an official checkpoint folder; tensor-parallel ranks read the slices of a "
                              "converted one: convert it once (python convert_checkpoint.py SRC DST, or "
                              "nanoqwen.checkpoint.resolve_checkpoint) and pass that folder")
    plan = ShardPlan.make(cfg, tp.world, tp.rank)
    rd = _ShardReader(folder, cfg, device, dtype)
    H, F_, hd = cfg.hidden_size, cfg.mlp_width, cfg.head_dim
    h0, h1 = plan.heads
    qkv = [(j * H + h0 * hd, j * H + h1 * hd) for j in range(3)]
    f0, f1 = plan.mlp
    with torch.device("meta"):
        model = Qwen(cfg)
    for i, block in enumerate(model.transformer.h):
        p = f"transformer.h.{i}."
        attn, mlp = block.attn, block.mlp
        attn.n_head = h1 - h0
        attn.c_attn = rd.column(p + "attn.c_attn.", H, qkv)
        if plan.attn_proj_aligned and not rd.has(p + "attn.c_proj.perm"):
            attn.c_proj = RowParallel(rd.row(p + "attn.c_proj.", H, h0 * hd, h1 * hd, tp.rank == 0), tp)
        else:
            attn.c_proj = RowParallel(rd.whole(p + "attn.c_proj.", H, tp.rank == 0), tp, pad=(h0 * hd, H))
        perm = p + "mlp.c_proj.perm"
        if rd.has(perm):  # act-order: this rank's features are whole groups of c_proj's kernel order
            feats = rd.get(perm).long().cpu()[f0:f1]
            cols = torch.cat([feats, feats + F_])
        else:
            cols = [(f0, f1), (F_ + f0, F_ + f1)]
        mlp.w2_w1 = rd.column(p + "mlp.w2_w1.", H, cols)
        mlp.c_proj = RowParallel(rd.row(p + "mlp.c_proj.", F_, f0, f1, tp.rank == 0), tp)
    v0, v1 = plan.vocab
    model.transformer.wte = VocabParallelEmbedding(rd.get("transformer.wte.weight", 0, [(v0, v1)]), v0, tp)
    head = rd.get("lm_head.weight", 0, [(v0, v1)])
    if head.shape[0] < plan.vocab_shard:
        head = torch.cat([head, head.new_zeros(plan.vocab_shard - head.shape[0], H)])
    model.lm_head = VocabParallelHead(head, cfg.vocab_size, tp)
    norms = {n: rd.get(n) for n, _ in model.named_parameters() if n.endswith(("ln_1.weight", "ln_2.weight",
                                                                               "ln_f.weight"))}
    model.load_state_dict(norms, strict=False, assign=True)
    model.rotary = type(model.rotary)(cfg.rotary_dim, cfg.rotary_emb_base).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: no shard was read for {', '.join(left[:5])}: a nanoqwen bug, please report")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- control messages

class _Channel:
    """Rank 0's messages to the workers (pickled; only nanoqwen's own processes are in the group) over the gloo
    group: one broadcast of a fixed buffer whose first 8 bytes give the length, a second for what does not fit."""

    SIZE = 1 << 14

    def __init__(self, group):
        self.group = group
        self.buf = torch.zeros(self.SIZE, dtype=torch.uint8)
        self.view = self.buf.numpy()

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        k = min(len(data), self.SIZE - 8)
        self.view[:8] = np.frombuffer(struct.pack("<q", len(data)), dtype=np.uint8)
        self.view[8:8 + k] = np.frombuffer(data, dtype=np.uint8, count=k)
        dist.broadcast(self.buf, group=self.group, src=0)
        if len(data) > k:
            dist.broadcast(torch.frombuffer(bytearray(data[k:]), dtype=torch.uint8), group=self.group, src=0)

    def recv(self):
        dist.broadcast(self.buf, group=self.group, src=0)
        n = struct.unpack("<q", self.view[:8].tobytes())[0]
        data = self.view[8:8 + min(n, self.SIZE - 8)].tobytes()
        if n > len(data):
            rest = torch.empty(n - len(data), dtype=torch.uint8)
            dist.broadcast(rest, group=self.group, src=0)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


@contextlib.contextmanager
def _deferred_sigint():
    """Hold Ctrl-C until the block ends (main thread only): every rank must finish a forward once it is announced."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process is one of several started by torchrun (the env://
    variables), else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def _init_groups(rank: int, world: int, device: torch.device, init_method: str | None) -> TPGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = dict(init_method=init_method, rank=rank, world_size=world) if init_method else {}
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
    ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, world, device, None, ctrl)


# ----------------------------------------------------------------------------------------------- rank 0

class TensorParallel:
    """Rank 0's side of an engine's tensor-parallel group: starts (or, under torchrun, joins) the workers, loads rank
    0's shard, sends each step's message (`step`), and turns any failure into a `TensorParallelError`."""

    def __init__(self, world: int, device: torch.device, addr: str | None = None, port: int | None = None):
        if dist.is_initialized():
            raise TensorParallelError("torch.distributed is already initialised in this process (another "
                                      "tensor-parallel LLM?): close() the other engine first")
        self.world, self.device = world, device
        self.procs, self.pipes, self.errors = {}, {}, {}
        self.failure: str | None = None
        self._closing = self._closed = False
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one message at a time (a server's shutdown may race its engine thread)
        self._tables: tuple[list, list] = ([], [])
        launched = torchrun_rank()
        try:
            if launched is not None:
                if device.type == "cuda":  # one GPU per process: its local rank's
                    self.device = device = torch.device("cuda", launched[2])
                self.group = _init_groups(0, world, device, None)
            else:
                addr, port = addr or "127.0.0.1", port or free_port()
                self._spawn(addr, port)
                self.group = _init_groups(0, world, device, f"tcp://{addr}:{port}")
        except BaseException:
            self._kill_workers(graceful=False)
            raise
        self.channel = _Channel(self.group.ctrl)
        if self.procs:
            threading.Thread(target=self._watch, name="nanoqwen-tp-monitor", daemon=True).start()
        atexit.register(self.shutdown)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    # ------------------------------------------------------------------------------------------- workers
    def _spawn(self, addr: str, port: int) -> None:
        import torch.multiprocessing as mp
        from multiprocessing.connection import wait
        ctx = mp.get_context("spawn")
        dev = self.device
        for rank in range(1, self.world):
            device = torch.device(dev.type, (dev.index or 0) + rank) if dev.type == "cuda" else dev
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_spawned_worker, args=(rank, self.world, str(device), addr, port, send),
                            name=f"nanoqwen-tp-rank{rank}", daemon=True)
            p.start()
            send.close()
            self.procs[rank], self.pipes[rank] = p, recv
        ready, deadline = set(), time.monotonic() + START_TIMEOUT_S
        while len(ready) < len(self.procs):  # each worker says so before it joins: a failed start is seen here
            left = deadline - time.monotonic()
            if left <= 0:
                raise TensorParallelError(f"tensor-parallel workers {sorted(set(self.procs) - ready)} did not start "
                                          f"within {START_TIMEOUT_S} s; is the machine overloaded?")
            waitables = {self.pipes[r]: r for r in self.procs if r not in ready}
            waitables.update({self.procs[r].sentinel: r for r in self.procs if r not in ready})
            for w in wait(list(waitables), timeout=left):
                rank = waitables[w]
                if w is self.pipes[rank]:
                    with contextlib.suppress(EOFError, OSError):
                        kind, text = w.recv()
                        if kind == "ready":
                            ready.add(rank)
                            continue
                        self.errors[rank] = text
                self.procs[rank].join(timeout=5)
                self._drain(rank)
                hint = "" if rank in self.errors else " (its output above says why)"
                raise TensorParallelError(f"{self._death(rank)}, while starting{hint}")

    def _watch(self) -> None:
        """Monitor thread: a worker exiting while the engine runs breaks the group."""
        from multiprocessing.connection import wait
        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        pipes = {c: r for r, c in self.pipes.items()}
        while sentinels:
            ready = wait(list(sentinels) + list(pipes))
            for w in ready:
                if w in pipes and not self._read(w, pipes[w]):
                    del pipes[w]  # closed: that worker is exiting
            for w in ready:
                if w in sentinels:
                    rank = sentinels.pop(w)
                    self._drain(rank)
                    if not self._closing:
                        self._break(self._death(rank))

    def _read(self, conn, rank) -> bool:
        """Take one report from a worker's pipe; False once the pipe is closed."""
        try:
            kind, text = conn.recv()
        except (EOFError, OSError):
            return False
        if kind == "error":
            self.errors[rank] = text
        return True

    def _drain(self, rank: int) -> None:
        conn = self.pipes.get(rank)
        while conn is not None and not conn.closed and conn.poll():
            if not self._read(conn, rank):
                break

    def _death(self, rank: int) -> str:
        p = self.procs[rank]
        p.join(timeout=2)  # its sentinel can fire a moment before the exit status is there
        code = p.exitcode
        how = "is still running" if code is None else f"was killed by {signal.Signals(-code).name}" if code < 0 \
            else f"exited with code {code}"
        error = self.errors.get(rank)
        said = f": {error.strip().splitlines()[-1]}" if error else ""
        return f"tensor-parallel worker rank {rank} (pid {p.pid}) {how}{said}"

    def _break(self, reason: str) -> None:
        """The group cannot go on: remember why, release rank 0 from any collective, stop the other workers."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()  # frees rank 0 from NCCL waits on the lost peer
        self._kill_workers(graceful=False)

    def _kill_workers(self, graceful: bool = True) -> None:
        self._closing = self._closing or not graceful
        for p in self.procs.values():
            if graceful:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        for p in self.procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    # ------------------------------------------------------------------------------------------- messages
    def check(self) -> None:
        """Raise if the group is broken or closed."""
        if self.failure is not None:
            raise TensorParallelError(self._unusable())
        if self._closed:
            raise TensorParallelError("this tensor-parallel engine was closed: build a new LLM")

    def _unusable(self) -> str:
        end = "" if self.failure.endswith((".", "?", "!")) else "."
        return (f"{self.failure}{end} The tensor-parallel engine cannot continue: close() it and build a new LLM "
                "(restart the server)")

    def stage_tables(self, cols: list[int], vals: list[int]) -> None:
        """Block-table entries (flat index, block) appended on rank 0: sent with the next step."""
        self._tables[0].extend(cols)
        self._tables[1].extend(vals)

    @contextlib.contextmanager
    def step(self, kind: str, *payload):
        """Send the workers `kind` and `payload` (with the staged block-table entries), then run rank 0's part (the
        block). Any failure inside breaks the group: the ranks cannot resynchronise after a half-done forward."""
        self.check()
        tables, self._tables = self._tables, ([], [])
        delta = (np.array(tables[0], dtype=np.int64), np.array(tables[1], dtype=np.int64)) if tables[0] else None
        with _deferred_sigint():
            try:
                with self._send_lock:
                    self.channel.send((kind, delta, *payload))
                yield
            except BaseException as e:
                self._fail(e)
                raise TensorParallelError(self._unusable()) from e

    def _fail(self, error: BaseException) -> None:
        deadline = time.monotonic() + (FAILURE_GRACE_S if self.procs else 0)
        while self.failure is None and time.monotonic() < deadline:  # a lost peer: let the monitor name it
            time.sleep(0.05)
        if self.failure is None:
            if self.procs:
                self._break(f"a tensor-parallel step failed on rank 0 ({type(error).__name__}: {error}); the workers "
                            "were stopped, since they cannot follow a step rank 0 abandoned")
            else:
                self._break(f"a tensor-parallel collective failed ({type(error).__name__}: {error}): a worker is "
                            "gone or failed; its log says why (torchrun prints every rank's output)")

    # ------------------------------------------------------------------------------------------- set-up
    def load(self, folder: Path, dtype: torch.dtype):
        """Every rank loads its shard of the converted `folder`; rank 0's model is returned."""
        from .checkpoint import load_model
        with self.step("load", str(folder), dtype):
            model = load_model(folder, self.device, dtype, tp=self.group)
            dist.barrier(group=self.group.ctrl)  # a worker that failed to load is reported here
        return model

    def setup_cache(self, **kwargs) -> None:
        """The workers build their KV caches and step buffers (`Worker.on_cache` arguments)."""
        with self.step("cache", kwargs):
            pass

    def shutdown(self) -> None:
        """Stop the workers (they exit) and leave the process group; safe to call twice."""
        if self._closed:
            return
        self._closed = self._closing = True
        atexit.unregister(self.shutdown)
        if self.failure is None:
            with contextlib.suppress(Exception), self._send_lock:
                self.channel.send(("stop", None))
        self._kill_workers(graceful=self.failure is None)
        for conn in self.pipes.values():
            conn.close()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        # free the process groups here: the monitor thread may drop the last reference to this object at interpreter
        # exit, and a group freed by a daemon thread then aborts the process (pybind11 re-takes the GIL)
        self.channel = self.group.ctrl = None


# ----------------------------------------------------------------------------------------------- workers

def _uploader(device: torch.device):
    if device.type == "cpu":
        return torch.from_numpy
    return lambda a: torch.from_numpy(a).pin_memory().to(device, non_blocking=True)


class Worker:
    """A worker rank: follows rank 0's messages (module docstring) until told to stop."""

    def __init__(self, group: TPGroup):
        self.group, self.device = group, group.device
        self.channel = _Channel(group.ctrl)
        self.upload = _uploader(self.device)
        self.model = self.kv_cache = None

    def serve(self) -> None:
        while True:
            kind, delta, *payload = self.channel.recv()
            if kind == "stop":
                return
            handler = getattr(self, f"on_{kind}", None)
            if handler is None:
                raise TensorParallelError(f"unknown message {kind!r} from rank 0: do rank 0 and this worker run the "
                                          "same nanoqwen version?")
            if delta is not None:
                self._apply_tables(*delta)
            with torch.no_grad():
                handler(*payload)

    def on_load(self, folder: str, dtype: torch.dtype) -> None:
        from .checkpoint import load_model
        self.model = load_model(Path(folder), self.device, dtype, tp=self.group)
        dist.barrier(group=self.group.ctrl)

    def on_profile(self, n: int, utilization: float, per_block: int, useful: int) -> None:
        from .engine.llm import profile_kv_blocks
        self.group.min_over_ranks(profile_kv_blocks(self.model, n, utilization, per_block, useful))

    def on_cache(self, kw: dict) -> None:
        from .kv_cache import KVCache
        cfg, dev = self.model.config, self.device
        heads = self.model.transformer.h[0].attn.n_head
        self.kv_cache = KVCache(cfg.num_hidden_layers, kw["num_blocks"], kw["block_size"], heads, cfg.head_dim,
                                self.model.dtype, dev, kw["kv_cache_dtype"], kw["kv_quant_mode"])
        n = kw["max_num_seqs"]
        self.max_blocks = -(-kw["max_model_len"] // kw["block_size"])
        self.max_context_len = self.max_blocks * kw["block_size"]
        self.tables_host = np.zeros((n + 1, self.max_blocks), dtype=np.int32)
        self.tables = torch.from_numpy(self.tables_host) if dev.type == "cpu" else \
            torch.zeros(n + 1, self.max_blocks, dtype=torch.int32, device=dev)
        self.rows = torch.zeros(6, n, dtype=torch.long, device=dev)  # a decode step's rows: the graphs' input
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)  # rank 0's tokens land here (the broadcast)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.capture = kw["cuda_graphs"] and dev.type == "cuda"
        self.graphs, self.pool = {}, None

    def _apply_tables(self, cols: np.ndarray, vals: np.ndarray) -> None:
        self.tables_host.reshape(-1)[cols] = vals
        if self.device.type != "cpu":
            flat = self.upload(np.stack([cols, vals]))
            self.tables.view(-1).index_copy_(0, flat[0], flat[1].int())

    def on_eager(self, step) -> None:
        tokens, meta, _, _, _ = step.inputs(self.tables, self.upload)
        self.model(tokens, meta, self.kv_cache)

    def on_decode(self, bucket: int, rows: np.ndarray) -> None:
        self.rows[:, :bucket].copy_(self.upload(np.ascontiguousarray(rows)), non_blocking=True)
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return
        self._decode(bucket)
        if self.capture:  # after one run (kernels compiled, NCCL set up); capturing runs nothing
            try:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._decode(bucket)
                self.pool, self.graphs[bucket] = graph.pool(), graph
            except Exception as e:
                warnings.warn(f"tensor-parallel rank {self.group.rank}: CUDA graph capture failed "
                              f"({type(e).__name__}: {e}); decoding without graphs")
                self.capture = False
                self.graphs.clear()

    def _decode(self, b: int) -> None:
        from .engine.runner import decode_inputs
        _, meta, _ = decode_inputs(self.rows, b, self.tables, self.cu, self.max_context_len)
        self.model(self.ids[:b], meta, self.kv_cache)


def _exit_with_parent(parent: int) -> None:
    """A worker outlives no rank 0: poll the parent (a worker stuck in a collective cannot notice otherwise)."""
    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, name="nanoqwen-tp-parent", daemon=True).start()


def _spawned_worker(rank: int, world: int, device: str, addr: str, port: int, conn) -> None:
    """Entry point of a worker spawned by rank 0. It leaves with os._exit: nothing to flush but stderr, and the
    interpreter's teardown would only delay rank 0's shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops the workers
    parent = os.getppid()
    _exit_with_parent(parent)
    try:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # (a device error shows before rank 0 waits for this worker to join)
        conn.send(("ready", None))
        group = _init_groups(rank, world, device, f"tcp://{addr}:{port}")
        Worker(group).serve()
        dist.destroy_process_group()
    except BaseException as e:
        if os.getppid() != parent:  # rank 0 is gone: its own error says why, this one is only the echo
            sys.stderr.write(f"nanoqwen tensor-parallel worker rank {rank}: rank 0 is gone ({e}); exiting\n")
        else:
            text = traceback.format_exc()
            with contextlib.suppress(Exception):
                conn.send(("error", text))
            sys.stderr.write(f"nanoqwen tensor-parallel worker rank {rank} failed:\n{text}")
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


def serve_if_torchrun_worker(world: int, device) -> None:
    """Under torchrun, a rank > 0 process serves rank 0 here and then exits (`LLM(...)` never returns on it); a
    plain process or rank 0 returns at once."""
    launched = torchrun_rank()
    if launched is None:
        return
    rank, size, local_rank = launched
    if size != world:
        raise ValueError(f"torchrun started {size} processes but tensor_parallel_size is {world}: start one process "
                         f"per rank (torchrun --nproc-per-node {world} ..., or --nnodes K with K * nproc = {world}) "
                         "or pass the same tensor_parallel_size")
    if rank == 0:
        return
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device("cuda", local_rank) if dev.type == "cuda" else dev
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = _init_groups(rank, world, dev, None)
    Worker(group).serve()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    sys.exit(0)
