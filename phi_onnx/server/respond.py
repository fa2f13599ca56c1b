"""One chat completion in flight: waits on its job's events and answers whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from phi_onnx.server import schema
from phi_onnx.server.schema import APIError

log = logging.getLogger("phi_onnx.server")
_CODES = {
    "ContextLengthError": "context_length_exceeded",
    "ImageError": "invalid_image",
    "PromptError": "invalid_prompt",
}
_PARAMS = {"ContextLengthError": "messages", "PromptError": "messages"}  # when the error names no part


class Run:
    """A submitted job and the HTTP request it answers; cancels the job when the client goes away or time runs out."""

    def __init__(self, request, state, job, req: schema.ChatRequest, started: float) -> None:
        self.request = request
        self.state = state
        self.job = job
        self.req = req
        self.started = started
        self.deadline = started + state.settings.request_timeout_s
        self.request_id: str = request.scope.get("phi.request_id", "-")
        self.log: dict[str, Any] = request.scope.setdefault("phi.log", {})
        self.log["images"] = len(req.images)
        self.ttft_s: float | None = None
        self.stats: dict[str, Any] = {}
        self._closed = False
        self._watch = asyncio.create_task(self._watch_disconnect())
        remaining = max(0.0, self.deadline - time.perf_counter())
        self._timer = asyncio.get_running_loop().call_later(remaining, self._expire)

    async def first(self) -> tuple:
        """Wait for the job to start; a refused request raises its APIError (the worker's one-line reason)."""
        event = await self._next()
        if event[0] == "start":
            self.ttft_s = time.perf_counter() - self.started
            self.stats = event[2]
            return event
        self._close()
        if event[0] == "error":
            raise self._refusal(event)
        raise APIError(499, "the client closed the request", code="cancelled")  # event is a cancelled "done"

    async def whole(self, first: tuple) -> dict[str, Any]:
        parts: list[str] = [first[3]]
        try:
            while True:
                event = await self._next()
                if event[0] == "text":
                    parts.append(event[2])
                    continue
                if event[0] == "error":  # the worker died mid-generation
                    self.log["finish"] = "error"
                    raise self._refusal(event)
                self._done(event)
                if self.stats.get("finish_reason") == "error":
                    raise self._failure()
                return schema.completion(
                    self.request_id, self.state.name, "".join(parts), self.stats["finish_reason"], self._usage()
                )
        finally:
            self._close()

    async def sse(self, first: tuple) -> AsyncIterator[bytes]:
        created = int(time.time())
        usage: Any = None if self.req.include_usage else False

        def event(delta, finish=None) -> bytes:
            data = schema.chunk(self.request_id, self.state.name, created, delta, finish, usage)
            return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

        try:
            yield event({"role": "assistant", "content": ""})
            if first[3]:
                yield event({"content": first[3]})
            while True:
                try:
                    message = await self._next()
                    if message[0] == "error":  # the worker died mid-generation
                        raise self._refusal(message)
                    if message[0] == "done":
                        self._done(message)
                        if self.stats.get("finish_reason") == "error":
                            raise self._failure()
                except APIError as err:  # headers are sent: an error event ends the stream
                    self.log.setdefault("finish", "error")
                    yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
                    yield b"data: [DONE]\n\n"
                    return
                if message[0] == "text":
                    if message[2]:
                        yield event({"content": message[2]})
                    continue
                if self.stats.get("finish_reason") == "cancelled":
                    return
                yield event({}, self.stats["finish_reason"])
                if self.req.include_usage:
                    data = schema.chunk(self.request_id, self.state.name, created, None, None, self._usage())
                    yield b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
        finally:
            self._close()

    def _expire(self) -> None:
        """The deadline passed: the next event the route reads says so (before the job's cancelled end)."""
        self.job.events.put_nowait(("timeout",))
        self.state.scheduler.cancel(self.job)

    async def _next(self) -> tuple:
        event = await self.job.events.get()
        if event[0] == "shutdown":
            self.log["finish"] = "shutdown"
            raise APIError(
                503,
                "the server is shutting down and its grace period ran out before this request finished: retry on "
                "another replica",
                type="service_unavailable",
                code="shutting_down",
                headers={"Retry-After": "5"},
            )
        if event[0] == "timeout":
            self.log["finish"] = "timeout"
            raise APIError(
                504,
                f"the request took over {self.state.settings.request_timeout_s:g} s and was "
                "stopped: lower max_tokens or retry later",
                type="server_error",
                code="timeout",
            )
        return event

    def _refusal(self, event: tuple) -> APIError:
        """The APIError of an ``("error", id, kind, message)`` event: the worker's one-line reason, or a 500."""
        kind, message = event[2], event[3]
        if kind == "internal":
            log.error("request %s failed: %s", self.request_id, message)
            return APIError(500, f"internal error (request id {self.request_id})", type="server_error")
        param = event[4] if len(event) > 4 else _PARAMS.get(kind)
        if kind == "OptionsError":  # the model's own limits: top_k against the vocabulary, a constraint it compiles
            param = "top_k" if "top_k" in message else self.req.constraint
        return APIError(400, message, param=param, code=_CODES.get(kind))

    def _done(self, event: tuple) -> None:
        self.stats = {**self.stats, **event[2]}

    def _failure(self) -> APIError:
        log.error("request %s failed mid-generation: %s", self.request_id, self.stats.get("error"))
        return APIError(500, f"internal error (request id {self.request_id})", type="server_error")

    def _usage(self) -> dict[str, Any]:
        s = self.stats
        return schema.usage(s.get("prompt_tokens", 0), s.get("generated_tokens", 0), s.get("cached_tokens", 0))

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.log["finish"] = "disconnected"
                self.state.scheduler.cancel(self.job)
                return

    def _close(self) -> None:
        """Stop watching and the deadline; a job still running is cancelled and recorded once its worker says how far
        it got (so the access log and the metrics count the tokens really generated)."""
        if self._closed:
            return
        self._closed = True
        self._watch.cancel()
        self._timer.cancel()
        if self.job.finished:
            self._record()
            return
        self.state.scheduler.cancel(self.job)
        hold = self.log.get("hold")
        if hold is not None:
            hold.acquire()  # the access line waits for the job's real end
        asyncio.get_running_loop().create_task(self._settle(hold))

    async def _settle(self, hold) -> None:
        try:
            while True:
                event = await self.job.events.get()
                if event[0] in ("done", "error"):
                    if event[0] == "done":
                        self._done(event)
                    break
        finally:
            self._record()
            if hold is not None:
                hold.release()

    def _record(self) -> None:
        s = self.stats
        queue_wait = (self.job.started_at - self.job.queued_at) if self.job.started_at else None
        if self.job.worker is not None:
            self.log["worker"] = self.job.worker.process.pid
        self.log.update(
            prompt=s.get("prompt_tokens", 0),
            image_tokens=s.get("image_tokens", 0),
            cached=s.get("cached_tokens", 0),
            generated=s.get("generated_tokens", 0),
            ttft_ms=None if self.ttft_s is None else self.ttft_s * 1e3,
        )
        self.log.setdefault("finish", s.get("finish_reason"))
        if s:
            self.state.metrics.record(s, queue_wait, self.ttft_s, time.perf_counter() - self.started)
