"""The middleware every request passes: request id, drain, API key, error bodies, metrics and the access log."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid

log = logging.getLogger("phi_onnx.server")
_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Gate:
    """A pure ASGI middleware (streaming responses pass through untouched, and disconnects reach the route)."""

    def __init__(self, app, state) -> None:
        self.app = app
        self.state = state
        key = state.settings.api_key
        self._key = None if key is None else key.encode()
        self._instance = state.instance.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex[:24]
        scope["phi.request_id"] = request_id
        entry = scope.setdefault("phi.log", {})
        entry["hold"] = hold = _Hold(lambda: _access(request_id, scope, status["code"], entry, started))
        status = {"code": 500, "started": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                ids = [(b"x-request-id", request_id.encode()), (b"x-phi-onnx-instance", self._instance)]
                message = {**message, "headers": [*headers, *ids]}
            await send(message)

        path = scope.get("path", "")
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await _answer(send_with_id, *refusal)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # the ASGI server gave up on the request (its shutdown time is over)
            if not status["started"]:
                status["code"] = 503
                with contextlib.suppress(Exception):
                    message = "the server is shutting down: retry on another replica"
                    await _answer(send_with_id, 503, _body(message, "service_unavailable", "shutting_down"))
            raise
        except Exception:
            log.exception("request %s failed", request_id)
            if not status["started"]:
                body = {"message": f"internal error (request id {request_id})", "type": "server_error"}
                await _answer(send_with_id, 500, {"error": {**body, "param": None, "code": None}})
        finally:
            route = path if path in _ROUTES or path.startswith("/v1/models/") else "other"
            route = "/v1/models" if route.startswith("/v1/models/") else route
            self.state.metrics.requests.labels(route, str(status["code"])).inc()
            hold.release()  # writes the access line now, or when a cancelled generation has reported its end

    def _refusal(self, scope, path: str) -> tuple[int, dict, dict] | None:
        if scope.get("method") == "OPTIONS":
            return None  # CORS preflight (answered by the CORS middleware when origins are allowed)
        if self.state.draining:
            return (
                503,
                _body("the server is shutting down: retry on another replica", "service_unavailable", "shutting_down"),
                {"Retry-After": "5"},
            )
        if path == "/health" or self._key is None:
            return None
        given = _header(scope, b"authorization") or ""
        scheme, _, token = given.strip().partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 7235)
            token = ""
        if not hmac.compare_digest(token.strip().encode(), self._key):
            message = (
                "missing API key: send Authorization: Bearer <key>"
                if not given
                else "invalid API key: check the key the server was started with"
            )
            return 401, _body(message, "invalid_request_error", "invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        return None


class _Hold:
    """Calls ``done`` once every holder has released it (the response, and a generation still winding down)."""

    def __init__(self, done) -> None:
        self.count, self.done = 1, done

    def acquire(self) -> None:
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.done()


def _body(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _answer(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _access(request_id: str, scope, status: int, entry: dict, started: float) -> None:
    """One line per request: id, method, path, status, token counts, time to first token and total time."""

    def ms(value) -> str:
        return "-" if value is None else f"{value:.0f}"

    fields = [f"id={request_id}", scope.get("method", "-"), printable(scope.get("path", "")), str(status)]
    if "prompt" in entry:
        fields += [
            f"prompt={entry['prompt']}",
            f"images={entry.get('images', 0)}",
            f"image_tokens={entry['image_tokens']}",
            f"cached={entry['cached']}",
            f"generated={entry['generated']}",
            f"ttft_ms={ms(entry.get('ttft_ms'))}",
        ]
        if entry.get("worker"):
            fields.append(f"worker={entry['worker']}")
        if entry.get("finish"):
            fields.append(f"finish={entry['finish']}")
    fields.append(f"total_ms={ms((time.perf_counter() - started) * 1e3)}")
    log.info(" ".join(fields))


def printable(text: str) -> str:
    """A path as a log line or an error message shows it: at most 100 characters, each unprintable one escaped."""
    text = text if len(text) <= 100 else text[:97] + "..."
    return "".join(c if c.isprintable() and c != " " else "%" + format(ord(c), "02X") for c in text)
