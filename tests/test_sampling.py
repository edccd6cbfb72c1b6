"""Sampling: parameter validation, HF-equal logits processing, batch-independent seeded draws, logprobs."""
import math
import random

import pytest
import torch

from nanoqwen.sampling import (
    Sampler, SamplingParams, SamplingTensors, gumbel_noise, presence_mask, random_seed, update_presence_,
)
from nanoqwen.sampling import _mul32

QWEN_CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
}

sampler = Sampler()


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


def test_from_generation_config_qwen_chat():
    p = SamplingParams.from_generation_config(QWEN_CHAT_GENERATION_CONFIG)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (1.0, 0.8, 0, 1.1, 512)
    assert not p.greedy
    p = SamplingParams.from_generation_config(QWEN_CHAT_GENERATION_CONFIG, temperature=0.7, seed=3)
    assert p.temperature == 0.7 and p.seed == 3 and p.top_p == 0.8
    assert SamplingParams.from_generation_config({**QWEN_CHAT_GENERATION_CONFIG, "do_sample": False}).greedy
    bare = SamplingParams.from_generation_config({"do_sample": True})
    assert (bare.temperature, bare.top_k, bare.top_p, bare.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert SamplingParams.from_generation_config({}).greedy  # HF's do_sample default is False
    with pytest.raises(ValueError, match="tempreature"):
        SamplingParams.from_generation_config({}, tempreature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"do_sample": True, "top_p": 2.0})


# ---------------------------------------------------------------- helpers

def test_presence_mask_and_update():
    mask = presence_mask([[1, 3, 3], [], [0]], 5)
    assert mask.tolist() == [[False, True, False, True, False], [False] * 5, [True, False, False, False, False]]
    update_presence_(mask, torch.tensor([4, 2, 0]))
    assert mask.tolist() == [[False, True, False, True, True], [False, False, True, False, False],
                             [True, False, False, False, False]]
    with pytest.raises(ValueError, match="outside"):
        presence_mask([[5]], 5)


def test_from_params_errors_and_advance():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingTensors.from_params([SamplingParams(repetition_penalty=1.1)])
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.from_params([SamplingParams()], seeds=[1, 2])
    with pytest.raises(ValueError, match="empty"):
        SamplingTensors.from_params([])
    state = SamplingTensors.from_params([SamplingParams(repetition_penalty=1.2, seed=1)] * 2,
                                        token_ids=[[1], [2]], vocab_size=4, steps=[3, 0])
    state.advance_(torch.tensor([0, 3]))
    assert state.steps.tolist() == [4, 1]
    assert state.seen.tolist() == [[True, True, False, False], [False, False, True, True]]
    with pytest.raises(ValueError, match="vocab_size"):
        sampler(torch.zeros(2, 6), state)
    with pytest.raises(ValueError, match="rows"):
        sampler(torch.zeros(3, 4), state)
    assert 0 <= random_seed() < 2 ** 63 and random_seed() != random_seed()


def test_mul32_has_no_overflow():
    rng = random.Random(0)
    xs = [0, 1, 2 ** 32 - 1, 2 ** 31, 12345] + [rng.getrandbits(32) for _ in range(1000)]
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % 2 ** 32 for x in xs]


def test_noise_finite_for_any_seed():
    seeds = torch.tensor([0, 1, -1, 2 ** 63 - 1, -2 ** 63], dtype=torch.int64)
    noise = gumbel_noise(seeds, torch.tensor([0, 5, 2 ** 40, 7, 1]), 4096)
    assert torch.isfinite(noise).all()
    assert len({tuple(row.tolist()) for row in noise}) == 5


# ---------------------------------------------------------------- logits processing vs HF and a reference

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


def _reference(row, seen, params):
    """Per-row, plain-Python statement of HF's rules (float64), returning (scores list, kept mask)."""
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
        order = sorted(range(len(x)), key=lambda i: x[i])  # ascending, ties by id (stable)
        m = max(x[i] for i in order if keep[i])
        weights = [math.exp(x[i] - m) if keep[i] else 0.0 for i in order]
        total, cumulative = sum(weights), 0.0
        for pos, i in enumerate(order[:-1]):
            cumulative += weights[pos] / total
            if cumulative <= 1 - params.top_p:
                keep[i] = False
    return x, keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_matches_reference(seed):
    logits, seen, params = _batch(seed)
    state = SamplingTensors.from_params(params, token_ids=seen, vocab_size=VOCAB)
    got = Sampler.process(logits, state)
    for b, p in enumerate(params):
        x, keep = _reference(logits[b], seen[b], p)
        assert (torch.isfinite(got[b]) == torch.tensor(keep)).all(), f"row {b} {SETTINGS[b]}"
        expected = torch.tensor([v if k else -math.inf for v, k in zip(x, keep)], dtype=torch.float32)
        torch.testing.assert_close(got[b], expected, rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_process_matches_hf_processors_with_ties(seed, dtype):
    """Bit-equal scores; among tokens *exactly tied* at the top-p boundary, HF's choice follows
    torch.sort's unstable order while ours is by token id, so there only the count kept per value must agree."""
    transformers = pytest.importorskip("transformers")
    logits, seen, params = _batch(seed, dtype)
    state = SamplingTensors.from_params(params, token_ids=seen, vocab_size=VOCAB)
    got = Sampler.process(logits, state)
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
    state = SamplingTensors.from_params(params, token_ids=seen, vocab_size=5000)
    assert torch.equal(Sampler.process(logits, state), _hf_process(transformers, logits, seen, params))


def test_greedy_rows_take_argmax_in_mixed_batch():
    logits, seen, params = _batch(3)
    state = SamplingTensors.from_params(params, token_ids=seen, vocab_size=VOCAB)
    out = sampler(logits, state)
    penalised = Sampler.process(logits, SamplingTensors.from_params(
        [SamplingParams(temperature=0, repetition_penalty=p.repetition_penalty) for p in params],
        token_ids=seen, vocab_size=VOCAB))
    processed = Sampler.process(logits, state)
    for b, p in enumerate(params):
        if p.greedy:
            assert out.next_ids[b] == penalised[b].argmax()
        else:
            assert torch.isfinite(processed[b, out.next_ids[b]])
    assert out.next_ids.dtype == torch.int64 and out.chosen_logprobs is None and out.top_ids is None


def test_all_greedy_is_plain_argmax_and_ignores_seed():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    params = [SamplingParams(temperature=0, seed=s) for s in range(5)]
    out = sampler(logits, SamplingTensors.from_params(params))
    assert torch.equal(out.next_ids, logits.float().argmax(-1))


def test_capturable_state_gives_the_same_scores_and_tokens():
    logits, seen, params = _batch(4)
    plain = SamplingTensors.from_params(params, token_ids=seen, vocab_size=VOCAB)
    full = SamplingTensors.from_params(params, token_ids=seen, vocab_size=VOCAB, capturable=True)
    assert torch.equal(Sampler.process(logits, plain), Sampler.process(logits, full))
    assert torch.equal(sampler(logits, plain).next_ids, sampler(logits, full).next_ids)
    only_plain = [SamplingParams(seed=i) for i in range(3)]
    a = SamplingTensors.from_params(only_plain)
    b = SamplingTensors.from_params(only_plain, capturable=True, token_ids=[[]] * 3, vocab_size=VOCAB)
    assert torch.equal(sampler(logits[:3], a).next_ids, sampler(logits[:3], b).next_ids)


# ---------------------------------------------------------------- seeded draws

def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 1000)  # uniform: the seed alone decides
    draws = {}
    for seed in range(20):
        state = SamplingTensors.from_params([SamplingParams(seed=seed)])
        first = [sampler(logits, state).next_ids.item()]
        again = SamplingTensors.from_params([SamplingParams(seed=seed)])
        assert sampler(logits, again).next_ids.item() == first[0]
        draws[seed] = first[0]
    assert len(set(draws.values())) > 15


def test_same_seed_same_token_alone_or_in_any_batch():
    g = torch.Generator().manual_seed(7)
    vocab, steps = 500, 6
    logits = torch.randn(8, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0.8 + 0.1 * i, top_k=[0, 50, 200][i % 3], top_p=[1.0, 0.9][i % 2],
                             repetition_penalty=[1.0, 1.1][i % 2], seed=1000 + i) for i in range(7)]
    params.append(SamplingParams(temperature=0))
    prompts = [torch.randint(0, vocab, (10,), generator=g).tolist() for _ in params]

    def run(rows):
        state = SamplingTensors.from_params([params[r] for r in rows], token_ids=[prompts[r] for r in rows],
                                            vocab_size=vocab, steps=[2] * len(rows))
        tokens = []
        for step in range(steps):
            out = sampler(logits[rows] + step, state).next_ids
            state.advance_(out)
            tokens.append(out)
        return torch.stack(tokens, dim=1)  # [rows, steps]

    alone = torch.cat([run([r]) for r in range(len(params))])
    for order_seed in range(4):
        order = torch.randperm(len(params), generator=torch.Generator().manual_seed(order_seed)).tolist()
        batched = run(order)
        assert torch.equal(batched, alone[order])
    assert torch.equal(run([3, 3, 3])[0], alone[3])  # duplicates do not interfere either


def _chi_square(counts, probs):
    """Pearson statistic over the support and the count outside it (which must be 0)."""
    support = probs > 0
    n = counts.sum()
    expected = probs[support] * n
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(counts[~support].sum()), \
        int(support.sum()) - 1


@pytest.mark.parametrize("settings", [
    dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.8), dict(temperature=1.5, top_k=9, top_p=0.9),
    dict(temperature=0.5, repetition_penalty=1.3),
])
def test_empirical_distribution_over_seeds_matches_filtered(settings):
    vocab, n = 12, 30000
    logits = torch.linspace(-2, 2, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))]
    logits[3] = logits[5]  # a tie
    params = SamplingParams(**settings)
    seen = [[0, 3, 7]] * n
    one_row = SamplingTensors.from_params([params], token_ids=seen[:1], vocab_size=vocab)
    probs = torch.softmax(Sampler.process(logits.view(1, -1), one_row)[0].double(), dim=-1)
    state = SamplingTensors.from_params([params] * n, seeds=list(range(n)), token_ids=seen, vocab_size=vocab)
    ids = sampler(logits.expand(n, vocab), state).next_ids
    counts = torch.bincount(ids, minlength=vocab).double()
    stat, outside, df = _chi_square(counts, probs)
    assert outside == 0, "sampled a token that top-k/top-p removed"
    assert stat < df + 6 * math.sqrt(2 * df) + 10, (stat, df)
    assert 0.5 * (counts / n - probs).abs().sum() < 0.02


def test_empirical_distribution_over_steps_and_pairs_independent():
    """One seed across many steps: right marginal, and consecutive tokens independent (hash quality)."""
    vocab, n = 4, 40000
    logits = torch.zeros(n, vocab)
    state = SamplingTensors.from_params([SamplingParams(seed=12345)] * n, steps=list(range(n)))
    ids = sampler(logits, state).next_ids
    pairs = torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab * vocab).double()
    stat, _, df = _chi_square(pairs, torch.full((vocab * vocab,), 1 / vocab ** 2, dtype=torch.float64))
    assert stat < df + 6 * math.sqrt(2 * df), stat
    # neighbouring seeds at the same step are independent too
    state = SamplingTensors.from_params([SamplingParams()] * n, seeds=list(range(n)))
    ids = sampler(logits, state).next_ids
    pairs = torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab * vocab).double()
    stat, _, df = _chi_square(pairs, torch.full((vocab * vocab,), 1 / vocab ** 2, dtype=torch.float64))
    assert stat < df + 6 * math.sqrt(2 * df), stat


def test_large_vocab_never_samples_filtered_tokens():
    g = torch.Generator().manual_seed(5)
    vocab, n = 151936, 16
    logits = torch.randn(n, vocab, generator=g).to(torch.bfloat16) * 4
    params = [SamplingParams(top_k=[0, 20][i % 2], top_p=[0.8, 0.95, 1.0, 0.5][i % 4], seed=i) for i in range(n)]
    state = SamplingTensors.from_params(params)
    processed = Sampler.process(logits, state)
    for step in range(3):
        out = sampler(logits, state)
        assert torch.isfinite(processed.gather(1, out.next_ids.view(-1, 1))).all()
        state.advance_(out.next_ids)


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_the_raw_distribution():
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(4, 300, generator=g) * 2).to(torch.bfloat16)
    params = [SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3, seed=1),
              SamplingParams(logprobs=0, temperature=0),
              SamplingParams(top_k=3),
              SamplingParams(logprobs=2, top_p=0.5, seed=2)]
    state = SamplingTensors.from_params(params, token_ids=[[1, 2, 3]] * 4, vocab_size=300)
    out = sampler(logits, state)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert out.top_logprobs.shape == (4, 5) and out.top_ids.shape == (4, 5)
    assert out.top_logprobs.dtype == torch.float32 and out.top_ids.dtype == torch.int64
    torch.testing.assert_close(out.chosen_logprobs, expected.gather(1, out.next_ids.view(-1, 1)).squeeze(1))
    torch.testing.assert_close(out.top_logprobs, expected.topk(5, dim=-1).values)
    torch.testing.assert_close(expected.gather(1, out.top_ids), out.top_logprobs)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()

    only_chosen = sampler(logits, SamplingTensors.from_params([SamplingParams(logprobs=0, seed=0)] * 4))
    assert only_chosen.top_logprobs.shape == (4, 0) and only_chosen.chosen_logprobs.shape == (4,)


# ---------------------------------------------------------------- CUDA graph (runs only where CUDA is)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_captures_in_a_cuda_graph():
    device = torch.device("cuda")
    vocab, n = 32000, 8
    logits = torch.randn(n, vocab, device=device, dtype=torch.bfloat16) * 3
    params = [SamplingParams(temperature=[0, 0.7][i % 2], top_k=[0, 40][i % 2], top_p=[1.0, 0.9][i // 4],
                             repetition_penalty=1.1, seed=i) for i in range(n)]
    prompts = [[1, 2, 3, i] for i in range(n)]
    eager = SamplingTensors.from_params(params, device, token_ids=prompts, vocab_size=vocab, capturable=True)
    expected = []
    for _ in range(3):
        ids = sampler(logits, eager).next_ids
        eager.advance_(ids)
        expected.append(ids)

    static = SamplingTensors.from_params(params, device, token_ids=prompts, vocab_size=vocab, capturable=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        warm = SamplingTensors.from_params(params, device, token_ids=prompts, vocab_size=vocab, capturable=True)
        sampler(logits, warm)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler(logits, static).next_ids
        static.advance_(out)
    # capture does not run the kernels: reset the state the advance_ would have changed
    fresh = SamplingTensors.from_params(params, device, token_ids=prompts, vocab_size=vocab, capturable=True)
    static.steps.copy_(fresh.steps)
    static.seen.copy_(fresh.seen)
    for step in range(3):
        graph.replay()
        assert torch.equal(out, expected[step])
