"""The scheduler alone (plain Python, no model): budgets, decode-first order, admission, preemption, prefix-cache
registration, overlap bookkeeping (pending tokens) and whole-prompt chunks."""
import pytest

from nanoqwen import SamplingParams
from nanoqwen.engine.scheduler import FINISHED, RUNNING, WAITING, Scheduler, Sequence
from nanoqwen.kv_cache import BlockManager

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=16, max_model_len=256, whole=False, caching=True):
    blocks = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    return Scheduler(blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                     seq_length=1024, use_dynamic_ntk=True, whole_prompt_chunks=whole)


def seq(rid, n_prompt, max_new=8, first=0):
    return Sequence(rid, list(range(first, first + n_prompt)), SamplingParams(max_new_tokens=max_new), seed=rid)


def run_step(s, sample_value=7):
    """Schedule, commit, and 'read' every sampled token at once (the non-overlapped loop)."""
    batch = s.schedule()
    sampled = [q for q, n in batch if q.num_computed + n == q.num_tokens]
    s.commit(batch, sampled)
    for q in sampled:
        q.num_pending -= 1
        q.token_ids.append(sample_value)
        if q.num_output >= q.params.max_new_tokens:
            s.finish(q, "length")
    return [(q.request_id, n) for q, n in batch]


def test_chunked_prefill_and_decode_first():
    s = make(budget=10)
    a, b = seq(0, 23), seq(1, 3)
    s.add(a)
    s.add(b)
    assert run_step(s) == [(0, 10)]  # the budget cuts the first prompt; the second waits for room
    assert run_step(s) == [(0, 10)]
    assert run_step(s) == [(0, 3), (1, 3)]  # the last chunk samples; the other prompt joins
    assert a.num_output == 1 and b.num_output == 1
    assert run_step(s) == [(0, 1), (1, 1)]  # decodes, oldest first
    assert [q.slot for q in (a, b)] == [0, 1] and s.running == [a, b]


def test_prefix_cache_registers_only_new_blocks(monkeypatch):
    s = make(budget=5)
    calls = []
    real = s.blocks.register
    monkeypatch.setattr(s.blocks, "register", lambda *a: calls.append(a[3:]) or real(*a))
    a = seq(0, 17)
    s.add(a)
    for _ in range(4):
        run_step(s)
    assert calls == [(0, 1), (1, 2), (2, 3), (3, 4)]  # block i registered once, by the step that completes it
    b = seq(1, 17)
    s.add(b)
    run_step(s)
    assert b.metrics["cached_tokens"] == 16 and b.num_registered == 4


def test_preemption_of_the_newest_and_recompute():
    s = make(num_blocks=8, budget=64)  # each request alone fits (8 + 20 tokens: 7 blocks), both do not
    a, b = seq(0, 8, max_new=20), seq(1, 8, max_new=20, first=100)
    s.add(a)
    s.add(b)
    run_step(s)  # 2 + 2 blocks, 4 left
    for _ in range(9):  # both grow to 4 blocks by token 13; at 17 a fifth each would make 10: b (the newest) goes
        run_step(s)
    assert s.num_preemptions >= 1 and b.status == WAITING and b.num_computed == 0 and b.slot is None
    assert a.status == RUNNING and len(a.block_table) * BS >= a.num_computed
    assert b.ntk_index is not None  # kept for the recomputation
    while a.status != FINISHED:
        run_step(s)
    n = b.num_tokens
    [(rid, k)] = run_step(s)  # b is readmitted and recomputes prompt + generated tokens in one chunk (less
    assert rid == 1 and k <= n and (n - k) % BS == 0  # the prompt blocks the prefix cache still holds)
    assert b.status == RUNNING and b.num_computed == n and b.num_tokens == n + 1  # and samples its next token


def test_pending_tokens_overlap_bookkeeping():
    """A launched step's sampled token counts before its value is read: the next step is scheduled with exact
    counts, a sequence whose pending token reaches max_new_tokens is not scheduled again."""
    s = make(budget=64)
    a = seq(0, 5, max_new=2)
    s.add(a)
    batch = s.schedule()
    s.commit(batch, [a])
    assert a.num_pending == 1 and a.num_tokens == 6 and a.num_output == 1
    batch = s.schedule()  # step 2 before step 1's token is read: a decode of the pending token
    assert [(q.request_id, n) for q, n in batch] == [(0, 1)]
    s.commit(batch, [a])
    assert a.num_pending == 2 and a.num_output == 2
    assert s.schedule() == []  # two tokens pending = max_new_tokens: nothing more to run for a


def test_preempted_with_pending_token_waits_for_it():
    s = make(num_blocks=4, budget=64)
    a, b = seq(0, 7, max_new=20), seq(1, 7, max_new=20, first=50)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.commit(batch, [a, b])
    s.preempt(b)
    assert b.num_pending == 1 and b.status == WAITING
    s.finish(a, "abort")
    assert [q for q, _ in s.schedule()] == []  # b's last token value is not known yet: it cannot be recomputed
    b.num_pending -= 1
    b.token_ids.append(3)
    assert [(q.request_id, n) for q, n in s.schedule()] == [(1, 4)]  # its first block from the prefix cache


def test_whole_prompt_chunks():
    """int8 "qwen" mode: a prompt is one chunk even beyond the budget (the step's only big chunk), and a
    recomputation repeats the original chunks: the prompt, then one token at a time."""
    s = make(budget=5, whole=True, caching=False)
    a, b = seq(0, 9, max_new=4), seq(1, 7, max_new=4, first=30)
    s.add(a)
    s.add(b)
    assert run_step(s) == [(0, 9)]  # over the budget, alone among prompts
    assert run_step(s) == [(0, 1), (1, 7)]  # uncut beside decodes: the one big chunk of this step
    s.preempt(a)
    assert run_step(s) == [(1, 1), (0, 9)]  # the recomputation starts with the whole prompt
    assert run_step(s) == [(1, 1), (0, 1)]
    assert run_step(s) == [(1, 1), (0, 1)]


def test_finish_and_abort_free_everything():
    s = make()
    qs = [seq(i, 3 + i) for i in range(5)]
    for q in qs:
        s.add(q)
    run_step(s)
    s.finish(qs[0], "abort")
    s.finish(qs[4], "stop")
    extra = seq(9, 4)
    s.add(extra)
    s.finish(extra, "abort")  # waiting requests can be aborted too
    for q in qs[1:4]:
        s.finish(q, "length")
    assert not s.running and not s.waiting
    assert s.blocks.num_free == s.blocks.num_blocks and sorted(s.free_slots) == list(range(8))


@pytest.mark.parametrize("whole", [False, True])
def test_random_workload_invariants(whole):
    """Random arrivals, lengths, aborts and a tight pool: every step's batch fits the budget (one oversize prompt
    at most in whole-prompt mode), blocks cover every scheduled token, nothing leaks."""
    import random
    rng = random.Random(5)
    s = make(num_blocks=24, max_num_seqs=6, budget=12, whole=whole, caching=not whole)
    live, rid = [], 0
    for _ in range(400):
        if rng.random() < 0.4:
            q = seq(rid, rng.randint(1, 30), max_new=rng.randint(1, 10), first=rng.randrange(1000))
            rid += 1
            s.add(q)
            live.append(q)
        if live and rng.random() < 0.05:
            s.finish(live.pop(rng.randrange(len(live))), "abort")
        batch = s.schedule()
        sizes = [n for _, n in batch]
        big = [n for n in sizes if n > 1]
        assert sum(sizes) <= s.max_num_batched_tokens or (whole and len(big) == 1), sizes
        for q, n in batch:
            assert len(q.block_table) * BS >= q.num_computed + n and q.status == RUNNING
        sampled = [q for q, n in batch if q.num_computed + n == q.num_tokens]
        s.commit(batch, sampled)
        for q in sampled:
            q.num_pending -= 1
            q.token_ids.append(1)
            if q.num_output >= q.params.max_new_tokens:
                s.finish(q, "length")
                live.remove(q)
    for q in list(live):
        s.finish(q, "abort")
    assert s.blocks.num_free == s.blocks.num_blocks and not any(s.blocks.ref_count)
