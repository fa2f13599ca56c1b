"""``phi-onnx serve``: an OpenAI-compatible HTTP server (the ``serve`` extra: FastAPI, uvicorn, prometheus-client)."""

from phi_onnx.server.app import ServerState, create_app
from phi_onnx.server.settings import API_KEY_ENV, ServerSettings

__all__ = ["API_KEY_ENV", "ServerSettings", "ServerState", "create_app"]
