"""The FastAPI application: OpenAI's chat and text completions (streaming or not), models, tokenize / detokenize,
health, Prometheus metrics and the web chat page, over one `EngineLoop`.

Streams are plain `text/event-stream` responses ("data: {json}\\n\\n" per chunk, then "data: [DONE]"). A client that
disconnects, streaming or not, aborts its requests in the engine, which frees their KV blocks at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import stop_token_ids
from .engine_loop import EngineDead, EngineError, EngineLoop
from .protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, NamedTool, TokenizeRequest,
                       check_model, check_unsupported, error_body, parse, sampling_params, stop_strings)
from .react import OBSERVATION_STOP, ReActParser, chat_prompt_ids, to_conversation

log = logging.getLogger("nanoqwen.serve")
PAGE = Path(__file__).parent / "static" / "index.html"


def json_response(data: dict, status: int = 200) -> Response:
    return Response(json.dumps(data, ensure_ascii=False), status_code=status, media_type="application/json")


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf


class EventStream(StreamingResponse):
    """A text/event-stream response that aborts its generation however the response ends: finished, failed, or the
    client gone before or while streaming (a body generator that never started would not run its own `finally`)."""

    def __init__(self, body, gen):
        # no caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering)
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


class Server:
    def __init__(self, llm, model_name: str, api_key: str | None):
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.tokenizer = llm.tokenizer  # immutable: safe to use on the event loop while the engine thread runs
        self.max_model_len = llm.max_model_len
        self.defaults = llm.default_params
        self.window = llm.generation_config.get("max_window_size", 6144)
        self.stop_ids = frozenset(stop_token_ids(llm.chat_format))
        self.engine = EngineLoop(llm, model_name)
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------------ helpers
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the server's --api-key as 'Authorization: Bearer "
                                "KEY'", None, "invalid_api_key")

    def adapters(self) -> list[str]:
        """The LoRA adapters served as models of their own (LLM(enable_lora=True) and --lora-modules)."""
        return list(self.llm.lora.names) if getattr(self.llm, "lora", None) is not None else []

    def check_model(self, requested: str | None) -> str | None:
        return check_model(requested, self.model_name, self.adapters())

    def model_card(self, adapter: str | None = None) -> dict:
        return {"id": adapter or self.model_name, "object": "model", "created": self.created, "owned_by": "nanoqwen",
                "root": adapter or self.model_name, "parent": self.model_name if adapter else None,
                "max_model_len": self.max_model_len}

    def token_entry(self, token_id: int, logprob: float) -> dict:
        raw = self.tokenizer.id_to_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _logprob(logprob), "bytes": list(raw)}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_bytes(token_id).decode("utf-8", errors="replace")

    def answer_entries(self, out, start: int) -> list[dict]:
        """The engine's logprob entries of out from `start` on, without a final stop token (it is not part of the
        text, as OpenAI never shows <|im_end|>)."""
        entries = out.logprobs or []
        if out.finished and out.finish_reason == "stop" and out.token_ids and out.token_ids[-1] in self.stop_ids:
            entries = entries[:len(out.token_ids) - 1]
        return entries[start:]

    def chat_functions(self, req) -> tuple[list[dict] | None, bool]:
        """(the functions to render in the ReAct prompt, whether they came as legacy `functions`)."""
        if req.tools and req.functions:
            raise APIError(400, "give tools or the legacy functions, not both", "tools")
        choice, param = (req.tool_choice, "tool_choice") if req.tools or not req.functions else \
            (req.function_call, "function_call")
        if choice == "required" or isinstance(choice, NamedTool) or (param == "function_call" and choice not in
                                                                     (None, "none", "auto")):
            raise APIError(400, f"{param} can be \"auto\" or \"none\": Qwen's ReAct format lets the model decide "
                                "whether to call a tool, it cannot be forced to call one", param)
        tools = req.tools or req.functions
        if not tools or choice == "none":
            return None, False
        functions = [(t.function if req.tools else t).model_dump(exclude_none=True) for t in tools]
        return functions, not req.tools

    def chat_ids(self, messages, functions) -> list[int]:
        if self.llm.chat_format != "chatml":
            raise APIError(400, "this is a base model (its generation_config.json has no ChatML chat format): use "
                                "/v1/completions, or serve a chat model", "messages")
        plain = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}].content[{j}] is a {part.type!r} part: this model reads "
                                            'text only, send {"type": "text", "text": "..."} parts',
                                       f"messages[{i}].content")
                    texts.append(part.text)
                content = "\n".join(texts)
            d = {"role": m.role, "content": content, "tool_call_id": m.tool_call_id}
            if m.function_call is not None:
                d["function_call"] = m.function_call.model_dump()
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "function": c.function.model_dump()} for c in m.tool_calls]
            plain.append(d)
        return chat_prompt_ids(self.tokenizer, to_conversation(plain, functions), self.window)

    async def start(self, items: list):
        try:
            return await self.engine.generate(items)
        except ValueError as e:  # the engine's own checks (e.g. a request larger than the whole KV cache)
            raise APIError(400, str(e)) from None
        except EngineDead as e:
            raise APIError(503, str(e)) from None

    async def collect(self, gen, request: Request) -> dict | None:
        """Every choice's final output, or None when the client disconnected first (its requests are aborted)."""
        async def drain():
            finals = {}
            async for batch in gen:
                finals.update((index, out) for index, out in batch if out.finished)
            return finals

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            return work.result() if work.done() else None
        except EngineError as e:
            raise APIError(500, str(e)) from None
        finally:
            work.cancel()
            watch.cancel()
            gen.close()

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ------------------------------------------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        req = parse(ChatRequest, await request.body())
        lora = self.check_model(req.model)
        check_unsupported(req)
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported: only \"text\"",
                           "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        functions, legacy = self.chat_functions(req)
        ids = self.chat_ids(req.messages, functions)
        # stop strings match the text, so the reference's extra copies without leading newlines (a workaround for
        # its token-id stop words) are not needed: they would stop where the client did not ask
        stop = stop_strings(req.stop) + ([OBSERVATION_STOP] if functions else [])
        n = req.n or 1
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [sampling_params(req, self.defaults, max_tokens=req.max_completion_tokens or req.max_tokens,
                                  prompt_len=len(ids), max_model_len=self.max_model_len, stop=stop,
                                  seed=None if req.seed is None else req.seed + i, logprobs=logprobs,
                                  param="messages", lora=lora) for i in range(n)]
        gen = await self.start([(ids, p) for p in params])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        choices = [ChatChoice(self, i, functions is not None, legacy, req.logprobs) for i in range(n)]
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self.chat_stream(gen, head, choices, len(ids), usage), gen)
        finals = await self.collect(gen, request)
        if finals is None:
            return Response(status_code=499)
        for i, c in enumerate(choices):
            c.update(finals[i])
        return json_response({**head, "object": "chat.completion", "choices": [c.message() for c in choices],
                              "usage": self.usage(len(ids), sum(len(finals[i].token_ids) for i in range(n)))})

    async def chat_stream(self, gen, head: dict, choices: list, prompt_tokens: int, include_usage: bool):
        chunk = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        completion_tokens = {}
        try:
            yield sse({**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None} for c in choices], **extra})
            async for batch in gen:
                parts = []
                for index, out in batch:
                    completion_tokens[index] = len(out.token_ids)
                    delta = choices[index].update(out)
                    if delta is not None:
                        parts.append(sse({**chunk, "choices": [delta], **extra}))
                if parts:
                    yield "".join(parts)
            if include_usage:
                yield sse({**chunk, "choices": [],
                           "usage": self.usage(prompt_tokens, sum(completion_tokens.values()))})
        except Exception as e:  # the engine failed mid-stream: say so in the stream, OpenAI-style
            yield sse(error_body(str(e), "server_error"))
        finally:
            gen.close()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        req = parse(CompletionRequest, await request.body())
        lora = self.check_model(req.model)
        check_unsupported(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported: Qwen has no fill-in-the-middle format", "suffix")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, "best_of is not supported: leave it out (or set it equal to n)", "best_of")
        prompts = self.completion_prompts(req.prompt)
        items, stop = [], stop_strings(req.stop)
        for ids, _ in prompts:
            for i in range(n):
                p = sampling_params(req, self.defaults, max_tokens=req.max_tokens, prompt_len=len(ids),
                                    max_model_len=self.max_model_len, stop=stop,
                                    seed=None if req.seed is None else req.seed + i, logprobs=req.logprobs,
                                    param="prompt", lora=lora)
                if req.echo and req.logprobs is not None:  # the prompt's logprobs too (recomputed, never cached)
                    p = dataclasses.replace(p, prompt_logprobs=req.logprobs)
                items.append((ids, p))
        gen = await self.start(items)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        choices = [CompletionChoice(self, k, *prompts[k // n], bool(req.echo), req.logprobs)
                   for k in range(len(items))]
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self.completion_stream(gen, head, choices, prompt_tokens, usage), gen)
        finals = await self.collect(gen, request)
        if finals is None:
            return Response(status_code=499)
        out = []
        for k, c in enumerate(choices):
            piece = c.update(finals[k])
            out.append({**piece, "text": c.text})
            if c.logprobs is not None:
                out[-1]["logprobs"] = c.all_logprobs
        return json_response({**head, "choices": out,
                              "usage": self.usage(prompt_tokens, sum(len(f.token_ids) for f in finals.values()))})

    def completion_prompts(self, prompt) -> list[tuple[list[int], str]]:
        """(ids, text) of each prompt: strings are encoded as the engine does (special-token text becomes the
        control token), id lists are taken as they are and decoded for echo."""
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is an empty list: give at least one prompt", "prompt")
        out = []
        for k, p in enumerate(prompt):
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, f"prompt {k} is empty: give at least one token", "prompt")
            bad = [t for t in ids if not 0 <= t < self.llm.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt {k} holds token id {bad[0]}, outside the vocabulary "
                                    f"[0, {self.llm.config.vocab_size})", "prompt")
            out.append((ids, p if isinstance(p, str) else self.tokenizer.decode(ids)))
        return out

    async def completion_stream(self, gen, head: dict, choices: list, prompt_tokens: int, include_usage: bool):
        extra = {"usage": None} if include_usage else {}
        completion_tokens = {}
        try:
            async for batch in gen:
                parts = []
                for index, out in batch:
                    completion_tokens[index] = len(out.token_ids)
                    piece = choices[index].update(out)
                    if piece["text"] or piece["finish_reason"] or piece.get("logprobs"):
                        parts.append(sse({**head, "choices": [piece], **extra}))
                if parts:
                    yield "".join(parts)
            if include_usage:
                yield sse({**head, "choices": [], "usage": self.usage(prompt_tokens, sum(completion_tokens.values()))})
        except Exception as e:
            yield sse(error_body(str(e), "server_error"))
        finally:
            gen.close()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------------------ tokens
    async def tokenize(self, request: Request) -> Response:
        self.authorize(request)
        req = parse(TokenizeRequest, await request.body())
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, 'give either "prompt" (a string) or "messages" (a chat, with optional "tools"), '
                                "not both and not neither", "prompt")
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt)
        else:
            functions, _ = self.chat_functions(req)
            ids = self.chat_ids(req.messages, functions)
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len})

    async def detokenize(self, request: Request) -> Response:
        self.authorize(request)
        req = parse(DetokenizeRequest, await request.body())
        self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.llm.config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.llm.config.vocab_size})",
                           "tokens")
        return json_response({"prompt": self.tokenizer.decode(req.tokens)})


class ChatChoice:
    """One choice of a chat completion: turns the engine's growing output into message deltas (plain text, or
    content and a tool call read by `ReActParser`), and keeps the whole message for the non-streamed answer."""

    def __init__(self, server: Server, index: int, tools: bool, legacy: bool, logprobs: bool | None):
        self.server, self.index, self.legacy, self.want_logprobs = server, index, legacy, bool(logprobs)
        self.parser = ReActParser() if tools else None
        self.sent = 0  # characters of the output text consumed
        self.content, self.arguments, self.logprobs = "", "", []
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.finish_reason = None

    def update(self, out) -> dict | None:
        """Take the latest output; return this step's stream choice ({"index", "delta", ...}) or None if empty."""
        delta = {}
        if self.parser is None:
            if len(out.text) > self.sent:
                delta["content"] = out.text[self.sent:]
        else:
            content, started, args = self.parser.update(out.text, final=out.finished)
            if content:
                delta["content"] = content
            if started or args:
                call = {"arguments": args}
                if started:
                    call = {"name": self.parser.call.name, "arguments": args}
                if self.legacy:
                    delta["function_call"] = call
                else:
                    delta["tool_calls"] = [{"index": 0, "function": call}]
                    if started:
                        delta["tool_calls"][0].update(id=self.call_id, type="function")
            self.arguments += args
        self.sent = len(out.text)
        self.content += delta.get("content", "")
        entries = []
        if self.want_logprobs:
            entries = [self.server.token_entry(e["token_id"], e["logprob"]) |
                       {"top_logprobs": [self.server.token_entry(t, lp) for t, lp in e["top"]]}
                       for e in self.server.answer_entries(out, len(self.logprobs))]
            self.logprobs += entries
        if out.finished:
            self.finish_reason = out.finish_reason
            if self.parser is not None and self.parser.call is not None and out.finish_reason == "stop":
                self.finish_reason = "function_call" if self.legacy else "tool_calls"
        if not delta and not entries and not out.finished:
            return None
        return {"index": self.index, "delta": delta,
                "logprobs": {"content": entries} if self.want_logprobs else None,
                "finish_reason": self.finish_reason}

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.content}
        call = self.parser.call if self.parser is not None else None
        if call is not None:
            message["content"] = self.content or None
            function = {"name": call.name, "arguments": self.arguments}
            if self.legacy:
                message["function_call"] = function
            else:
                message["tool_calls"] = [{"id": self.call_id, "type": "function", "function": function}]
        return {"index": self.index, "message": message,
                "logprobs": {"content": self.logprobs} if self.want_logprobs else None,
                "finish_reason": self.finish_reason}


class CompletionChoice:
    """One choice of a text completion (prompt k // n, sample k % n): text deltas, echo, and logprobs in the
    completions shape (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset)."""

    def __init__(self, server: Server, index: int, prompt_ids: list[int], prompt_text: str, echo: bool,
                 logprobs: int | None):
        self.server, self.index, self.prompt_ids, self.prompt_text = server, index, prompt_ids, prompt_text
        self.echo, self.logprobs = echo, logprobs
        self.text, self.sent, self.entries_sent, self.offset = "", 0, 0, 0
        self.echoed = False
        self.all_logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add_token(self, lp: dict, token_id: int, logprob: float | None, top: dict | None) -> None:
        text = self.server.token_text(token_id)
        for key, value in (("tokens", text), ("token_logprobs", None if logprob is None else _logprob(logprob)),
                           ("top_logprobs", top), ("text_offset", self.offset)):
            lp[key].append(value)
        self.offset += len(text)

    def update(self, out) -> dict:
        text = out.text[self.sent:]
        self.sent = len(out.text)
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if self.echo and not self.echoed:
            self.echoed = True
            text = self.prompt_text + text
            if self.logprobs is not None:  # the engine's prompt logprobs: None for the first token
                for k, (tok, dist) in enumerate(zip(self.prompt_ids, out.prompt_logprobs)):
                    top = None if dist is None else dict(sorted(dist.items(), key=lambda kv: -kv[1])[:self.logprobs])
                    self._add_token(lp, tok, None if dist is None else dist[tok],
                                    None if top is None else {self.server.token_text(t): _logprob(v)
                                                              for t, v in top.items()})
            else:
                self.offset += len(self.prompt_text)
        if self.logprobs is not None:
            for e in self.server.answer_entries(out, self.entries_sent):
                self._add_token(lp, e["token_id"], e["logprob"],
                                {self.server.token_text(t): _logprob(v) for t, v in e["top"]})
                self.entries_sent += 1
            for key in lp:
                self.all_logprobs[key] += lp[key]
        self.text += text
        return {"index": self.index, "text": text, "logprobs": lp if self.logprobs is not None else None,
                "finish_reason": out.finish_reason if out.finished else None}


def create_app(llm, model_name: str, api_key: str | None = None) -> FastAPI:
    """The server's ASGI app over `llm`; its engine thread starts and stops with the app's lifespan."""
    server = Server(llm, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="nanoqwen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return json_response(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return json_response(error_body(message, "invalid_request_error"), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return json_response(error_body(f"invalid request: {e.errors()[0].get('msg')}", "invalid_request_error"), 400)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return json_response(error_body(f"internal server error ({type(e).__name__}: {e}); the server log has the "
                                        "details", "server_error"), 500)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            raise APIError(503, f"the engine thread is not running ({server.engine.error!r}); restart the server")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(server.engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return json_response({"object": "list", "data": [server.model_card(None)] +
                                                        [server.model_card(a) for a in server.adapters()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.authorize(request)
        return json_response(server.model_card(server.check_model(model_id)))

    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    return app


class BackgroundServer:
    """Serve an app from a thread of this process (notebooks, tests): `with BackgroundServer(app) as url: ...`.
    Port 0 picks a free port; `url` is the address it listens on."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="nanoqwen-http", daemon=True)
        self.url = None

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above): is the port free?")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
