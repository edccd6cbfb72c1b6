"""Sampling: parameter validation, HF-equal logits processing, batch-independent seeded draws, the device state
of `DeviceSampler`, logprobs."""
import math
import random

import pytest
import torch

import nanoqwen.sampling as sampling
from nanoqwen.sampling import DeviceSampler, SamplingParams
from nanoqwen.sampling import _mix32, _mul32

QWEN_CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
}


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.1}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": "0.1"}, "frequency_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10.0}, "max_new_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": 3}, "stop"),
    ({"stop": ["ok", 1]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "abc"}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"seed": 1.5}, "seed"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_normalise():
    p = SamplingParams(stop="Human:", stop_token_ids=[151645, 151644])
    assert p.stop == ("Human:",) and p.stop_token_ids == (151645, 151644)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == () and SamplingParams().stop_token_ids == ()
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    p = SamplingParams(presence_penalty=2, frequency_penalty=-2)
    assert (p.presence_penalty, p.frequency_penalty) == (2.0, -2.0) and isinstance(p.presence_penalty, float)


def test_from_generation_config_qwen_chat():
    p = SamplingParams.from_generation_config(QWEN_CHAT_GENERATION_CONFIG)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (1.0, 0.8, 0, 1.1, 512)
    assert not p.greedy and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
    p = SamplingParams.from_generation_config(QWEN_CHAT_GENERATION_CONFIG, temperature=0.7, seed=3,
                                              frequency_penalty=0.5)
    assert p.temperature == 0.7 and p.seed == 3 and p.top_p == 0.8 and p.frequency_penalty == 0.5
    assert SamplingParams.from_generation_config({**QWEN_CHAT_GENERATION_CONFIG, "do_sample": False}).greedy
    bare = SamplingParams.from_generation_config({"do_sample": True})
    assert (bare.temperature, bare.top_k, bare.top_p, bare.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert SamplingParams.from_generation_config({}).greedy  # HF's do_sample default is False
    with pytest.raises(ValueError, match="tempreature"):
        SamplingParams.from_generation_config({}, tempreature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"do_sample": True, "top_p": 2.0})


def test_tiny_temperature_is_greedy():
    """Regression: temperature=1e-40 was accepted as sampling; logits / 1e-40 overflow to +inf for every positive
    logit and the first of them won, not the largest."""
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=9.9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 0.0]])
    assert (logits / 1e-40 == float("inf")).sum() == 3  # the mechanism of the bug: three tied "maxima"
    for temperature in (1e-40, 1e-6):
        p = SamplingParams(temperature=temperature, seed=0)
        sampler = DeviceSampler(1, 5)
        sampler.add(0, p, 0, [])
        assert sampler.sample(logits, [0]).next_ids.tolist() == [1]


def test_mul32_has_no_overflow():
    rng = random.Random(0)
    xs = [0, 1, 2 ** 32 - 1, 2 ** 31, 12345] + [rng.getrandbits(32) for _ in range(1000)]
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 0x80000000):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % 2 ** 32 for x in xs] == [_mul32(x, c) for x in xs]
    assert _mix32(torch.tensor(xs)).tolist() == [_mix32(x) for x in xs]  # host and device hash agree


# ---------------------------------------------------------------- shared helpers

SETTINGS = [  # (temperature, top_k, top_p, repetition_penalty)
    (1.0, 0, 1.0, 1.0), (0.7, 0, 0.8, 1.1), (1.0, 5, 1.0, 1.3), (1.3, 10, 0.5, 1.0), (0.5, 3, 0.95, 0.8),
    (1.0, 0, 0.3, 1.1), (2.0, 1, 1.0, 1.0), (0.9, 40, 0.9, 1.05), (0.0, 0, 1.0, 1.1), (0.0, 5, 0.5, 1.0),
    (1.0, 1000, 0.999, 1.0), (0.8, 0, 0.05, 1.1),
]
VOCAB = 64


def _batch(seed=0, dtype=torch.float32):
    """Random logits on a coarse grid (many exact ties, positives and negatives) and random seen ids."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randint(-24, 24, (len(SETTINGS), VOCAB), generator=g) / 4).to(dtype)
    seen = [torch.randint(0, VOCAB, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in SETTINGS]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r, seed=i)
              for i, (t, k, p, r) in enumerate(SETTINGS)]
    return logits, seen, params


def _float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _reference(row, seen, params):
    """Per-row, plain-Python statement of HF's rules (float64; top-p's threshold float32(1 - top_p) as HF
    compares it), returning (scores list, kept mask)."""
    x = [float(v) for v in row]
    r = params.repetition_penalty
    for i in set(seen):
        x[i] = x[i] * r if x[i] < 0 else x[i] / r
    if params.greedy:
        return x, [True] * len(x)
    x = [v / params.temperature for v in x]
    keep = [True] * len(x)
    if params.top_k:
        kth = sorted(x, reverse=True)[min(params.top_k, len(x)) - 1]
        keep = [v >= kth for v in x]
    if params.top_p < 1.0:
        threshold = _float32(1 - params.top_p)
        order = sorted(range(len(x)), key=lambda i: x[i])  # ascending, ties by id (stable)
        m = max(x[i] for i in order if keep[i])
        weights = [math.exp(x[i] - m) if keep[i] else 0.0 for i in order]
        total, cumulative = sum(weights), 0.0
        for pos, i in enumerate(order[:-1]):
            cumulative += weights[pos] / total
            if cumulative <= threshold:
                keep[i] = False
    return x, keep


def _hf_process(transformers, logits, seen, params):
    """Each row through HF's own processors, in the order `generate` applies them."""
    rows = []
    for b, p in enumerate(params):
        scores = logits[b:b + 1].float()
        ids = torch.tensor([seen[b]], dtype=torch.int64).view(1, -1)
        if p.repetition_penalty != 1.0 and ids.numel():
            scores = transformers.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
        if not p.greedy:
            if p.temperature != 1.0:
                scores = transformers.TemperatureLogitsWarper(p.temperature)(ids, scores)
            if p.top_k:
                scores = transformers.TopKLogitsWarper(p.top_k)(ids, scores)
            if p.top_p < 1.0:
                scores = transformers.TopPLogitsWarper(p.top_p)(ids, scores)
        rows.append(scores[0])
    return torch.stack(rows)


def _chi_square(counts, probs):
    """Pearson statistic over the support and the count outside it (which must be 0)."""
    support = probs > 0
    n = counts.sum()
    expected = probs[support] * n
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(counts[~support].sum()), \
        int(support.sum()) - 1


def _draw(sampler, logits, slots):
    """One engine step: sample, then complete (rows the candidates left pending, and the copy to the host)."""
    out = sampler.sample(logits, slots)
    return torch.tensor(sampler.complete(out, logits, slots))


def _sampler(params, vocab, prompts=None, outputs=None, seeds=None, **kwargs):
    """A DeviceSampler holding one request per slot 0..n-1; returns it and the slot list."""
    sampler = DeviceSampler(len(params), vocab, **kwargs)
    for slot, p in enumerate(params):
        seed = seeds[slot] if seeds is not None else (p.seed if p.seed is not None else slot)
        sampler.add(slot, p, seed, prompts[slot] if prompts else [], outputs[slot] if outputs else [])
    return sampler, list(range(len(params)))


# ---------------------------------------------------------------- DeviceSampler: processing vs HF and a reference

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_matches_reference(seed):
    logits, seen, params = _batch(seed)
    sampler, slots = _sampler(params, VOCAB, prompts=seen)
    got = sampler.process(logits, slots)
    for b, p in enumerate(params):
        x, keep = _reference(logits[b], seen[b], p)
        assert (torch.isfinite(got[b]) == torch.tensor(keep)).all(), f"row {b} {SETTINGS[b]}"
        expected = torch.tensor([v if k else -math.inf for v, k in zip(x, keep)], dtype=torch.float32)
        # the inputs are exact; float32 rounds the penalty and the temperature once each: (1 + 2^-24)^2 - 1
        torch.testing.assert_close(got[b], expected, rtol=3 * 2.0 ** -24, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_process_matches_hf_processors_with_ties(seed, dtype):
    """Bit-equal scores; among tokens *exactly tied* at the top-p boundary, HF's choice follows
    torch.sort's unstable order while ours is by token id, so there only the count kept per value must agree."""
    transformers = pytest.importorskip("transformers")
    logits, seen, params = _batch(seed, dtype)
    sampler, slots = _sampler(params, VOCAB, prompts=seen)
    got = sampler.process(logits, slots)
    expected = _hf_process(transformers, logits, seen, params)
    for b in range(len(params)):
        both = torch.isfinite(got[b]) & torch.isfinite(expected[b])
        assert torch.equal(got[b][both], expected[b][both]), f"row {b} {SETTINGS[b]}"
        kept_ours = torch.unique(got[b][torch.isfinite(got[b])], return_counts=True)
        kept_hf = torch.unique(expected[b][torch.isfinite(expected[b])], return_counts=True)
        assert all(torch.equal(x, y) for x, y in zip(kept_ours, kept_hf)), f"row {b} {SETTINGS[b]}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_process_equals_hf_processors_bit_for_bit_without_ties(seed):
    transformers = pytest.importorskip("transformers")
    _, seen, params = _batch(seed)
    logits = torch.randn(len(params), 5000, generator=torch.Generator().manual_seed(seed)) * 3
    sampler, slots = _sampler(params, 5000, prompts=seen)
    assert torch.equal(sampler.process(logits, slots), _hf_process(transformers, logits, seen, params))


def test_top_p_threshold_is_float32_as_hf_compares_it():
    """A token whose mass below-and-including it lies between 0.2 and float32(0.2) is removed at top_p 0.8 by HF
    (it compares float32 sums with float32(1 - top_p)); a float64 threshold of 0.2 would keep it."""
    logits = torch.tensor([[0.0, -1.386299729347229, -13.520000457763672]])  # found by a search, checked here:
    below = torch.softmax(logits[0].double(), dim=0)[1:].sum().item()
    assert 0.2 < below < _float32(0.2)
    sampler, slots = _sampler([SamplingParams(top_p=0.8)], 3)
    kept = torch.isfinite(sampler.process(logits, slots))
    assert kept.tolist() == [[True, False, False]]
    transformers = pytest.importorskip("transformers")
    assert torch.equal(kept, torch.isfinite(transformers.TopPLogitsWarper(0.8)(None, logits)))


def test_top_p_over_a_flat_large_vocabulary_matches_reference():
    """Nuclei of ~10^4 tokens in a 151,936-token row: the sort-free search must find HF's boundary exactly."""
    vocab = 151936
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, vocab, generator=g).to(torch.bfloat16).float()  # bf16: many exact ties too
    params = [SamplingParams(top_p=0.8), SamplingParams(top_p=0.3, temperature=0.7), SamplingParams(top_p=0.95)]
    sampler, slots = _sampler(params, vocab)
    got = sampler.process(logits, slots)
    for b, p in enumerate(params):
        x = (logits[b].double() / p.temperature)
        order = torch.argsort(x, stable=True)  # ascending, ties by id
        probs = torch.softmax(x[order], dim=0)
        removed = probs.cumsum(0) <= _float32(1 - p.top_p)
        removed[-1] = False
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[order[removed]] = False
        assert torch.equal(torch.isfinite(got[b]), keep), f"row {b}"
        assert 1000 < int(keep.sum()) < vocab - 1000


# ---------------------------------------------------------------- DeviceSampler: candidates and the exact search

def _mixed_logits(rows, vocab, seed):
    """Rows of every shape the searches must agree on: coarse-grid ties, bf16 ties, flat, peaked, -inf entries."""
    g = torch.Generator().manual_seed(seed)
    shapes = [
        (torch.randint(-8, 8, (vocab,), generator=g) / 2),
        torch.randn(vocab, generator=g).to(torch.bfloat16).float() * 2,
        torch.randn(vocab, generator=g) * 0.3,
        torch.randn(vocab, generator=g) * 6,
        torch.where(torch.rand(vocab, generator=g) < 0.3, float("-inf"), torch.randn(vocab, generator=g)),
    ]
    return torch.stack([shapes[i % len(shapes)] for i in range(rows)])


@pytest.mark.parametrize("num_candidates", [1, 5, 32])
def test_candidate_draws_equal_the_exact_search(num_candidates, monkeypatch):
    """Three ways to the same tokens, step after step: the exact search for every row (num_candidates=0); top-K
    candidates with the exact search at once for rows they cannot answer (CPU); and candidates with those rows left
    pending for `complete` (capturable). Both branches of the candidate paths run."""
    vocab, rows = 200, 20
    rng = random.Random(num_candidates)
    params = [SamplingParams(temperature=rng.choice([0, 0.6, 1.0, 1.7]), top_k=rng.choice([0, 0, 3, 40]),
                             top_p=rng.choice([1.0, 0.5, 0.8, 0.97]), repetition_penalty=rng.choice([1.0, 1.2]),
                             presence_penalty=rng.choice([0.0, 0.4]), seed=rng.randrange(1 << 40))
              for _ in range(rows)]
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(10))] for _ in range(rows)]
    exact, slots = _sampler(params, vocab, prompts=prompts, num_candidates=0)
    at_once, _ = _sampler(params, vocab, prompts=prompts, num_candidates=num_candidates, capturable=False)
    deferred, _ = _sampler(params, vocab, prompts=prompts, num_candidates=num_candidates, capturable=True)
    searched = []
    real = sampling._draw_exact
    monkeypatch.setattr(sampling, "_draw_exact", lambda scores, *a: searched.append(len(scores)) or real(scores, *a))
    at_once_searched, pending = 0, 0
    for step in range(5):
        logits = _mixed_logits(rows, vocab, step)
        expected = exact.sample(logits, slots).next_ids
        searched.clear()
        assert torch.equal(at_once.sample(logits, slots).next_ids, expected), f"step {step}"
        at_once_searched += sum(searched)
        out = deferred.sample(logits, slots)
        if step == 0:
            static = out  # as a CUDA graph's output: the same tensors every step, rewritten in place
        else:
            for name in ("next_ids", "pending"):
                getattr(static, name).copy_(getattr(out, name))
        pending += int(static.pending.sum())
        assert deferred.complete(static, logits, slots) == expected.tolist(), f"step {step}"
        assert deferred.complete(static, logits, slots) == expected.tolist()  # a second call changes nothing
    sampled_rows = 5 * sum(not p.greedy for p in params)
    assert 0 < at_once_searched == pending < sampled_rows
    for sampler in (at_once, deferred):  # the state the three kept is the same too
        assert torch.equal(sampler.steps, exact.steps) and torch.equal(sampler.seen, exact.seen)
        assert torch.equal(sampler.counts, exact.counts)


# ---------------------------------------------------------------- DeviceSampler: seeded draws

def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 1000)  # uniform: the seed alone decides
    draws = {}
    for seed in range(20):
        first = _sampler([SamplingParams()], 1000, seeds=[seed])[0].sample(logits, [0]).next_ids.item()
        assert _sampler([SamplingParams()], 1000, seeds=[seed])[0].sample(logits, [0]).next_ids.item() == first
        draws[seed] = first
    assert len(set(draws.values())) > 15


def test_same_seed_same_token_alone_or_in_any_batch():
    g = torch.Generator().manual_seed(7)
    vocab, steps = 500, 6
    logits = torch.randn(8, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0.8 + 0.1 * i, top_k=[0, 50, 200][i % 3], top_p=[1.0, 0.9][i % 2],
                             repetition_penalty=[1.0, 1.1][i % 2], frequency_penalty=[0.0, 0.3][i % 3 == 0],
                             seed=1000 + i) for i in range(7)]
    params.append(SamplingParams(temperature=0))
    prompts = [torch.randint(0, vocab, (10,), generator=g).tolist() for _ in params]
    outputs = [torch.randint(0, vocab, (2,), generator=g).tolist() for _ in params]

    def run(rows, slot_offset=0, **kwargs):
        sampler = DeviceSampler(len(rows) + slot_offset, vocab, **kwargs)
        slots = [slot_offset + i for i in range(len(rows))]
        for s, r in zip(slots, rows):
            sampler.add(s, params[r], 1000 + r, prompts[r], outputs[r])
        tokens = [_draw(sampler, logits[rows] + step, slots) for step in range(steps)]
        return torch.stack(tokens, dim=1)  # [rows, steps]

    alone = torch.cat([run([r]) for r in range(len(params))])
    for order_seed in range(3):
        order = torch.randperm(len(params), generator=torch.Generator().manual_seed(order_seed)).tolist()
        assert torch.equal(run(order, slot_offset=order_seed), alone[order])
    assert torch.equal(run(list(range(8)), capturable=True, num_candidates=2), alone)
    assert torch.equal(run(list(range(8)), num_candidates=0), alone)
    assert torch.equal(run([3, 3, 3])[0], alone[3])  # duplicates do not interfere either


def test_preempted_request_continues_its_draws():
    """remove() then add() with the tokens generated so far (another slot) continues the same token stream."""
    vocab = 300
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(3)) * 2
    p = SamplingParams(top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7, seed=5)
    prompt = [1, 2, 3, 2]
    whole, _ = _sampler([p], vocab, prompts=[prompt])
    expected = [whole.sample(logits[i:i + 1], [0]).next_ids.item() for i in range(8)]
    sampler = DeviceSampler(4, vocab)
    sampler.add(0, p, 5, prompt)
    got = [sampler.sample(logits[i:i + 1], [0]).next_ids.item() for i in range(4)]
    sampler.remove(0)
    sampler.add(0, SamplingParams(temperature=0), 1, [7])  # the slot goes to another request meanwhile
    sampler.add(2, p, 5, prompt, got)
    got += [sampler.sample(logits[i:i + 1], [2]).next_ids.item() for i in range(4, 8)]
    assert got == expected


@pytest.mark.parametrize("settings", [
    dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.8), dict(temperature=1.5, top_k=9, top_p=0.9),
    dict(temperature=0.5, repetition_penalty=1.3),
])
def test_empirical_distribution_over_seeds_matches_filtered(settings):
    vocab, n = 12, 30000
    logits = torch.linspace(-2, 2, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))]
    logits[3] = logits[5]  # a tie
    params = SamplingParams(**settings)
    one_row, _ = _sampler([params], vocab, prompts=[[0, 3, 7]])
    probs = torch.softmax(one_row.process(logits.view(1, -1), [0])[0].double(), dim=-1)
    sampler, slots = _sampler([params] * n, vocab, prompts=[[0, 3, 7]] * n, seeds=list(range(n)))
    ids = sampler.sample(logits.expand(n, vocab), slots).next_ids
    counts = torch.bincount(ids, minlength=vocab).double()
    stat, outside, df = _chi_square(counts, probs)
    assert outside == 0, "sampled a token that top-k/top-p removed"
    assert stat < df + 6 * math.sqrt(2 * df) + 10, (stat, df)
    assert 0.5 * (counts / n - probs).abs().sum() < 0.02


def test_empirical_distribution_over_steps_and_pairs_independent():
    """One seed across many steps: right marginal, and consecutive tokens independent (hash quality)."""
    vocab, n = 4, 40000
    logits = torch.zeros(n, vocab)
    uniform_pairs = torch.full((vocab * vocab,), 1 / vocab ** 2, dtype=torch.float64)
    sampler, slots = _sampler([SamplingParams()] * n, vocab, seeds=[12345] * n)
    sampler.steps[:n] = torch.arange(n)  # white-box: row i is the request at step i
    ids = sampler.sample(logits, slots).next_ids
    stat, _, df = _chi_square(torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab ** 2).double(),
                              uniform_pairs)
    assert stat < df + 6 * math.sqrt(2 * df), stat
    # neighbouring seeds at the same step are independent too
    sampler, slots = _sampler([SamplingParams()] * n, vocab, seeds=list(range(n)))
    ids = sampler.sample(logits, slots).next_ids
    stat, _, df = _chi_square(torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab ** 2).double(),
                              uniform_pairs)
    assert stat < df + 6 * math.sqrt(2 * df), stat


@pytest.mark.parametrize("capturable", [False, True])
def test_large_vocab_never_samples_filtered_tokens(capturable):
    g = torch.Generator().manual_seed(5)
    vocab, n = 151936, 16
    logits = torch.randn(n, vocab, generator=g).to(torch.bfloat16) * 4
    params = [SamplingParams(top_k=[0, 20][i % 2], top_p=[0.8, 0.95, 1.0, 0.5][i % 4], seed=i) for i in range(n)]
    sampler, slots = _sampler(params, vocab, capturable=capturable)
    processed = sampler.process(logits, slots)
    for step in range(3):
        assert torch.isfinite(processed.gather(1, _draw(sampler, logits, slots).view(-1, 1))).all()


def test_greedy_rows_take_argmax_in_mixed_batch():
    logits, seen, params = _batch(3)
    sampler, slots = _sampler(params, VOCAB, prompts=seen)
    processed = sampler.process(logits, slots)
    penalised, _ = _sampler([SamplingParams(temperature=0, repetition_penalty=p.repetition_penalty) for p in params],
                            VOCAB, prompts=seen)
    penalised = penalised.process(logits, slots)
    out = sampler.sample(logits, slots)
    for b, p in enumerate(params):
        if p.greedy:
            assert out.next_ids[b] == penalised[b].argmax()
        else:
            assert torch.isfinite(processed[b, out.next_ids[b]])
    assert out.next_ids.dtype == torch.int64 and out.chosen_logprobs is None and out.top_ids is None


def test_all_greedy_is_plain_argmax_and_ignores_seed():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    sampler, slots = _sampler([SamplingParams(temperature=0, seed=s) for s in range(5)], 100)
    assert sampler.flags(slots).greedy_only
    assert torch.equal(sampler.sample(logits, slots).next_ids, logits.float().argmax(-1))


@pytest.mark.parametrize("capturable, num_candidates", [(False, None), (True, None), (True, 0)])
def test_graph_flags_give_the_same_tokens(capturable, num_candidates):
    """Every optional stage on (SamplerFlags.for_graph) changes no token: one graph serves many compositions."""
    vocab = 300
    logits = _mixed_logits(6, vocab, 1)
    batches = [
        [SamplingParams(temperature=0, seed=1), SamplingParams(temperature=0, repetition_penalty=1.2)],
        [SamplingParams(seed=2), SamplingParams(top_p=0.9, seed=3)],
        [SamplingParams(top_k=7, seed=4), SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=5)],
        [SamplingParams(logprobs=3, seed=6), SamplingParams(presence_penalty=1.0, seed=7)],
    ]
    batches.append([SamplingParams(top_k=290, seed=8), SamplingParams(top_k=3, top_p=0.7, seed=9)])  # 512 > vocab
    for params in batches:
        plain, slots = _sampler(params, vocab, prompts=[[1, 2]] * len(params), capturable=capturable,
                                num_candidates=num_candidates)
        full, _ = _sampler(params, vocab, prompts=[[1, 2]] * len(params), capturable=capturable,
                           num_candidates=num_candidates)
        flags = plain.flags(slots)
        for step in range(3):
            x, slots_d = logits[:len(params)], torch.tensor(slots)
            a = plain.sample(x, slots_d, flags)
            b = full.sample(x, slots_d, flags.for_graph())
            assert plain.complete(a, x, slots_d, flags) == full.complete(b, x, slots_d, flags.for_graph()), params
            if a.top_ids is not None:  # the same values (which of exactly tied ids gets listed may differ)
                k = flags.logprobs
                assert torch.equal(a.top_logprobs, b.top_logprobs[:, :k])
                assert torch.equal(a.chosen_logprobs, b.chosen_logprobs)
        assert torch.equal(plain.steps, full.steps)
        penalised = [s for s, p in enumerate(params) if p.repetition_penalty != 1.0]
        assert torch.equal(plain.seen[penalised], full.seen[penalised])  # other rows: unused either way


# ---------------------------------------------------------------- DeviceSampler: penalties and device state

def test_presence_and_frequency_penalties_match_reference():
    """OpenAI's rule on generated ids only, after the repetition penalty, in vLLM's float32 order (frequency term
    subtracted first); penalties that are not dyadic fractions make that order visible in the last bits."""
    np = pytest.importorskip("numpy")
    vocab = 40
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0, presence_penalty=0.3, frequency_penalty=0.7),
              SamplingParams(temperature=0.8, presence_penalty=-1.3, repetition_penalty=1.3, seed=1),
              SamplingParams(frequency_penalty=1.9, presence_penalty=0.1, top_p=0.9, seed=2),
              SamplingParams(temperature=0)]
    prompts = [[0, 1, 1, 2], [3, 4], [5], [6, 6]]
    outputs = [[1, 1, 7, 9, 9, 9], [3, 8], [5, 5, 5, 0], [1]]
    sampler, slots = _sampler(params, vocab, prompts=prompts, outputs=outputs)
    for step in range(3):
        got = sampler.process(logits, slots)
        for b, p in enumerate(params):
            seen, counts = set(prompts[b] + outputs[b]), np.bincount(outputs[b], minlength=vocab)
            r, f, pr = (np.float32(v) for v in (p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
            for i in range(vocab):
                x = np.float32(logits[b, i].item())
                if i in seen:
                    x = x * r if x < 0 else x / r
                x = x - np.float32(counts[i]) * f - np.float32(counts[i] > 0) * pr
                if not p.greedy:
                    x = x / np.float32(p.temperature)
                assert got[b, i].item() == x or math.isinf(got[b, i].item()), (step, b, i)
            assert torch.isfinite(got[b]).sum() > 1
        new = sampler.sample(logits, slots).next_ids.tolist()
        for b, t in enumerate(new):
            outputs[b].append(t)
    assert sampler.counts[:3].tolist() == [torch.bincount(torch.tensor(o), minlength=vocab).tolist()
                                           for o in outputs[:3]]  # row 3 has no such penalty: its row is unused


def test_unused_penalties_cost_nothing():
    sampler, slots = _sampler([SamplingParams(seed=1), SamplingParams(temperature=0)], 50, prompts=[[1, 2], [3]])
    flags = sampler.flags(slots)
    assert not flags.repetition and not flags.counts and sampler.counts is None
    sampler.sample(torch.randn(2, 50), slots)
    assert not sampler.seen.any() and sampler.counts is None  # no presence mask update without a penalty
    with pytest.raises(ValueError, match="presence/frequency"):
        sampler.sample(torch.randn(2, 50), torch.tensor(slots), flags.__class__(counts=True))


def test_state_lives_on_the_device_and_advances():
    vocab = 30
    sampler = DeviceSampler(3, vocab)
    sampler.add(1, SamplingParams(repetition_penalty=1.2, frequency_penalty=0.1, seed=9), 9, [4, 5], [6])
    sampler.add(0, SamplingParams(temperature=0), 0, [1])
    assert sampler.steps.tolist() == [0, 1, 0, 0]
    assert sampler.seen[1].nonzero().squeeze(1).tolist() == [4, 5, 6]
    assert sampler.counts[1].nonzero().squeeze(1).tolist() == [6]  # the prompt does not count
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([1, 0])
    ids = sampler.sample(logits, slots, sampler.flags([1, 0])).next_ids
    assert sampler.steps.tolist() == [1, 2, 0, 0]
    assert sampler.seen[1, ids[0]] and sampler.seen[0, ids[1]] and sampler.counts[1].sum() == 2
    # a CUDA-graph bucket pads with the scratch slot: its rows change nothing else
    padded = torch.cat([logits, logits[:1]])
    ids3 = sampler.sample(padded, torch.tensor([1, 0, sampler.pad_slot]), sampler.flags([1, 0, sampler.pad_slot]))
    assert sampler.steps[:3].tolist() == [2, 3, 0]
    assert ids3.next_ids.shape == (3,)


def test_protocol_errors_say_what_to_do():
    sampler = DeviceSampler(2, 10)
    with pytest.raises(ValueError, match="add"):
        sampler.flags([0])
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\)"):
        sampler.add(2, SamplingParams(), 0, [])
    with pytest.raises(ValueError, match="token id"):
        sampler.add(0, SamplingParams(), 0, [10])
    with pytest.raises(ValueError, match="seed"):
        sampler.add(0, SamplingParams(), 1.5, [1])
    with pytest.raises(ValueError, match="SamplingParams"):
        sampler.add(0, {"temperature": 0}, 0, [1])
    sampler.add(0, SamplingParams(), 0, [1])
    with pytest.raises(ValueError, match=r"logits must be \[B, 10\]"):
        sampler.sample(torch.zeros(1, 11), [0])
    with pytest.raises(ValueError, match="flags"):
        sampler.sample(torch.zeros(1, 10), torch.tensor([0]))
    sampler.remove(0)
    with pytest.raises(ValueError, match="holds no request"):
        sampler.sample(torch.zeros(1, 10), [0])
    with pytest.raises(ValueError, match="max_num_seqs"):
        DeviceSampler(0, 10)


def test_logprobs_are_the_raw_distribution():
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(4, 300, generator=g) * 2).to(torch.bfloat16)
    params = [SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3, seed=1),
              SamplingParams(logprobs=0, temperature=0),
              SamplingParams(top_k=3),
              SamplingParams(logprobs=2, top_p=0.5, seed=2)]
    sampler, slots = _sampler(params, 300, prompts=[[1, 2, 3]] * 4)
    out = sampler.sample(logits, slots)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert out.top_logprobs.shape == (4, 5) and out.top_ids.shape == (4, 5)
    assert out.top_logprobs.dtype == torch.float32 and out.top_ids.dtype == torch.int64
    torch.testing.assert_close(out.chosen_logprobs, expected.gather(1, out.next_ids.view(-1, 1)).squeeze(1))
    torch.testing.assert_close(out.top_logprobs, expected.topk(5, dim=-1).values)
    torch.testing.assert_close(expected.gather(1, out.top_ids), out.top_logprobs)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    only_chosen, slots = _sampler([SamplingParams(logprobs=0, seed=0)] * 4, 300)
    out = only_chosen.sample(logits, slots)
    assert out.top_logprobs.shape == (4, 0) and out.chosen_logprobs.shape == (4,)


# ---------------------------------------------------------------- DeviceSampler: capturable in a CUDA graph

def test_capturable_path_never_reads_the_device():
    """On the meta device any host read (.item(), nonzero, a data-dependent branch) or host tensor raises: the
    capturable `sample` runs there for every stage, with candidates and with the exact search for every row
    (num_candidates=0); the CPU path (a host branch) does not."""
    vocab = 1000
    params = [SamplingParams(top_p=0.8, top_k=7, repetition_penalty=1.1, presence_penalty=0.1, logprobs=2),
              SamplingParams(temperature=0), SamplingParams(temperature=0.5), SamplingParams(top_p=0.5)]
    logits = torch.empty(4, vocab, device="meta", dtype=torch.bfloat16)
    slots = torch.empty(4, dtype=torch.int64, device="meta")
    for num_candidates in (None, 0):
        sampler, _ = _sampler(params, vocab, device="meta", num_candidates=num_candidates)
        assert sampler.capturable
        flags = sampler.flags(range(4))
        for f in (flags, flags.for_graph(), sampler.flags([1])):
            out = sampler.sample(logits, slots, f)
            assert out.next_ids.shape == (4,) and out.next_ids.device.type == "meta"
            assert (out.pending is None) == (num_candidates == 0 or f.greedy_only)
    sampler.capturable = False
    with pytest.raises(Exception, match="meta"):
        _sampler(params, vocab, device="meta", capturable=False)[0].sample(logits, slots, flags)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_sampler_captures_in_a_cuda_graph():
    device, vocab, n = torch.device("cuda"), 32000, 8
    logits = torch.randn(n, vocab, device=device, dtype=torch.bfloat16) * 3
    params = [SamplingParams(temperature=[0, 0.7][i % 2], top_k=[0, 40][i % 2], top_p=[1.0, 0.9][i // 4],
                             repetition_penalty=1.1, seed=i) for i in range(n)]

    def fresh():
        s = DeviceSampler(n, vocab, device)
        for slot, p in enumerate(params):
            s.add(slot, p, slot, [1, 2, 3, slot])
        return s

    eager = fresh()
    slots = torch.arange(n, device=device)
    flags = eager.flags(range(n)).for_graph()
    expected = []
    for _ in range(3):
        out = eager.sample(logits, slots, flags)
        expected.append(eager.complete(out, logits, slots, flags))
    static = fresh()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, on a throwaway sampler
        fresh().sample(logits, slots, flags)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the kernels without running them: `static` keeps its fresh state
        out = static.sample(logits, slots, flags)
    for step in range(3):
        graph.replay()
        assert static.complete(out, logits, slots, flags) == expected[step]


@pytest.mark.parametrize("capturable", [False, True])
def test_rows_without_top_p_draw_in_vocabulary_order_and_are_never_pending(capturable):
    """A sampled row without top-p needs no order: its token is the first id whose cumulative mass (in id order)
    exceeds floor(u * total), whatever the candidates hold, so it is never left for `complete`."""
    vocab, rows = 500, 6
    params = [SamplingParams(temperature=t, top_k=k, repetition_penalty=1.1, seed=i)
              for i, (t, k) in enumerate([(1.0, 0), (1.7, 0), (0.5, 0), (1.0, 400), (1.3, 2), (0.0, 0)])]
    sampler, slots = _sampler(params, vocab, prompts=[[1, 2, 3]] * rows, num_candidates=2, capturable=capturable)
    exact, _ = _sampler(params, vocab, prompts=[[1, 2, 3]] * rows, num_candidates=0)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        logits = torch.randn(rows, vocab, generator=g) * 0.1  # flat: the mass lies far beyond 2 candidates
        flags = sampler.flags(slots)
        scores = sampler.process(logits, slots, flags)  # before `sample` changes the penalty state
        out = sampler.sample(logits, slots, flags)
        assert out.pending is None or not out.pending.any()
        expected = exact.sample(logits, slots).next_ids
        assert torch.equal(out.next_ids, expected), f"step {step}"
        u = sampling._uniforms(sampler.seed_lanes[:rows], sampler.steps[:rows] - 1)
        for row, p in enumerate(params[:-1]):  # by hand: the id-order inverse CDF over the kept masses
            mass = sampling._fixed_point_mass(scores[row:row + 1], sampler.mass_bits)[0]
            target = int(sampling._target(u[row:row + 1], mass.sum().view(1)))
            assert int(out.next_ids[row]) == int((mass.cumsum(0) > target).int().argmax()), f"step {step}, row {row}"
        assert int(out.next_ids[-1]) == int(scores[-1].argmax())
