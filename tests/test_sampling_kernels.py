"""The fused sampling kernels (nanoqwen/kernels/sampling.py) against the torch DeviceSampler they replace.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). The claim is equality:
the same scores bit for bit, the same tokens (the fused draw's at once, the torch path's after `complete`) and
sampler state. Both paths use integer masses from an
fp64 exp; where two exp implementations differ by an ulp a mass moves by a few units in 2^bits, which changes a draw
with probability below 2^-40 (nanoqwen/kernels/sampling.py), so exact equality is the assertion.
"""
import random
import warnings

import pytest
import torch

from nanoqwen.kernels import HAVE_TRITON
from nanoqwen.kernels import sampling as sampling_kernels
from nanoqwen.sampling import DeviceSampler, SamplingParams

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton (the test extra installs it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(rng: random.Random, rows: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=rng.choice([0, 0.6, 1.0, 1.7]), top_k=rng.choice([0, 0, 3, 40, 5000]),
                           top_p=rng.choice([1.0, 0.5, 0.8, 0.97]), repetition_penalty=rng.choice([1.0, 1.1, 0.9]),
                           presence_penalty=rng.choice([0.0, 0.0, 0.4]), frequency_penalty=rng.choice([0.0, -0.3]),
                           seed=rng.randrange(1 << 62))
            for _ in range(rows)]


def _logits(gen: torch.Generator, rows: int, vocab: int, dtype) -> torch.Tensor:
    """Rows of different kinds: coarse grids full of exact ties, peaked, flat, and -inf holes."""
    kinds = [torch.randint(-12, 12, (vocab,), generator=gen) / 4,
             torch.randn(vocab, generator=gen) * 6,
             torch.randn(vocab, generator=gen) * 0.05,
             torch.where(torch.rand(vocab, generator=gen) < 0.3, float("-inf"), torch.randn(vocab, generator=gen))]
    return torch.stack([kinds[(i + int(torch.randint(0, 4, (1,), generator=gen))) % 4] for i in range(rows)]).to(
        device=DEVICE, dtype=dtype)


def _pair(params, vocab, prompts, num_candidates):
    made = []
    for fused in (True, False):
        sampler = DeviceSampler(len(params), vocab, DEVICE, num_candidates=num_candidates, capturable=True,
                                fused=fused)
        for slot, p in enumerate(params):
            sampler.add(slot, p, p.seed, prompts[slot], prompts[slot][:slot % 3])
        made.append(sampler)
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scores_equal_the_torch_path_bit_for_bit(kernel_seed, dtype):
    rng, gen = random.Random(kernel_seed), torch.Generator().manual_seed(kernel_seed)
    vocab, rows = 333, 9
    params = _params(rng, rows)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(30))] for _ in range(rows)]
    fused, _ = _pair(params, vocab, prompts, 16)
    slots = torch.tensor([rng.randrange(rows) for _ in range(rows)], device=DEVICE)
    logits = _logits(gen, rows, vocab, dtype)
    flags = fused.flags(range(rows)).for_graph()
    assert flags.repetition and flags.counts and flags.temperature, "the draw of params must turn every stage on"
    got = sampling_kernels.sampler_scores(fused, logits, slots, flags)
    expected = fused._scores(logits.float(), slots, flags)
    assert torch.equal(got, expected), f"seed {kernel_seed}: max |diff| {(got - expected).abs().max()}"


@pytest.mark.parametrize("num_candidates,vocab", [(8, 300), (64, 300), (1024, 300), (32, 1000)])
@pytest.mark.parametrize("graph_flags", [False, True])
def test_fused_draws_equal_the_torch_path(kernel_seed, num_candidates, vocab, graph_flags):
    """Step after step, with pad rows sharing the scratch slot: the fused `sample` gives every row its token at once
    (no pending rows: the kernel runs the exact search for rows past the candidates) equal to the torch path's after
    its `complete`, and the same state (steps, seen, counts)."""
    rng, gen = random.Random(kernel_seed), torch.Generator().manual_seed(kernel_seed)
    rows = 12
    params = _params(rng, rows)
    live = rng.sample(range(rows), 9)
    params[live[0]] = SamplingParams(temperature=1.7, top_p=0.97, seed=kernel_seed)  # drawn from flat rows: pending
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(30))] for _ in range(rows)]
    fused, reference = _pair(params, vocab, prompts, num_candidates)
    assert fused.fused and not reference.fused
    slot_list = live + [fused.pad_slot] * 3
    slots = torch.tensor(slot_list, device=DEVICE)
    flags = fused.flags(slot_list)
    flags = flags.for_graph() if graph_flags else flags
    searched = 0
    for step in range(4):
        logits = _logits(gen, len(slot_list), vocab, rng.choice([torch.float32, torch.bfloat16]))
        logits[0] = torch.randn(vocab, generator=gen).to(logits) * 0.05  # a nucleus of ~97% of the row
        got, expected = fused.sample(logits, slots, flags), reference.sample(logits, slots, flags)
        where = f"seed {kernel_seed}, step {step}"
        assert got.pending is None, where
        searched += int(expected.pending[:len(live)].sum())
        tokens = reference.complete(expected, logits, slots, flags)
        assert got.next_ids.tolist() == tokens, where
        assert fused.complete(got, logits, slots, flags) == tokens, where  # only the copy
        assert torch.equal(fused.steps, reference.steps), where
        assert torch.equal(fused.seen[:rows], reference.seen[:rows]), where
        assert torch.equal(fused.counts, reference.counts), where
    assert fused.fused  # the kernels ran throughout (no fall-back)
    if num_candidates < 64:
        assert searched > 0, "the flat top-p row's nucleus exceeds the candidates: the exact search must run"


def test_the_exact_search_in_the_kernel_on_ties_and_top_k(kernel_seed):
    """Rows whose nucleus lies past the candidates, on coarse grids full of exact ties (the search's last step picks
    a token inside a tie group by id), with top-k too: the kernel's tokens equal the torch path's exact search."""
    rng, gen = random.Random(kernel_seed), torch.Generator().manual_seed(kernel_seed)
    vocab, rows = 257, 8
    params = [SamplingParams(temperature=rng.choice([0.5, 1.0, 3.0]), top_p=rng.choice([0.6, 0.9, 0.99]),
                             top_k=rng.choice([0, 0, 100, 250]), repetition_penalty=rng.choice([1.0, 1.3]),
                             seed=rng.randrange(1 << 40)) for _ in range(rows)]
    fused, reference = _pair(params, vocab, [[1, 2, 3, 4]] * rows, 4)
    slots = list(range(rows))
    searched = 0
    for step in range(6):
        logits = (torch.randint(-3, 3, (rows, vocab), generator=gen) / 8).to(DEVICE)  # 6 values: huge tie groups
        got, expected = fused.sample(logits, slots), reference.sample(logits, slots)
        searched += int(expected.pending.sum())
        assert got.next_ids.tolist() == reference.complete(expected, logits, slots), f"seed {kernel_seed}, step {step}"
    assert searched > rows, "these flat rows must take the exact search"
    assert torch.equal(fused.seen, reference.seen) and torch.equal(fused.steps, reference.steps)


def test_logprobs_come_with_the_fused_draw(kernel_seed):
    vocab = 200
    params = [SamplingParams(top_p=0.8, repetition_penalty=1.1, logprobs=3, seed=i) for i in range(4)]
    fused, reference = _pair(params, vocab, [[1, 2, 3]] * 4, 32)
    logits = _logits(torch.Generator().manual_seed(kernel_seed), 4, vocab, torch.float32)
    slots = [0, 1, 2, 3]
    got, expected = fused.sample(logits, slots), reference.sample(logits, slots)
    assert fused.complete(got, logits, slots) == reference.complete(expected, logits, slots)
    for name in ("chosen_logprobs", "top_logprobs", "top_ids"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_a_failing_kernel_falls_back_once_with_a_warning(monkeypatch):
    vocab = 100
    params = [SamplingParams(top_p=0.8, repetition_penalty=1.1, seed=i) for i in range(3)]
    fused, reference = _pair(params, vocab, [[5, 6]] * 3, 16)
    logits = _logits(torch.Generator().manual_seed(0), 3, vocab, torch.float32)
    slots = [0, 1, 2]

    def broken(*args, **kwargs):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(sampling_kernels, "sampler_draw", broken)
    with pytest.warns(UserWarning, match="fused Triton sampling kernels failed .*PTX compile failed"):
        got = fused.sample(logits, slots)
    assert not fused.fused
    expected = reference.sample(logits, slots)
    assert fused.complete(got, logits, slots) == reference.complete(expected, logits, slots)
    assert torch.equal(fused.steps, reference.steps) and torch.equal(fused.seen, reference.seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused.sample(logits, slots)  # the torch path from now on, silently


def test_fused_needs_the_capturable_form():
    with pytest.raises(ValueError, match="fused=True .* needs capturable=True"):
        DeviceSampler(2, 10, "cpu", capturable=False, fused=True)
    assert not DeviceSampler(2, 10, "cpu").fused  # the CPU default: the torch path, with its host branch


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_engine_with_the_fused_sampler_gives_the_same_outputs(tmp_path_factory, qwen_tiktoken, overlap):
    """The engine's decode-graph path (run eagerly on the CPU) with the sampler as CUDA runs it (capturable, fused,
    few candidates so that some rows go through `complete`): every request's tokens equal the default engine's."""
    from nanoqwen import LLM
    from nanoqwen.testing import tiny_config, write_official_checkpoint
    cfg = tiny_config(vocab_size=1024, hidden_size=32, num_attention_heads=2, kv_channels=16, intermediate_size=64)
    ckpt = write_official_checkpoint(tmp_path_factory.mktemp("fused"), cfg, seed=5, dtype=torch.float32,
                                     vocab_file=qwen_tiktoken)
    rng = random.Random(7)
    prompts = [[rng.randrange(1024) for _ in range(rng.randint(1, 40))] for _ in range(8)]
    params = [SamplingParams(max_new_tokens=rng.randint(3, 10), ignore_eos=True, seed=rng.randrange(1 << 30),
                             **rng.choice([dict(temperature=0), dict(top_p=0.8, repetition_penalty=1.1),
                                           dict(temperature=0.7, top_k=20, presence_penalty=0.5)]))
              for _ in prompts]
    outputs = []
    for fused in (False, True):
        llm = LLM(ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=256, block_size=4, cuda_graphs=True,
                  overlap=overlap, max_num_seqs=8)
        if fused:
            sampler = llm.runner.sampler
            sampler.capturable, sampler.num_candidates, sampler.fused = True, 8, True
        outputs.append([o.token_ids for o in llm.generate(prompts, params)])
        assert not fused or llm.runner.sampler.fused  # no fall-back happened
    assert outputs[0] == outputs[1]
