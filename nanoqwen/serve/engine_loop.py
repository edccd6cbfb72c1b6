"""One engine thread for all clients: it owns the `LLM` (which is not thread-safe) and makes every call to it.

Handlers on the event loop send it commands (add these requests, abort those) through a queue and get each step's
outputs back through an asyncio queue per API request, so requests from every connection join the same continuous
batch and a step never blocks the event loop. The thread steps while any request is unfinished and sleeps on the
command queue otherwise.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback

from .metrics import Metrics

log = logging.getLogger("nanoqwen.serve")


class EngineDead(RuntimeError):
    """The engine thread is gone (a bug): no request can run until the server restarts."""


class EngineError(RuntimeError):
    """A step failed: every request in flight was aborted."""


class Generation:
    """The engine requests of one API request (one per choice, or per prompt and choice). Iterate it on the event
    loop for lists of (choice index, RequestOutput), one list per engine step; `close()` aborts what is unfinished."""

    def __init__(self, engine: "EngineLoop", items: list):
        self.engine, self.items = engine, items
        self.queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.arrival = time.perf_counter()
        self.unfinished = len(items)
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> list:
        if self.unfinished == 0:
            raise StopAsyncIteration
        batch = await self.queue.get()
        while not self.queue.empty():  # a consumer that fell behind takes every step it missed at once
            batch = batch + self.queue.get_nowait()
        errors = [item for item in batch if isinstance(item, BaseException)]
        if errors:
            self.unfinished = 0
            raise errors[0]
        self.unfinished -= sum(out.finished for _, out in batch)
        return batch

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.unfinished:
                self.engine._send(("abort", self))


class EngineLoop:
    def __init__(self, llm, model_name: str = "model"):
        self.llm = llm
        self.metrics = Metrics(model_name)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._owner: dict[int, tuple[Generation, int]] = {}  # engine request id -> (generation, choice index)
        self._rids: dict[Generation, list[int]] = {}
        self._timing: dict[int, list[float]] = {}  # engine request id -> [arrival, last token time]
        self.error: BaseException | None = None  # set when the thread died: /health reports it

    # ---------------------------------------------------------------------------------------- event loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanoqwen-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._send(("stop", None))
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(self, items: list) -> Generation:
        """Queue (prompt ids, SamplingParams) pairs as one generation; returns once the engine accepted them all,
        or raises the engine's error (a ValueError for a request it cannot serve)."""
        if not self.alive:
            raise EngineDead(f"the engine thread is not running ({self.error!r}); restart the server")
        gen = Generation(self, items)
        self._send(("add", gen))
        try:
            await gen.accepted
        except BaseException:  # refused, or the client left while waiting: abort whatever was queued
            gen.close()
            raise
        return gen

    def _send(self, command) -> None:
        self._commands.put(command)

    # ---------------------------------------------------------------------------------------- engine thread side
    def _post(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # never leave clients waiting on a dead thread
            self.error = e
            log.error("engine thread died:\n%s", traceback.format_exc())
            for gen in list(self._rids):
                self._post(gen.queue.put_nowait, [e])

    def _serve(self) -> None:
        llm = self.llm
        while True:
            commands = []
            try:  # wait for a command only when there is nothing to step
                commands.append(self._commands.get(block=not llm.has_unfinished()))
                while True:
                    commands.append(self._commands.get_nowait())
            except queue.Empty:
                pass
            for kind, gen in commands:
                if kind == "stop":
                    return
                if kind == "add":
                    self._add(gen)
                elif kind == "abort":
                    for rid in self._rids.get(gen, []):
                        llm.abort(rid)
            outputs = []
            if llm.has_unfinished():
                try:
                    outputs = llm.step()
                except Exception as e:
                    self._fail_all(e)
            # the state first: a client that sees its request end and reads /metrics must see it gone
            self.metrics.set_engine_state(len(llm.running), len(llm.waiting), *_kv_blocks(llm))
            self._dispatch(outputs)

    def _add(self, gen: Generation) -> None:
        rids = []
        try:
            for index, (ids, params) in enumerate(gen.items):
                rids.append(self.llm.add_request(ids, params))
                self._owner[rids[-1]] = (gen, index)
                self._timing[rids[-1]] = [gen.arrival, 0.0]
        except Exception as e:
            for rid in rids:
                self.llm.abort(rid)
                self._owner.pop(rid)
                self._timing.pop(rid)
            self._post(_settle, gen.accepted, e)
            return
        self._rids[gen] = rids
        self.metrics.add_prompt_tokens(sum(len(ids) for ids, _ in gen.items))
        self._post(_settle, gen.accepted, None)

    def _fail_all(self, error: Exception) -> None:
        """A step raised: the batch's state is unknown, so every request is aborted and its client told why."""
        log.error("engine step failed, aborting %d request(s):\n%s", len(self._owner), traceback.format_exc())
        error = EngineError(f"the engine failed while running this request ({type(error).__name__}: {error}); "
                             "the server aborted every running request; retry, and report it if it persists")
        for gen, rids in list(self._rids.items()):
            for rid in rids:
                self.llm.abort(rid)
            self._post(gen.queue.put_nowait, [error])

    def _dispatch(self, outputs) -> None:
        now, per_gen = time.perf_counter(), {}
        for out in outputs:
            owner = self._owner.get(out.request_id)
            if owner is None:
                continue
            gen, index = owner
            arrival, last = self._timing[out.request_id]
            if out.new_token_ids:
                if last == 0.0:
                    self.metrics.observe_first_token(now - arrival)
                else:
                    self.metrics.observe_inter_token(now - last)
                self._timing[out.request_id][1] = now
                self.metrics.add_generation_tokens(len(out.new_token_ids))
            if out.finished:
                del self._owner[out.request_id], self._timing[out.request_id]
                self.metrics.observe_finished(out.finish_reason, now - arrival)
                rids = self._rids[gen]
                rids.remove(out.request_id)
                if not rids:
                    del self._rids[gen]
            if not gen.closed:
                per_gen.setdefault(gen, []).append((index, out))
        if per_gen:
            self._post(_deliver, per_gen)


def _kv_blocks(llm) -> tuple[int | None, int | None]:
    """(free, total) KV-cache blocks; (None, None) if this engine does not expose them (the metrics then omit them
    rather than break the loop)."""
    blocks = getattr(llm, "blocks", None)
    return getattr(blocks, "num_free", None), getattr(blocks, "num_blocks", None)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(None)


def _deliver(per_gen: dict) -> None:
    for gen, batch in per_gen.items():
        gen.queue.put_nowait(batch)
