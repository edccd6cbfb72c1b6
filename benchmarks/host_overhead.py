"""Host microseconds per engine step, by part, with the model's forward stubbed (the CPU proxy for the decode loop).

    python benchmarks/host_overhead.py              # batch 1/16/64/256 x prompts 128/1024 x greedy/chat, CPU
    python benchmarks/host_overhead.py --tiny       # a quick smoke run (tests/test_benchmarks.py)

The engine as on a GPU (decode steps through the static CUDA-graph path, whose replay is stubbed; prefill eager). A
random one-layer model whose forward is replaced by a slice of a fixed random logits tensor over a 512-token
vocabulary (so the sampler's device work is small: on a GPU it is device time, timed by benchmarks/sampler.py; the
host part of sampling, building its inputs and launching it, is what this measures). Every request decodes (no EOS,
no stop), steps are timed once every request has finished its prompt. Parts:
  schedule   Scheduler.schedule + commit (admission, token budget, blocks, prefix cache)
  metadata   ModelRunner.launch minus the forward and the sampler (slot set-up, block-table deltas, step metadata)
  sampling   the sampler's host side: its flags per batch, and for sampled batches `complete` (the copy of the
             tokens); its device work is inside the stubbed graph (prefill steps sample eagerly, not timed here)
  detok      incremental detokenization of the new tokens
  outputs    the rest of turning tokens into outputs: stop checks, RequestOutput objects, the host copy's wait
  total      step(), timed without the per-part wrappers (which add their own calls: the parts sum to more)
Targets (issue 10, this 2-core CPU): <= 60 us per step at batch 1 greedy, <= 100 us with Qwen's chat defaults
(top_p 0.8, repetition penalty 1.1), <= 1 ms at batch 256 with 1,024-token prompts; no part grows with context.
Prints a table, then one JSON line (also written to $OUT/host_overhead.json when OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoqwen import LLM, Qwen, SamplingParams  # noqa: E402
from nanoqwen.sampling import SamplerOutput  # noqa: E402
from nanoqwen.testing import tiny_config  # noqa: E402
from nanoqwen.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

VOCAB = 512
MODES = {"greedy": dict(temperature=0.0),
         "chat": dict(temperature=1.0, top_p=0.8, repetition_penalty=1.1)}


def vocab_file() -> Path:
    here = Path(__file__).resolve().parent.parent
    for p in (here / ".bench" / "qwen.tiktoken", here.parent / "shared" / "qwen" / "Qwen-7B" / "qwen.tiktoken",
              here.parent / "shared" / "golden" / "qwen-tiny" / "checkpoint" / "qwen.tiktoken"):
        if p.is_file():
            return p
    sys.exit("host_overhead: qwen.tiktoken not found (.bench/ or ../shared)")


class Timer:
    """Wraps callables and sums their time per part."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.on = False

    def wrap(self, part, fn):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if self.on:
                    self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - t0
        return timed


def measure(batch: int, prompt_len: int, mode: str, steps: int, tokenizer: Tokenizer) -> dict:
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=1, kv_channels=64, intermediate_size=128,
                      num_hidden_layers=1, seq_length=8192)
    model = Qwen(cfg).init_weights().eval()
    llm = LLM(model, tokenizer=tokenizer, num_kv_blocks=batch * (-(-(prompt_len + steps + 64) // 16)) + 16,
              max_num_seqs=max(batch, 1), max_num_batched_tokens=max(8192, prompt_len), max_model_len=8192,
              cuda_graphs=True, progress=False)  # the decode path a GPU runs (its graph replay stubbed below)
    logits = torch.randn(max(batch, 8192), VOCAB)
    timer = Timer()

    def forward(tokens, meta, kv_cache=None):  # the stub: no device work, just logits of the right shape
        rows = tokens.shape[0] if meta.logits_indices is None else meta.logits_indices.shape[0]
        return logits[:rows]

    # decode steps: on a GPU one CUDA graph replay (input gathers, forward, sampler, token store): device work, stubbed
    # by its outputs (argmax tokens; nothing pending); what the host does around it is measured
    argmax = logits.argmax(-1)
    pending = torch.zeros(logits.shape[0], dtype=torch.bool)

    def replay(b, flags):
        return SamplerOutput(argmax[:b], pending=None if flags.greedy_only else pending[:b]), logits[:b]

    llm.model.forward = forward  # prefill steps (eager)
    llm.runner.graphs._step = replay
    push = IncrementalDetokenizer.push
    try:
        params = SamplingParams(max_new_tokens=2 * steps + 64, ignore_eos=True, seed=1, **MODES[mode])
        gen = torch.Generator().manual_seed(1)
        for _ in range(batch):
            llm.add_request(torch.randint(0, VOCAB, (prompt_len,), generator=gen).tolist(), params)
        while llm.scheduler.waiting or any(s.num_computed < s.num_prompt for s in llm.scheduler.running):
            llm.step()
        llm.step()
        # the total, uninstrumented (the stubs cost a call each); then the parts, through timing wrappers
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.step()
        wall = time.perf_counter() - t0
        llm.scheduler.schedule = timer.wrap("schedule", llm.scheduler.schedule)
        llm.scheduler.commit = timer.wrap("schedule", llm.scheduler.commit)
        llm.runner.launch = timer.wrap("launch", llm.runner.launch)
        llm.runner.graphs._step = timer.wrap("forward", replay)
        llm.model.forward = timer.wrap("forward", forward)
        for name in ("sample", "flags", "complete"):  # the sampler's host side (its device work is in the graph)
            setattr(llm.runner.sampler, name, timer.wrap("sampling", getattr(llm.runner.sampler, name)))
        llm._process = timer.wrap("process", llm._process)
        IncrementalDetokenizer.push = timer.wrap("detok", push)
        timer.on = True
        for _ in range(steps):
            llm.step()
    finally:
        IncrementalDetokenizer.push = push
        llm.close()
    p = {k: v / steps * 1e6 for k, v in timer.parts.items()}
    row = {"batch": batch, "prompt_len": prompt_len, "mode": mode,
           "schedule": p.get("schedule", 0.0),
           "metadata": p.get("launch", 0.0) - p.get("forward", 0.0) - p.get("sampling", 0.0),
           "sampling": p.get("sampling", 0.0), "detok": p.get("detok", 0.0),
           "outputs": p.get("process", 0.0) - p.get("detok", 0.0),
           "total": wall / steps * 1e6}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a quick smoke run (batch 1 and 16, 128-token prompts)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)  # host work is single-threaded; tiny ops run fastest on one thread
    tokenizer = Tokenizer(vocab_file())
    batches, lens, steps = ((1, 16), (128,), 20) if args.tiny else ((1, 16, 64, 256), (128, 1024), args.steps)
    rows = []
    out = Path(os.environ["OUT"]) / "host_overhead.json" if os.environ.get("OUT") else None
    cols = ("schedule", "metadata", "sampling", "detok", "outputs", "total")
    print(f"host us per step (forward stubbed, vocab {VOCAB}, {steps} decode steps, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'batch':>5} {'prompt':>6} {'mode':>6} " + " ".join(f"{c:>9}" for c in cols))
    for mode in MODES:
        for prompt_len in lens:
            for b in batches:
                row = measure(b, prompt_len, mode, max(5, steps // max(1, b // 16)), tokenizer)
                rows.append(row)
                print(f"{b:>5} {prompt_len:>6} {mode:>6} " + " ".join(f"{row[c]:>9.1f}" for c in cols), flush=True)
                if out is not None:
                    out.write_text(json.dumps({"rows": rows}, indent=1))
    targets = {"batch1_greedy_us": 60, "batch1_chat_us": 100, "batch256_1024_us": 1000}

    def total(b, n, mode):
        return next((r["total"] for r in rows if (r["batch"], r["prompt_len"], r["mode"]) == (b, n, mode)), None)

    got = {"batch1_greedy_us": total(1, 128, "greedy"), "batch1_chat_us": total(1, 128, "chat"),
           "batch256_1024_us": max(filter(None, (total(256, 1024, m) for m in MODES)), default=None)}
    print("targets: " + ", ".join(f"{k} {v:.1f} (<= {targets[k]})" for k, v in got.items() if v is not None))
    print(json.dumps({"host_overhead": rows, "targets": targets, "measured": got}))


if __name__ == "__main__":
    main()
