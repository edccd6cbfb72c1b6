"""Convert an official Qwen (v1) checkpoint folder into nanoqwen's layout.

    python convert_checkpoint.py SRC DST [--dtype bfloat16|float16|float32]
    nanoqwen convert SRC DST [--dtype ...]                 # the same, through the console script
"""
import argparse
import sys


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.strip().splitlines()[0])
    p.add_argument("src", help="official checkpoint folder (config.json, *.safetensors, qwen.tiktoken)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the converted fp weights (default: keep the checkpoint's own: bfloat16 for Qwen, "
                        "float16 for the GPTQ ones, whose packed weights and fp16 scales are never cast)")
    args = p.parse_args(argv)
    from nanoqwen.checkpoint import CheckpointError, convert
    from nanoqwen.config import ConfigError
    try:
        out = convert(args.src, args.dst, args.dtype)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
