"""The server on Ray Serve: two replicas of the same app behind Serve's proxy on 127.0.0.1, on the session's Ray."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

KEY = "ray-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(ray_local, tiny_model_dir):
    serve = pytest.importorskip("ray.serve")
    from phi_onnx.server import ServerSettings
    from phi_onnx.server.ray import application

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServerSettings(model_name="tiny", api_key=KEY, threads=1)
    serve.run(application(tiny_model_dir, settings, replicas=2, cpus_per_replica=0.5), name="phi-onnx",
              route_prefix="/")  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_two_replicas_answer_concurrent_openai_clients_with_auth_and_metrics(serve_url):
    import openai

    client = openai.OpenAI(base_url=serve_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    answers, errors = [], []

    def ask(i: int) -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny",
                messages=[{"role": "user", "content": f"Question {i}"}],
                max_tokens=300,
                extra_body={"min_tokens": 300},
            )
            answers.append((raw.headers["x-phi-onnx-instance"], raw.parse()))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(answers) == 6
    assert all(a.usage.completion_tokens == 300 for _, a in answers)
    assert len({instance for instance, _ in answers}) == 2, "one replica answered every concurrent request"
    health = {httpx.get(serve_url + "/health", timeout=30).json()["instance"] for _ in range(40)}
    assert health == {instance for instance, _ in answers}
    assert httpx.get(serve_url + "/v1/models", timeout=30).status_code == 401  # the API key holds on every replica
    metrics = httpx.get(serve_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert metrics.status_code == 200 and "phi_onnx_requests_total" in metrics.text
