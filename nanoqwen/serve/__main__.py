"""python -m nanoqwen.serve --ckpt NAME_OR_PATH: the OpenAI-compatible server and its web chat page."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv=None, prog="python -m nanoqwen.serve"):
    p = argparse.ArgumentParser(prog=prog,
                                description="Serve a Qwen (v1) model with OpenAI's API (/v1/chat/completions, "
                                            "/v1/completions, ...) and a web chat page at /.")
    p.add_argument("--ckpt", required=True, help="qwen-7b-chat, qwen-14b-chat (+ -int4/-int8), qwen-7b, ..., an "
                   "Org/Name Hugging Face repo, an official checkpoint folder or a converted one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients send (default: the --ckpt name, or the "
                   "folder's name for a path)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (the page asks for it)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA (float16 for GPTQ checkpoints), float32 on the CPU")
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="int8: store K/V as uint8 with per (token, head) scales, half the memory")
    p.add_argument("--kv-quant-mode", choices=["default", "qwen"], default="default",
                   help="int8 cache rounding: default, or qwen (the reference's, for parity)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + answer in tokens (default: the engine's)")
    p.add_argument("--max-num-seqs", type=int, help="most requests in one batch (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="fraction of the GPU memory for weights, activations and the KV cache (default 0.9)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N GPUs (cuda:0..N-1 from --device); under torchrun (every rank runs "
                        "this command) N must equal the number of processes, and rank 0 serves")
    p.add_argument("--dist-addr", help="tensor parallelism: rendezvous address of rank 0 (default 127.0.0.1)")
    p.add_argument("--dist-port", type=int, help="tensor parallelism: rendezvous port (default: a free one)")
    p.add_argument("--lora", metavar="PATH", help="a PEFT LoRA adapter merged into the weights at load time")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", default=[],
                   help="LoRA adapters served unmerged beside the base model, each as a model of its own (a request "
                        "with model NAME uses it); requests with different adapters share batches")
    p.add_argument("--max-loras", type=int, default=4, help="adapters loaded at once (with --lora-modules)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank (with --lora-modules)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    modules = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--lora-modules takes NAME=PATH items, got {item!r}")
        modules[name] = path
    args.lora_modules = modules
    return args


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, **({"prog": prog} if prog else {}))
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: the server needs fastapi and uvicorn ({e}); install them with: pip install 'nanoqwen[serve]' "
              "(or pip install -e '.[serve]' in a checkout)", file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from .. import LLM
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine_args = {k: v for k, v in (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs),
                                     ("gpu_memory_utilization", args.gpu_memory_utilization)) if v is not None}
    try:
        if args.lora_modules:
            engine_args.update(enable_lora=True, max_loras=max(args.max_loras, len(args.lora_modules)),
                               max_lora_rank=args.max_lora_rank)
        llm = LLM(args.ckpt, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache,
                  kv_quant_mode=args.kv_quant_mode, lora=args.lora, tensor_parallel_size=args.tensor_parallel_size,
                  dist_addr=args.dist_addr, dist_port=args.dist_port, **engine_args)
        for name, path in args.lora_modules.items():
            llm.add_lora(name, path)
    except (CheckpointError, ConfigError, OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or (Path(args.ckpt).name if Path(args.ckpt).exists() else args.ckpt)
    app = create_app(llm, name, args.api_key)
    print(f"nanoqwen: serving {name!r} on http://{args.host}:{args.port} (chat page at /, API under /v1)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
