"""The `nanoqwen` command (also `python -m nanoqwen`): one entry point, a sub-command per job.

    nanoqwen generate --ckpt qwen-7b-chat          chat with a chat model, or complete text with a base model
    nanoqwen serve --ckpt qwen-7b-chat             an OpenAI-compatible server with a web chat page
    nanoqwen convert SRC DST                        convert an official checkpoint ahead of time
    nanoqwen finetune --ckpt qwen-7b-chat --data train.json --out DIR    LoRA, Q-LoRA or full fine-tuning
    nanoqwen perplexity --ckpt qwen-7b FILE...      perplexity per window length, with and without NTK / LogN
"""
from __future__ import annotations

import importlib
import sys

# sub-command -> (module with a main(argv, prog) function, one line of help)
COMMANDS = {
    "generate": ("nanoqwen.generate", "chat with a chat model, or complete text with a base model (streaming)"),
    "serve": ("nanoqwen.serve.__main__", "an OpenAI-compatible server and a web chat page (the serve extra)"),
    "convert": ("convert_checkpoint", "convert an official Qwen checkpoint folder into nanoqwen's layout"),
    "finetune": ("nanoqwen.finetune", "LoRA, Q-LoRA or full fine-tuning on Qwen-format conversations (torchrun too)"),
    "perplexity": ("nanoqwen.perplexity", "long-context perplexity of documents per window length (Qwen's README)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return ("usage: nanoqwen COMMAND [options]   (nanoqwen COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nanoqwen: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"nanoqwen {name}")


if __name__ == "__main__":
    sys.exit(main())
