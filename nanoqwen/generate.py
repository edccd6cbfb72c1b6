"""The command line: chat with a Qwen chat model, or complete text with a base model, streaming.

    nanoqwen generate --ckpt qwen-7b-chat                       # interactive chat (or: python -m nanoqwen.generate)
    nanoqwen generate --ckpt qwen-7b-chat --prompt "你好"         # one answer, then exit
    nanoqwen generate --ckpt qwen-7b --prompt "The capital of France is"

In a chat, type :clear to forget the history and :quit (or Ctrl-D) to leave; Ctrl-C stops an answer (what was
already printed stays in the history). Chat messages are always plain text. Base-model prompts are tokenized as
Qwen's tokenizer does by default: the text of a special token such as <|endoftext|> becomes that token; pass
--no-special-tokens to keep such text as plain text.
"""
from __future__ import annotations

import argparse
import sys

from .sampling import SamplingParams

COMMANDS = {":clear": "forget the conversation so far", ":quit": "leave (also :exit, Ctrl-D)"}


def parse_args(argv=None, prog="python -m nanoqwen.generate"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="qwen-7b, qwen-7b-chat, qwen-14b, qwen-14b-chat (+ -int4/-int8), "
                   "an Org/Name Hugging Face repo, an official checkpoint folder or a converted one")
    p.add_argument("--prompt", help="answer (chat) or complete (base model) this once and exit")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt for chat models")
    p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's generation_config (512)")
    p.add_argument("--temperature", type=float, help="0 = greedy; default: generation_config (1.0)")
    p.add_argument("--top-p", type=float, help="default: generation_config (0.8 for Qwen)")
    p.add_argument("--top-k", type=int, help="0 = off; default: generation_config (0 for Qwen)")
    p.add_argument("--repetition-penalty", type=float, help="default: generation_config (1.1 for Qwen chat)")
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA (float16 for GPTQ checkpoints), float32 on the CPU")
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="int8: store K/V as uint8 with per (token, head) scales, half the memory (default: auto, "
                        "the model dtype)")
    p.add_argument("--kv-quant-mode", choices=["default", "qwen"], default="default",
                   help="int8 cache rounding: default (per token and head, rounded) or qwen (the reference's "
                        "chunk-wide truncation, for parity)")
    p.add_argument("--lora", metavar="PATH", help="a PEFT LoRA adapter folder (as Qwen's finetune.py writes it), "
                   "merged into the weights at load time")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N GPUs (cuda:0..N-1 from --device; N processes on the CPU). Under "
                        "torchrun (every rank runs this command), N must equal the number of processes")
    p.add_argument("--dist-addr", help="tensor parallelism: rendezvous address of rank 0 (default 127.0.0.1)")
    p.add_argument("--dist-port", type=int, help="tensor parallelism: rendezvous port (default: a free one)")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="base models: encode special-token text in the prompt (e.g. <|endoftext|>) as plain text "
                        "instead of as the special token (chat messages are always plain text)")
    args = p.parse_args(argv)
    try:  # the sampling flags are checked now, not after a model load of minutes
        sampling_params(None, args)
    except ValueError as e:
        p.error(str(e).removeprefix("SamplingParams: "))
    return args


def sampling_params(llm, args) -> SamplingParams:
    overrides = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                   ("top_p", args.top_p), ("top_k", args.top_k),
                                   ("repetition_penalty", args.repetition_penalty), ("seed", args.seed))
                 if v is not None}
    config = dict(llm.generation_config) if llm is not None else {}
    if args.temperature is not None and args.temperature > 0:
        config["do_sample"] = True  # an explicit temperature asks for sampling even if the config says greedy
    return SamplingParams.from_generation_config(config, **overrides)


def run(llm, ids: list[int], params: SamplingParams, out=sys.stdout) -> str:
    """Generate for one prompt, streaming text to `out`; returns the text (on Ctrl-C, what was printed so far) and
    prints the speed line on stderr."""
    rid = llm.add_request(ids, params)
    final, shown = None, []
    try:
        while final is None:
            for o in llm.step():
                if o.request_id != rid:
                    continue
                if o.new_text:
                    out.write(o.new_text)
                    out.flush()
                    shown.append(o.new_text)
                if o.finished:
                    final = o
    except KeyboardInterrupt:
        llm.abort(rid)
        llm.step()
        out.write("\n")
        print("[interrupted: the answer so far stays in the history; :clear forgets it]", file=sys.stderr, flush=True)
        return "".join(shown)
    out.write("\n")
    out.flush()
    m, n_new = final.metrics, len(final.token_ids)
    prefill_s = m["first_token"] - m["arrival"]
    decode_s = m["finished"] - m["first_token"]
    decode = f"{(n_new - 1) / decode_s:.1f} tok/s" if n_new > 1 and decode_s > 0 else "n/a"
    print(f"[prompt tokens: {len(ids)}, new tokens: {n_new}, prefill: {len(ids) / prefill_s:.1f} tok/s, "
          f"decode: {decode}, finish: {final.finish_reason}]", file=sys.stderr, flush=True)
    return final.text


def interactive(llm, args, params, history: list | None = None) -> None:
    """The read-answer loop; `history` (a list of (query, response)) grows in place."""
    chat = llm.chat_format == "chatml"
    history = [] if history is None else history
    tty = sys.stdin.isatty()
    print(f"nanoqwen: {'chat' if chat else 'text completion'} with {args.ckpt}. "
          + " ".join(f"{k} to {v};" for k, v in COMMANDS.items()), file=sys.stderr, flush=True)
    while True:
        if tty:
            sys.stdout.write("\nUser> " if chat else "\n>>> ")
            sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as Ctrl-D does
            line = ""
        if not line:
            if tty:
                sys.stdout.write("\n")  # the shell prompt starts on its own line
                sys.stdout.flush()
            break
        query = line.rstrip("\n")
        if query.strip() in (":quit", ":exit"):
            break
        if query.strip() == ":clear":
            history.clear()
            print("[history cleared]", file=sys.stderr, flush=True)
            continue
        if not query.strip():
            continue
        if chat:
            ids = llm.chat_context(query, history, args.system)
            if tty:
                sys.stdout.write("Qwen> ")
            response = run(llm, ids, params)
            history.append((query, response.strip()))
        else:
            run(llm, llm.encode(query, special_tokens=not args.no_special_tokens), params)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, **({"prog": prog} if prog else {}))
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import TensorParallelError
    from .engine import LLM
    try:
        llm = LLM(args.ckpt, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache,
                  kv_quant_mode=args.kv_quant_mode, lora=args.lora, tensor_parallel_size=args.tensor_parallel_size,
                  dist_addr=args.dist_addr, dist_port=args.dist_port)
        params = sampling_params(llm, args)
        if args.prompt is None:
            interactive(llm, args, params)
        elif llm.chat_format == "chatml":
            run(llm, llm.chat_context(args.prompt, None, args.system), params)
        else:
            sys.stdout.write(args.prompt)
            run(llm, llm.encode(args.prompt, special_tokens=not args.no_special_tokens), params)
    except (CheckpointError, ConfigError, OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TensorParallelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
