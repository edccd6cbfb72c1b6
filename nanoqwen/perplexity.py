"""Long-context perplexity as Qwen's README reports it (arXiv documents; Qwen-7B at 1,024 to 16,384 tokens, with and
without dynamic NTK and LogN).

    nanoqwen perplexity --ckpt qwen-7b paper1.txt paper2.txt                 # (or: python -m nanoqwen.perplexity)
    nanoqwen perplexity --ckpt qwen-7b --compare --json ppl.json *.txt       # plain, + NTK, + NTK + LogN
    nanoqwen perplexity --ckpt qwen-7b --no-dynamic-ntk --no-logn --lengths 1024,16384 doc.txt

The method: each document is cut into consecutive windows of each length (a tail shorter than the length is left
out); each window is one forward from position 0, so its NTK alpha comes from the window's length, and every token
after its first is predicted; the perplexity at a length is exp(mean negative log-likelihood) over every predicted
token of every window of that length. The windows of one length are batched (--batch-tokens per forward), and the
head's logits are made a slice of rows at a time (Qwen.token_logprobs), so a 16k window never holds [16k, vocab].
A FILE is UTF-8 text (tokenized as plain text: special-token text stays text) or a .json list of token ids.
Settings switch Qwen's long-context tricks per run (a load-time override of config.json, honoured by the torch path
and the Triton kernels alike); --compare evaluates the README's rows on one loaded model. Prints a table, writes
--json, and a PNG plot of perplexity against length, one line per setting, when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# (use_dynamic_ntk, use_logn_attn) of each setting's name; --compare runs the rows of Qwen's README table
SETTINGS = {"plain": (False, False), "ntk": (True, False), "logn": (False, True), "ntk+logn": (True, True)}
COMPARE = ("plain", "ntk", "ntk+logn")


def setting_name(use_dynamic_ntk: bool, use_logn_attn: bool) -> str:
    return next(name for name, v in SETTINGS.items() if v == (use_dynamic_ntk, use_logn_attn))


def set_long_context(model, setting: str) -> None:
    """Switch the model to a setting: both code paths read these from model.config at every forward."""
    model.config.use_dynamic_ntk, model.config.use_logn_attn = SETTINGS[setting]


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive windows of exactly `length` tokens (a shorter tail is left out)."""
    return [ids[a:a + length] for a in range(0, len(ids) - length + 1, length)]


@torch.no_grad()
def window_logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    """batch [B, L] token ids, each row a window from position 0 -> [B, L - 1] fp32: log p(token j + 1 | tokens
    0..j) for every window."""
    hidden = model.hidden_states(batch)
    B, L, H = hidden.shape
    chosen, _, _ = model.token_logprobs(hidden[:, :-1].reshape(-1, H), batch[:, 1:].reshape(-1))
    return chosen.view(B, L - 1)


def perplexity(model, documents: list[list[int]], length: int, batch_tokens: int = 16384, bar=None) -> dict:
    """Perplexity of `documents` (token id lists) at one window length: {"perplexity", "nll" (the summed negative
    log-likelihood), "tokens" (predicted), "windows"}; perplexity None when no document has `length` tokens."""
    if length < 2:
        raise ValueError(f"a window of {length} token(s) predicts nothing: use lengths of at least 2")
    todo = [w for doc in documents for w in windows(doc, length)]
    per_forward = max(1, batch_tokens // length)
    nll, tokens = 0.0, 0
    for a in range(0, len(todo), per_forward):
        chunk = todo[a:a + per_forward]
        lp = window_logprobs(model, torch.tensor(chunk, dtype=torch.long, device=model.device))
        nll -= lp.double().sum().item()
        tokens += lp.numel()
        if bar is not None:
            bar.update(len(chunk))
    return {"perplexity": math.exp(nll / tokens) if tokens else None, "nll": nll, "tokens": tokens,
            "windows": len(todo)}


def evaluate(model, documents: list[list[int]], lengths, settings=None, batch_tokens: int = 16384,
             progress: bool = True) -> dict:
    """{setting: {length: perplexity() result}} for each setting (default: the model's own) and length; the model's
    config is restored afterwards."""
    from tqdm.auto import tqdm

    cfg = model.config
    saved = (cfg.use_dynamic_ntk, cfg.use_logn_attn)
    settings = list(settings or [setting_name(*saved)])
    total = len(settings) * sum(len(windows(doc, n)) for doc in documents for n in lengths)
    results = {}
    try:
        with tqdm(total=total, desc="perplexity", unit="window", disable=not progress) as bar:
            for setting in settings:
                set_long_context(model, setting)
                results[setting] = {}
                for n in lengths:
                    bar.set_postfix_str(f"{setting}, {n} tokens")
                    results[setting][n] = perplexity(model, documents, n, batch_tokens, bar)
    finally:
        cfg.use_dynamic_ntk, cfg.use_logn_attn = saved
    return results


def table(results: dict, lengths) -> str:
    """Settings down, lengths across (as Qwen's README table), then the predicted tokens per length; '-': no
    document has that many tokens."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}" if v < 1e6 else f"{v:.3g}"

    width = max(9, max(len(s) for s in results) + 2)
    lines = [f"{'setting':<{width}}" + "".join(f"{n:>11}" for n in lengths)]
    for setting, row in results.items():
        lines.append(f"{setting:<{width}}" + "".join(f"{cell(row[n]['perplexity']):>11}" for n in lengths))
    first = next(iter(results.values()))
    lines.append(f"{'tokens':<{width}}" + "".join(f"{first[n]['tokens']:>11}" for n in lengths))
    return "\n".join(lines)


def plot(results: dict, lengths, path: Path, title: str) -> bool:
    """Perplexity against window length, one line per setting; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, row in results.items():
        xs = [n for n in lengths if row[n]["perplexity"] is not None]
        ax.plot(xs, [row[n]["perplexity"] for n in xs], marker="o", label=setting)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(lengths), [str(n) for n in lengths])
    ax.set_xlabel("window length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def read_documents(files, tokenizer) -> list[list[int]]:
    docs = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}: pass UTF-8 text files (or .json lists of token ids)")
        if path.suffix == ".json":
            ids = json.loads(path.read_text())
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{path}: a .json document must be one list of token ids (ints)")
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e}); convert it first") from e
            ids = tokenizer.encode(text, allowed_special=set())
        docs.append(ids)
    return docs


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths takes comma-separated integers such as 1024,2048, got {text!r}")
    if not lengths or any(n < 2 for n in lengths):
        raise argparse.ArgumentTypeError(f"--lengths needs window lengths of at least 2 tokens, got {text!r}")
    return sorted(set(lengths))


def parse_args(argv=None, prog="python -m nanoqwen.perplexity"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("files", nargs="+", metavar="FILE", help="documents: UTF-8 text, or .json lists of token ids")
    p.add_argument("--ckpt", required=True, help="qwen-7b, qwen-14b, ..., an Org/Name Hugging Face repo, an official "
                   "checkpoint folder or a converted one")
    p.add_argument("--lengths", type=parse_lengths, default=list(DEFAULT_LENGTHS),
                   help="window lengths, comma-separated (default: %(default)s)")
    p.add_argument("--no-dynamic-ntk", action="store_true", help="run with dynamic NTK off (config.json's otherwise)")
    p.add_argument("--no-logn", action="store_true", help="run with LogN attention scaling off")
    p.add_argument("--compare", action="store_true",
                   help=f"evaluate the settings of Qwen's README table ({', '.join(COMPARE)}) on one loaded model")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", default="perplexity.png",
                   help="the plot's file (default: %(default)s; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="tokens per forward: windows of one length are batched up to this (default: %(default)s)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA (float16 for GPTQ), float32 on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.compare and (args.no_dynamic_ntk or args.no_logn):
        p.error("--compare evaluates every setting itself: drop --no-dynamic-ntk / --no-logn")
    if args.batch_tokens < 1:
        p.error(f"--batch-tokens must be a positive integer, got {args.batch_tokens}")
    return args


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, **({"prog": prog} if prog else {}))
    from .checkpoint import CheckpointError, load_model, resolve_checkpoint
    from .config import ConfigError
    from .tokenizer import Tokenizer
    try:
        folder = resolve_checkpoint(args.ckpt, progress=not args.no_progress)
        documents = read_documents(args.files, Tokenizer.from_pretrained(folder))
        model = load_model(folder, args.device, args.dtype, use_dynamic_ntk=False if args.no_dynamic_ntk else None,
                           use_logn_attn=False if args.no_logn else None)
        settings = COMPARE if args.compare else None
        results = evaluate(model, documents, args.lengths, settings, args.batch_tokens, not args.no_progress)
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    name = Path(str(args.ckpt).rstrip("/")).name
    print(f"perplexity of {name} over {len(documents)} document(s) (seq_length {model.config.seq_length}: NTK and "
          "LogN act beyond it)")
    print(table(results, args.lengths))
    if args.json:
        out = {"ckpt": str(args.ckpt), "files": [str(f) for f in args.files], "documents": len(documents),
               "document_tokens": [len(d) for d in documents], "seq_length": model.config.seq_length,
               "lengths": args.lengths, "results": {s: {str(n): r for n, r in row.items()} for s, row in results.items()}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not args.no_plot:
        if plot(results, args.lengths, Path(args.plot), f"{name}: perplexity against window length"):
            print(f"plot: {args.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
