"""What an operator sets when starting the server: one validated object shared by the CLI and the app factory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from phi_onnx.errors import OptionsError

API_KEY_ENV = "PHI_ONNX_API_KEY"
"""The environment variable ``phi-onnx serve`` reads the API key from when ``--api-key`` is not given."""


@dataclass(frozen=True)
class ServerSettings:
    """Server limits, security policy and scheduling.

    Attributes:
        model_name: The id clients name in ``model`` (default: the repo id, or the model folder's name).
        api_key: When set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
        parallel: Generations at once; each runs in its own worker process with its own copy of the model.
        threads: onnxruntime threads per worker (default: the CPU count divided by ``parallel``).
        max_queue: Requests waiting for a free worker; one more is answered 429.
        request_timeout_s: The most a request may take, queue wait included; then 504 (or an error event).
        grace_s: On SIGTERM, how long running requests may go on before the server exits.
        max_body_bytes: The largest request body; larger is 413.
        max_images: Image parts in one request (a video is one part).
        max_image_bytes: The largest encoded image, from a data URL, a remote URL or a file.
        max_prompt_tokens: The longest prompt (image tokens included); None allows the model's context.
        default_max_tokens: ``max_tokens`` when a request gives none (capped by the context left).
        allow_remote_images: Fetch ``http(s)`` image URLs.
        allow_private_networks: Let remote URLs reach loopback, private, link-local and other non-public addresses.
        allowed_local_dir: Serve ``file://`` URLs and plain paths under this folder only; None refuses them all.
        remote_timeout_s: Total time to fetch one remote image, redirects included.
        max_redirects: Redirects followed per remote image, each re-checked against the policy.
        cors_origins: Origins allowed to call from a browser; empty turns CORS off.
        device, preprocessor, max_frames: Passed to :func:`phi_onnx.load` in each worker.
    """

    model_name: str | None = None
    api_key: str | None = None
    parallel: int = 1
    threads: int | None = None
    max_queue: int = 64
    request_timeout_s: float = 600.0
    grace_s: float = 30.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 1024
    allow_remote_images: bool = False
    allow_private_networks: bool = False
    allowed_local_dir: Path | None = None
    remote_timeout_s: float = 10.0
    max_redirects: int = 3
    cors_origins: tuple[str, ...] = ()
    device: str = "auto"
    preprocessor: str = "auto"
    max_frames: int = 16

    def __post_init__(self) -> None:
        for name in ("parallel", "max_body_bytes", "max_images", "max_image_bytes", "default_max_tokens", "max_frames"):
            _positive_int(name, getattr(self, name))
        for name in ("max_queue", "max_redirects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OptionsError(f"{name} must be a whole number >= 0, got {value!r}")
        for name in ("threads", "max_prompt_tokens"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("request_timeout_s", "grace_s", "remote_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise OptionsError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable() or " " in self.api_key):
            raise OptionsError("the API key must be printable text without spaces: pick another key")
        if self.allowed_local_dir is not None:
            folder = Path(self.allowed_local_dir).expanduser()
            if not folder.is_dir():
                raise OptionsError(f"--allowed-local-dir {str(folder)!r} is not a folder: give an existing folder")
            object.__setattr__(self, "allowed_local_dir", folder.resolve())
        origins = (self.cors_origins,) if isinstance(self.cors_origins, str) else tuple(self.cors_origins)
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise OptionsError(f"CORS origin {origin!r} must be '*' or start with http:// or https://")
        object.__setattr__(self, "cors_origins", origins)

    @property
    def worker_threads(self) -> int:
        """onnxruntime intra-op threads per worker process."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.parallel)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"{name} must be a positive whole number, got {value!r}")
