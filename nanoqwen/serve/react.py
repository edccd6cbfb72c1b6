"""Tool calling in the ReAct text format Qwen (v1) chat models were trained on (QWEN_V1_SPEC.md section 13).

`chat_prompt` turns OpenAI messages (with `tools` or the legacy `functions`) into the ChatML prompt ids, with the tool
descriptions and the ReAct instruction in the user turn, earlier calls as "Action:" / "Action Input:" lines and tool
results as "Observation:" lines. `ReActParser` turns the generated text back into content and a tool call. It reads
the text as it grows, so a streamed answer and a non-streamed one are cut the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..chat import make_context
from .protocol import APIError

DEFAULT_SYSTEM = "You are a helpful assistant."
OBSERVATION_STOP = "Observation:"

TOOL_DESC = ("{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} "
             "API useful for? {description_for_model} Parameters: {parameters}")
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


def react_instruction(functions: list[dict]) -> str:
    """The instruction that lists the tools, exactly as section 13 writes it."""
    lines, names = [], []
    for f in functions:
        name = f.get("name", "")
        name_m, name_h = f.get("name_for_model") or name, f.get("name_for_human") or name
        desc = f.get("description") or ""
        lines.append(TOOL_DESC.format(name_for_model=name_m, name_for_human=name_h,
                                      description_for_model=f.get("description_for_model") or desc,
                                      parameters=json.dumps(f.get("parameters") or {}, ensure_ascii=False)))
        names.append(name_m)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(lines),
                                    tools_name_text=", ".join(names)).lstrip("\n").rstrip()


def _clean(text: str | None) -> str:
    return (text or "").lstrip("\n").rstrip()


def _flatten(messages: list[dict]) -> list[dict]:
    """OpenAI's current shapes in the legacy ones the format knows: `developer` is `system`, a `tool` message is a
    `function` result, and an assistant message with several `tool_calls` becomes one call per message, each followed
    by its result (matched by `tool_call_id`, else by order): ReAct has one Action per Observation."""
    out, i = [], 0
    while i < len(messages):
        m = dict(messages[i])
        i += 1
        if m["role"] == "developer":
            m["role"] = "system"
        if m["role"] == "tool":
            m["role"] = "function"
        calls = m.pop("tool_calls", None) or []
        if m["role"] != "assistant" or not calls:
            out.append(m)
            continue
        results = []
        while i < len(messages) and messages[i]["role"] == "tool":
            results.append(messages[i])
            i += 1
        by_id = {r.get("tool_call_id"): r for r in results if r.get("tool_call_id")}
        unused = dict.fromkeys(range(len(results)))
        for n, call in enumerate(calls):
            out.append({"role": "assistant", "content": m.get("content") if n == 0 else None,
                        "function_call": call["function"]})
            result = by_id.get(call.get("id")) or (results[n] if n < len(results) else None)
            k = next((k for k in unused if results[k] is result), None)
            if k is not None:
                del unused[k]
                out.append({"role": "function", "content": result.get("content")})
        out += [{"role": "function", "content": results[k].get("content")} for k in unused]
    return out


@dataclass
class Conversation:
    """What `make_context` takes, plus `open_answer`: the start of an assistant turn the model is to continue (the
    conversation ends with a tool result or an assistant message), or None when it ends with a user query."""
    system: str
    history: list[tuple[str, str]]
    query: str | None
    open_answer: str | None


def to_conversation(messages: list[dict], functions: list[dict] | None) -> Conversation:
    """The reference's message handling (section 13), with its errors as 400s that say what to fix.

    `messages` are plain dicts (role, content as a string, function_call / tool_calls, tool_call_id)."""
    messages = _flatten(messages)
    if not any(m["role"] == "user" for m in messages):
        raise APIError(400, "messages must hold at least one user message", "messages")
    system = DEFAULT_SYSTEM
    if messages[0]["role"] == "system":
        system = _clean(messages.pop(0)["content"])
    instruction = react_instruction(functions) if functions else ""
    turns: list[dict] = []  # alternating user / assistant, tool results folded into the assistant answers
    for m in messages:
        role, content, call = m["role"], _clean(m.get("content")), m.get("function_call")
        if role == "system":
            raise APIError(400, "a system (or developer) message may only come first: Qwen's chat format has one "
                                "system prompt; merge them into the first message", "messages")
        if role == "function":
            if not turns or turns[-1]["role"] != "assistant":
                raise APIError(400, "a tool (or function) message must follow the assistant message that called the "
                                    "tool", "messages")
            turns[-1]["content"] += f"\nObservation: {content}"
        elif role == "assistant":
            if not turns:
                raise APIError(400, "the first message after the system prompt must be a user message, not an "
                                    "assistant one", "messages")
            if call is None:
                if functions:
                    content = f"Thought: I now know the final answer.\nFinal Answer: {content}"
            else:
                if not content.startswith("Thought:"):
                    content = f"Thought: {content}"
                content = f"{content}\nAction: {call['name']}\nAction Input: {call['arguments']}"
            if turns[-1]["role"] == "user":
                turns.append({"role": "assistant", "content": _clean(content)})
            else:
                turns[-1]["content"] += "\n" + content
        else:  # user
            if turns and turns[-1]["role"] == "user":
                raise APIError(400, "two user messages in a row: Qwen's chat format pairs every user message with an "
                                    "assistant answer; merge them into one message", "messages")
            turns.append({"role": "user", "content": content})
    if messages[-1]["role"] == "function":
        turns[-1]["content"] += "\nThought:"  # the model goes on after the last observation
    query = None
    if turns[-1]["role"] == "user":
        query = turns.pop()["content"]
    history = [(_clean(turns[k]["content"]), _clean(turns[k + 1]["content"])) for k in range(0, len(turns), 2)]
    if instruction:  # the reference puts it in the last history turn when there is one, even before a new query
        if history:
            q, a = history[-1]
            history[-1] = (f"{instruction}\n\nQuestion: {q}", a)
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    open_answer = None
    if query is None:
        query, open_answer = history.pop()
    return Conversation(system, history, query, open_answer)


def chat_prompt_ids(tokenizer, conversation: Conversation, max_window_size: int) -> list[int]:
    """The ChatML prompt ids: `make_context` of the conversation, and for an open answer the assistant turn left
    open after its text (the context with its final <|im_end|> removed, as the reference continues it)."""
    c = conversation
    ids = make_context(tokenizer, c.query, c.history, c.system, max_window_size)[1]
    if c.open_answer is not None:
        ids = ids + tokenizer.encode(c.open_answer, allowed_special=set())
    return ids


FINAL_ANSWER, ACTION, ACTION_INPUT, OBSERVATION = "\nFinal Answer: ", "\nAction:", "\nAction Input:", "\nObservation:"


@dataclass
class ToolCall:
    name: str
    arguments: str = ""


class ReActParser:
    """Reads the generated text as it grows and says what is content and what is a tool call.

    The text is undecided until a marker completes: "Final Answer: " (the content is what follows it) or "Action:"
    then "Action Input:" (a call: its name between them, its arguments after, the content the thought before
    "Action:" without its "Thought: " prefix). Whichever completes first decides, so every prefix of the text is read
    the same way as the whole; a marker at the very start counts as if a newline preceded it. Text that never
    decides is content as a whole. Content and arguments are stripped of surrounding whitespace. This follows the
    reference's `parse_response`, except that it takes the first "Final Answer:" where the reference takes the last
    (a stream cannot take back text it has sent) and that a Final Answer before an Action wins.

    `update(text, final)` returns the new content text, whether the call became known (its name), and the new
    argument text since the last call; call it with every longer text, and `final=True` at the end.
    """

    def __init__(self):
        self.mode: str | None = None  # None (undecided), "answer" or "call"
        self.call: ToolCall | None = None
        self._start = 0  # where the content (answer mode) or the arguments (call mode) start in the text
        self._sent = 0  # characters of content or arguments sent, counted from after their leading whitespace
        self._thought = ""

    def _decide(self, text: str) -> None:
        padded = "\n" + text  # positions in `padded` are one more than in `text`
        fa = padded.find(FINAL_ANSWER)
        i = padded.find(ACTION)
        j = padded.find(ACTION_INPUT, i) if i >= 0 else -1
        answer_end = fa + len(FINAL_ANSWER) - 1 if fa >= 0 else None
        call_end = j + len(ACTION_INPUT) - 1 if j >= 0 else None
        if answer_end is not None and (call_end is None or answer_end <= call_end):
            self.mode, self._start = "answer", answer_end
        elif call_end is not None:
            thought = text[:max(i - 1, 0)]
            t = thought.find("Thought: ")
            self._thought = (thought[t + len("Thought: "):] if t >= 0 else thought).strip()
            self.mode, self._start = "call", call_end
            self.call = ToolCall(padded[i + len(ACTION):j].strip())

    def _stream(self, text: str, final: bool) -> str:
        """New characters of text[self._start:], without leading whitespace, holding back trailing whitespace
        (dropped if nothing follows it) and, in call mode, what is or may become "\nObservation:" and after it."""
        body = text[self._start:]
        if self.mode == "call":
            k = body.find(OBSERVATION)
            if k >= 0:
                body = body[:k]
            elif not final:
                body = body[:len(body) - _partial_suffix(body, OBSERVATION)]
        body = body.lstrip().rstrip()
        new, self._sent = body[self._sent:], max(self._sent, len(body))
        return new

    def update(self, text: str, final: bool = False) -> tuple[str, bool, str]:
        """-> (content delta, call started now, arguments delta)."""
        if self.mode is None:
            self._decide(text)
            if self.mode is None:
                return (text.strip(), False, "") if final else ("", False, "")
            if self.mode == "call":
                return self._thought, True, self._stream(text, final)
        if self.mode == "answer":
            return self._stream(text, final), False, ""
        return "", False, self._stream(text, final)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
