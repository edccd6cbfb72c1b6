"""lm-evaluation-harness backend `nanoqwen`: loglikelihood, loglikelihood_rolling and generate_until on the engine.

    python -m nanoqwen.lm_eval --model_args ckpt=qwen-7b --tasks hellaswag,arc_easy    # = lm_eval --model nanoqwen

lm-eval's own `lm_eval` command knows only its built-in backends (it reads no plugin entry points), so run it through
`python -m nanoqwen.lm_eval`, which registers this backend and then hands every argument to lm-eval's command line
(adding `--model nanoqwen` when absent). From Python, importing this module registers it:

    import lm_eval, nanoqwen.lm_eval
    lm_eval.simple_evaluate(model="nanoqwen", model_args="ckpt=qwen-7b", tasks=["hellaswag"])

model_args: `ckpt` (as LLM takes it), `max_length` (tokens of one forward; default the model's seq_length, where
dynamic NTK and LogN would start), `max_gen_toks` (default 256), and any LLM keyword (dtype, num_kv_blocks,
max_num_batched_tokens, use_dynamic_ntk, use_logn_attn, ...). The device comes from lm-eval's --device (its default
cuda:0 falls back to the CPU where there is no GPU); `--batch_size N` caps the engine's running requests
(max_num_seqs), `auto` leaves the engine's default. Every method sends all its requests to the engine at once: it
batches them by tokens (continuous batching, chunked prefill), and contexts shared by several requests (few-shot
prompts, the choices of one question) come from the prefix cache.
Requires lm-eval >= 0.4.10 (older releases import every backend at start-up, which fails under transformers 5).
"""
from __future__ import annotations

import inspect
import sys

import torch

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .engine import LLM
from .sampling import SamplingParams
from .tokenizer import EOD_ID

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")

# registered by name, not by the class object: under `python -m nanoqwen.lm_eval` this file also runs as __main__, and
# lm-eval must load the class from the module proper (one class, whichever way the module was reached)
if "nanoqwen" not in model_registry:
    model_registry.register("nanoqwen", target="nanoqwen.lm_eval:NanoQwenLM")


class NanoQwenLM(TemplateLM):
    """An lm-eval `LM` over a nanoqwen `LLM` (built from `ckpt` and the LLM keywords, or given as `llm`)."""

    def __init__(self, ckpt=None, llm: LLM | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 batch_size=None, max_batch_size=None, device=None, **llm_kwargs):
        super().__init__()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda:0 unless told otherwise; without a GPU, the CPU (as its
            # HF backend does), said out loud
            print(f"nanoqwen backend: no CUDA device here, running on the CPU instead of {device} (pass --device cpu "
                  "to silence this)", file=sys.stderr)
            device = None
        if device is not None:
            llm_kwargs["device"] = device
        if (ckpt is None) == (llm is None):
            raise ValueError("the nanoqwen backend needs a checkpoint: --model_args ckpt=NAME_OR_FOLDER (or, from "
                             "Python, llm=an LLM already built)")
        if llm is None:
            known = set(inspect.signature(LLM).parameters) - {"ckpt"}
            unknown = sorted(set(llm_kwargs) - known)
            if unknown:
                raise ValueError(f"unknown model_args {', '.join(unknown)} for the nanoqwen backend: use ckpt, "
                                 f"max_length, max_gen_toks or LLM's keywords ({', '.join(sorted(known))})")
            if batch_size not in (None, "auto") and not str(batch_size).startswith("auto"):
                llm_kwargs.setdefault("max_num_seqs", int(batch_size))
            llm = LLM(ckpt, **{k: v for k, v in llm_kwargs.items() if v is not None})
        elif set(llm_kwargs) - {"device"}:
            raise ValueError(f"model_args {', '.join(sorted(llm_kwargs))} configure a new LLM; with llm= given, "
                             "build that LLM with them instead")
        self.llm = llm
        self.max_length = int(max_length or min(llm.config.seq_length, llm.max_model_len))
        if not 2 <= self.max_length <= llm.max_model_len:
            raise ValueError(f"max_length {self.max_length} must be in [2, max_model_len = {llm.max_model_len}]")
        self.max_gen_toks = int(max_gen_toks)
        self._device = llm.device

    # ------------------------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return EOD_ID  # <|endoftext|>: also the context of a document's first token (prefix_token_id)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.llm.encode(string)  # Qwen adds no BOS; special-token text becomes the token, as Qwen's tokenizer

    def tok_decode(self, tokens) -> str:
        return self.llm.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids). A pair longer than
        max_length keeps its last max_length tokens (the context loses its start), as lm-eval's HF backend does."""
        pairs = []
        for _, context, continuation in requests:
            if len(continuation) >= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens leaves no context within max_length "
                                 f"{self.max_length}: raise max_length (--model_args max_length=N)")
            keep = self.max_length - len(continuation)
            pairs.append((context[-keep:], continuation))
        results = self._run(self.llm.loglikelihood, pairs, disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, all of its tokens predicted once (the first one from <|endoftext|>), in
        windows whose forward is at most max_length tokens, each prediction with as much context as fits."""
        pairs, owner = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for pair in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, max_seq_len=self.max_length - 1, context_len=1)):
                pairs.append(pair)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._run(self.llm.loglikelihood, pairs, disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (greedy unless do_sample) until a string of `until`, <|endoftext|> (and a chat
        model's end-of-turn tokens) or `max_gen_toks` tokens; the context keeps its last max_length - max_gen_toks
        tokens."""
        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args
            p, max_gen = self._sampling_params(gen_kwargs or {})
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for the context within max_length "
                                 f"{self.max_length}")
            prompts.append(self.tok_encode(context)[-(self.max_length - max_gen):])
            params.append(p)
        outs = self._run(lambda ps: self.llm.generate(ps, params), prompts, disable_tqdm) if prompts else []
        texts = [o.text for o in outs]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _sampling_params(self, gen_kwargs: dict) -> tuple[SamplingParams, int]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation arguments {', '.join(unknown)} are not supported by the nanoqwen backend "
                             f"(it takes {', '.join(GEN_KWARGS)})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = gen_kwargs.get("do_sample")
        greedy = do_sample is False or (do_sample is None and temperature == 0.0)  # lm-eval's rule
        kw = dict(temperature=0.0 if greedy else (temperature or 1.0), max_new_tokens=max_gen, stop=until or None,
                  repetition_penalty=float(gen_kwargs.get("repetition_penalty", 1.0)))
        if not greedy:
            kw.update(top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=int(gen_kwargs.get("top_k", 0)),
                      seed=gen_kwargs.get("seed"))
        return SamplingParams(**kw), max_gen

    def _run(self, fn, items, disable_tqdm: bool):
        """fn(items) with the engine's progress bars on or off as lm-eval asks."""
        saved, self.llm.progress = self.llm.progress, self.llm.progress and not disable_tqdm
        try:
            return fn(items)
        finally:
            self.llm.progress = saved


def main(argv=None, prog=None) -> int:
    """lm-eval's command line with this backend registered (and --model nanoqwen unless another is named)."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--model" or a.startswith("--model=") for a in argv) and argv[:1] not in (["ls"], ["validate"]):
        argv += ["--model", "nanoqwen"]
    sys.argv = [prog or "python -m nanoqwen.lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
