"""End to end on the golden tiny chat checkpoint: greedy generation, logprobs, chat and the command line."""
import subprocess
import sys

import pytest
import torch

from conftest import NO_TRITON, ROOT
from nanoqwen import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=256)


def greedy(case):
    return SamplingParams(temperature=0, repetition_penalty=case["repetition_penalty"],
                          max_new_tokens=case["max_new_tokens"])


GENERATE = ["fp32/generate/text", "fp32/generate/text_rep1.1", "fp32/generate/chat_context_rep1.1",
            "fp32/generate/chat_context_rep1.0", "fp32/generate/long", "fp32/generate/cross_seq_length"]


@pytest.mark.parametrize("name", GENERATE)
def test_greedy_generate(llm, tiny_ref, name):
    case = tiny_ref["cases"][name]
    out = llm.generate(case["input_ids"], greedy(case))
    assert out.token_ids == case["output_ids"]
    assert out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(case["output_ids"])


def test_first_token_logprobs(llm, tiny_ref, tiny_ref_tensors):
    case = tiny_ref["cases"]["fp32/forward/text"]
    assert case["positions"][-1] == len(case["input_ids"]) - 1
    expected = torch.log_softmax(tiny_ref_tensors["fp32/forward/text/logits"][-1].double(), -1)
    out = llm.generate(case["input_ids"], SamplingParams(temperature=0, max_new_tokens=2, logprobs=5,
                                                         repetition_penalty=1.1))
    first = out.logprobs[0]
    top_ids = expected.topk(5).indices.tolist()
    assert [i for i, _ in first["top"]] == top_ids
    for i, lp in first["top"]:
        assert abs(lp - float(expected[i])) < 1e-4
    assert abs(first["logprob"] - float(expected[first["token_id"]])) < 1e-4
    assert len(out.logprobs) == 2


def test_chat_golden(llm, tiny_ref):
    case = tiny_ref["cases"]["chat"]
    history = []
    params = SamplingParams(temperature=0, repetition_penalty=case["repetition_penalty"],
                            max_new_tokens=case["max_new_tokens"])
    for turn in case["turns"]:
        assert llm.chat_context(turn["query"], history, case["system"]) == turn["context_ids"]
        response, new_history = llm.chat(turn["query"], history, case["system"], params)
        # the reference drops the last token when no stop token came (spec 11.9); nanoqwen keeps it
        assert response == llm.tokenizer.decode(turn["output_ids"]).strip()
        assert new_history[-1] == (turn["query"], response) and len(new_history) == len(history) + 1
        history = history + [(turn["query"], turn["response"])]  # the reference's history, for its next context


def test_chat_stream_deltas(llm, tiny_ref):
    turn = tiny_ref["cases"]["chat"]["turns"][0]
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
    deltas = list(llm.chat_stream(turn["query"], None, params=params))
    assert len(deltas) > 1
    assert "".join(deltas) == llm.tokenizer.decode(turn["output_ids"])


def test_chat_defaults_from_generation_config(llm):
    p = llm.default_params
    assert (p.top_p, p.top_k, p.repetition_penalty, p.temperature, p.max_new_tokens) == (0.8, 0, 1.1, 1.0, 512)
    assert llm.chat_format == "chatml"


def test_stop_token_ends_chat(llm):
    """Chat models stop at <|im_end|>, <|im_start|> or <|endoftext|> directly (no forced 2^15 logit)."""
    ids = llm.chat_context("你好")
    ref = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    stop_at = ref.token_ids[2]
    out = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[stop_at]))
    assert out.token_ids == ref.token_ids[:3] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(ref.token_ids[:2])


def test_stop_string(llm):
    ids = llm.chat_context("你好")
    ref = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=8))
    cut = ref.text[3:5]
    out = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=8, stop=[cut]))
    assert out.finish_reason == "stop" and out.text == ref.text[:ref.text.find(cut)]


def test_seeded_sampling_reproducible(llm):
    ids = llm.chat_context("你好")
    p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=1234)
    a, b = llm.generate(ids, p), llm.generate(ids, p)
    assert a.token_ids == b.token_ids
    c = llm.generate(ids, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=4321))
    assert c.token_ids != a.token_ids


def cli(*args, stdin=None, timeout=300, module="nanoqwen.generate"):
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_cli_one_shot(tiny_ckpt, tiny_ref):
    turn = tiny_ref["cases"]["chat"]["turns"][0]
    r = cli("--ckpt", str(tiny_ckpt), "--prompt", turn["query"], "--temperature", "0", "--repetition-penalty", "1.0",
            "--max-new-tokens", "12", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    from nanoqwen import Tokenizer
    assert r.stdout.strip() == Tokenizer.from_pretrained(tiny_ckpt).decode(turn["output_ids"]).strip()
    assert "prompt tokens: 20, new tokens: 12" in r.stderr and "decode:" in r.stderr


def test_cli_interactive(tiny_ckpt):
    import re
    from nanoqwen import Tokenizer
    from nanoqwen.chat import make_context
    r = cli("--ckpt", str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "3",
            stdin="你好\nTell me a story.\n:clear\nTell me a story.\n:quit\nnever read\n")
    assert r.returncode == 0, r.stderr
    lens = [int(n) for n in re.findall(r"prompt tokens: (\d+)", r.stderr)]
    assert len(lens) == 3 and "history cleared" in r.stderr
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    fresh = len(make_context(tok, "Tell me a story.", system="You are a helpful assistant.")[1])
    assert lens[0] == 20 and lens[2] == fresh and lens[1] > fresh  # turn 2 carries turn 1; :clear forgot it


def test_cli_bad_ckpt(tmp_path):
    r = cli("--ckpt", "qwen-does-not-exist")
    assert r.returncode != 0 and "unknown checkpoint" in r.stderr and "--ckpt /path/to" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("--ckpt", str(tmp_path / "missing-folder"))
    assert r.returncode != 0 and "no folder" in r.stderr and "Traceback" not in r.stderr
    r = cli("--ckpt", "qwen-7b-chat")  # HF_HUB_OFFLINE=1 in the tests: a clear offline error
    assert r.returncode != 0 and "could not download Qwen/Qwen-7B-Chat" in r.stderr and "Traceback" not in r.stderr


def test_cli_argument_errors_before_loading(tiny_ckpt):
    """Bad sampling flags fail before anything is loaded (the checkpoint named here does not even exist), and bad
    devices with one line each, no traceback."""
    r = cli("--ckpt", "/no/such/folder", "--temperature", "-1")
    assert r.returncode == 2 and "temperature must be >= 0" in r.stderr and "no folder" not in r.stderr
    r = cli("--ckpt", "/no/such/folder", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr
    devices = ["nonsense"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for dev in devices:
        r = cli("--ckpt", str(tiny_ckpt), "--device", dev, "--prompt", "hi")
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


def test_console_script_subcommands(tiny_ckpt, tiny_ref):
    """`nanoqwen COMMAND` (python -m nanoqwen): help lists the commands and each one's usage names itself."""
    r = cli("--help", module="nanoqwen")
    assert r.returncode == 0 and "generate" in r.stdout and "convert" in r.stdout
    r = cli("generate", "--help", module="nanoqwen")
    assert r.returncode == 0 and r.stdout.startswith("usage: nanoqwen generate")
    r = cli("frobnicate", module="nanoqwen")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    turn = tiny_ref["cases"]["chat"]["turns"][0]
    r = cli("generate", "--ckpt", str(tiny_ckpt), "--prompt", turn["query"], "--temperature", "0",
            "--repetition-penalty", "1.0", "--max-new-tokens", "12", "--dtype", "float32", module="nanoqwen")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == llm_text(tiny_ckpt, turn["output_ids"]).strip()


def llm_text(ckpt, ids):
    from nanoqwen import Tokenizer
    return Tokenizer.from_pretrained(ckpt).decode(ids)


def test_special_token_text_in_prompts(llm):
    """Base-model prompts: special-token text becomes the special token, as Qwen's tokenizer does by default;
    special_tokens=False keeps it plain text (chat content always is)."""
    text = "a<|endoftext|>b"
    assert llm.encode(text) == [llm.tokenizer.encode("a")[0], 151643, llm.tokenizer.encode("b")[0]]
    plain = llm.encode(text, special_tokens=False)
    assert 151643 not in plain and llm.tokenizer.decode(plain) == text
    out = llm.generate(text, SamplingParams(temperature=0, max_new_tokens=1), special_tokens=False)
    assert out.prompt_token_ids == plain


def test_interrupted_answer_kept_in_history(llm, monkeypatch, capsys):
    """Ctrl-C during an answer: what was printed is returned (the chat keeps it in its history), the request is
    aborted, and the engine has nothing left running."""
    import io
    from nanoqwen import generate
    real_step, calls = llm.step, []

    def step():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm, "step", step)
    out = io.StringIO()
    text = generate.run(llm, llm.chat_context("你好"), SamplingParams(temperature=0, max_new_tokens=20), out)
    assert text and out.getvalue() == text + "\n" and not llm.has_unfinished()
    assert "stays in the history" in capsys.readouterr().err
    monkeypatch.setattr(llm, "step", real_step)
    history = []
    args = generate.parse_args(["--ckpt", "x"])
    monkeypatch.setattr(generate, "run", lambda *a, **k: "partial answer ")
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    generate.interactive(llm, args, SamplingParams(temperature=0, max_new_tokens=2), history)
    assert history == [("你好", "partial answer")]


def test_cli_ctrl_d_at_the_prompt_ends_the_line(tiny_ckpt):
    """In a terminal, Ctrl-D at `User> ` leaves with a newline, so the shell prompt starts on its own line."""
    import os
    import pty
    import select
    import time
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "nanoqwen.generate", "--ckpt", str(tiny_ckpt), "--dtype", "float32"],
                         stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, cwd=ROOT, close_fds=True)
    os.close(slave)
    seen, deadline = b"", time.time() + 120
    try:
        while b"User> " not in seen and time.time() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert b"User> " in seen, seen
        os.write(master, b"\x04")  # Ctrl-D: end of input at the terminal
        assert p.wait(timeout=60) == 0
        rest = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            rest += chunk
        assert rest.replace(b"\r", b"") == b"\n", rest
    finally:
        p.kill()
        os.close(master)


def test_runs_without_triton(tiny_ckpt, tiny_ref):
    """A CPU install without Triton (CPU builds of PyTorch do not bring it): nanoqwen imports, generates through the
    torch references, and NANOQWEN_KERNELS=triton says what is missing."""
    case = tiny_ref["cases"]["fp32/generate/text"]
    code = NO_TRITON + f"""
import os, torch
from nanoqwen import LLM, SamplingParams
from nanoqwen.kernels import HAVE_TRITON
assert not HAVE_TRITON
llm = LLM({str(tiny_ckpt)!r}, device="cpu", dtype=torch.float32, num_kv_blocks=64)
out = llm.generate({case["input_ids"]!r}, SamplingParams(temperature=0, max_new_tokens={case["max_new_tokens"]},
                   repetition_penalty={case["repetition_penalty"]}))
assert out.token_ids == {case["output_ids"]!r}, out.token_ids
os.environ["NANOQWEN_KERNELS"] = "triton"
try:
    llm.generate([1, 2], SamplingParams(temperature=0, max_new_tokens=1))
except RuntimeError as e:
    assert "Triton is not installed" in str(e), e
    print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
