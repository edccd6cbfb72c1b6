"""Sampling: `SamplingParams` (what a request asks for) and `DeviceSampler` (logits -> next token ids for a
batch of running requests, each request's sampling state kept on the device in a slot).

Semantics follow Hugging Face `generate` as Qwen's reference uses it (QWEN_V1_SPEC.md section 9.6):
repetition penalty on every distinct id seen so far (prompt and generated), then (OpenAI's) presence and
frequency penalties over generated ids, then for sampled rows temperature, top-k, top-p, and a draw from the
softmax; greedy rows take the argmax after the penalties.

A request's token at step t depends only on its seed, t and its own logits: never on the other rows of the
batch or their order, and never on a global RNG state. `DeviceSampler.sample` is tensor ops whose shapes depend
only on the batch size, the vocabulary and host flags fixed by the batch's composition, with no host sync, so
it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from .kernels import use_triton
from .kernels import sampling as sampling_kernels

__all__ = [
    "SamplingParams", "DeviceSampler", "SamplerFlags", "SamplerOutput", "random_seed", "GREEDY_TEMPERATURE",
]

_MASK32 = 0xFFFFFFFF
GREEDY_TEMPERATURE = 1e-5  # below it a request is greedy: logits / T would overflow fp32 long before T = 1e-40


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature 0 (or anything below 1e-5, vLLM's rule: dividing by a smaller one overflows) means greedy
    (argmax); top_k 0 and top_p 1.0 mean "no filtering"; repetition_penalty 1.0 means none (HF: every distinct
    prompt or generated id). presence_penalty and frequency_penalty (OpenAI, in [-2, 2], 0 = none) count only
    generated tokens: logit -= frequency_penalty * count + presence_penalty * (count > 0), after the repetition
    penalty. `stop` strings and `stop_token_ids` end the output (the engine checks them, the sampler
    does not). `seed` makes sampling reproducible; None lets the engine draw one (see `random_seed`).
    `logprobs=k` asks for the k most likely tokens' log-probabilities at each step (0: only the chosen
    token's). `prompt_logprobs=k` (vLLM's): for every prompt token after the first, its logprob given the tokens
    before it and the k most likely tokens' there (RequestOutput.prompt_logprobs; 0: the prompt token's only); it
    costs the head's logits for every prompt row, and the prompt is recomputed rather than read from the prefix
    cache. `ignore_eos` keeps generating past `<|endoftext|>` until `max_new_tokens` (benchmarks).
    `lora` names an adapter added with `LLM.add_lora` (an engine built with `enable_lora=True`); None: the base model.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 512
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    lora: str | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"SamplingParams: {name} must be in [-2, 2] (0 disables it), got {value}")
            setattr(self, name, value)
        self.max_new_tokens = _integer("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValueError(f"SamplingParams: logprobs must be None or an int >= 0 (0 returns only the "
                                 f"chosen token's logprob), got {self.logprobs}")
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs)
            if self.prompt_logprobs < 0:
                raise ValueError(f"SamplingParams: prompt_logprobs must be None or an int >= 0 (0 returns only each "
                                 f"prompt token's logprob), got {self.prompt_logprobs}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams: ignore_eos must be True or False, got {self.ignore_eos!r}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_ids(self.stop_token_ids)
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise ValueError(f"SamplingParams: lora must be an adapter name (a non-empty string) or None, got "
                             f"{self.lora!r}")

    @property
    def greedy(self) -> bool:
        """True when this request takes the argmax (temperature below GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE

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


# ---------------------------------------------------------------------------------------------- seeded uniforms

def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32) (a Python int or an int64 tensor). A constant >= 2^31 is used as
    c - 2^32 (the same residue), so |x * c| < 2^63: the product never overflows int64."""
    return (x * (c - (1 << 32) if c >= 1 << 31 else c)) & _MASK32


def _mix32(x):
    """A bijective 32-bit integer hash (xorshift-multiply rounds) on ints or int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_LANE_SALTS = (0x9E3779B9, 0x85EBCA6B)  # two independent 32-bit lanes: 64 bits of key, so seeds never collide
_STEP_SALT = 0x5BD1E995


def _as_int64(seed) -> int:
    """Any Python int seed, reduced to 64 bits and stored as a signed int64 (the hash uses all 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"sampling: a seed must be an int, got {seed!r}")
    seed %= 1 << 64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _seed_lanes(seed: int) -> list[int]:
    """A request's 64-bit seed mixed into two 32-bit lanes, once when it enters the sampler (host ints)."""
    seed = _as_int64(seed) % (1 << 64)
    hi, lo = seed >> 32, seed & _MASK32
    return [_mix32(_mix32(hi ^ salt) ^ lo) for salt in _LANE_SALTS]


def _uniforms(lanes: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] fp64 uniforms in [0, 1) on a 2^-53 grid: a pure function of each row's seed lanes and step."""
    step = _mix32((steps & _MASK32) ^ _STEP_SALT)
    bits = _mix32(lanes ^ step.unsqueeze(1))
    return (bits[:, 0] * 2 ** 21 + (bits[:, 1] >> 11)).double() * 2.0 ** -53


# ---------------------------------------------------------------------------------------------- the device sampler

@dataclass
class SamplerOutput:
    """next_ids [B] int64. When any row asked for logprobs: chosen_logprobs [B] fp32 (the chosen token under
    the model's raw distribution), top_logprobs / top_ids [B, kmax] (kmax = the largest k asked; a row that
    asked for k keeps its first k columns). Rows that did not ask get values too; ignore them."""

    next_ids: torch.Tensor
    chosen_logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    pending: torch.Tensor | None = None  # [B] bool (capturable DeviceSampler): rows `complete` must still draw


@dataclass(frozen=True)
class SamplerFlags:
    """What one batch composition needs, decided on the host from its requests' SamplingParams
    (`DeviceSampler.flags`): which stages run and the static sizes. A stage turned on for rows that do not use it
    leaves their tokens unchanged, so `for_graph()` (every optional stage on, sizes rounded up to powers of two)
    gives the same tokens with far fewer distinct flags to capture graphs for.

    greedy_only: every row takes the argmax (no draw at all); any_greedy: some row does.
    repetition / counts: some row has repetition_penalty != 1 / presence or frequency penalty != 0.
    temperature: some sampled row has temperature != 1. top_k: the largest top_k of the sampled rows (0: none).
    top_p: some sampled row has top_p < 1. logprobs: the largest `logprobs` asked (None: no row asked).
    """

    greedy_only: bool = False
    any_greedy: bool = True
    repetition: bool = False
    counts: bool = False
    temperature: bool = False
    top_k: int = 0
    top_p: bool = False
    logprobs: int | None = None

    def for_graph(self) -> "SamplerFlags":
        logprobs = None if self.logprobs is None else _next_pow2(self.logprobs)
        if self.greedy_only:
            return replace(self, logprobs=logprobs)
        return SamplerFlags(greedy_only=False, any_greedy=True, repetition=True, counts=self.counts,
                            temperature=True, top_k=_next_pow2(self.top_k), top_p=True, logprobs=logprobs)


def _next_pow2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


class DeviceSampler:
    """Next tokens for a batch of running requests, with every request's sampling state kept on the device.

    Each running request owns a slot in 0..max_num_seqs-1; its settings, seed, step counter (tokens generated so
    far), repetition-penalty presence mask (prompt + generated ids) and, when it uses presence/frequency penalties,
    its generated-token counts live in per-slot device buffers. Slot `pad_slot` (= max_num_seqs) is scratch for the
    pad rows of a CUDA-graph batch bucket. Protocol:

        sampler.add(slot, params, seed, prompt_ids, output_ids)   # admitted, or re-admitted after preemption
        flags = sampler.flags(slot_list)                           # host only, per batch composition
        out = sampler.sample(logits, slots, flags)                 # slots: [B] int64 on the device
        next_ids = sampler.complete(out, logits, slots, flags)     # list[int]: the step's copy to the host
        sampler.remove(slot)                                       # finished, aborted or preempted

    `sample` advances each row's step and marks its new token seen (counted), on the device, with no host sync.
    `complete` copies the tokens to the host (one copy, the sync the engine needs anyway); with `capturable` it
    first draws the rare rows `sample` left pending (next paragraph), which costs a second copy on those steps.

    Semantics (HF `generate` as Qwen's reference uses it, QWEN_V1_SPEC.md 9.6): logits in fp32; repetition penalty
    over the distinct prompt + generated ids; then presence/frequency penalties over generated ids; greedy rows take
    the argmax; sampled rows divide by the temperature, keep HF's top-k set (every token >= the k-th largest value)
    and top-p set (sorted descending, a token stays while the probability mass before it is below top_p, HF's
    threshold float32(1 - top_p) included), and draw from the softmax over the kept tokens.

    How, without sorting the vocabulary:
    - Mass: each token's probability is an integer, floor(exp(x - max) * 2^S) with 2^S * vocab <= 2^62. Sums are
      exact, so they do not depend on order, batch or device, and a token of probability below 2^-S of the row's
      top token (2^-44 for Qwen's vocabulary) counts as 0 (at most 152k * 2^-44 < 1e-8 of the mass).
    - Order: tokens by value descending, exact ties by id descending (the order of HF's stable ascending sort,
      reversed). The kept set is a prefix of it: the tokens before the first whose cumulative mass reaches
      ceil((1 - float32(1 - top_p)) * top-k mass). HF compares float32 cumulative sums, so the two can differ only
      where that sum is within float32 rounding of the threshold.
    - Draw: inverse CDF. u = hash(seed lanes, step) in [0, 1) with 53 bits; the token is the one whose mass interval
      holds floor(u * kept mass): in vocabulary (id) order for rows without top-p (their kept set needs no order:
      one cumulative sum over the row), in the order above for top-p rows. One uniform per row, no noise over the
      vocabulary; each token's probability is its share of the kept mass within 2^-53.
    - Finding a top-p row's nucleus and mass position: the top `num_candidates` tokens (torch.topk), sorted in the
      order above, answer it when the nucleus lies among the candidates strictly above the K-th value (language-model
      rows almost always do). Other top-p rows need the exact search over the whole row (`_MassOrder`, a weighted
      radix select: no sort, but some 30 passes over [rows, vocab]). Without `capturable` (the CPU default) `sample`
      runs it at once on just those rows; with it (the CUDA default) `sample` has no data-dependent branch, marks
      those rows in `out.pending`, leaves their state unchanged, and `complete` draws them. `num_candidates=0` sends
      every top-p row through the exact search inside `sample` (capturable, never pending, slower). All paths give
      the same tokens: integer masses, the same orders. (Before 2026-11-30 rows without top-p drew in the sampling
      order too, and were left pending whenever u fell past the candidates: seeded outputs of such requests changed
      then.)

    Fused (`fused`, the default where the Triton kernels run: CUDA, or NANOQWEN_KERNELS=triton with `capturable`):
    `sample` for sampled batches is three launches (nanoqwen/kernels/sampling.py: penalties + temperature, topk, one
    program per row for the mass, the order of the candidates, the draw and the state) instead of about a hundred
    small torch ops; the same tokens and state, and never a pending row: the kernel runs the exact search itself
    for the rows the candidates do not answer, so `complete` is only the copy and no step waits for its tokens.

    CUDA graphs: everything in `sample` has shapes fixed by (B, vocab, flags, num_candidates) and branches only on
    host flags. Capture it per (batch bucket, flags.for_graph()), for example "greedy" and "full" per bucket, with
    `logits` and `slots` as static inputs (pad rows: slot `pad_slot`), after one warm-up call outside the capture;
    after each replay call `complete(out, logits, slots, flags)` with the graph's static tensors. `add`/`remove`
    write the same buffers the graph reads.
    """

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device | str | None = None, *,
                 num_candidates: int | None = None, capturable: bool | None = None, fused: bool | None = None):
        self.device = torch.device(device if device is not None else "cpu")
        if num_candidates is None:  # the CPU's topk slows with K; a GPU's hardly does (benchmarks/sampler.py)
            num_candidates = 256 if self.device.type == "cpu" else 1024
        for name, value, least in (("max_num_seqs", max_num_seqs, 1), ("vocab_size", vocab_size, 1),
                                   ("num_candidates", num_candidates, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"DeviceSampler: {name} must be an int >= {least}, got {value!r}")
        self.capturable = self.device.type != "cpu" if capturable is None else bool(capturable)
        self.max_num_seqs, self.vocab_size, self.num_candidates = max_num_seqs, vocab_size, num_candidates
        if fused is None:
            fused = self.capturable and num_candidates > 0 and use_triton(self.device)
        elif fused and not (self.capturable and num_candidates > 0):
            raise ValueError("DeviceSampler: fused=True (the Triton draw) needs capturable=True and num_candidates > 0")
        self.fused, self._fused_ran = bool(fused), False
        self.pad_slot = max_num_seqs
        self.mass_bits = 62 - (vocab_size - 1).bit_length()  # sum of vocab_size masses <= 2^62
        n, dev = max_num_seqs + 1, self.device
        self.temperature = torch.ones(n, device=dev)  # 1 on greedy rows
        self.top_k = torch.zeros(n, dtype=torch.int64, device=dev)  # 0: off
        self.top_p_mass = torch.ones(n, dtype=torch.float64, device=dev)  # 1 - float32(1 - top_p), exact; 1: off
        self.repetition = torch.ones(n, device=dev)
        self.presence = torch.zeros(n, device=dev)
        self.frequency = torch.zeros(n, device=dev)
        self.greedy = torch.ones(n, dtype=torch.bool, device=dev)
        self.seed_lanes = torch.zeros(n, 2, dtype=torch.int64, device=dev)
        self.steps = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(n, vocab_size, dtype=torch.bool, device=dev)
        self.counts: torch.Tensor | None = None  # [n, vocab] int32, made by the first request that needs it
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self._one = torch.ones((), dtype=torch.int32, device=dev)
        self._params: list[SamplingParams | None] = [None] * max_num_seqs

    # ------------------------------------------------------------------------------------------ requests
    def add(self, slot: int, params: SamplingParams, seed: int, prompt_ids: Sequence[int],
            output_ids: Sequence[int] = ()) -> None:
        """Give `slot` to a request: its params, its resolved seed (see `random_seed`), its prompt ids and the ids
        it already generated (non-empty when it re-enters after preemption: its draws continue where they were)."""
        self._check_slot(slot, "add")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"DeviceSampler.add: params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids, output_ids = list(prompt_ids), list(output_ids)
        for name, ids in (("prompt_ids", prompt_ids), ("output_ids", output_ids)):
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"DeviceSampler.add: {name} holds {bad[0]!r}, not a token id in [0, "
                                 f"{self.vocab_size}); pass ints below the logits' width (lm_head rows)")
        lanes = _seed_lanes(seed)
        sampled = not params.greedy
        self.temperature[slot] = params.temperature if sampled else 1.0
        self.top_k[slot] = params.top_k if sampled and params.top_k < self.vocab_size else 0
        self.top_p_mass[slot] = 1.0 - _float32(1.0 - params.top_p) if sampled and params.top_p < 1.0 else 1.0
        self.repetition[slot] = params.repetition_penalty
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        self.greedy[slot] = not sampled
        self.seed_lanes[slot, 0], self.seed_lanes[slot, 1] = lanes
        self.steps[slot] = len(output_ids)
        if params.repetition_penalty != 1.0:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt_ids + output_ids, dtype=torch.int64).to(self.device)] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            if self.counts is None:
                self.counts = torch.zeros(self.max_num_seqs + 1, self.vocab_size, dtype=torch.int32,
                                          device=self.device)
            generated = torch.tensor(output_ids, dtype=torch.int64)
            self.counts[slot] = torch.bincount(generated, minlength=self.vocab_size).to(self.device, torch.int32)
        self._params[slot] = params

    def remove(self, slot: int) -> None:
        """Free `slot` (finished, aborted or preempted). Its device rows are left as they are: the next `add`
        overwrites what it uses."""
        self._check_slot(slot, "remove")
        self._params[slot] = None

    def flags(self, slots: Sequence[int]) -> SamplerFlags:
        """The host flags of a batch made of these slots (`pad_slot` rows count as greedy rows)."""
        params, padded = [], False
        for s in slots:
            if s == self.pad_slot:
                padded = True
                continue
            self._check_slot(s, "flags")
            if self._params[s] is None:
                raise ValueError(f"DeviceSampler: slot {s} holds no request; add() it before sampling it")
            params.append(self._params[s])
        sampled = [p for p in params if not p.greedy]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return SamplerFlags(
            greedy_only=not sampled,
            any_greedy=padded or len(sampled) < len(params),
            repetition=any(p.repetition_penalty != 1.0 for p in params),
            counts=any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params),
            temperature=any(p.temperature != 1.0 for p in sampled),
            top_k=max((p.top_k for p in sampled if p.top_k < self.vocab_size), default=0),
            top_p=any(p.top_p < 1.0 for p in sampled),
            logprobs=max(asked) if asked else None,
        )

    def _check_slot(self, slot, what: str) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_num_seqs:
            raise ValueError(f"DeviceSampler.{what}: slot must be an int in [0, {self.max_num_seqs}), got {slot!r}")

    def _batch(self, logits: torch.Tensor, slots, flags: SamplerFlags | None, what: str):
        if isinstance(slots, torch.Tensor):
            if flags is None:
                raise ValueError(f"DeviceSampler.{what}: with a slots tensor pass flags=sampler.flags(slot list) "
                                 "too (reading the slots back from the device would cost a sync)")
        else:
            slots = list(slots)
            flags = self.flags(slots) if flags is None else flags
            slots = torch.tensor(slots, dtype=torch.int64).to(self.device)
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size or slots.shape != (logits.shape[0],):
            raise ValueError(f"DeviceSampler.{what}: logits must be [B, {self.vocab_size}] with one slot per row, got "
                             f"logits {tuple(logits.shape)} and slots {tuple(slots.shape)}")
        if flags.counts and self.counts is None:
            raise ValueError(f"DeviceSampler.{what}: flags ask for presence/frequency penalties but no request "
                             "added so far uses them; compute flags with sampler.flags(slots)")
        return slots, flags

    # ------------------------------------------------------------------------------------------ sampling
    def sample(self, logits: torch.Tensor, slots, flags: SamplerFlags | None = None) -> SamplerOutput:
        """Next token ids for `logits` [B, vocab] (any float dtype), row i belonging to slot `slots[i]`.

        slots: a [B] int64 device tensor together with `flags` (the engine's way: no copies), or a list of ints
        (flags computed, one host-to-device copy). Advances each slot's step and presence mask / counts.
        """
        slots, flags = self._batch(logits, slots, flags, "sample")
        if self.fused and not flags.greedy_only:
            return self._sample_fused(logits, slots, flags)
        raw = logits.float()
        scores = self._scores(raw, slots, flags)
        pending = None
        if flags.greedy_only:
            next_ids = scores.argmax(dim=1)
        else:
            next_ids, pending = self._draw(scores, slots, flags)
            if flags.any_greedy:  # greedy rows hold T = 1: their scores are only penalised
                next_ids = torch.where(self.greedy[slots], scores.argmax(dim=1), next_ids)
        self.steps.index_add_(0, slots, torch.ones_like(slots))
        self._record(slots, next_ids, flags, None if pending is None else ~pending)
        return self._logprobs(SamplerOutput(next_ids=next_ids, pending=pending), raw, flags)

    def _logprobs(self, out: SamplerOutput, raw: torch.Tensor, flags: SamplerFlags) -> SamplerOutput:
        if flags.logprobs is not None:
            logprobs = torch.log_softmax(raw.float(), dim=1)
            out.chosen_logprobs = logprobs.gather(1, out.next_ids.unsqueeze(1)).squeeze(1)
            out.top_logprobs, out.top_ids = logprobs.topk(min(flags.logprobs, self.vocab_size), dim=1)
        return out

    def _sample_fused(self, logits: torch.Tensor, slots: torch.Tensor, flags: SamplerFlags) -> SamplerOutput:
        """`sample` in three launches (nanoqwen/kernels/sampling.py): the same tokens and state, with no row pending
        (the kernel runs the exact search itself for the rare rows the candidates do not answer).
        Should the kernels fail on their first call (before any state changed: a Triton build or compile error),
        the sampler says so once and keeps to the torch path."""
        k = min(self.vocab_size, max(self.num_candidates, flags.top_k))
        try:
            rows = logits if logits.stride(1) == 1 else logits.contiguous()
            scores = sampling_kernels.sampler_scores(self, rows, slots, flags)
            next_ids = sampling_kernels.sampler_draw(self, scores, slots, flags, k)
        except Exception as e:
            if self._fused_ran:
                raise
            warnings.warn(f"DeviceSampler: the fused Triton sampling kernels failed ({type(e).__name__}: {e}); "
                          "using the torch sampler instead (the same tokens, about 100 more launches a step)",
                          stacklevel=3)
            self.fused = False
            return self.sample(logits, slots, flags)
        self._fused_ran = True
        return self._logprobs(SamplerOutput(next_ids=next_ids), logits, flags)

    def complete(self, out: SamplerOutput, logits: torch.Tensor, slots, flags: SamplerFlags | None = None
                 ) -> list[int]:
        """The next ids as a host list (one device-to-host copy), after drawing the rows `sample` left pending
        (then a second copy): same logits, slots and flags as that `sample` call, before the next one. Updates
        `out` in place (a second call finds nothing pending)."""
        if out.pending is None:
            return out.next_ids.tolist()
        host = torch.cat([out.next_ids, out.pending.long()]).tolist()
        n = out.next_ids.shape[0]
        rows = [i for i in range(n) if host[n + i]]
        if not rows:
            return host[:n]
        slots, flags = self._batch(logits, slots, flags, "complete")
        rows_d = torch.tensor(rows, dtype=torch.int64).to(self.device)
        pending_slots = slots[rows_d]
        scores = self._scores(logits[rows_d].float(), pending_slots, flags)
        mass, _, total, top_p_on, limit = self._masses(scores, pending_slots, flags)
        u = _uniforms(self.seed_lanes[pending_slots], self.steps[pending_slots] - 1)  # `sample` counted the step
        drawn = _draw_exact(scores, mass, total, top_p_on, limit, u)
        out.next_ids[rows_d] = drawn
        out.pending.zero_()  # in place: under a CUDA graph `out` is the same static tensors at every replay
        if out.chosen_logprobs is not None:
            out.chosen_logprobs[rows_d] = torch.log_softmax(logits[rows_d].float(), dim=1).gather(
                1, drawn.unsqueeze(1)).squeeze(1)
        self._record(pending_slots, drawn, flags, None)
        for i, token in zip(rows, drawn.tolist()):
            host[i] = token
        return host[:n]

    def _record(self, slots, next_ids, flags: SamplerFlags, drawn: torch.Tensor | None) -> None:
        """Mark the new tokens seen and counted; only where `drawn` (pending rows get theirs from `complete`)."""
        if flags.repetition:
            seen = self._true if drawn is None else self.seen[slots, next_ids] | drawn
            self.seen.index_put_((slots, next_ids), seen)
        if flags.counts:
            self.counts.index_put_((slots, next_ids), self._one if drawn is None else drawn.int(), accumulate=True)

    def process(self, logits: torch.Tensor, slots, flags: SamplerFlags | None = None) -> torch.Tensor:
        """The fp32 scores the draw samples from (for tests and inspection; changes no state): penalised logits,
        on sampled rows divided by the temperature, with the tokens outside top-k / top-p at -inf."""
        slots, flags = self._batch(logits, slots, flags, "process")
        scores = self._scores(logits.float(), slots, flags)
        if flags.greedy_only or not (flags.top_k or flags.top_p):
            return scores
        mass, kth, total, top_p_on, limit = self._masses(scores, slots, flags)
        keep = scores >= kth if kth is not None else torch.ones_like(scores, dtype=torch.bool)
        if limit is not None:
            order = _MassOrder(scores, mass, total)
            group, before, within, each = order.find(limit - 1)  # the last kept token
            keep &= order.kept(group, within // each) | ~top_p_on.unsqueeze(1)
        keep |= self.greedy[slots].unsqueeze(1)
        return scores.masked_fill(~keep, float("-inf"))

    def _scores(self, x: torch.Tensor, slots: torch.Tensor, flags: SamplerFlags) -> torch.Tensor:
        """Penalised logits; on sampled rows also divided by the temperature (greedy rows hold T = 1)."""
        if flags.repetition:  # HF: divide positive logits, multiply negative ones (x * 1 and x / 1 are exact)
            p = self.repetition[slots].unsqueeze(1)
            x = torch.where(self.seen[slots], torch.where(x < 0, x * p, x / p), x)
        if flags.counts:  # OpenAI's formula, left to right as vLLM applies it
            counts = self.counts[slots]
            x = x - counts * self.frequency[slots].unsqueeze(1) - (counts > 0) * self.presence[slots].unsqueeze(1)
        if flags.temperature:
            x = x / self.temperature[slots].unsqueeze(1)
        return x

    def _masses(self, scores, slots, flags, candidates: "_Candidates | None" = None):
        """Integer masses with top-k applied, their total, and the top-p limit: a token is kept while the mass
        before it is below `limit` (rows with top_p = 1 are marked off in `top_p_on`)."""
        mass = _fixed_point_mass(scores, self.mass_bits)
        kth = None
        if flags.top_k:
            top_k = self.top_k[slots].unsqueeze(1)
            if candidates is not None:
                values = candidates.values
            else:  # for_graph() may have rounded flags.top_k past the vocabulary
                values = scores.topk(min(flags.top_k, self.vocab_size), dim=1).values
            kth = torch.where(top_k > 0, values.gather(1, (top_k - 1).clamp(min=0)), float("-inf"))
            mass = torch.where(scores >= kth, mass, 0)
        total = mass.sum(dim=1)
        top_p_on = limit = None
        if flags.top_p:
            fraction = self.top_p_mass[slots]
            top_p_on = fraction < 1.0
            limit = torch.minimum((fraction * total.double()).ceil().long().clamp(min=1), total)
        return mass, kth, total, top_p_on, limit

    def _draw(self, scores: torch.Tensor, slots: torch.Tensor, flags: SamplerFlags):
        """(next ids, pending rows or None). Rows without top-p draw in vocabulary order (never pending); top-p rows
        in the sampling order, from the candidates when their nucleus lies among them."""
        candidates = None
        if self.num_candidates and flags.top_p:
            candidates = _Candidates(scores, min(self.vocab_size, max(self.num_candidates, flags.top_k)))
        mass, _, total, top_p_on, limit = self._masses(scores, slots, flags, candidates)
        u = _uniforms(self.seed_lanes[slots], self.steps[slots])
        if candidates is None:
            return _draw_exact(scores, mass, total, top_p_on, limit, u), None
        next_ids, answered = candidates.draw(mass, total, limit, u)
        next_ids = torch.where(top_p_on, next_ids, _draw_by_id(mass, total, u))
        answered = answered | ~top_p_on
        if flags.any_greedy:
            answered = answered | self.greedy[slots]  # they take the argmax instead
        if self.capturable:
            return next_ids, ~answered
        if not bool(answered.all()):  # a host branch: fine where the host is the device
            rows = (~answered).nonzero().squeeze(1)
            next_ids[rows] = _draw_exact(scores[rows], mass[rows], total[rows], top_p_on[rows], limit[rows], u[rows])
        return next_ids, None


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def _fixed_point_mass(scores: torch.Tensor, bits: int) -> torch.Tensor:
    """[B, V] int64: floor(exp(x - row max) * 2^bits), each token's unnormalised probability as an integer. The
    difference is fp32 (one rounding, the same everywhere), the exp fp64: implementations that differ by an ulp there
    (CPU, CUDA, the fused kernel in Triton's interpreter) give masses a few units apart in 2^bits, not more."""
    return (scores - scores.amax(dim=1, keepdim=True)).double().exp_().mul_(2.0 ** bits).long()


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 values, -0.0 equal to +0.0: non-negative floats' bits already are;
    negative ones get their magnitude bits reversed, then move up by one so that -0.0 lands on +0.0."""
    bits = x.contiguous().view(torch.int32)
    negative = bits >> 31  # -1 for negative floats, 0 otherwise
    return (bits ^ (negative & 0x7FFFFFFF)) - negative


def _target(u: torch.Tensor, kept_mass: torch.Tensor) -> torch.Tensor:
    """The mass position floor(u * kept_mass) in [0, kept_mass) that the inverse-CDF draw looks up."""
    return torch.minimum((u * kept_mass.double()).floor().long(), kept_mass - 1).clamp(min=0)


class _Candidates:
    """The K largest scores of each row in the sampling order (value desc, id desc). Unless K is the whole row,
    only the ones strictly above the K-th value are surely its first positions: a token left out may tie the K-th."""

    def __init__(self, scores: torch.Tensor, k: int):
        values, ids = scores.topk(k, dim=1)  # the exact top-k set; ties at the k-th value chosen arbitrarily
        order = (_order_key(values).long() * 2 ** 32 + ids).argsort(dim=1, descending=True)
        self.values, self.ids = values.gather(1, order), ids.gather(1, order)
        self.whole_row = k == scores.shape[1]

    def draw(self, mass, total, limit, u):
        """(next ids, answered) of top-p rows: rows not answered need a mass position beyond the sure candidates."""
        mass = mass.gather(1, self.ids)
        cumulative = mass.cumsum(dim=1)
        sure = cumulative[:, -1] if self.whole_row else torch.where(self.values > self.values[:, -1:], mass, 0).sum(1)
        last = cumulative.shape[1] - 1

        def position(q):  # first candidate whose cumulative mass exceeds q
            return torch.searchsorted(cumulative, q.unsqueeze(1), right=True).squeeze(1).clamp(max=last)

        kept_mass = cumulative.gather(1, position(limit - 1).unsqueeze(1)).squeeze(1)
        target = _target(u, kept_mass)
        return self.ids.gather(1, position(target).unsqueeze(1)).squeeze(1), (limit <= sure) & (target < sure)


def _draw_by_id(mass, total, u) -> torch.Tensor:
    """The inverse-CDF draw in vocabulary order: the first id whose cumulative mass exceeds floor(u * total)."""
    cumulative = mass.cumsum(dim=1)
    position = torch.searchsorted(cumulative, _target(u, total).unsqueeze(1), right=True).squeeze(1)
    return position.clamp(max=mass.shape[1] - 1)


def _draw_exact(scores, mass, total, top_p_on, limit, u) -> torch.Tensor:
    """The draw over whole rows: in vocabulary order without top-p; in the sampling order (`_MassOrder`: no sort, no
    host branch) for top-p rows."""
    by_id = _draw_by_id(mass, total, u)
    if limit is None:
        return by_id
    order = _MassOrder(scores, mass, total)
    group, before, within, each = order.find(limit - 1)  # the last kept token's tie group
    kept_mass = torch.where(top_p_on, before + (within // each + 1) * each, total)
    group, before, within, each = order.find(_target(u, kept_mass))
    return torch.where(top_p_on, order.token(group, within // each), by_id)


class _MassOrder:
    """Every token of each row in the order (value desc, id desc) with its integer mass, searched by mass
    position without sorting: a weighted radix select. The order-preserving int32 key splits into 11 + 11 + 10
    bits; each level histograms the masses of the tokens that share the bits chosen so far and picks the bin
    holding the position. After the last level the key is one exact value, whose tied tokens go by id."""

    WIDTHS = (2048, 2048, 1024)

    def __init__(self, scores: torch.Tensor, mass: torch.Tensor, total: torch.Tensor):
        self.key, self.mass, self.total = _order_key(scores), mass, total
        self.bins = [((self.key >> 21) + 1024).long(), ((self.key >> 10) & 2047).long(), (self.key & 1023).long()]
        self.top_level = self._histogram(0, mass)

    def _histogram(self, level: int, mass: torch.Tensor) -> torch.Tensor:
        hist = torch.zeros(mass.shape[0], self.WIDTHS[level], dtype=torch.int64, device=mass.device)
        return hist.scatter_add_(1, self.bins[level], mass)

    def find(self, position: torch.Tensor):
        """For mass positions [n] in [0, total): (key of the tie group holding it, mass before that group,
        offset of the position into the group, mass of each token in the group)."""
        hist, group_mass, before, inside, chosen = self.top_level, self.total, torch.zeros_like(position), None, []
        for level, width in enumerate(self.WIDTHS):
            if level:
                same = self.bins[level - 1] == chosen[-1].unsqueeze(1)
                inside = same if inside is None else inside & same
                hist = self._histogram(level, torch.where(inside, self.mass, 0))
            at_or_above = group_mass.unsqueeze(1) - hist.cumsum(dim=1) + hist  # mass of a bin and the bins above
            b = ((at_or_above > (position - before).unsqueeze(1)).sum(dim=1) - 1).clamp(0, width - 1)
            group_mass = hist.gather(1, b.unsqueeze(1)).squeeze(1)
            before = before + at_or_above.gather(1, b.unsqueeze(1)).squeeze(1) - group_mass
            chosen.append(b)
        group = ((chosen[0] - 1024) * 2 ** 21 + chosen[1] * 2 ** 10 + chosen[2]).to(torch.int32)
        count = (self.key == group.unsqueeze(1)).sum(dim=1).clamp(min=1)
        return group, before, position - before, (group_mass // count).clamp(min=1)

    def _from_top(self, group: torch.Tensor):
        tie = self.key == group.unsqueeze(1)
        return tie, tie.sum(dim=1, keepdim=True) - tie.cumsum(dim=1)  # rank in the group: 0 = the highest id

    def token(self, group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        tie, from_top = self._from_top(group)
        return (tie & (from_top == rank.unsqueeze(1))).int().argmax(dim=1)

    def kept(self, group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """[n, V] bool: the tokens up to and including the rank-th of the group (the prefix of the order)."""
        tie, from_top = self._from_top(group)
        return (self.key > group.unsqueeze(1)) | (tie & (from_top <= rank.unsqueeze(1)))
