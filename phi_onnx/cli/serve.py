"""``phi-onnx serve``: run the OpenAI-compatible server with uvicorn, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import click

from phi_onnx.errors import OptionsError, PhiOnnxError

_CLOSE_S = 2  # after the drain, how long connections get to send what they have before their tasks are cancelled


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--model-name", default=None, help="The id clients send as 'model' (default: repo id or folder name).")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (default: $PHI_ONNX_API_KEY).")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Generations at once, each in its own worker process with its own copy of the model.")  # fmt: skip
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="CPU threads per worker (default: cores / parallel)."
)
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a worker; more are answered 429.")  # fmt: skip
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True,
              help="Seconds a request may take, queue included; then 504.")  # fmt: skip
@click.option("--grace", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds running requests get to finish after SIGTERM; then they get 503.")  # fmt: skip
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=32, show_default=True,
              help="Largest request body in MB; larger is 413.")  # fmt: skip
@click.option("--max-images", type=click.IntRange(min=1), default=16, show_default=True, help="Images per request.")
@click.option("--max-image-mb", type=click.FloatRange(min=0, min_open=True), default=20, show_default=True,
              help="Largest encoded image in MB.")  # fmt: skip
@click.option(
    "--max-prompt-tokens", type=click.IntRange(min=1), default=None, help="Longest prompt (default: context)."
)
@click.option("--default-max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="max_tokens when a request gives none (capped by the context left).")  # fmt: skip
@click.option("--allow-remote-images", is_flag=True, help="Fetch http(s) image URLs (public addresses only).")
@click.option("--allow-private-networks", is_flag=True, help="Let remote image URLs reach private addresses too.")
@click.option("--allowed-local-dir", type=click.Path(file_okay=False), default=None,
              help="Serve file:// URLs and paths under this folder only.")  # fmt: skip
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser calls from this origin (repeatable).")
@click.option("-d", "--device", default="auto", show_default=True, help="auto, cpu, cuda or dml.")
@click.option("--preprocessor", type=click.Choice(["auto", "phi-onnx", "onnxruntime-genai"]), default="auto",
              help="Image preprocessing: ours (honours num_crops) or onnxruntime-genai's.")  # fmt: skip
@click.option("--max-frames", type=click.IntRange(min=1), default=16, show_default=True, help="Most frames per video.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray Serve: a local Ray, or the cluster at ADDRESS (auto, ray://HOST:10001).")  # fmt: skip
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="With --ray: replicas.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: autoscale up to this many replicas on ongoing requests.")  # fmt: skip
@click.option("--cpus-per-replica", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True,
              help="With --ray: CPUs Ray reserves per replica.")  # fmt: skip
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0, show_default=True,
              help="With --ray: GPUs per replica.")  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)  # fmt: skip
def serve(model: str | None, host: str, port: int, log_level: str, ray_address: str | None, **kw) -> None:
    """Serve MODEL with OpenAI's chat-completions API.

    \b
    Examples:
      phi-onnx serve ./tiny
      phi-onnx serve --api-key "$KEY" --parallel 2 --host 0.0.0.0
      curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from phi_onnx.errors import require
    from phi_onnx.server import API_KEY_ENV, ServerSettings, create_app

    uvicorn = require("uvicorn", extra="serve", purpose="phi-onnx serve")
    require("fastapi", extra="serve", purpose="phi-onnx serve")
    settings = ServerSettings(
        model_name=kw["model_name"],
        api_key=kw["api_key"] or os.environ.get(API_KEY_ENV) or None,
        parallel=kw["parallel"],
        threads=kw["threads"],
        max_queue=kw["max_queue"],
        request_timeout_s=kw["request_timeout"],
        grace_s=kw["grace"],
        max_body_bytes=int(kw["max_body_mb"] * 1024 * 1024),
        max_images=kw["max_images"],
        max_image_bytes=int(kw["max_image_mb"] * 1024 * 1024),
        max_prompt_tokens=kw["max_prompt_tokens"],
        default_max_tokens=kw["default_max_tokens"],
        allow_remote_images=kw["allow_remote_images"],
        allow_private_networks=kw["allow_private_networks"],
        allowed_local_dir=kw["allowed_local_dir"],
        cors_origins=kw["cors_origins"],
        device=kw["device"],
        preprocessor=kw["preprocessor"],
        max_frames=kw["max_frames"],
    )
    _logging(log_level)
    ray_flags = ("replicas", "max_replicas", "cpus_per_replica", "gpus_per_replica")
    if ray_address is not None:
        _serve_on_ray(model, settings, host, port, ray_address, {k: kw[k] for k in ray_flags})
        return
    if kw["replicas"] != 1 or kw["max_replicas"] is not None or kw["gpus_per_replica"]:
        raise OptionsError("--replicas, --max-replicas and --gpus-per-replica need --ray: add --ray, or drop them")
    sock = _listen(host, port)  # before the model loads: a taken port is refused at once
    app = create_app(model, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=_CLOSE_S, server_header=False)  # fmt: skip
    server = _Server(config, app.state.phi, host)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except PhiOnnxError:
        raise
    if server.failed:
        raise click.exceptions.Exit(2)


def _serve_on_ray(model, settings, host: str, port: int, address: str, flags: dict) -> None:
    """Start Ray Serve on ``host:port`` with the app in ``replicas`` replicas; stop it on SIGTERM or Ctrl-C."""
    from phi_onnx.errors import require
    from phi_onnx.hub import resolve_model
    from phi_onnx.server.ray import application

    ray = require("ray", extra="ray", purpose="phi-onnx serve --ray")
    serve = require("ray.serve", extra="ray", purpose="phi-onnx serve --ray")
    folder = resolve_model(model, cuda=bool(flags["gpus_per_replica"]))  # fetched once here; replicas read the folder
    _listen(host, port).close()  # a taken port is a one-line error before Ray starts
    ray.init(address=None if address == "local" else address, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    if settings.model_name is None:
        from dataclasses import replace

        name = model if isinstance(model, str) and not Path(model).exists() else Path(folder).name
        settings = replace(settings, model_name=name)
    serve.run(application(folder, settings, **flags), name="phi-onnx", route_prefix="/")
    count = flags["replicas"] if flags["max_replicas"] is None else f"{flags['replicas']}-{flags['max_replicas']}"
    click.echo(f"phi-onnx serve: ready on http://{host}:{port} (model {settings.model_name!r}, {count} replicas "
               f"on Ray Serve)", err=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    click.echo("phi-onnx serve: stopping the Ray Serve application", err=True)
    serve.shutdown()
    ray.shutdown()


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, or a one-line error naming the address and the fix."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        reason = "in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err)).lower()
        raise OptionsError(
            f"cannot listen on {host}:{port} ({reason}): pick another --port, or stop the program that uses it"
        ) from None
    sock.set_inheritable(True)
    return sock


def _logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log = logging.getLogger("phi_onnx.server")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


class _Server:
    """uvicorn's server, plus: one line when ready, and a drain on the first SIGTERM or Ctrl-C (a second one exits)."""

    def __new__(cls, config, state, host):
        import uvicorn

        class Server(uvicorn.Server):
            failed = False

            async def startup(self, sockets=None) -> None:
                self.started_at = time.perf_counter()
                await super().startup(sockets)
                if self.should_exit:  # start-up failed (the model did not load, or the port is taken)
                    self.failed = True
                    return
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets] if self.servers else []
                port = bound[0][1] if bound else config.port
                shown = f"[{host}]" if ":" in host else host
                workers = state.settings.parallel
                click.echo(
                    f"phi-onnx serve: ready on http://{shown}:{port} (model {state.name!r}, {workers} worker"
                    f"{'' if workers == 1 else 's'}, {'API key required' if state.settings.api_key else 'no API key'})",
                    err=True,
                )

            def handle_exit(self, sig, frame) -> None:
                if state.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                    self.force_exit = self.should_exit = True
                    return
                state.drain()
                click.echo(
                    f"phi-onnx serve: draining: new requests get 503; waiting up to {state.settings.grace_s:g} s for "
                    f"{state.scheduler.running + state.scheduler.queue_depth} running",
                    err=True,
                )
                deadline = time.monotonic() + state.settings.grace_s

                async def wait() -> None:
                    while state.scheduler.busy() and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    if state.scheduler.busy():
                        count = state.abandon()
                        click.echo(f"phi-onnx serve: grace is over: stopping {count} running", err=True)
                        stopped = time.monotonic() + 2  # each worker stops within one decode step
                        while state.scheduler.busy() and time.monotonic() < stopped:
                            await asyncio.sleep(0.02)
                    self.should_exit = True

                asyncio.get_event_loop().create_task(wait())

        return Server(config)
