"""The ASGI app: OpenAI's chat-completions API over phi-onnx, with auth, limits, metrics and graceful drain.

Use :func:`create_app` to embed it in an existing service (mount it, or run it with any ASGI server); ``phi-onnx
serve`` runs it with uvicorn.
"""

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from phi_onnx.errors import require
from phi_onnx.server import schema
from phi_onnx.server.gate import Gate, printable
from phi_onnx.server.media import fetch_image, image_size
from phi_onnx.server.respond import Run
from phi_onnx.server.scheduler import QueueFull, Scheduler
from phi_onnx.server.schema import APIError, bad
from phi_onnx.server.settings import ServerSettings

log = logging.getLogger("phi_onnx.server")


class ServerState:
    """What the routes share: settings, the scheduler, metrics, and whether the server is draining."""

    def __init__(self, folder: Path, name: str, context_length: int, settings: ServerSettings, load_kwargs) -> None:
        from phi_onnx.server.metrics import Metrics

        self.folder = folder
        self.name = name
        self.context_length = context_length
        self.settings = settings
        self.scheduler = Scheduler(load_kwargs, settings.parallel, settings.max_queue)
        self.metrics = Metrics(self.scheduler)
        self.draining = False
        self.created = int(time.time())
        self.instance = uuid.uuid4().hex[:12]  # tells replicas apart behind a load balancer (GET /health)

    def drain(self) -> None:
        """Refuse new requests with 503; running ones go on (``phi-onnx serve`` exits when they are done)."""
        self.draining = True

    def abandon(self) -> int:
        """The drain's grace ran out: queued and running requests are answered 503 ``shutting_down`` (a stream: an
        error event) and their generations stopped. Returns how many there were."""
        self.draining = True
        return self.scheduler.abandon()


def create_app(model: Any = None, settings: ServerSettings | None = None):
    """An ASGI app serving ``model`` with OpenAI's chat-completions API.

    Args:
        model: A model folder, a Hub repo id (fetched once), None for the default model, or a loaded
            :class:`~phi_onnx.PhiVision` (its folder and load settings are used; each worker loads its own copy).
        settings: Limits, security policy and scheduling; defaults are safe for a loopback server.

    Returns:
        A FastAPI app. The model is loaded in its worker processes at start-up (the app's lifespan); the app's
        ``state.phi`` is the :class:`ServerState`.
    """
    fastapi = require("fastapi", extra="serve", purpose="the HTTP server")
    from contextlib import asynccontextmanager

    settings = settings or ServerSettings()
    folder, name, load_kwargs = _model(model, settings)
    from phi_onnx.hub.modelinfo import inspect_model

    state = ServerState(folder, name, inspect_model(folder).context_length, settings, load_kwargs)

    @asynccontextmanager
    async def lifespan(app):
        await state.scheduler.start()
        try:
            yield
        finally:
            await state.scheduler.stop()

    app = fastapi.FastAPI(
        title="phi-onnx",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # a 307 with an empty body breaks POST clients: a trailing slash is a 404 instead
    )
    app.state.phi = state
    _routes(app, state)
    app.add_middleware(Gate, state=state)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app


def _model(model: Any, settings: ServerSettings) -> tuple[Path, str, dict[str, Any]]:
    from phi_onnx.hub import is_repo_id, resolve_model
    from phi_onnx.model import PhiVision

    kwargs: dict[str, Any] = {
        "device": settings.device,
        "threads": settings.worker_threads,
        "preprocessor": settings.preprocessor,
        "max_frames": settings.max_frames,
    }
    if isinstance(model, PhiVision):
        folder = model.folder
        kwargs.update(device=model.device, preprocessor=model.preprocessor, max_frames=model.max_frames)
        kwargs.update(frame_sampling=model.frame_sampling, token_ids=model.token_ids)
        name = folder.name
    else:
        folder = resolve_model(model, cuda=settings.device in ("cuda", "auto") and _cuda_usable())
        name = str(model) if isinstance(model, str) and is_repo_id(model) and not Path(model).exists() else None
        name = name or Path(folder).name
    return Path(folder), settings.model_name or name, {**kwargs, "model": str(folder)}


def _cuda_usable() -> bool:
    from phi_onnx import _og

    return _og.cuda_usable() if hasattr(_og, "cuda_usable") else False


def _routes(app, state: ServerState) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        path = printable(request.url.path)
        message, headers = str(err.detail), dict(err.headers or {})
        if err.status_code == 404:
            message = f"no route {path}: see /v1/chat/completions and /v1/models"
        elif err.status_code == 405:
            headers["Allow"] = ", ".join(sorted(m.strip() for m in headers.get("Allow", "").split(",") if m.strip()))
            message = f"{request.method} is not allowed on {path}: use {headers['Allow'] or 'another method'}"
        return _error(APIError(err.status_code, message, code=code, headers=headers))

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error(err)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.scheduler.ready_workers == 0:  # every worker died and none has loaded the model again yet
            return JSONResponse({"status": "unavailable", "model": state.name, "workers": 0}, status_code=503)
        return {
            "status": "ok",
            "model": state.name,
            "workers": state.scheduler.ready_workers,
            "instance": state.instance,
        }

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        body, kind = state.metrics.render()
        return Response(body, media_type=kind)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        if model_id != state.name:
            raise _no_model(model_id, state)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = await _body(request, state.settings.max_body_bytes, state.settings.request_timeout_s)
        req = schema.parse_chat(body, state.settings.default_max_tokens)
        if req.model != state.name:
            raise _no_model(req.model, state)
        given = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
        job_request = await _job_request(req, state, default_max=not given)
        try:
            job = state.scheduler.submit(job_request, affinity=_conversation_key(req.messages))
        except QueueFull:
            raise APIError(
                429,
                f"the server is busy ({state.scheduler.queue_depth} requests waiting): retry in a moment",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        run = Run(request, state, job, req, started)
        first = await run.first()
        if req.stream:
            return StreamingResponse(
                run.sse(first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return JSONResponse(await run.whole(first))


def _conversation_key(messages: list[dict[str, Any]]) -> str:
    """A key of a conversation's opening (its messages up to the first user turn), the same on every later turn."""
    import hashlib

    opening = []
    for message in messages:
        opening.append(message)
        if message.get("role") == "user":
            break
    return hashlib.sha256(json.dumps(opening, sort_keys=True, default=str).encode()).hexdigest()


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.name,
        "object": "model",
        "created": state.created,
        "owned_by": "phi-onnx",
        "max_model_len": state.context_length,
    }


def _no_model(name: str, state: ServerState) -> APIError:
    shown = name if len(name) <= 80 else name[:77] + "..."
    return APIError(
        404,
        f"the model {shown!r} does not exist on this server: use {state.name!r}",
        param="model",
        code="model_not_found",
    )


def _error(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _body(request, cap: int, timeout: float) -> dict:
    """The request's JSON body, read within ``timeout`` seconds (a client that sends it slowly holds no slot)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise _too_large(int(declared), cap)
    data = bytearray()

    async def read() -> None:
        async for piece in request.stream():
            data.extend(piece)
            if len(data) > cap:
                raise _too_large(len(data), cap)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g} s ({len(data):,} bytes came): send it at once",
            code="request_timeout",
        ) from None
    except ClientDisconnect:  # nobody reads the answer; the access log says 499
        raise APIError(499, "the client closed the request while sending it", code="cancelled") from None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON ({err})") from None
    except RecursionError:
        raise bad("the request body is JSON nested too deeply: flatten it") from None


def _too_large(size: int, cap: int) -> APIError:
    return APIError(
        413, f"the request body is over {cap:,} bytes: send smaller or fewer images", code="request_too_large"
    )


async def _job_request(req: schema.ChatRequest, state: ServerState, default_max: bool) -> dict[str, Any]:
    """Fetch the images under the policy and check the image-token budget from their headers, before any decoding."""
    from phi_onnx.preprocess import image_token_count

    settings = state.settings
    if len(req.images) > settings.max_images:
        raise bad(
            f"the request has {len(req.images)} images, over this server's limit of {settings.max_images}: send fewer",
            param="messages",
            code="too_many_images",
        )
    fetched = []
    for i, p, url, detail in req.images:
        where = f"messages[{i}].content[{p}]"
        if url[:5].lower() == "data:":  # no I/O: decoded here, without a hop to a thread
            data = fetch_image(url, where, settings)
        else:
            data = await asyncio.to_thread(fetch_image, url, where, settings)
        fetched.append((i, p, data, detail))
    sizes = [image_size(data) for _, _, data, _ in fetched]
    crops = req.options.get("num_crops") or (16 if len(fetched) == 1 else 4)
    image_tokens = sum(
        image_token_count(w, h, 1 if detail == "low" else crops)
        for (_, _, _, detail), size in zip(fetched, sizes)
        if size is not None
        for w, h in [size]
    )
    limit = min(
        state.context_length - (0 if default_max else req.options["max_new_tokens"]),
        settings.max_prompt_tokens or state.context_length,
    )
    if image_tokens > limit:
        raise bad(
            f"the images alone take {image_tokens:,} prompt tokens, over the {limit:,} this request can have: "
            "send fewer or smaller images, or lower num_crops",
            param="messages",
            code="context_length_exceeded",
        )
    return {
        "messages": req.messages,
        "images": fetched,
        "options": req.options,
        "max_prompt_tokens": settings.max_prompt_tokens,
        "max_tokens_default": default_max,
    }
