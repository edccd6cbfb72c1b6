"""The continuous-batching engine: batching invariance, chunked prefill, prefix caching, preemption, errors."""
import random

import pytest
import torch

from nanoqwen import LLM, SamplingParams
from nanoqwen.testing import tiny_config, write_official_checkpoint


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, qwen_tiktoken):
    """A random small model (vocab 1024, seq_length 32 so NTK and LogN switch on for longer prompts)."""
    cfg = tiny_config(vocab_size=1024, hidden_size=32, num_attention_heads=2, kv_channels=16, intermediate_size=64)
    return write_official_checkpoint(tmp_path_factory.mktemp("small"), cfg, seed=3, dtype=torch.float32,
                                     vocab_file=qwen_tiktoken)


def make(ckpt, **kw):
    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("block_size", 4)
    return LLM(ckpt, device="cpu", dtype=torch.float32, **kw)


def prompts(n, lo, hi, seed, vocab=1024):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def params_mix(n, seed, max_new=(4, 12)):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kw = dict(max_new_tokens=rng.randint(*max_new), repetition_penalty=rng.choice([1.0, 1.1, 1.3]))
        if rng.random() < 0.5:
            kw.update(temperature=0)
        else:
            kw.update(temperature=rng.choice([0.7, 1.0]), top_p=rng.choice([0.8, 1.0]), top_k=rng.choice([0, 20]),
                      seed=rng.randrange(1 << 30))
        out.append(SamplingParams(**kw, ignore_eos=True))
    return out


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_batched_equals_single(small_ckpt, overlap):
    llm = make(small_ckpt, overlap=overlap)
    ps = [p for p in prompts(6, 1, 3, 0)] + prompts(3, 30, 90, 1)  # very different lengths, some past seq_length
    params = params_mix(len(ps), 2)
    batched = llm.generate(ps, params)
    for p, sp, out in zip(ps, params, batched):
        assert llm.generate(p, sp).token_ids == out.token_ids
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_golden_generate_and_padded_batch_together(tiny_ckpt, tiny_ref):
    """The golden README batch rows (unpadded) and every fp32/generate case, all in one batch."""
    llm = LLM(tiny_ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=256)
    cases = [c for k, c in tiny_ref["cases"].items() if k.startswith("fp32/generate/")]
    rows = tiny_ref["cases"]["batch_left_padded"]["rows"]
    ps = [c["input_ids"] for c in cases] + [r["input_ids"][r["n_pad"]:] for r in rows]
    params = [SamplingParams(temperature=0, repetition_penalty=c["repetition_penalty"],
                             max_new_tokens=c["max_new_tokens"]) for c in cases]
    params += [SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=len(r["output_ids"])) for r in rows]
    outs = llm.generate(ps, params)
    expected = [c["output_ids"] for c in cases] + [r["output_ids"] for r in rows]
    assert [o.token_ids for o in outs] == expected


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_chunked_prefill(small_ckpt, overlap):
    ps = prompts(4, 20, 70, 5)
    params = params_mix(4, 6)
    one_shot = make(small_ckpt).generate(ps, params)
    llm = make(small_ckpt, max_num_batched_tokens=7, overlap=overlap)
    chunked = llm.generate(ps, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in one_shot]


def test_prefix_caching(small_ckpt):
    system = prompts(1, 41, 41, 7)[0]
    a, b = system + [5, 6, 7], system + [9, 10]
    p = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    llm = make(small_ckpt)
    first = llm.generate(a, p)
    second = llm.generate(b, p)
    assert first.metrics["cached_tokens"] == 0
    assert second.metrics["cached_tokens"] == 40  # 10 full blocks of 4 shared; the rest computed
    uncached = make(small_ckpt, enable_prefix_caching=False)
    assert uncached.generate(b, p).token_ids == second.token_ids
    assert uncached.generate(a, p).token_ids == first.token_ids
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_prefix_cache_concurrent_requests(small_ckpt):
    """Requests sharing a prefix in the same batch: blocks are shared only once computed, outputs unchanged."""
    system = prompts(1, 30, 30, 8)[0]
    ps = [system + q for q in prompts(5, 1, 6, 9)]
    params = params_mix(5, 10)
    llm = make(small_ckpt, max_num_batched_tokens=16)
    outs = llm.generate(ps, params)
    ref = make(small_ckpt, enable_prefix_caching=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref.generate(ps, params)]
    assert any(o.metrics["cached_tokens"] > 0 for o in outs)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_stress_small_pool(small_ckpt, overlap):
    """Hundreds of requests with random lengths, parameters and aborts through a deliberately small block pool."""
    rng = random.Random(11)
    n = 200
    ps = prompts(n, 1, 40, 12)
    params = params_mix(n, 13, max_new=(1, 14))
    llm = make(small_ckpt, num_kv_blocks=40, max_num_seqs=12, max_num_batched_tokens=48, overlap=overlap)
    ids = {}
    outputs, aborted = {}, set()
    pending = list(range(n))
    while pending or llm.has_unfinished():
        for _ in range(rng.randint(0, 6)):  # requests keep arriving while others run
            if pending:
                i = pending.pop(0)
                ids[llm.add_request(ps[i], params[i])] = i
        if ids and rng.random() < 0.05:  # abort a random live request now and then
            victim = rng.choice([r for r in ids if r in llm.requests] or [None])
            if victim is not None:
                llm.abort(victim)
        for out in llm.step():
            if out.finished:
                assert out.request_id not in outputs
                outputs[out.request_id] = out
                if out.finish_reason == "abort":
                    aborted.add(out.request_id)
    assert set(outputs) == set(ids)
    assert llm.num_preemptions > 0, "the pool should have been too small to avoid preemption"
    assert 0 < len(aborted) < n
    assert llm.blocks.num_free == llm.blocks.num_blocks and not any(llm.blocks.ref_count)
    assert not llm.running and not llm.waiting and not llm.requests
    iso = make(small_ckpt)
    for rid, out in outputs.items():
        if out.finish_reason != "abort":
            i = ids[rid]
            assert len(out.token_ids) == params[i].max_new_tokens
            assert iso.generate(ps[i], params[i]).token_ids == out.token_ids, f"request {i}"


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_streaming_api(small_ckpt, overlap):
    llm = make(small_ckpt, overlap=overlap)
    a = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    b = llm.add_request([4, 5], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    deltas, final = {a: [], b: []}, {}
    for out in llm.stream():
        deltas[out.request_id].append(out.new_text)
        assert len(out.new_token_ids) == 1
        if out.finished:
            final[out.request_id] = out
    for rid in (a, b):
        assert "".join(deltas[rid]) == final[rid].text == llm.tokenizer.decode(final[rid].token_ids)
    assert len(final[a].token_ids) == 5 and len(final[b].token_ids) == 3


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_abort(small_ckpt, overlap):
    llm = make(small_ckpt, overlap=overlap)
    rid = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    llm.step()
    llm.abort(rid)
    outs = llm.step()
    assert [o.finish_reason for o in outs] == ["abort"] and outs[0].request_id == rid
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks
    llm.abort(12345)  # unknown ids are ignored


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_max_model_len_stops_generation(small_ckpt, overlap):
    llm = make(small_ckpt, max_model_len=10, overlap=overlap)
    out = llm.generate([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_errors(small_ckpt):
    llm = make(small_ckpt, max_model_len=64, num_kv_blocks=8)
    with pytest.raises(ValueError, match=r"70 tokens, more than max_model_len = 64"):
        llm.add_request(list(range(70)))
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.add_request([])
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.add_request("")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.add_request([1, 2], {"temperature": 0})
    with pytest.raises(ValueError, match=r"more than the whole KV cache \(8 blocks\)"):
        llm.add_request(list(range(30)), SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([5000])
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate([[1], [2], [3]], [SamplingParams(), SamplingParams()])
    assert not llm.has_unfinished()
    with pytest.raises(ValueError, match="base model"):
        base = make(small_ckpt)
        base.chat_format = "raw"
        base.chat("hi")


def test_static_decode_path(small_ckpt):
    """The CUDA-graph decode path (padded to a bucket, static buffers, static max_context_len) runs eagerly on the
    CPU and gives the same tokens as the plain path, for batch sizes that are not buckets."""
    ps = prompts(5, 1, 50, 21)
    params = params_mix(5, 22)
    plain = make(small_ckpt, cuda_graphs=False).generate(ps, params)
    llm = make(small_ckpt, cuda_graphs=True, max_num_seqs=8, max_model_len=128)
    assert llm.graphs is not None and not llm.graphs.capture and llm.graphs.buckets == [1, 2, 4, 8]
    assert [o.token_ids for o in llm.generate(ps, params)] == [o.token_ids for o in plain]


def test_static_decode_path_through_kernels(small_ckpt, monkeypatch):
    """The graph-bucket decode path through the Triton kernels (interpreter on the CPU): pad rows (slot -1,
    context 0) and a static max_context_len far beyond the contexts do not change the tokens."""
    ps = prompts(3, 2, 20, 23)
    params = [SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)] * 3
    plain = make(small_ckpt, cuda_graphs=False).generate(ps, params)
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    llm = make(small_ckpt, cuda_graphs=True, max_num_seqs=4, max_model_len=64)
    assert [o.token_ids for o in llm.generate(ps, params)] == [o.token_ids for o in plain]


def test_one_token_prefill_chunk_beside_decodes(small_ckpt):
    """A decode batch that also carries a 1-token prefill chunk which is not its prompt's last token must not go
    through the decode-graph path (it used to hand the sampler one row too many and leave the engine broken)."""
    def run(**kw):
        llm = make(small_ckpt, max_num_batched_tokens=2, max_num_seqs=4, max_model_len=128, **kw)
        a = llm.add_request([1, 2], SamplingParams(temperature=0.8, seed=5, max_new_tokens=6, ignore_eos=True))
        outs = {}
        for _ in range(2):
            outs.update({o.request_id: o for o in llm.step() if o.finished})
        b = llm.add_request(list(range(3, 13)), SamplingParams(temperature=0.8, seed=6, max_new_tokens=4,
                                                                ignore_eos=True))
        outs.update({o.request_id: o for o in llm.stream() if o.finished})
        return [outs[a].token_ids, outs[b].token_ids]
    assert run(cuda_graphs=True) == run(cuda_graphs=False)


def test_failed_step_leaves_the_engine_consistent(small_ckpt, monkeypatch):
    """A step whose forward raises changes nothing: the error reaches the caller, later steps carry on, and the
    outputs are those of a run without the failure."""
    ps, params = prompts(4, 3, 30, 31), params_mix(4, 32)
    expected = [o.token_ids for o in make(small_ckpt).generate(ps, params)]
    llm = make(small_ckpt, max_num_batched_tokens=16)
    ids = [llm.add_request(p, sp) for p, sp in zip(ps, params)]
    real, calls = llm.model.forward, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) in (2, 5):
            raise RuntimeError("injected failure")
        return real(*args, **kw)

    monkeypatch.setattr(llm.model, "forward", flaky)
    done, failures = {}, 0
    while llm.has_unfinished():
        try:
            outs = llm.step()
        except RuntimeError as e:
            assert "injected" in str(e)
            failures += 1
            continue
        done.update({o.request_id: o for o in outs if o.finished})
    assert failures == 2 and [done[i].token_ids for i in ids] == expected
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_outputs_are_views_as_of_their_step(small_ckpt):
    llm = make(small_ckpt)
    rid = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    seen = [o for o in llm.stream() if o.request_id == rid]
    assert [len(o.token_ids) for o in seen] == [1, 2, 3, 4]
    assert [o.new_token_ids[0] for o in seen] == seen[-1].token_ids
    assert "".join(o.new_text for o in seen) == seen[-1].text and seen[-1].prompt_token_ids == [1, 2, 3]


def test_qwen_int8_mode_independent_of_the_batch(tiny_ckpt, tiny_ref, monkeypatch):
    """kv_quant_mode="qwen" quantizes each written chunk as one unit, so a request's chunks must not depend on the
    rest of the batch: a prompt is never split (not by a budget below its length, not beside decoding neighbours)
    and a preempted request recomputes with its original chunks (the prompt, then one token at a time).

    Exact outputs are compared only where the batch is the same (the golden prompt alone, under a budget of one
    token less than its length: it used to be split 21 + 1 and diverge from its second token); elsewhere a different
    batch changes the float rounding, which truncation can amplify (test_kv_int8.py), so the chunks themselves are
    checked."""
    case = tiny_ref["cases"]["kv_int8/generate/text"]
    prompt, n = case["input_ids"], case["max_new_tokens"]
    greedy = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)

    def engine(**kw):
        kw.setdefault("num_kv_blocks", 64)
        return LLM(tiny_ckpt, device="cpu", dtype=torch.float32, kv_cache_dtype="int8", kv_quant_mode="qwen",
                   block_size=4, **kw)

    alone = engine().generate(prompt, greedy).token_ids
    assert engine(max_num_batched_tokens=len(prompt) - 1).generate(prompt, greedy).token_ids == alone

    chunks = {}  # request id -> chunk sizes in launch order (a recomputation starts a new list)

    def watch(llm):
        real = llm.scheduler.commit

        def commit(batch, sampled):
            for seq, k in batch:
                runs = chunks.setdefault((id(llm), seq.request_id), [])
                if seq.num_computed == 0:
                    runs.append([])
                runs[-1].append(k)
            return real(batch, sampled)

        monkeypatch.setattr(llm.scheduler, "commit", commit)
        return llm

    neighbours = prompts(3, 2, 9, 33, vocab=151000)
    llm = watch(engine(max_num_batched_tokens=len(prompt) + 2))
    longer = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    others = [llm.add_request(p, longer) for p in neighbours]
    for _ in range(3):
        llm.step()  # the neighbours are decoding when the prompt arrives
    rid = llm.add_request(prompt, greedy)
    list(llm.stream())
    small = watch(engine(num_kv_blocks=20, max_num_seqs=4))  # too few blocks for all: preemption, recomputation
    small_ids = [small.add_request(p, sp) for p, sp in zip([prompt] + neighbours, [greedy] + [longer] * 3)]
    list(small.stream())
    assert small.num_preemptions > 0
    recomputed = 0
    reqs = [(id(llm), r) for r in [rid] + others] + [(id(small), r) for r in small_ids]
    for req, p in zip(reqs, [prompt] + neighbours + [prompt] + neighbours):
        for run in chunks[req]:
            assert run[0] == len(p) and set(run[1:]) <= {1}, (req, run)  # whole prompt, then one token at a time
        recomputed += len(chunks[req]) > 1
    assert recomputed > 0
