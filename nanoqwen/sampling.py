"""Sampling: `SamplingParams` (what a request asks for), `SamplingTensors` (the same settings for a whole
batch, as device tensors) and `Sampler` (logits -> next token ids, batched, without a host sync).

Semantics follow Hugging Face `generate` as Qwen's reference uses it (QWEN_V1_SPEC.md section 9.6):
repetition penalty on every distinct id seen so far (prompt and generated), then for sampled rows
temperature, top-k, top-p, and a draw from the softmax; greedy rows take the argmax after the penalty.

The draw is a Gumbel-max race whose noise is a counter-based hash of (seed, step, token id), so a request's
token at step t depends only on its seed, t and its own logits: never on the other rows of the batch or
their order, and never on a global RNG state. Everything in `Sampler.__call__` is tensor ops whose shapes
depend only on the batch size and the vocabulary, and whose branches depend only on host-side flags fixed
when the batch's `SamplingTensors` were built, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Sequence

import torch

__all__ = [
    "SamplingParams", "SamplingTensors", "Sampler", "SamplerOutput",
    "presence_mask", "update_presence_", "random_seed",
]

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean "no filtering"; repetition_penalty 1.0
    means none. `stop` strings and `stop_token_ids` end the output (the engine checks them, the sampler
    does not). `seed` makes sampling reproducible; None lets the engine draw one (see `random_seed`).
    `logprobs=k` asks for the k most likely tokens' log-probabilities at each step (0: only the chosen
    token's). `ignore_eos` keeps generating past `<|endoftext|>` until `max_new_tokens` (benchmarks).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        self.temperature = _real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0 (0 means greedy), got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be >= 0 (0 disables it), got {self.top_k}")
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams: repetition_penalty must be > 0 (1.0 disables it), "
                             f"got {self.repetition_penalty}")
        self.max_new_tokens = _integer("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValueError(f"SamplingParams: logprobs must be None or an int >= 0 (0 returns only the "
                                 f"chosen token's logprob), got {self.logprobs}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams: ignore_eos must be True or False, got {self.ignore_eos!r}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_ids(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        """True when this request takes the argmax (temperature 0)."""
        return self.temperature == 0.0

    @classmethod
    def from_generation_config(cls, config: dict, **overrides) -> "SamplingParams":
        """Read the sampling keys of a Hugging Face `generation_config.json` dict; `overrides` win.

        `do_sample` false (or absent, HF's default) means greedy. A missing temperature is 1.0. A missing
        top_k is 0 (off): HF's default of 50 is deliberately not applied, Qwen's configs say 0 anyway.
        Other keys (chat_format, eos/pad ids, max_window_size, stop_words_ids) belong to the chat layer
        and the engine and are ignored here.
        """
        if not isinstance(config, dict):
            raise ValueError(f"from_generation_config expects the parsed generation_config.json as a dict, "
                             f"got {type(config).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"from_generation_config: unknown SamplingParams field(s) {unknown}; "
                             f"valid names are {sorted(names)}")

        def get(key, default):
            value = config.get(key)
            return default if value is None else value

        kwargs = {
            "temperature": get("temperature", 1.0) if get("do_sample", False) else 0.0,
            "top_p": get("top_p", 1.0),
            "top_k": get("top_k", 0),
            "repetition_penalty": get("repetition_penalty", 1.0),
            "max_new_tokens": get("max_new_tokens", 512),
        }
        kwargs.update(overrides)
        return cls(**kwargs)


def _real(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SamplingParams: {name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SamplingParams: {name} must be an int, got {value!r}")
    return int(value)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"SamplingParams: stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("SamplingParams: stop strings must be non-empty (an empty string would end every "
                         "output at once); remove it")
    return tuple(stop)


def _stop_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or \
            not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"SamplingParams: stop_token_ids must be a list of token ids (ints >= 0), got {ids!r}")
    return tuple(int(i) for i in ids)


def random_seed() -> int:
    """A fresh 63-bit seed from the OS entropy pool, for a request that did not give one.

    The engine should draw it once per request and keep it, so that the request's whole output (and any
    recomputation after preemption) is reproducible from the logged seed.
    """
    return random.SystemRandom().getrandbits(63)


def presence_mask(token_ids: Sequence[Sequence[int]], vocab_size: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """[B, vocab_size] bool, True where the id occurs in that row's tokens (prompt + generated so far).

    This is the repetition penalty's memory: HF penalises each distinct id once, whatever its count, so a
    presence bit per id is exactly enough. Keep it on the device and grow it with `update_presence_`.
    """
    mask = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool)
    for row, ids in enumerate(token_ids):
        ids = torch.as_tensor(list(ids), dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
            raise ValueError(f"presence_mask: row {row} holds token id {bad}, outside the logits' vocabulary "
                             f"[0, {vocab_size}); pass the vocab size of the logits (lm_head rows)")
        mask[row, ids] = True
    return mask.to(device) if device is not None else mask


def update_presence_(mask: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Mark each row's newly sampled id as seen, in place (device-only, capturable)."""
    return mask.scatter_(1, next_ids.view(-1, 1), True)


@dataclass
class SamplingTensors:
    """The per-row sampling settings of one batch as device tensors, plus host flags that skip unused stages.

    Build it with `from_params` when the batch's composition changes; between steps call `advance_` with the
    sampled ids (it bumps `steps` and the presence mask in place). For a CUDA graph build it with
    `capturable=True` (every stage runs whatever the flags), keep it as the graph's static input, and copy
    the fields of a freshly built batch into it with `Tensor.copy_`.
    """

    temperatures: torch.Tensor  # [B] fp32; 1.0 on greedy rows (they never use it)
    top_ks: torch.Tensor  # [B] int64; 0 = off
    top_p_thresholds: torch.Tensor  # [B] fp32: float32(1 - top_p), as HF compares; -1 = off
    repetition_penalties: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64 (the seed's 64 bits, two's complement)
    steps: torch.Tensor  # [B] int64: tokens generated so far by each request
    greedy: torch.Tensor  # [B] bool
    seen: torch.Tensor | None  # [B, V] bool presence mask, or None when no row has a penalty
    # Host flags, fixed per batch: which stages run at all.
    any_greedy: bool
    all_greedy: bool
    use_penalty: bool
    use_temperature: bool
    use_top_k: bool
    use_top_p: bool
    num_logprobs: int | None  # max k over the rows that asked, None when none did

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device | str | None = None, *,
                    seeds: Sequence[int] | None = None,
                    steps: Sequence[int] | torch.Tensor | None = None,
                    seen: torch.Tensor | None = None,
                    token_ids: Sequence[Sequence[int]] | None = None,
                    vocab_size: int | None = None,
                    capturable: bool = False) -> "SamplingTensors":
        """Stack the rows' settings.

        seeds: the engine's per-request seeds (resolved once per request); default each row's `seed`, and
            a fresh `random_seed()` for rows without one (not reproducible then).
        steps: tokens each request has generated so far (default all 0).
        seen / token_ids + vocab_size: the repetition-penalty memory, either an existing [B, V] bool mask
            (used as is, not copied) or the rows' prompt + generated ids to build it. Needed only when a row
            has repetition_penalty != 1 (or `capturable`).
        capturable: run every stage (penalty, temperature, top-k, top-p, noise, greedy select) whatever
            these rows ask, so one captured graph serves any later rows copied in. Logprobs stay a per-batch
            host decision (`num_logprobs`); compute them outside the graph if they vary.
        """
        params = list(params)
        n = len(params)
        if n == 0:
            raise ValueError("SamplingTensors.from_params: got an empty batch; pass one SamplingParams per row")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError("SamplingTensors.from_params: every row must be a SamplingParams")
        for name, value in (("seeds", seeds), ("steps", steps), ("token_ids", token_ids)):
            if value is not None and len(value) != n:
                raise ValueError(f"SamplingTensors.from_params: {name} has {len(value)} rows but there are "
                                 f"{n} SamplingParams; pass one per row")
        if seeds is None:
            seeds = [random_seed() if p.seed is None else p.seed for p in params]
        sampled = [not p.greedy for p in params]
        use_penalty = capturable or any(p.repetition_penalty != 1.0 for p in params)
        if use_penalty and seen is None:
            if token_ids is None or vocab_size is None:
                raise ValueError("SamplingTensors.from_params: the repetition penalty runs (a row has "
                                 "repetition_penalty != 1, or capturable=True), so pass the rows' seen "
                                 "tokens: seen=[B, V] bool mask, or token_ids=(prompt + generated ids per "
                                 "row) with vocab_size=")
            seen = presence_mask(token_ids, vocab_size, device)
        if seen is not None and (seen.dim() != 2 or seen.shape[0] != n or seen.dtype != torch.bool):
            raise ValueError(f"SamplingTensors.from_params: seen must be a [{n}, V] bool tensor, got "
                             f"{tuple(seen.shape)} {seen.dtype}")
        if steps is None:
            steps = torch.zeros(n, dtype=torch.int64, device=device)
        else:
            steps = torch.as_tensor(steps, dtype=torch.int64).to(device).clone()
        asked = [p.logprobs for p in params if p.logprobs is not None]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            temperatures=tensor([p.temperature if s else 1.0 for p, s in zip(params, sampled)], torch.float32),
            top_ks=tensor([p.top_k if s else 0 for p, s in zip(params, sampled)], torch.int64),
            top_p_thresholds=tensor([1.0 - p.top_p if s and p.top_p < 1.0 else -1.0
                                     for p, s in zip(params, sampled)], torch.float32),
            repetition_penalties=tensor([p.repetition_penalty for p in params], torch.float32),
            seeds=tensor([_as_int64(s) for s in seeds], torch.int64),
            steps=steps,
            greedy=tensor([not s for s in sampled], torch.bool),
            seen=seen,
            any_greedy=capturable or not all(sampled),
            all_greedy=not any(sampled) and not capturable,
            use_penalty=use_penalty,
            use_temperature=capturable or any(s and p.temperature != 1.0 for p, s in zip(params, sampled)),
            use_top_k=capturable or any(s and p.top_k > 0 for p, s in zip(params, sampled)),
            use_top_p=capturable or any(s and p.top_p < 1.0 for p, s in zip(params, sampled)),
            num_logprobs=max(asked) if asked else None,
        )

    def advance_(self, next_ids: torch.Tensor) -> None:
        """After a step: count the new token and mark it seen (in place, capturable)."""
        self.steps.add_(1)
        if self.seen is not None:
            update_presence_(self.seen, next_ids)


def _as_int64(seed) -> int:
    """Any Python int seed, reduced to 64 bits and stored as a signed int64 (the hash uses all 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"SamplingTensors.from_params: seeds must be ints, got {seed!r}")
    seed %= 1 << 64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


@dataclass
class SamplerOutput:
    """next_ids [B] int64. When any row asked for logprobs: chosen_logprobs [B] fp32 (the chosen token under
    the model's raw distribution), top_logprobs / top_ids [B, kmax] (kmax = the largest k asked; a row that
    asked for k keeps its first k columns). Rows that did not ask get values too; ignore them."""

    next_ids: torch.Tensor
    chosen_logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None


class Sampler:
    """Batched HF-order sampling: repetition penalty -> (sampled rows) temperature -> top-k -> top-p -> draw.

    No `.item()`, no data-dependent Python branches: safe for CUDA graphs. Logits are upcast to fp32 first.
    """

    def __call__(self, logits: torch.Tensor, state: SamplingTensors) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != state.greedy.shape[0]:
            raise ValueError(f"Sampler: logits must be [B, V] with B = {state.greedy.shape[0]} rows of "
                             f"SamplingTensors, got {tuple(logits.shape)}")
        if state.seen is not None and state.seen.shape[1] != logits.shape[1]:
            raise ValueError(f"Sampler: the presence mask covers {state.seen.shape[1]} ids but the logits have "
                             f"{logits.shape[1]}; build it with vocab_size = logits.shape[1]")
        raw = logits.float()
        scores = self.process(raw, state)
        if state.all_greedy:
            next_ids = scores.argmax(dim=-1)
        else:
            noise = gumbel_noise(state.seeds, state.steps, scores.shape[1])
            next_ids = (scores + noise).argmax(dim=-1)
            if state.any_greedy:
                next_ids = torch.where(state.greedy, scores.argmax(dim=-1), next_ids)
        out = SamplerOutput(next_ids=next_ids)
        if state.num_logprobs is not None:
            logprobs = torch.log_softmax(raw, dim=-1)
            out.chosen_logprobs = logprobs.gather(1, next_ids.view(-1, 1)).squeeze(1)
            k = min(state.num_logprobs, logprobs.shape[1])
            out.top_logprobs, out.top_ids = logprobs.topk(k, dim=-1)
        return out

    @staticmethod
    def process(logits: torch.Tensor, state: SamplingTensors) -> torch.Tensor:
        """The fp32 scores the draw uses: penalised logits, and on sampled rows also temperature-scaled
        with the tokens outside top-k / top-p set to -inf: bit-for-bit HF's processors on the same input,
        except which of several *exactly tied* tokens at the top-p boundary survive. HF leaves that to
        torch.sort's unstable order; here the sort is stable (ties by token id), so the choice is the same on
        every device and batch size."""
        scores = logits.float()
        if state.use_penalty:
            p = state.repetition_penalties.view(-1, 1)
            scores = torch.where(state.seen, torch.where(scores < 0, scores * p, scores / p), scores)
        if state.all_greedy:
            return scores
        if state.use_temperature:
            scores = scores / state.temperatures.view(-1, 1)
        if not (state.use_top_k or state.use_top_p):
            return scores
        # One ascending sort serves both filters. HF sorts again after top-k, but the removed tokens are
        # exactly a prefix of this order and become -inf, so that second sort would give the same array.
        vocab = scores.shape[1]
        sorted_scores, order = torch.sort(scores, dim=-1, stable=True)
        if state.use_top_k:
            k = torch.where(state.top_ks > 0, state.top_ks.clamp(max=vocab), vocab)
            kth_largest = sorted_scores.gather(1, (vocab - k).view(-1, 1))
            scores = scores.masked_fill(scores < kth_largest, float("-inf"))
            sorted_scores = sorted_scores.masked_fill(sorted_scores < kth_largest, float("-inf"))
        if state.use_top_p:
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= state.top_p_thresholds.view(-1, 1)
            remove[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return scores


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow: multiply by c's 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] fp32 Gumbel(0, 1) noise, a pure function of (seed, step, token id) for each row.

    argmax(scores + noise) is then an exact draw from softmax(scores) (Gumbel-max), with -inf scores never
    chosen. The uniform u = (h + 0.5) / 2^32 from a 32-bit hash h lies strictly inside (0, 1), and the two
    logs run in fp64, so the noise is always finite (within about [-3.2, 22.9]) and its upper tail, which
    decides among unlikely tokens, is not coarsened by fp32 rounding near u = 1.
    """
    seeds = seeds.view(-1, 1)
    key = _mix32((seeds >> 32) & _MASK32)
    key = _mix32(key ^ (seeds & _MASK32))
    key = _mix32(key ^ _mix32((steps.view(-1, 1) & _MASK32) ^ 0x5BD1E995))
    token = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) ^ 0x27D4EB2F)
    h = _mix32(key ^ token)  # for a fixed key, a bijection of the token ids: no two tokens share a value
    u = (h.double() + 0.5) * 2.0 ** -32
    return (-torch.log(-torch.log(u))).float()
