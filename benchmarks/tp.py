"""Tensor parallelism: batch-1 decode and throughput through LLM(tensor_parallel_size=N) for N = 1, 2, ...

    python benchmarks/tp.py                              # Qwen-7B shape, random bf16 weights, N = 1 and 2 (if 2 GPUs)
    python benchmarks/tp.py --shape 14b --sizes 1 2 4    # Qwen-14B shape
    python benchmarks/tp.py --ckpt qwen-14b-chat-int4    # a real checkpoint (name, repo or folder)
    python benchmarks/tp.py --tiny                       # CPU smoke run: gloo processes, tiny model, seconds

Random weights are written once as a converted checkpoint into --workdir (every rank reads its slices of it, as from
a real one). Each N builds the engine as a user does (CUDA graphs, overlap, KV cache from free memory per GPU),
then:
- batch-1 decode: one greedy request of --prompt-len random tokens, ignore_eos, --new-tokens tokens; tok/s counts
  the tokens after the first, from the first token's time to the last one's;
- throughput: --requests such requests queued at once; generated tokens over the wall time.
Also the start-up time (processes, loading, KV sizing, graph capture) and the KV cache's size in tokens per rank.
Correctness in the same run, reported and not asserted: how many leading batch-1 tokens equal N = 1's (the shards
sum in another order, so in bf16 a near-tie can go the other way after a while; fp32 tiny runs match throughout).
Sizes needing more GPUs than there are are listed as skipped. Writes $OUT/tp_<shape>.json after every row.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nanoqwen import LLM, SamplingParams  # noqa: E402
from nanoqwen.checkpoint import FORMAT_FILE, FORMAT_VERSION, nanoqwen_shapes  # noqa: E402
from nanoqwen.config import QwenConfig  # noqa: E402
from throughput import QWEN_7B, TINY, find_vocab, write_json  # noqa: E402

SHAPES = {"7b": QWEN_7B, "14b": dict(vocab_size=152064, hidden_size=5120, num_attention_heads=40,
                                     num_hidden_layers=40, kv_channels=128, intermediate_size=27392, seq_length=2048),
          "tiny": TINY}
SHARD_BYTES = 2 << 30


def write_random_checkpoint(folder: Path, cfg: QwenConfig, dtype: torch.dtype) -> Path:
    """A converted nanoqwen folder of random weights (N(0, 0.02), c_proj scaled down, norms 1), written shard by
    shard; reused when it is there already."""
    if (folder / FORMAT_FILE).is_file():
        return folder
    from safetensors.torch import save_file
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shard, size, files = {}, 0, []

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        files.append((name, list(shard)))

    for name, shape in nanoqwen_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = torch.ones(shape, dtype=dtype)
        else:
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith("c_proj.weight") else 0.02
            t = (torch.randn(shape, generator=g) * std).to(dtype)
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
            shard, size = {}, 0
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, names in files for n in names}}))
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    shutil.copyfile(find_vocab() / "qwen.tiktoken", tmp / "qwen.tiktoken")
    (tmp / FORMAT_FILE).write_text(json.dumps({"format": "nanoqwen", "version": FORMAT_VERSION,
                                               "dtype": str(dtype).removeprefix("torch.")}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def measure(ckpt, world: int, args, engine_kw: dict) -> dict:
    t0 = time.perf_counter()
    llm = LLM(ckpt, tensor_parallel_size=world, progress=False, **engine_kw)
    row = {"tensor_parallel_size": world, "startup_s": round(time.perf_counter() - t0, 2),
           "kv_tokens_per_rank": llm.blocks.num_blocks * llm.block_size, "kv_heads_per_rank": llm.num_kv_heads}
    try:
        g = torch.Generator().manual_seed(1)
        vocab = min(llm.config.vocab_size, 150000)
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
        params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
        llm.generate(prompts[0][:8], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up (lazy kernels)
        out = llm.generate(prompts[0], params)
        m = out.metrics
        row["decode_tok_s"] = round((len(out.token_ids) - 1) / (m["finished"] - m["first_token"]), 2)
        row["tokens"] = out.token_ids
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        row["throughput_tok_s"] = round(sum(len(o.token_ids) for o in outs) / wall, 1)
        row["throughput_wall_s"] = round(wall, 2)
    finally:
        llm.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a checkpoint (name, repo or folder) instead of random weights")
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="7b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/nanoqwen_tp_bench", help="where random checkpoints are written")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, fp32: a smoke run of the whole path")
    args = p.parse_args()
    if args.tiny:
        args.shape, args.dtype, args.new_tokens, args.requests, args.prompt_len = "tiny", "float32", 16, 8, 16
        engine_kw = dict(device="cpu", cpu_kv_cache_gib=2 / 1024, max_model_len=256)  # 2 MiB per rank
    else:
        engine_kw = {}
    dtype = getattr(torch, args.dtype)
    if args.ckpt:
        ckpt, label = args.ckpt, Path(args.ckpt).name
    else:
        cfg = QwenConfig.from_dict(SHAPES[args.shape])
        ckpt = write_random_checkpoint(Path(args.workdir) / f"{args.shape}-{args.dtype}", cfg, dtype)
        label = args.shape
    if args.ckpt or not args.tiny:
        engine_kw["dtype"] = dtype
    gpus = torch.cuda.device_count() if not args.tiny else None
    res = {"label": label, "dtype": args.dtype, "gpus": gpus, "new_tokens": args.new_tokens,
           "requests": args.requests, "prompt_len": args.prompt_len, "rows": []}
    base = None
    for world in args.sizes:
        if gpus is not None and world > gpus:
            res["rows"].append({"tensor_parallel_size": world, "skipped": f"needs {world} GPUs, {gpus} here"})
            print(f"N={world}: skipped ({world} GPUs needed, {gpus} here)", flush=True)
            write_json(res, f"tp_{label}.json")
            continue
        row = measure(ckpt, world, args, engine_kw)
        tokens = row.pop("tokens")
        if base is None:
            base = tokens
        row["tokens_equal_to_first_size"] = next((i for i, (a, b) in enumerate(zip(tokens, base)) if a != b),
                                                 min(len(tokens), len(base)))
        res["rows"].append(row)
        write_json(res, f"tp_{label}.json")
        print(f"N={world}: start-up {row['startup_s']} s, batch-1 decode {row['decode_tok_s']} tok/s, throughput "
              f"{row['throughput_tok_s']} tok/s ({args.requests} x {args.new_tokens}), KV {row['kv_tokens_per_rank']} "
              f"tokens per rank, {row['tokens_equal_to_first_size']}/{len(tokens)} tokens as N={args.sizes[0]}",
              flush=True)


if __name__ == "__main__":
    main()
