"""Sampler speed: microseconds per call, `DeviceSampler` against a plain sort-based PyTorch sampler (HF's way).

    python benchmarks/sampler.py                       # batches 1 16 64 256, Qwen's vocabulary (151,936)
    python benchmarks/sampler.py --batches 1 16 --reps 5

Modes: "greedy" (temperature 0, no penalty) and "chat" (Qwen's chat defaults: top_p 0.8, repetition penalty 1.1,
temperature 1, each request its own seed, 300 seen ids). Both sides are timed as an engine step uses them, up to
the tokens in a host list. Baseline ("old"): argmax for greedy batches, otherwise what HF's processors do
(repetition penalty through a presence mask, a sort of the whole vocabulary, softmax, cumsum, the top-p mask,
torch.multinomial); then `.tolist()`. New: `DeviceSampler.sample` (batch flags, device slots tensor, state
updates) + `complete` (the copy to the host, and the exact search for rows the candidates could not answer); on
CUDA the fused Triton draw (nanoqwen/kernels/sampling.py), and in graphs also the torch path ("graph_torch_us").

Logits shapes (the baseline sorts the whole row whatever they are; the new one's cost depends on them):
- "peaked": a bulk of randn * 2.5 plus a head of 40 tokens near +14: a top-p 0.8 nucleus of a few tokens, as a
  language model's next-token distribution usually has. The top-K candidates answer every row.
- "flat": randn: a nucleus of ~66k tokens, the worst case: every row goes through the exact radix search (with
  `capturable`, in `complete`, after the copy that shows them pending).
The nucleus sizes are measured and printed.

CPU: wall time of each call, median (--threads sets torch's threads). CUDA: CUDA events around each call, median;
"graph" = the new `sample` captured in a CUDA graph (flags.for_graph()), replayed, then `complete`. --candidates K...
times the new sampler for several candidate counts (the CPU default is 256, the CUDA default 1024; 0 = the exact
search for every row inside `sample`). Correctness in the same run: the new sampler's tokens with candidates
answering at once (capturable=False), deferring to `complete` (capturable=True) and from the exact search alone
must be equal, and on CUDA the graph replay's equal to eager; exit status 1 otherwise. Prints a table, then one
JSON line; writes $OUT/sampler.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoqwen.sampling import DeviceSampler, SamplingParams  # noqa: E402

VOCAB = 151936
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = {
    "greedy": dict(temperature=0.0),
    "chat": dict(top_p=0.8, repetition_penalty=1.1),
}


def make_logits(shape: str, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if shape == "flat":
        logits = torch.randn(batch, VOCAB, generator=g)
    else:
        logits = torch.randn(batch, VOCAB, generator=g) * 2.5
        head = torch.randint(0, VOCAB, (batch, 40), generator=g)
        logits.scatter_(1, head, 14 + 2.5 * torch.randn(batch, 40, generator=g))
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32  # what the model hands the sampler
    return logits.to(DEV, dtype)


def nucleus_sizes(logits: torch.Tensor) -> list[int]:
    rows = logits[:16].float()
    sampler = DeviceSampler(rows.shape[0], VOCAB, DEV)
    for slot in range(rows.shape[0]):
        sampler.add(slot, SamplingParams(top_p=0.8), slot, [])
    return torch.isfinite(sampler.process(rows, list(range(rows.shape[0])))).sum(1).tolist()


def timed(fn, reps: int) -> float:
    """Median microseconds of fn() over reps calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if DEV.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


class Batch:
    """One batch of `batch` requests in a mode: the baseline's state and a DeviceSampler's."""

    def __init__(self, mode: str, batch: int, capturable: bool | None = None, num_candidates: int | None = None,
                 fused: bool | None = None):
        self.params = [SamplingParams(**MODES[mode], seed=i) for i in range(batch)]
        g = torch.Generator().manual_seed(batch)
        self.prompts = [torch.randint(0, VOCAB, (300,), generator=g).tolist() for _ in range(batch)]
        self.penalty = any(p.repetition_penalty != 1.0 for p in self.params)
        self.greedy = all(p.greedy for p in self.params)
        # baseline: a [batch, vocab] presence mask kept on the device, settings as tensors built once
        self.seen = torch.zeros(batch, VOCAB, dtype=torch.bool, device=DEV)
        for row, ids in enumerate(self.prompts):
            self.seen[row, torch.tensor(ids, device=DEV)] = True
        self.rows = torch.arange(batch, device=DEV)
        self.penalties = torch.tensor([p.repetition_penalty for p in self.params], device=DEV).unsqueeze(1)
        self.top_p = torch.tensor([p.top_p for p in self.params], device=DEV).unsqueeze(1)
        self.generator = torch.Generator(device=DEV).manual_seed(0)
        # new
        self.sampler = DeviceSampler(batch, VOCAB, DEV, capturable=capturable, num_candidates=num_candidates,
                                     fused=fused)
        for slot, (p, ids) in enumerate(zip(self.params, self.prompts)):
            self.sampler.add(slot, p, slot, ids)
        self.slots = torch.arange(batch, device=DEV)
        self.flags = self.sampler.flags(range(batch))

    def old(self, logits: torch.Tensor) -> list[int]:
        if self.greedy and not self.penalty:
            return logits.argmax(-1).tolist()
        x = logits.float()
        if self.penalty:
            x = torch.where(self.seen, torch.where(x < 0, x * self.penalties, x / self.penalties), x)
        ordered, order = torch.sort(x, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > self.top_p  # mass before a token already beyond top_p
        probs = probs.masked_fill(drop, 0.0)
        next_ids = order.gather(1, torch.multinomial(probs, 1, generator=self.generator)).squeeze(1)
        if self.penalty:
            self.seen[self.rows, next_ids] = True
        return next_ids.tolist()

    def new(self, logits: torch.Tensor) -> list[int]:
        out = self.sampler.sample(logits, self.slots, self.flags)
        return self.sampler.complete(out, logits, self.slots, self.flags)


def graph_time(mode: str, logits: torch.Tensor, reps: int, num_candidates: int | None,
               fused: bool | None = None) -> tuple[float, bool]:
    """The new `sample` in a CUDA graph: (median us per replay + complete, first replay's tokens == eager ones)."""
    batch = logits.shape[0]
    captured, eager = (Batch(mode, batch, num_candidates=num_candidates, fused=fused) for _ in range(2))
    flags = captured.flags.for_graph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        Batch(mode, batch, num_candidates=num_candidates, fused=fused).new(logits)  # warm-up, thrown away
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records kernels without running them: `captured` keeps its fresh state
        out = captured.sampler.sample(logits, captured.slots, flags)

    def step():
        graph.replay()
        return captured.sampler.complete(out, logits, captured.slots, flags)

    same = step() == eager.sampler.complete(eager.sampler.sample(logits, eager.slots, flags), logits, eager.slots,
                                            flags)
    return timed(step, reps), same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--shapes", nargs="+", default=["peaked", "flat"], choices=["peaked", "flat"])
    ap.add_argument("--reps", type=int, default=None, help="timed calls per cell (default: fewer for big batches)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[None],
                    help="DeviceSampler num_candidates values to time (default: the device's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run: batch 1, peaked logits, one timed call")
    args = ap.parse_args()
    if args.tiny:
        args.batches, args.shapes, args.reps, args.candidates = [1], ["peaked"], 1, [None]
    if args.threads:
        torch.set_num_threads(args.threads)
    results, ok = [], True
    where = torch.cuda.get_device_name() if DEV.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {DEV} ({where}), torch {torch.__version__}, vocab {VOCAB}", flush=True)
    for shape in args.shapes:
        print(f"{shape} logits: top-p 0.8 nucleus sizes {nucleus_sizes(make_logits(shape, 16, 0))}", flush=True)
    for mode in MODES:
        for shape in (["peaked"] if mode == "greedy" else args.shapes):  # argmax does not care about the shape
            for batch in args.batches:
                reps = args.reps or (20 if DEV.type == "cuda" else max(3, 64 // batch))
                logits = make_logits(shape, batch, batch)
                b = Batch(mode, batch)
                old_us = timed(lambda: b.old(logits), reps)
                for k in args.candidates:
                    b = Batch(mode, batch, num_candidates=k)
                    row = dict(mode=mode, logits=shape, batch=batch, candidates=b.sampler.num_candidates,
                               old_us=old_us, new_us=timed(lambda: b.new(logits), reps))
                    if mode != "greedy":  # the new sampler's ways agree (fresh state each; fused: on CUDA)
                        ways = [Batch(mode, batch, capturable=c, num_candidates=n, fused=f).new(logits)
                                for c, n, f in ((False, k, None), (True, k, False), (None, 0, None), (True, k, None))]
                        ok &= ways[0] == ways[1] == ways[2] == ways[3]
                    if DEV.type == "cuda":
                        row["graph_us"], same = graph_time(mode, logits, reps, k)
                        ok &= same
                        if mode != "greedy" and b.sampler.fused:  # the same graph with the torch sampler
                            row["graph_torch_us"], same = graph_time(mode, logits, reps, k, fused=False)
                            ok &= same
                    row["speedup"] = row["old_us"] / row["new_us"]
                    results.append(row)
                    print(row, flush=True)
    header = f"{'mode':7} {'logits':7} {'batch':>5} {'K':>5} {'old us':>11} {'new us':>10} {'speedup':>8}"
    print("\n" + header + ("  graph us  (torch path)" if DEV.type == "cuda" else ""))
    for r in results:
        line = f"{r['mode']:7} {r['logits']:7} {r['batch']:5d} {r['candidates']:5d} {r['old_us']:11.0f} " \
               f"{r['new_us']:10.0f} " \
               f"{r['speedup']:7.1f}x"
        print(line + (f"  {r['graph_us']:8.0f}" if "graph_us" in r else "")
              + (f"  ({r['graph_torch_us']:.0f})" if "graph_torch_us" in r else ""))
    record = dict(bench="sampler", device=str(DEV), torch=torch.__version__, threads=torch.get_num_threads(),
                  vocab=VOCAB, correct=bool(ok), results=results)
    print(json.dumps(record))
    if "OUT" in os.environ:
        Path(os.environ["OUT"], "sampler.json").write_text(json.dumps(record, indent=1))
    if not ok:
        print("ERROR: the new sampler's paths gave different tokens", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
