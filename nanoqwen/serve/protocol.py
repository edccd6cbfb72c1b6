"""The OpenAI request bodies, their validation, and errors in OpenAI's shape.

Bodies are validated strictly (a string is not a number, a float is not an int, true is not 1) and every failure is
an `APIError` with a 400 that names the field, never FastAPI's 422 `{"detail": ...}`. Unknown fields are ignored, as
OpenAI clients add new ones; known fields that would change the output and are not implemented are refused.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling import SamplingParams


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "server_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(Strict):
    type: str
    text: str | None = None


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None


class FunctionDef(Strict):
    # Qwen's own name_for_model / name_for_human / description_for_model keys are kept (extra="allow")
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedTool(Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(Strict):
    include_usage: bool | None = None


class ResponseFormat(Strict):
    type: str


class Common(Strict):
    """Fields of both endpoints. None means "not given": the default comes from the checkpoint's
    generation_config.json. top_k, repetition_penalty and ignore_eos are extra fields, as vLLM accepts them."""
    model: str | None = None
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    user: str | None = None


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# what a field that accepts several shapes should be, for errors that would otherwise list every shape's complaint
SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of text parts ({"type": "text", "text": "..."})',
    "tool_choice": '"none", "auto", "required" or {"type": "function", "function": {"name": "..."}}',
    "function_call": '"none", "auto" or {"name": "..."}',
}


def parse(model: type[BaseModel], body: bytes):
    """Validate a JSON body; a 400 naming the first wrong field otherwise."""
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        raise _bad_request(e, body) from None


def _bad_request(e: ValidationError, body: bytes) -> APIError:
    errors = e.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first['msg']}); send a JSON object")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    path, names = _json_path(data, first["loc"], missing=first["type"] == "missing")
    same = [x for x in errors if _json_path(data, x["loc"], missing=x["type"] == "missing")[0] == path]
    if first["type"] == "missing":
        return APIError(400, f"{path} is required", path)
    got = f" (got {json.dumps(first.get('input'), ensure_ascii=False)[:200]})"
    if len(same) > 1 and names and names[-1] in SHAPES:
        return APIError(400, f"{path} must be {SHAPES[names[-1]]}{got}", path)
    messages = list(dict.fromkeys(x["msg"] for x in same))
    return APIError(400, f"{path or 'the request body'}: {'; or '.join(messages)}{got}", path or None)


def _json_path(data, loc, missing: bool) -> tuple[str, list[str]]:
    """The part of a pydantic error location that exists in the request JSON (union branch tags dropped), as
    `messages[0].content`, with the field names on it."""
    path, names = "", []
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            path, data = f"{path}[{part}]", data[part]
        elif isinstance(part, str) and isinstance(data, dict) and (part in data or (missing and i == len(loc) - 1)):
            path, data = f"{path}.{part}" if path else part, data.get(part)
            names.append(part)
        else:
            break
    return path, names


def check_model(requested: str | None, served: str, adapters: list[str] = ()) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base model); 404 for a name the server does not serve."""
    if requested is None or requested == served:
        return None
    if requested in adapters:
        return requested
    names = ", ".join(repr(n) for n in [served, *adapters])
    raise APIError(404, f"the model {requested!r} does not exist: this server serves {names} (GET /v1/models lists "
                        "them)", "model", "model_not_found")


def check_unsupported(req: Common) -> None:
    """Refuse what would otherwise be silently ignored and change the output."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported: leave it out", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    if req.stop is not None and any(s == "" for s in ([req.stop] if isinstance(req.stop, str) else req.stop)):
        raise APIError(400, "stop strings must be non-empty (an empty one would end every answer at once)", "stop")


def sampling_params(req: Common, defaults: SamplingParams, *, max_tokens: int | None, prompt_len: int,
                    max_model_len: int, stop: list[str], seed: int | None, logprobs: int | None,
                    param: str, lora: str | None = None) -> SamplingParams:
    """The request's SamplingParams: its fields over the checkpoint's defaults.

    An explicit max_tokens must fit in max_model_len after the prompt (a 400 otherwise, as OpenAI and vLLM answer);
    the default (generation_config's max_new_tokens) is cut to what fits."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens and max_model_len is {max_model_len}: no room is left "
                            f"for an answer; shorten the {param}", param)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens = {max_tokens} does not fit: the prompt has {prompt_len} tokens and "
                            f"max_model_len is {max_model_len}, which leaves {room}; lower max_tokens or shorten the "
                            "prompt", "max_tokens")

    def pick(name):
        value = getattr(req, name)
        return value if value is not None else getattr(defaults, name)

    try:
        return SamplingParams(
            temperature=pick("temperature"), top_p=pick("top_p"), top_k=max(pick("top_k"), 0),  # vLLM's -1: no top-k
            repetition_penalty=pick("repetition_penalty"), presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            max_new_tokens=max_tokens if max_tokens is not None else min(defaults.max_new_tokens, room),
            stop=stop or None, seed=seed, logprobs=logprobs, ignore_eos=bool(req.ignore_eos), lora=lora)
    except ValueError as e:  # whatever SamplingParams itself refuses
        raise APIError(400, str(e)) from None


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])
