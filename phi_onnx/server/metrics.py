"""Prometheus metrics of one server: requests, queue, running generations, latencies and token counts."""

from __future__ import annotations

from typing import Any

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    """The server's metrics in a registry of its own (several apps in one process do not collide)."""

    def __init__(self, scheduler) -> None:
        from phi_onnx.errors import require

        prom = require("prometheus_client", extra="serve", purpose="the server's /metrics")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "phi_onnx_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        queue = prom.Gauge("phi_onnx_queue_depth", "Requests waiting for a free worker.", registry=r)
        queue.set_function(lambda: scheduler.queue_depth)
        running = prom.Gauge("phi_onnx_running_generations", "Generations running now.", registry=r)
        running.set_function(lambda: scheduler.running)
        self.ttft = prom.Histogram(
            "phi_onnx_time_to_first_token_seconds",
            "From the request to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = prom.Histogram(
            "phi_onnx_request_seconds",
            "From the request to its last byte (chat completions).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = prom.Histogram(
            "phi_onnx_queue_wait_seconds",
            "Time a request waited for a free worker.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = prom.Counter(
            "phi_onnx_tokens",
            "Tokens by kind: prompt, image (part of prompt), cached (part of prompt), generated.",
            ["kind"],
            registry=r,
        )
        self.decode_rate = prom.Histogram(
            "phi_onnx_decode_tokens_per_second",
            "Decode speed of each generation after its first token.",
            buckets=_RATE_BUCKETS,
            registry=r,
        )

    def record(self, stats: dict[str, Any], queue_wait_s: float | None, ttft_s: float | None, total_s: float) -> None:
        """Record one finished chat completion."""
        for kind, key in (
            ("prompt", "prompt_tokens"),
            ("image", "image_tokens"),
            ("cached", "cached_tokens"),
            ("generated", "generated_tokens"),
        ):
            self.tokens.labels(kind).inc(stats.get(key) or 0)
        if queue_wait_s is not None:
            self.queue_wait.observe(queue_wait_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.e2e.observe(total_s)
        if (stats.get("generated_tokens") or 0) > 1 and stats.get("decode_tokens_per_s"):
            self.decode_rate.observe(stats["decode_tokens_per_s"])

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
