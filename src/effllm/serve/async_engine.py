"""`AsyncEngine`: the synchronous `LLMEngine` behind an asyncio server.

One background thread owns the engine: it applies queued commands (add, abort), runs `step` while any
request is unfinished, and hands each step's outputs to the event loop, which routes them to the
per-request queues that handlers iterate. Commands are applied between steps, so an abort (a client
that went away, a timeout) frees the request's KV blocks before the next step. The model's forward
releases the GIL, so the event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from effllm.engine.llm_engine import StepError
from effllm.engine.outputs import RequestOutput
from effllm.engine.sampling_params import SamplingParams
from effllm.serve.errors import EngineFailedError, QueueFullError, RequestTimeoutError, ServerUnavailableError
from effllm.serve.metrics import ServerMetrics

logger = logging.getLogger("effllm.serve")


@dataclass
class _Stream:
    """Loop-side state of one submitted request (one or more prompts, each an engine request)."""

    engine_ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False  # produced output: no longer counts as queued
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: dict[str, float] = field(default_factory=dict)
    unfinished: set[str] = field(default_factory=set)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class RequestStream:
    """The outputs of one submitted request: iterate `(prompt_index, RequestOutput)` until all finish.

    Use it as an async context manager: leaving the block early (an error, a cancelled task, a client
    that disconnected) aborts what is still running.
    """

    def __init__(self, engine: AsyncEngine, stream: _Stream, timeout: float | None):
        self._engine = engine
        self._stream = stream
        self._index = {rid: i for i, rid in enumerate(stream.engine_ids)}
        self._deadline = None if timeout is None else stream.arrival + timeout
        self.finished = False

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.abort()

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        stream = self._stream
        while stream.unfinished:
            item = await self._next()
            if isinstance(item, BaseException):
                self.abort()
                raise item
            if item.finished:
                stream.unfinished.discard(item.request_id)
            yield self._index[item.request_id], item
        self.finished = True
        self._engine._forget(stream)

    async def _next(self) -> RequestOutput | BaseException:
        queue = self._stream.queue
        if self._deadline is None:
            return await queue.get()
        try:
            return await asyncio.wait_for(queue.get(), max(self._deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            self.abort()
            raise RequestTimeoutError(
                f"the request ran past the server's {self._engine.request_timeout:g} s limit and was aborted; "
                "ask for fewer tokens"
            ) from None

    def abort(self) -> None:
        """Stop whatever is still running (idempotent; a finished stream has nothing to stop)."""
        if not self.finished:
            self.finished = True
            self._engine._abort(self._stream)


class AsyncEngine:
    """Runs an `LLMEngine` in a background thread; `submit` returns a `RequestStream` of its outputs.

    max_queue caps the requests submitted but not yet producing output (a 429 beyond it); request_timeout
    aborts a request that runs longer (a 408). Call `start` inside the event loop, `shutdown` to stop.
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_queue: int | None = None,
        request_timeout: float | None = None,
        metrics: ServerMetrics | None = None,
    ):
        self.engine = engine
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = metrics
        self._commands: collections.deque[tuple] = collections.deque()
        self._wakeup = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # engine request id -> stream (event-loop side)
        self._num_queued = 0
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._live: set[str] = set()  # engine request ids added and not finished (engine thread only)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread, bound to the running event loop (a no-op once started)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="effllm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every request still running and stop the engine thread (`start` may run it again)."""
        if self._thread is None:
            return
        self._stopping = True
        self._send(("stop",))
        await asyncio.to_thread(self._thread.join)
        self.abort_all()
        with self._wakeup:  # model calls queued behind the stop never ran
            left = [c for c in self._commands if c[0] == "call"]
            self._commands.clear()
        for _, _, future in left:
            _settle(
                future, None, ServerUnavailableError("the server is shutting down; the request was aborted")
            )
        self._thread, self._stopping = None, False

    def abort_all(self) -> None:
        """End every open request with a 503 (its handler answers; the engine frees its blocks)."""
        self._fail_all(ServerUnavailableError("the server is shutting down; the request was aborted"))

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopping and (self._thread is None or self._thread.is_alive())

    # ------------------------------------------------------------------ requests
    def submit(self, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Queue prompts (token ids) with one set of sampling params; raises 429/503 errors at once."""
        if not self.healthy:
            raise ServerUnavailableError(
                "the engine is not running (it failed or is shutting down); retry later"
            )
        if self.max_queue is not None and self._num_queued >= self.max_queue:
            raise QueueFullError(
                f"the server's queue is full ({self.max_queue} requests waiting); retry later"
            )
        self.start()
        base = f"r{next(self._ids)}"
        stream = _Stream([f"{base}-{i}" for i in range(len(prompts))])
        stream.unfinished = set(stream.engine_ids)
        for rid, ids in zip(stream.engine_ids, prompts, strict=True):
            self._streams[rid] = stream
            self._send(("add", rid, ids, params))
        self._num_queued += 1
        return RequestStream(self, stream, self.request_timeout)

    async def run(self, fn: Any) -> Any:
        """`fn()` on the engine thread between two steps (work that uses the model, e.g. embeddings)."""
        if not self.healthy:
            raise ServerUnavailableError(
                "the engine is not running (it failed or is shutting down); retry later"
            )
        self.start()
        future = self._loop.create_future()
        self._send(("call", fn, future))
        return await future

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) sequences: the engine's, plus adds not yet handed to it."""
        scheduler = self.engine.scheduler
        with self._wakeup:
            pending = sum(1 for c in self._commands if c[0] == "add")
        return len(scheduler.running), len(scheduler.waiting) + pending

    def kv_cache_usage(self) -> float:
        return self.engine.block_manager.usage

    def _abort(self, stream: _Stream) -> None:
        live = [rid for rid in stream.engine_ids if rid in stream.unfinished]
        if live:
            self._send(("abort", live))
            if self.metrics is not None:
                for _ in live:
                    self.metrics.observe_finished("abort")
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        if not stream.started:
            stream.started = True
            self._num_queued -= 1
        for rid in stream.engine_ids:
            self._streams.pop(rid, None)

    def _send(self, command: tuple) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while True:
                for command in self._take_commands():
                    if command[0] == "stop":
                        self.engine.abort(list(self._live))
                        self._live.clear()
                        return
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except StepError as e:  # that step's requests were aborted; the engine goes on
                        logger.error("%s", e, exc_info=e.cause)
                        self._live.difference_update(e.request_ids)
                        error = EngineFailedError(
                            "the engine failed while running this request and aborted it; see the server log"
                        )
                        for rid in e.request_ids:
                            self._loop.call_soon_threadsafe(self._deliver_error, rid, error)
                        continue
                    self._live.difference_update(out.request_id for out in outputs if out.finished)
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as e:  # the engine is broken: fail every request, report unhealthy
            logger.exception("the engine failed; the server stops serving requests")
            self.error = e
            error = EngineFailedError("the engine failed while serving this request; see the server log")
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._fail_all, error)

    def _take_commands(self) -> list[tuple]:
        with self._wakeup:
            while not self._commands and not self.engine.has_unfinished_requests():
                self._wakeup.wait()
            commands = list(self._commands)
            self._commands.clear()
        return commands

    def _apply(self, command: tuple) -> None:
        if command[0] == "call":
            _, fn, future = command
            try:
                result, error = fn(), None
            except Exception as e:  # the caller's error, not the engine's
                result, error = None, e
            self._loop.call_soon_threadsafe(_settle, future, result, error)
            return
        if command[0] == "abort":
            self.engine.abort(command[1])
            self._live.difference_update(command[1])
            return
        _, rid, ids, params = command
        try:
            self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
            self._live.add(rid)
        except Exception as e:  # invalid for the engine: only this request fails
            self._loop.call_soon_threadsafe(self._deliver_error, rid, e)

    # ------------------------------------------------------------------ on the event loop
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if not stream.started:
                stream.started = True
                self._num_queued -= 1
            if self.metrics is not None:
                self._observe(stream, out, now)
            stream.queue.put_nowait(out)

    def _deliver_error(self, rid: str, error: BaseException) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.queue.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.queue.put_nowait(error)

    def _observe(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        m = self.metrics
        new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
        if new_tokens:
            last = stream.last_token_time.get(out.request_id)
            if last is None:
                m.ttft.observe(now - stream.arrival)
                m.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                m.tpot.observe(now - last)
            stream.last_token_time[out.request_id] = now
            m.generation_tokens.inc(new_tokens)
        if out.finished:
            m.e2e.observe(now - stream.arrival)
            for completion in out.outputs:
                m.observe_finished(completion.finish_reason or "abort")
