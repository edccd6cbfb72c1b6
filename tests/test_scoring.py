"""Scoring on the golden tiny checkpoint (fp32, CPU): prompt logprobs through the engine (chunked prefill, prefix
caching, preemption), LLM.score / LLM.loglikelihood, the per-run NTK / LogN switches and the perplexity command.

Expected values are the log-softmax of the reference's recorded logits (golden rows only: the reference recorded full
rows at three positions per case) and, for the rows between, of nanoqwen's own full causal forward, which
tests/test_model_golden.py holds to those same golden rows. Tolerance: logits agree with the reference to about 1e-4
in fp32 (golden README), and a log-softmax moves by at most twice its input's error (the logsumexp is 1-Lipschitz):
ATOL = 2e-4.
"""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from nanoqwen import LLM, Qwen, SamplingParams
from nanoqwen import model as model_module

ATOL = 2e-4
CASES = ["fp32/forward/text", "fp32/forward/random", "fp32/forward/long"]  # long: 100 tokens, seq_length 32


def make(ckpt, **kw):
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLM(ckpt, device="cpu", dtype=torch.float32, progress=False, **kw)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return make(tiny_ckpt)


@pytest.fixture(scope="module")
def golden_logprobs(tiny_ref, tiny_ref_tensors):
    """{case: (ids, positions, log-softmax of the reference's logits at those positions [3, vocab])}."""
    out = {}
    for name in CASES:
        case = tiny_ref["cases"][name]
        out[name] = (case["input_ids"], case["positions"],
                     torch.log_softmax(tiny_ref_tensors[f"{name}/logits"].double(), -1))
    return out


def full_forward_logprobs(model, ids) -> torch.Tensor:
    """log-softmax [len(ids), vocab] of nanoqwen's plain causal forward (no cache, no engine)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


def prompt_logprobs(llm, ids, k, **params):
    out = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=k, **params))
    return out.prompt_logprobs


def check_against_golden(plp, ids, positions, golden, k):
    """plp: prompt logprobs of ids (the golden case's ids plus one token, so that its last golden row is a prompt row)."""
    for r, pos in enumerate(positions):
        entry, target = plp[pos + 1], ids[pos + 1]
        assert entry[target] == pytest.approx(golden[r, target].item(), abs=ATOL), f"row {pos}"
        top = sorted(entry.values(), reverse=True)[:k]  # values, not ids: near-ties may swap ranks
        assert top == pytest.approx(golden[r].topk(k).values.tolist(), abs=ATOL)
        for tok, lp in entry.items():
            assert lp == pytest.approx(golden[r, tok].item(), abs=ATOL)


# ------------------------------------------------------------------------------------------------ prompt logprobs
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("budget", [8192, 7], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_match_the_golden_forward(tiny_ckpt, golden_logprobs, name, budget):
    """vLLM's shape: None, then {prompt token, top k} per token; values = log-softmax of the reference's logits, also
    through chunked prefill (chunks of 7 tokens) and beyond seq_length (the long case: NTK alpha 7 and LogN)."""
    ids, positions, golden = golden_logprobs[name]
    ids = ids + [ids[3]]  # one more token: the reference's last recorded row predicts it
    llm = make(tiny_ckpt, max_num_batched_tokens=budget)
    plp = prompt_logprobs(llm, ids, 3)
    assert len(plp) == len(ids) and plp[0] is None
    assert all(ids[i] in plp[i] and len(plp[i]) in (3, 4) for i in range(1, len(ids)))
    check_against_golden(plp, ids, positions, golden, 3)
    full = full_forward_logprobs(llm.model, ids)
    for i in range(1, len(ids)):
        assert plp[i][ids[i]] == pytest.approx(full[i - 1, ids[i]].item(), abs=ATOL), f"token {i}"


def test_prompt_logprobs_with_the_prefix_cache(tiny_ckpt, golden_logprobs):
    """A cached prefix has no logits: a request that asks for prompt logprobs recomputes its prompt (cached_tokens 0)
    and still gets every entry; its blocks still serve later requests."""
    ids, positions, golden = golden_logprobs["fp32/forward/long"]
    ids = ids + [ids[3]]
    llm = make(tiny_ckpt)
    plain = SamplingParams(temperature=0, max_new_tokens=1)
    first = llm.generate(ids, plain)
    assert first.prompt_logprobs is None
    again = llm.generate(ids, plain)
    assert again.metrics["cached_tokens"] > 0  # the cache holds this prompt
    out = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=2))
    assert out.metrics["cached_tokens"] == 0
    check_against_golden(out.prompt_logprobs, ids, positions, golden, 2)
    assert llm.generate(ids, plain).metrics["cached_tokens"] > 0


def test_prompt_logprobs_through_preemption(tiny_ckpt):
    """A pool too small for the batch preempts and recomputes requests: their prompt logprobs come out whole, once
    each, equal to those of a run alone; requests batched with plain ones, and with overlap scheduling."""
    rng = random.Random(5)
    ps = [[rng.randrange(151851) for _ in range(rng.randint(20, 45))] for _ in range(6)]
    params = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                             prompt_logprobs=1 if i % 3 != 2 else None) for i in range(len(ps))]
    llm = make(tiny_ckpt, num_kv_blocks=40, max_num_batched_tokens=24, overlap=True)
    victims, preempt = [], llm.scheduler.preempt
    llm.scheduler.preempt = lambda seq: (victims.append(seq.params.prompt_logprobs), preempt(seq))[1]
    outs = llm.generate(ps, params)
    assert 1 in victims, f"a request with prompt logprobs should have been preempted: {victims}"
    alone = make(tiny_ckpt)
    for p, sp, out in zip(ps, params, outs):
        ref = alone.generate(p, sp)
        assert out.token_ids == ref.token_ids
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        for got, want in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert got.keys() == want.keys()
            assert list(got.values()) == pytest.approx(list(want.values()), abs=ATOL)


def test_only_requests_that_ask_compute_prompt_rows(llm, monkeypatch):
    """Without prompt_logprobs a step asks the model for the logits of its sampled rows only; with it, the prompt rows
    go through token_logprobs and the head never sees more than a slice of rows at once."""
    prompts = [list(range(1000, 1000 + n)) for n in (40, 9, 25)]
    full = full_forward_logprobs(llm.model, prompts[0])
    rows, head_rows = [], []
    forward, logits = llm.model.forward, llm.model.logits
    monkeypatch.setattr(llm.model, "forward", lambda t, meta=None, kv=None: (
        rows.append(len(meta.logits_indices)), forward(t, meta, kv))[1])
    monkeypatch.setattr(llm.model, "logits", lambda h: (head_rows.append(h.shape[0]), logits(h))[1])
    llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3))
    assert rows and max(rows) <= len(prompts) and max(head_rows) <= len(prompts)  # 3 steps, 3 sampled rows each

    head_rows.clear()
    monkeypatch.setattr(model_module, "LOGPROB_SLICE_ELEMENTS", 5 * llm.config.vocab_size)  # 5 rows a slice
    out = llm.generate(prompts[0], SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=0))
    assert max(head_rows) == 5 and sum(head_rows) == 39 + 1  # 39 prompt rows in slices of 5, 1 sampled row
    assert [out.prompt_logprobs[i][t] for i, t in enumerate(prompts[0]) if i] == \
        pytest.approx([full[i - 1, t].item() for i, t in enumerate(prompts[0]) if i], abs=ATOL)


def test_prompt_logprobs_validation():
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


# ------------------------------------------------------------------------------------------------ score / loglikelihood
def test_score_matches_the_golden_rows(llm, golden_logprobs):
    texts = [golden_logprobs[n][0] + [golden_logprobs[n][0][3]] for n in CASES]
    scores = llm.score(texts)
    for name, ids, s in zip(CASES, texts, scores):
        _, positions, golden = golden_logprobs[name]
        assert s.token_ids == ids and len(s.token_logprobs) == len(ids) - 1
        for r, pos in enumerate(positions):
            assert s.token_logprobs[pos] == pytest.approx(golden[r, ids[pos + 1]].item(), abs=ATOL)
        assert s.logprob == pytest.approx(math.fsum(s.token_logprobs), abs=1e-9)
        assert s.perplexity == pytest.approx(math.exp(-s.logprob / (len(ids) - 1)), rel=1e-12)
    one = llm.score("Hello world")  # a single prompt gives a single Score
    assert one.token_ids == llm.encode("Hello world") and len(one.token_logprobs) == len(one.token_ids) - 1


def test_loglikelihood_matches_the_golden_rows(llm, tiny_ref, golden_logprobs):
    """(logprob, is_greedy) of the token after each case's last recorded row, for the reference's argmax there and for
    another token; and of a long continuation, whose sum equals score's and whose greediness follows the reference's
    argmax at every position. The whole sequence is the case's, so NTK alpha is the reference's."""
    pairs, want = [], []
    for name in CASES:
        ids, positions, golden = golden_logprobs[name]
        argmax = tiny_ref["cases"][name]["argmax"]
        assert int(golden[-1].argmax()) == argmax[-1]
        other = (argmax[-1] + 1) % 1000
        pairs += [(ids, [argmax[-1]]), (ids, [other])]
        want += [(golden[-1, argmax[-1]].item(), True), (golden[-1, other].item(), False)]
    for (lp, greedy), (w_lp, w_greedy) in zip(llm.loglikelihood(pairs), want):
        assert lp == pytest.approx(w_lp, abs=ATOL) and greedy == w_greedy

    ids = tiny_ref["cases"]["fp32/forward/random"]["input_ids"]
    argmax = tiny_ref["cases"]["fp32/forward/random"]["argmax"]
    (lp, greedy), = llm.loglikelihood([(ids[:10], ids[10:])])
    assert lp == pytest.approx(math.fsum(llm.score(ids).token_logprobs[9:]), abs=ATOL)
    assert greedy == all(argmax[q - 1] == ids[q] for q in range(10, len(ids)))
    text = llm.loglikelihood([("The capital of France is", " Paris")])
    ids = llm.encode("The capital of France is") + llm.encode(" Paris")
    assert text[0][0] == pytest.approx(llm.score(ids).token_logprobs[-1], abs=ATOL)


def test_loglikelihood_reuses_a_cached_context_only(tiny_ckpt, monkeypatch):
    """Scoring from a later token lets the prefix cache serve the context (whole blocks before the first scored
    position) and never the continuation; the numbers do not change."""
    llm = make(tiny_ckpt)
    context, continuation = list(range(500, 530)), list(range(700, 706))
    first = llm.loglikelihood([(context, continuation)])
    cached = []
    allocate = llm.blocks.allocate
    monkeypatch.setattr(llm.blocks, "allocate", lambda t, h: (lambda r: (cached.append(r[1]), r)[1])(allocate(t, h)))
    second = llm.loglikelihood([(context, continuation)])
    assert cached == [(len(context) - 1) // 4 * 4]  # block_size 4: every whole block before position 29
    assert second[0][1] == first[0][1] and second[0][0] == pytest.approx(first[0][0], abs=ATOL)


def test_scoring_errors(llm):
    with pytest.raises(ValueError, match="empty context"):
        llm.loglikelihood([("", "Paris")])
    with pytest.raises(ValueError, match="empty continuation"):
        llm.loglikelihood([("Paris", [])])
    with pytest.raises(TypeError, match="pairs"):
        llm.loglikelihood(["just a string"])
    with pytest.raises(ValueError, match="load-time overrides"):
        LLM(llm.model, tokenizer=llm.tokenizer, use_logn_attn=False)
    assert not llm.requests and not llm.waiting  # nothing left queued by the refused calls


# ------------------------------------------------------------------------------------------------ NTK / LogN switches
@pytest.fixture(scope="module")
def switched_models(tiny_ckpt):
    """The tiny model loaded under each setting (load-time overrides of config.json)."""
    from nanoqwen.perplexity import SETTINGS
    return {name: Qwen.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, use_dynamic_ntk=ntk,
                                       use_logn_attn=logn) for name, (ntk, logn) in SETTINGS.items()}


def test_switches_change_numbers_beyond_seq_length_only(switched_models, tiny_ref, golden_logprobs):
    """Up to seq_length (32) NTK alpha is 1 and every LogN factor 1, so all four settings compute the same numbers
    exactly; beyond it each switch changes them. With both on, the model is the reference."""
    ids, positions, golden = golden_logprobs["fp32/forward/long"]
    short = {n: full_forward_logprobs(m, ids[:32]) for n, m in switched_models.items()}
    long = {n: full_forward_logprobs(m, ids) for n, m in switched_models.items()}
    for n in short:
        assert torch.equal(short[n], short["ntk+logn"]), n
    for a in long:
        for b in long:
            if a < b:
                assert (long[a][32:] - long[b][32:]).abs().max() > 1e-2, (a, b)  # far beyond fp32 noise (~1e-5)
    torch.testing.assert_close(long["ntk+logn"][positions], golden, atol=ATOL, rtol=0)


def test_switches_reach_the_engine_and_the_kernels(tiny_ckpt, switched_models, golden_logprobs, monkeypatch):
    """LLM(use_dynamic_ntk=, use_logn_attn=) scores as the model loaded that way; and the Triton kernels (run by
    the interpreter) honour the switches as the torch path does."""
    ids = golden_logprobs["fp32/forward/long"][0][:40]
    for name, ntk, logn in (("plain", False, False), ("logn", False, True)):
        llm = make(tiny_ckpt, use_dynamic_ntk=ntk, use_logn_attn=logn)
        full = full_forward_logprobs(switched_models[name], ids)
        assert llm.score(ids).token_logprobs == pytest.approx(
            [full[i, t].item() for i, t in enumerate(ids[1:])], abs=ATOL)
    pytest.importorskip("triton")
    monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
    for name in ("plain", "ntk"):
        triton_lp = full_forward_logprobs(switched_models[name], ids)
        monkeypatch.setenv("NANOQWEN_KERNELS", "torch")
        torch_lp = full_forward_logprobs(switched_models[name], ids)
        monkeypatch.setenv("NANOQWEN_KERNELS", "triton")
        torch.testing.assert_close(triton_lp, torch_lp, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ perplexity
def write_ids(path, ids):
    path.write_text(json.dumps(ids))
    return str(path)


def test_perplexity_from_the_golden_logits(tiny_ckpt, golden_logprobs, tmp_path, capsys):
    """Windows of 2 tokens predict each window's second token from its first (position 0, where NTK and LogN change
    nothing), which the reference recorded for every case: the command's perplexity is theirs."""
    from nanoqwen.perplexity import main
    files, lps = [], []
    for i, name in enumerate(CASES):
        ids, _, golden = golden_logprobs[name]
        files.append(write_ids(tmp_path / f"doc{i}.json", ids[:2]))
        lps.append(golden[0, ids[1]].item())
    out = tmp_path / "ppl.json"
    assert main(["--ckpt", str(tiny_ckpt), "--lengths", "2", "--json", str(out), "--device", "cpu", "--no-plot",
                 "--no-progress", *files]) == 0
    result = json.loads(out.read_text())["results"]["ntk+logn"]["2"]
    assert result["tokens"] == 3 and result["windows"] == 3
    assert result["nll"] == pytest.approx(-sum(lps), abs=3 * ATOL)
    assert result["perplexity"] == pytest.approx(math.exp(-sum(lps) / 3), rel=ATOL)
    assert "ntk+logn" in capsys.readouterr().out


def test_perplexity_command(tiny_ckpt, switched_models, golden_logprobs, tmp_path, capsys):
    """Windows of 100, 50 and 32 tokens over the long case (seq_length 32): the command's numbers are exp(mean NLL)
    of the model's own forward of each window (each from position 0, NTK alpha from the window), for every setting of
    --compare; the switches change nothing at 32 tokens; a table, the JSON and the plot come out."""
    from nanoqwen.perplexity import main
    ids = golden_logprobs["fp32/forward/long"][0]
    doc = write_ids(tmp_path / "long.json", ids)
    out, png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    assert main(["--ckpt", str(tiny_ckpt), "--lengths", "32,50,100", "--compare", "--json", str(out), "--plot",
                 str(png), "--device", "cpu", "--no-progress", "--batch-tokens", "64", doc]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["plain", "ntk", "ntk+logn"]
    for setting, row in results.items():
        for n in (32, 50, 100):
            nll = 0.0
            for a in range(0, len(ids) - n + 1, n):
                window = ids[a:a + n]
                lp = full_forward_logprobs(switched_models[setting], window)
                nll -= sum(lp[j, t].item() for j, t in enumerate(window[1:]))
            tokens = (len(ids) // n) * (n - 1)
            assert row[str(n)]["tokens"] == tokens and row[str(n)]["windows"] == len(ids) // n
            assert row[str(n)]["nll"] == pytest.approx(nll, abs=ATOL * tokens), (setting, n)
        assert row["32"]["perplexity"] == results["plain"]["32"]["perplexity"]
    assert results["plain"]["100"]["perplexity"] != results["ntk+logn"]["100"]["perplexity"]
    printed = capsys.readouterr().out
    assert all(s in printed for s in results) and "tokens" in printed
    try:
        import matplotlib  # noqa: F401
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not png.exists()


GPL = Path("/usr/share/common-licenses/GPL-3")


@pytest.mark.skipif(not GPL.is_file(), reason="no /usr/share/common-licenses/GPL-3 (a text Debian ships) here")
def test_perplexity_of_a_real_document(tiny_ckpt, tmp_path):
    """A text that ships with the system, read by the command as plain text: its windows of 64 tokens (beyond
    seq_length: NTK alpha 3 and LogN) give the perplexity that the engine's scores of the same windows give, through
    chunked prefill and the paged cache: two paths, one number."""
    from nanoqwen.perplexity import main, windows
    text = GPL.read_text(encoding="utf-8")[:2400]
    doc, out = tmp_path / "gpl.txt", tmp_path / "ppl.json"
    doc.write_text(text, encoding="utf-8")
    assert main(["--ckpt", str(tiny_ckpt), "--lengths", "64", "--json", str(out), "--device", "cpu", "--no-plot",
                 "--no-progress", str(doc)]) == 0
    result = json.loads(out.read_text())["results"]["ntk+logn"]["64"]
    llm = make(tiny_ckpt, max_num_batched_tokens=24)
    ids = llm.tokenizer.encode(text, allowed_special=set())
    scores = llm.score(windows(ids, 64))
    tokens = sum(len(s.token_logprobs) for s in scores)
    assert result["tokens"] == tokens == (len(ids) // 64) * 63 > 300
    assert result["nll"] == pytest.approx(-sum(s.logprob for s in scores), abs=ATOL * tokens)


def test_perplexity_command_errors(tiny_ckpt, tmp_path, capsys):
    from nanoqwen.perplexity import main
    assert main(["--ckpt", str(tiny_ckpt), "--device", "cpu", str(tmp_path / "missing.txt")]) == 2
    assert "no file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "ids"}')
    assert main(["--ckpt", str(tiny_ckpt), "--device", "cpu", str(bad)]) == 2
    assert "list of token ids" in capsys.readouterr().err
    for args in (["--lengths", "1"], ["--lengths", "a,b"], ["--compare", "--no-logn"]):
        with pytest.raises(SystemExit):
            main(["--ckpt", str(tiny_ckpt), *args, str(bad)])


def test_scoring_benchmark_runs(golden, tmp_path):
    """benchmarks/scoring.py --tiny: its rows timed and its engine-vs-plain-forward check passed (speed not asserted)."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scoring.py"), "--tiny", "--rounds", "1"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "scoring.json").read_text())
    assert res["ok"] and res["max_abs_diff"] <= res["tolerance"] == 2e-4
    assert [row["row"] for row in res["rows"]] == ["engine prefill only", "engine score", "engine prompt_logprobs=5",
                                                   "plain forward"]
    assert all(row["tok_s"] > 0 for row in res["rows"])
