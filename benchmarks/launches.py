"""How many kernels one decode step launches: per layer and outside the layers.

A small random model with Qwen-7B's head dim (128) runs one decode step through the CUDA code path (the Triton
kernels, NANOQWEN_KERNELS=triton; on the CPU in Triton's interpreter), driven as the engine's CUDA-graph decode does:
`model(tokens, AttentionMetadata(...decode...), kv_cache)`. Counted:
- aten ops that launch work on a GPU, caught with a TorchDispatchMode: every op except views (outputs aliasing an
  input), ops that return no tensor (dtype promotion), bare allocations (empty*) and host reads of a value
  (`_local_scalar_dense`: counted apart as host syncs, which a CUDA graph cannot hold). One aten op counts one launch;
  on a GPU a cuBLAS matmul may add a kernel of its own (a split-K reduction, a bias copy);
- Triton kernel launches (the torch ops the interpreter runs inside a launch are not counted).
Ops run inside `transformer.h[i]` count for layer i, the rest as "outside". CPU-only input checks are not counted
(`Qwen._check_ids` runs on CPU tensors only; on CUDA it does nothing).

    python benchmarks/launches.py [--batch 1] [--context 700] [--kv-cache int8 [--kv-quant-mode qwen]] [--gptq 4]
                                  [--eager]

`--eager` adds `logits_indices` as the engine's non-graph path does. `--engine greedy|chat` counts instead what the
engine's CUDA graph for a decode step holds (`DecodeGraphs._step`): the gathers of the step's inputs from the
per-slot buffers, the forward, the sampler (greedy, or Qwen's chat defaults: top_p 0.8, repetition penalty 1.1; the
fused Triton draw as on CUDA, or `--torch-sampler`) and the store of the sampled tokens. Prints a table, then one
JSON line.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NANOQWEN_KERNELS", "triton")
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from nanoqwen import Qwen, QwenConfig  # noqa: E402
from nanoqwen.attention import AttentionMetadata  # noqa: E402
from nanoqwen.kv_cache import KVCache  # noqa: E402

aten = torch.ops.aten
NO_LAUNCH = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.lift_fresh.default, aten.set_.source_Storage_storage_offset}
HOST_SYNC = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}


def launches_nothing(func) -> bool:
    """A view (its output aliases an input without writing it) or an op that returns no tensor (dtype promotion,
    sizes): no kernel."""
    returns = func._schema.returns
    views = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return views or not any("Tensor" in str(r.type) for r in returns)


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = "outside"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.syncs: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = str(func.overloadpacket.__name__)
            if func in HOST_SYNC:
                self.syncs.append(f"{self.where}: {name}")
            elif func not in NO_LAUNCH and not launches_nothing(func):
                self.counts[self.where][f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def triton_launches(self):
        """Count every Triton launch (interpreted or compiled); pause aten counting while it runs."""
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        saved = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

        def wrap(run):
            def counted(fn_self, *args, warmup=False, **kwargs):
                if not warmup:
                    name = getattr(fn_self, "__name__", None) or fn_self.fn.__name__
                    self.counts[self.where][f"triton.{name}"] += 1
                self.paused += 1
                try:
                    return run(fn_self, *args, warmup=warmup, **kwargs)
                finally:
                    self.paused -= 1
            return counted

        for cls, run in saved.items():
            cls.run = wrap(run)
        try:
            yield
        finally:
            for cls, run in saved.items():
                cls.run = run

    def attribute_layers(self, model: Qwen):
        """Forward hooks that switch `where` to the layer being run."""
        handles = []
        for i, block in enumerate(model.transformer.h):
            def enter(mod, args, i=i):
                self.where = f"layer {i}"

            def leave(mod, args, out):
                self.where = "outside"
            handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
        return handles


def build(args, device):
    cfg = QwenConfig.from_dict(dict(vocab_size=1024, hidden_size=256, num_attention_heads=2, kv_channels=128,
                                    num_hidden_layers=args.layers, intermediate_size=1024, seq_length=8192))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    with torch.device(device):
        model = Qwen(cfg).init_weights().to(dtype).eval().requires_grad_(False)
    if args.gptq:
        from nanoqwen.quant.gptq import swap_linears
        swap_linears(model, args.gptq, 128, device=device)
    block_size, max_model_len = 16, 2048
    max_blocks = max_model_len // block_size
    B = args.batch
    cache = KVCache(cfg.num_hidden_layers, B * max_blocks, block_size, cfg.num_attention_heads, cfg.head_dim, dtype,
                    device, args.kv_cache, args.kv_quant_mode)
    if args.kv_cache is None:
        cache.k.normal_()
        cache.v.normal_()
    else:
        for t in (cache.k, cache.v):
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
        for t in (cache.k_scale, cache.v_scale):
            t.fill_(0.01)
        for t in (cache.k_zero, cache.v_zero):
            t.fill_(128)
    ctx = torch.tensor([max(1, args.context - 7 * i) for i in range(B)], dtype=torch.int32)
    tables = torch.arange(B * max_blocks, dtype=torch.int32).view(B, max_blocks)
    pos = (ctx - 1).long()
    slots = (tables[torch.arange(B), pos // block_size] * block_size + pos % block_size).long()
    # as DecodeGraphs._meta: the static max_context_len of the bucket; the eager path (LLM._prepare) adds the logits
    # row indices and the real longest context
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=device), max_seqlen_q=1, positions=pos.to(device),
        ntk_index=torch.zeros(B, dtype=torch.long, device=device), slot_mapping=slots.to(device),
        block_tables=tables.to(device), context_lens=ctx.to(device),
        max_context_len=int(ctx.max()) if args.eager else max_blocks * block_size, is_decode=True,
        logits_indices=torch.arange(B, device=device) if args.eager else None)
    tokens = torch.randint(0, cfg.vocab_size, (B,), device=device)
    return model, tokens, meta, cache


def engine_step(model, args):
    """The engine's decode step as its CUDA graph holds it, for `args.batch` requests `args.context` tokens in."""
    from nanoqwen import LLM, SamplingParams, Tokenizer
    here = Path(__file__).resolve().parent.parent
    vocab = next(p for p in (here / ".bench" / "qwen.tiktoken", here.parent / "shared" / "qwen" / "Qwen-7B" /
                             "qwen.tiktoken", here.parent / "shared" / "golden" / "qwen-tiny" / "checkpoint" /
                             "qwen.tiktoken") if p.is_file())
    llm = LLM(model, tokenizer=Tokenizer(vocab), num_kv_blocks=args.batch * ((args.context + 64) // 16 + 2),
              max_num_seqs=args.batch, max_model_len=2048, cuda_graphs=True, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True) if args.engine == "greedy" else \
        SamplingParams(top_p=0.8, repetition_penalty=1.1, max_new_tokens=64, ignore_eos=True, seed=0)
    for i in range(args.batch):
        llm.add_request([(7 * i + j) % model.config.vocab_size for j in range(args.context - 1)], params)
    while any(s.num_computed < s.num_prompt for s in llm.running) or llm.waiting:
        llm.step()
    llm.step()  # one decode step through the engine: the graph's buffers now hold a real batch
    sampler = llm.runner.sampler  # as on CUDA: no host branch (rows the candidates miss are left to complete()),
    sampler.capturable, sampler.num_candidates = True, 1024  # 1,024 candidates, and the fused Triton draw
    sampler.fused = not args.torch_sampler
    graphs, b = llm.runner.graphs, args.batch
    bucket = next(x for x in graphs.buckets if x >= b)
    flags = llm.runner.sampler.flags([s.slot for s in llm.running]).for_graph()
    return lambda: graphs._step(bucket, flags)[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=700, help="context length after this step (the first sequence)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-cache", choices=["int8"], default=None)
    p.add_argument("--kv-quant-mode", choices=["default", "qwen"], default="default")
    p.add_argument("--gptq", type=int, choices=[4, 8], default=None, help="swap in GPTQ linears of these bits")
    p.add_argument("--eager", action="store_true", help="the non-graph decode metadata (with logits_indices)")
    p.add_argument("--engine", choices=["greedy", "chat"], help="count the engine's whole graphed decode step")
    p.add_argument("--torch-sampler", action="store_true", help="--engine chat with the torch sampler, not the "
                   "fused Triton draw (nanoqwen/kernels/sampling.py)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokens, meta, cache = build(args, device)
    model._check_ids = lambda ids: None  # a CPU-only check (see the module docstring)
    step = (lambda: model(tokens, meta, cache)) if args.engine is None else engine_step(model, args)
    counter = LaunchCounter()
    handles = counter.attribute_layers(model)
    with torch.no_grad():
        step()  # warm up: compile (GPU) or rewrite (interpreter) every kernel once
        with counter.triton_launches(), counter:
            logits = step()
    for h in handles:
        h.remove()
    assert logits.shape == (args.batch, model.config.vocab_size) and torch.isfinite(logits.float()).all()

    layer0, outside = counter.counts["layer 0"], counter.counts["outside"]
    per_layer = [sum(counter.counts[f"layer {i}"].values()) for i in range(model.config.num_hidden_layers)]
    names = sorted(set(layer0) | set(outside))
    print(f"{'kernel':<40} {'layer 0':>8} {'outside':>8}")
    for n in names:
        print(f"{n:<40} {layer0.get(n, 0):>8} {outside.get(n, 0):>8}")
    print(f"{'total':<40} {per_layer[0]:>8} {sum(outside.values()):>8}")
    if counter.syncs:
        print("host syncs (cannot be captured in a CUDA graph):", ", ".join(counter.syncs))
    total = sum(per_layer) + sum(outside.values())
    print(json.dumps(dict(per_layer=per_layer[0], outside=sum(outside.values()), layers=len(per_layer),
                          total=total, qwen7b_total=32 * per_layer[0] + sum(outside.values()),
                          host_syncs=len(counter.syncs), batch=args.batch, context=args.context,
                          kv_cache=args.kv_cache, kv_quant_mode=args.kv_quant_mode, gptq=args.gptq, eager=args.eager,
                          device=device.type)))


if __name__ == "__main__":
    main()
