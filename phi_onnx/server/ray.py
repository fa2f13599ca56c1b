"""The HTTP server on Ray Serve: the same ASGI app (OpenAI API, auth, limits, metrics) in N replicas.

Each replica builds the app with :func:`phi_onnx.server.create_app` when it starts (the app and its worker processes
live in the replica, nothing is pickled but the model path and the settings). Ray Serve's proxy spreads requests
over the replicas and, with autoscaling, adds replicas when the ongoing requests per replica (the queue depth Serve
sees) stay above the target, and removes them when they fall.

Python recipe (``serve run`` takes the same application)::

    import ray
    from ray import serve
    from phi_onnx.server import ServerSettings
    from phi_onnx.server.ray import application

    ray.init(address="auto")
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(application("/shared/models/phi-3.5-vision", ServerSettings(api_key="KEY"), replicas=4,
                          gpus_per_replica=1), name="phi-onnx", route_prefix="/")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_onnx.errors import OptionsError, require
from phi_onnx.server.settings import ServerSettings


def application(
    model: str | Path,
    settings: ServerSettings | None = None,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    cpus_per_replica: float = 1,
    gpus_per_replica: float = 0,
):
    """A Ray Serve application serving ``model`` with ``replicas`` copies of the phi-onnx server.

    Args:
        model: A model folder every node can read (or a Hub repo id each replica fetches into its cache).
        settings: The server settings of every replica (API key, limits, ``parallel`` workers per replica).
        replicas: Replicas to start with (the minimum when ``max_replicas`` turns autoscaling on).
        max_replicas: Autoscale between ``replicas`` and this many on ongoing requests per replica.
        cpus_per_replica: CPUs Ray reserves per replica; the replica's workers share this many threads.
        gpus_per_replica: GPUs per replica (use ``device="cuda"`` in settings).

    Returns:
        A bound deployment for ``serve.run``.
    """
    serve = require("ray.serve", extra="ray", purpose="phi-onnx serve --ray")
    settings = settings or ServerSettings()
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise OptionsError(f"replicas must be >= 1 and max_replicas >= replicas, got {replicas} and {max_replicas}")
    if settings.threads is None:  # os.cpu_count() in a replica is the node's, not the replica's share
        from dataclasses import replace

        settings = replace(settings, threads=max(1, int(cpus_per_replica) // settings.parallel))
    source = str(model) if model is not None else None

    def build():
        from phi_onnx.server.app import create_app

        return create_app(source, settings)

    options: dict[str, Any] = {
        "name": "phi-onnx",
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # Serve's own bound on requests in a replica: the replica's workers plus its queue (beyond that, Serve queues).
        "max_ongoing_requests": settings.parallel + settings.max_queue,
        "graceful_shutdown_timeout_s": settings.grace_s,
    }
    if max_replicas is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": max(1, settings.parallel),
        }
    return serve.deployment(serve.ingress(build)(), **options).bind()
