"""The lm-evaluation-harness backend on the golden tiny checkpoint: its three methods called with lm-eval's own
Instance objects return what the engine computes (fp32; tolerance as tests/test_scoring.py: 2e-4 per token), and
`python -m nanoqwen.lm_eval` runs local tasks end to end (the data sets are files made here: the machine is offline).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

try:
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from nanoqwen.lm_eval import NanoQwenLM
except Exception as e:  # absent, or a release before 0.4.10, which fails to import under transformers 5
    pytest.skip(f"the lm-eval backend needs lm-eval >= 0.4.10 ({type(e).__name__}: {e}); pip install -e '.[eval]'",
                allow_module_level=True)

from conftest import ROOT  # noqa: E402
from nanoqwen import LLM, SamplingParams  # noqa: E402
from nanoqwen.tokenizer import EOD_ID  # noqa: E402

ATOL = 2e-4


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=256, block_size=4, progress=False)


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood(llm):
    """lm-eval's pair encoding (the whole text encoded, trailing context spaces moved to the continuation, an empty
    context replaced by <|endoftext|>), then the engine's log-likelihood of the continuation and its greediness."""
    lm = NanoQwenLM(llm=llm)
    pairs = [("The capital of France is", " Paris"), ("Question: 2 + 2 = ", "4"), ("", "Hello there"),
             ("Once upon a time", " there was a little robot who")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    for (context, continuation), (lp, greedy) in zip(pairs, got):
        if context:
            spaces = len(context) - len(context.rstrip())
            ctx = llm.encode(context[:len(context) - spaces])
            whole = llm.encode(context + continuation)
        else:
            ctx, whole = [EOD_ID], [EOD_ID] + llm.encode(continuation)
        with torch.no_grad():
            logprobs = torch.log_softmax(llm.model(torch.tensor([whole]))[0].double(), -1)
        rows = range(len(ctx) - 1, len(whole) - 1)
        assert lp == pytest.approx(sum(logprobs[r, whole[r + 1]].item() for r in rows), abs=ATOL * len(rows))
        assert greedy == all(int(logprobs[r].argmax()) == whole[r + 1] for r in rows)


def test_loglikelihood_truncates_long_contexts(llm):
    """A pair longer than max_length keeps its last max_length tokens."""
    lm = NanoQwenLM(llm=llm, max_length=12)
    context, continuation = list(range(300, 330)), [400, 401, 402]
    (lp, greedy), = lm._loglikelihood_tokens([(None, context, continuation)])
    (want, want_greedy), = llm.loglikelihood([(context[-9:], continuation)])
    assert lp == pytest.approx(want, abs=ATOL) and greedy == want_greedy
    with pytest.raises(ValueError, match="max_length"):
        lm._loglikelihood_tokens([(None, context, list(range(12)))])


@pytest.mark.parametrize("max_length", [64, 16])
def test_loglikelihood_rolling(llm, max_length):
    """Every token predicted once, the first from <|endoftext|>: lm-eval's rolling windows (one window when the text
    fits, several at max_length 16), each scored by the engine in one forward of at most max_length tokens."""
    lm = NanoQwenLM(llm=llm, max_length=max_length)
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Hello world, this is a longer document that needs more than one window when max_length is small.", ""]
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    assert got[2] == 0.0  # nothing to predict
    for text, total in zip(texts[:2], got):
        tokens = llm.encode(text)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, EOD_ID, max_length - 1, 1)]
        assert sum(len(pred) for _, pred in windows) == len(tokens)
        assert all(len(ctx) + len(pred) <= max_length for ctx, pred in windows)
        want = math.fsum(math.fsum(llm.score(ctx + pred).token_logprobs[-len(pred):]) for ctx, pred in windows)
        assert total == pytest.approx(want, abs=ATOL * len(tokens))
        if len(tokens) < max_length:
            assert total == pytest.approx(llm.score([EOD_ID] + tokens).logprob, abs=ATOL * len(tokens))


def test_generate_until(llm):
    """Greedy continuations through the engine, cut at the first `until` string or after max_gen_toks tokens."""
    lm = NanoQwenLM(llm=llm)
    context = "The capital of France is"
    free = llm.generate(context, SamplingParams(temperature=0, max_new_tokens=10, repetition_penalty=1.0)).text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop and free.index(stop) > 0
    got = lm.generate_until(instances("generate_until", [
        (context, {"until": ["\u2603never"], "max_gen_toks": 10}),
        (context, {"until": [stop], "max_gen_toks": 10, "do_sample": False}),
        (context, {"until": "\u2603never", "max_gen_toks": 4, "temperature": 0.0}),
    ]))
    four = llm.generate(context, SamplingParams(temperature=0, max_new_tokens=4, repetition_penalty=1.0)).text
    assert got == [free, free[:free.index(stop)], four]
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until(instances("generate_until", [(context, {"num_beams": 4})]))


def test_backend_arguments(llm, tiny_ckpt):
    with pytest.raises(ValueError, match="ckpt="):
        NanoQwenLM()
    with pytest.raises(ValueError, match="unknown model_args colour"):
        NanoQwenLM(ckpt=str(tiny_ckpt), colour="blue")
    with pytest.raises(ValueError, match="max_length"):
        NanoQwenLM(llm=llm, max_length=10 ** 9)
    assert NanoQwenLM(llm=llm).max_length == llm.config.seq_length


TASKS = {
    "tiny_mc": dict(output_type="multiple_choice", doc_to_text="{{question}}", doc_to_choice="{{choices}}",
                    doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}]),
    "tiny_roll": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                      metric_list=[{"metric": "word_perplexity"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{question}}", doc_to_target="{{choices[answer]}}",
                     generation_kwargs={"until": ["\n"], "max_gen_toks": 6}, metric_list=[{"metric": "exact_match"}]),
}
DOCS = [{"question": "The capital of France is", "choices": [" Paris", " London", " a banana"], "answer": 0,
         "text": "The quick brown fox jumps over the lazy dog."},
        {"question": "One plus one equals", "choices": [" two", " seven"], "answer": 0,
         "text": "A second document, long enough to need two windows at max_length 16 in this test."}]


def test_command_runs_local_tasks(llm, tiny_ckpt, tmp_path):
    """`python -m nanoqwen.lm_eval` (lm-eval's command with the backend registered) on three local tasks, one per
    request type; the logged responses are the engine's numbers for the same requests."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, spec in TASKS.items():  # JSON is YAML
        (tmp_path / f"{name}.yaml").write_text(json.dumps({"task": name, "dataset_path": "json", "test_split": "test",
                                                           "dataset_kwargs": {"data_files": {"test": str(data)}},
                                                           **spec}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nanoqwen.lm_eval", "--model_args",
           f"ckpt={tiny_ckpt},dtype=float32,num_kv_blocks=64,max_length=16", "--device", "cpu",
           "--tasks", ",".join(TASKS), "--include_path", str(tmp_path), "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(results) == set(TASKS)
    lm = NanoQwenLM(llm=llm, max_length=16)
    samples = {name: [json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).open()]
               for name in TASKS}
    for s in samples["tiny_mc"]:  # (the task put its target delimiter, a space, before each choice)
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        assert [c for _, c in pairs] == [" " + c for c in DOCS[s["doc_id"]]["choices"]]
        for resp, (lp, greedy) in zip(s["resps"], lm.loglikelihood(instances("loglikelihood", pairs))):
            assert float(resp[0][0]) == pytest.approx(lp, abs=ATOL * 8) and resp[0][1] == str(greedy)
    for s in samples["tiny_roll"]:
        text = s["arguments"]["gen_args_0"]["arg_0"]
        assert text == DOCS[s["doc_id"]]["text"]
        want, = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
        assert float(s["resps"][0][0]) == pytest.approx(want, abs=ATOL * 32)
    for s in samples["tiny_gen"]:
        args = s["arguments"]["gen_args_0"]
        assert args["arg_1"]["max_gen_toks"] == 6
        want, = lm.generate_until(instances("generate_until", [(args["arg_0"], args["arg_1"])]))
        assert s["resps"][0][0] == want
