"""Tool calling through the server: the ReAct prompt against the format written in QWEN_V1_SPEC.md section 13, the
output parser, and a full round trip (tool_calls out, a tool result back in, a final answer out) on a scripted model.

The scripted model is the golden tiny checkpoint whose sampled logits are replaced, after a prompt of a given length,
by a one-hot margin on the next token of a script: the real engine, stop strings, detokenizer and streaming then turn
a known text into the response.
"""
import json
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the server tests use the openai client: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="the server tests use httpx: pip install -e '.[test]'")

from nanoqwen import LLM  # noqa: E402
from nanoqwen.chat import make_context  # noqa: E402
from nanoqwen.model import Qwen  # noqa: E402
from nanoqwen.serve.app import BackgroundServer, create_app  # noqa: E402
from nanoqwen.serve.react import ReActParser  # noqa: E402
from nanoqwen.tokenizer import IM_END_ID  # noqa: E402

MODEL = "tiny-scripted"
WEATHER = {"name": "get_weather", "description": "Get the current weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                          "required": ["city"]}}
SEARCH = {"name": "search", "description": "Search the web.",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}
QUESTION = "What is the weather in Paris?"
CALL_SCRIPT = ('Thought: I need the weather in Paris.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
               "Observation: it was never called")
ANSWER_SCRIPT = " I now know the final answer.\nFinal Answer: It is 22°C and sunny in Paris."


def spec_instruction(functions) -> str:
    """Section 13's instruction, written out from the spec (not from the server's code)."""
    lines = [f"{f['name']}: Call this tool to interact with the {f['name']} API. What is the {f['name']} API useful "
             f"for? {f['description']} Parameters: {json.dumps(f['parameters'], ensure_ascii=False)}"
             for f in functions]
    return ("Answer the following questions as best you can. You have access to the following APIs:\n\n"
            + "\n\n".join(lines) + "\n\n"
            "Use the following format:\n\n"
            "Question: the input question you must answer\n"
            "Thought: you should always think about what to do\n"
            f"Action: the action to take, should be one of [{', '.join(f['name'] for f in functions)}]\n"
            "Action Input: the input to the action\n"
            "Observation: the result of the action\n"
            "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
            "Thought: I now know the final answer\n"
            "Final Answer: the final answer to the original input question\n\n"
            "Begin!")


class ScriptedQwen(Qwen):
    """After a prompt of `script[0]` tokens, generate the token ids `script[1]`, then <|im_end|>. `delay` seconds of
    sleep per forward make a slow stream (the page test); `fail` makes every forward raise."""
    script = None
    delay = 0.0
    fail = False

    def forward(self, input_ids, meta=None, kv_cache=None):
        if self.fail:
            raise RuntimeError("scripted failure")
        logits = super().forward(input_ids, meta, kv_cache)
        if self.delay:
            time.sleep(self.delay)
        if self.script is None or meta is None:
            return logits
        prompt_len, ids = self.script
        rows = meta.positions if meta.logits_indices is None else meta.positions[meta.logits_indices]
        for r, pos in enumerate(rows.tolist()):
            k = pos + 1 - prompt_len  # index in the script of the token this row samples
            if k >= 0:
                logits[r] = -1e4
                logits[r, ids[k] if k < len(ids) else IM_END_ID] = 1e4
        return logits


@pytest.fixture(scope="module")
def scripted(tiny_ckpt):
    llm = LLM(tiny_ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=512, max_model_len=4096, progress=False)
    llm.model.__class__ = ScriptedQwen  # the same weights; only the sampled rows' logits change when a script is set
    with BackgroundServer(create_app(llm, MODEL)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def script(messages, text, **tokenize_fields):
            """Make the model answer `messages` (as /tokenize counts their prompt) with `text`."""
            r = httpx.post(f"{url}/tokenize", json={"messages": messages, **tokenize_fields}, timeout=30)
            r.raise_for_status()
            llm.model.script = (r.json()["count"], llm.tokenizer.encode(text, allowed_special=set()))

        yield SimpleNamespace(url=url, client=client, llm=llm, script=script, tokenizer=llm.tokenizer)
        llm.model.script = None


def tokenize(url, body) -> list[int]:
    r = httpx.post(f"{url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == len(r.json()["tokens"])
    return r.json()["tokens"]


def tools(*functions):
    return [{"type": "function", "function": f} for f in functions]


# ------------------------------------------------------------------------------------------------ the prompt
def test_tokenize_tools_request_is_the_spec_react_prompt(scripted):
    tok, system = scripted.tokenizer, "You are a helpful assistant."
    messages = [{"role": "user", "content": "\n" + QUESTION + "  "}]  # surrounding newlines/spaces are cleaned
    expected = make_context(tok, f"{spec_instruction([WEATHER, SEARCH])}\n\nQuestion: {QUESTION}", [], system)[1]
    assert tokenize(scripted.url, {"messages": messages, "tools": tools(WEATHER, SEARCH)}) == expected
    assert tokenize(scripted.url, {"messages": messages, "functions": [WEATHER, SEARCH]}) == expected
    # tool_choice "none" renders a plain chat; no tools at all is the same prompt as LLM.chat_context
    plain = scripted.llm.chat_context(QUESTION)
    assert tokenize(scripted.url, {"messages": messages, "tools": tools(WEATHER), "tool_choice": "none"}) == plain
    assert tokenize(scripted.url, {"messages": messages}) == plain


def test_tokenize_history_puts_instruction_in_last_turn_and_observation_opens_the_turn(scripted):
    tok, system = scripted.tokenizer, "Be brief."
    args = '{"city": "Paris"}'
    call = {"role": "assistant", "content": "I need the weather.",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": args}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "22°C"}
    instruction = spec_instruction([WEATHER])
    question = f"{instruction}\n\nQuestion: {QUESTION}"
    answer = f"Thought: I need the weather.\nAction: get_weather\nAction Input: {args}\nObservation: 22°C"

    # ends with the tool result: the assistant turn stays open after "Thought:" (the context minus its last <|im_end|>)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}, call, result]
    closed = make_context(tok, "next", [(question, answer + "\nThought:")], system)[1]
    open_turn = closed[:closed.index(IM_END_ID, len(make_context(tok, question, [], system)[1]))]
    assert tokenize(scripted.url, {"messages": messages, "tools": tools(WEATHER)}) == open_turn

    # a new user question after a finished turn: the instruction stays in the last history turn (the reference's way)
    final = {"role": "assistant", "content": "It is 22°C."}
    messages += [final, {"role": "user", "content": "And tomorrow?"}]
    done = answer + "\nThought: I now know the final answer.\nFinal Answer: It is 22°C."
    expected = make_context(tok, "And tomorrow?", [(question, done)], system)[1]
    assert tokenize(scripted.url, {"messages": messages, "tools": tools(WEATHER)}) == expected


# ------------------------------------------------------------------------------------------------ the parser
PARSER_CASES = [
    (CALL_SCRIPT.split("\nObservation:")[0] + "\n", "I need the weather in Paris.",
     ("get_weather", '{"city": "Paris"}')),
    ("Thought: I now know the final answer.\nFinal Answer: 42 is the answer.\n", "42 is the answer.", None),
    ("Final Answer: at the start", "at the start", None),
    ("just text, no markers  ", "just text, no markers", None),
    ("Thought: x\nAction: f\nAction Inp", "Thought: x\nAction: f\nAction Inp", None),  # never became a call
    ("Thought: x\nFinal Answer: y\nAction: f\nAction Input: {}", "y\nAction: f\nAction Input: {}", None),
    ("Action: lookup\nAction Input:  {\"q\": 1} \nObservation: z", "", ("lookup", '{"q": 1}')),
]


@pytest.mark.parametrize("text,content,call", PARSER_CASES)
def test_react_parser_reads_every_prefix_like_the_whole(text, content, call):
    whole = ReActParser()
    got_content, started, got_args = whole.update(text, final=True)
    assert got_content == content
    assert (whole.call.name, got_args) == call if call else whole.call is None
    streamed, pieces, args = ReActParser(), [], []
    for end in range(1, len(text) + 1):  # every prefix, one character more each time
        c, _, a = streamed.update(text[:end], final=end == len(text))
        pieces.append(c)
        args.append(a)
    assert "".join(pieces) == content and "".join(args) == (call[1] if call else "")


# ------------------------------------------------------------------------------------------------ the round trip
def test_tool_call_and_result_round_trip(scripted):
    client, spec = scripted.client, tools(WEATHER, SEARCH)
    messages = [{"role": "user", "content": QUESTION}]
    scripted.script(messages, CALL_SCRIPT, tools=spec)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=spec)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I need the weather in Paris."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens == scripted.llm.model.script[0]

    # the same with stream: true (the reference refuses it): deltas assemble to the same message
    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=spec, stream=True)
    content, name, arguments, ids, finish = "", "", "", set(), None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                assert t.index == 0
                ids.add(t.id) if t.id else None
                name += t.function.name or ""
                arguments += t.function.arguments or ""
            finish = c.finish_reason or finish
    assert (content, name, arguments, finish) == (choice.message.content, "get_weather", call.function.arguments,
                                                  "tool_calls")
    assert len(ids) == 1

    # the tool's result goes back in as the observation, and the final answer comes back as plain content
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22°C, sunny"}]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    scripted.script(messages, ANSWER_SCRIPT, tools=spec)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=spec)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "It is 22°C and sunny in Paris."
    assert not r.choices[0].message.tool_calls


def test_legacy_functions_give_function_call(scripted):
    messages = [{"role": "user", "content": QUESTION}]
    scripted.script(messages, CALL_SCRIPT, functions=[WEATHER])
    r = scripted.client.chat.completions.create(model=MODEL, messages=messages, functions=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    # a function message goes back in like a tool message
    messages += [{"role": "assistant", "content": None, "function_call": {"name": "get_weather",
                                                                          "arguments": '{"city": "Paris"}'}},
                 {"role": "function", "name": "get_weather", "content": "22°C, sunny"}]
    scripted.script(messages, ANSWER_SCRIPT, functions=[WEATHER])
    r = scripted.client.chat.completions.create(model=MODEL, messages=messages, functions=[WEATHER])
    assert (r.choices[0].finish_reason, r.choices[0].message.content) == ("stop", "It is 22°C and sunny in Paris.")


def test_forced_tool_choice_is_refused(scripted):
    messages = [{"role": "user", "content": QUESTION}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError) as e:
            scripted.client.chat.completions.create(model=MODEL, messages=messages, tools=tools(WEATHER),
                                                    tool_choice=choice)
        assert e.value.body["param"] == "tool_choice" and "auto" in e.value.body["message"]


def test_engine_failure_is_a_500_and_the_server_recovers(scripted):
    messages = [{"role": "user", "content": "Fail now."}]
    scripted.llm.model.fail = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            scripted.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert "scripted failure" in e.value.body["message"] and e.value.body["type"] == "server_error"
        with pytest.raises(openai.APIError, match="scripted failure"):  # an error event inside the stream
            list(scripted.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True))
    finally:
        scripted.llm.model.fail = False
    scripted.script(messages, "Back again.")
    r = scripted.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert r.choices[0].message.content == "Back again."
    assert httpx.get(f"{scripted.url}/health").status_code == 200
