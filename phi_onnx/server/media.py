"""Image sources from untrusted callers: data URLs by default; remote URLs and one local folder only when allowed.

The runtime library trusts its caller and opens any path it is given; a request to the server must never make it read
its own files or reach its own network. Every image of a request is turned into bytes here, under the operator's
policy and the byte cap, before any decoding; the worker process decodes them.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from phi_onnx.server.schema import APIError, bad
from phi_onnx.server.settings import ServerSettings

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_MEDIA_TYPES = ("image/", "video/")
_USERINFO = re.compile(r"^([A-Za-z][\w+.-]*://)[^/?#]*@")  # user:password@ in a URL's authority


@dataclass(frozen=True)
class ImageBytes:
    """One image part of a request, fetched: its encoded bytes, its size when the header tells it, its detail."""

    data: bytes
    detail: str = "auto"
    size: tuple[int, int] | None = None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone (no pixel is decoded), or None for videos and unknown formats."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # not an image Pillow knows (a video, or garbage the worker will name precisely)
        return None


def fetch_image(url: str, where: str, settings: ServerSettings) -> bytes:
    """The bytes of one image URL, under the server's policy (call it in a thread: it may wait on the network).

    Raises:
        APIError: 400 naming the part and the fix: a source the policy refuses, a fetch that failed, or an image over
            the byte cap. Nothing reveals whether a file outside the allowed folder exists.
    """
    if url[:5].lower() == "data:":
        return _data_url(url, where, settings.max_image_bytes)
    scheme = urlsplit(url).scheme.lower() if re.match(r"^[A-Za-z][\w+.-]*:", url) else ""
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise bad(
                f"{where}: remote image URLs are off on this server: send the image as a data:image/...;base64 URL "
                "(or start the server with --allow-remote-images)",
                param=where,
                code="remote_images_disabled",
            )
        return _remote(url, where, settings)
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return _local(url, scheme, where, settings)
    raise bad(f"{where}: the URL scheme {scheme!r} is not supported: send a data:image/...;base64 URL", param=where)


def _data_url(url: str, where: str, cap: int) -> bytes:
    match = _DATA_URL.match(url[:512])
    if match is None or match.group("params").lower().rsplit(";", 1)[-1] != "base64":  # ;base64 ends the params
        raise bad(f"{where}: a data URL must look like data:image/png;base64,<data>", param=where)
    mime = (match.group("mime") or "").lower()
    if not mime.startswith(_MEDIA_TYPES):
        raise bad(f"{where}: data URL of type {mime or 'none'!r}: send an image/... (or video/...) type", param=where)
    payload = url[match.end() :]
    if len(payload) > (cap // 3 + 1) * 4 + 64:  # checked before decoding: base64 is 4 characters per 3 bytes
        raise _too_large(where, (len(payload) * 3) // 4, cap)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad(
            f"{where}: the data URL's base64 payload is invalid: encode the file with standard base64", param=where
        ) from None


def _too_large(where: str, size: int, cap: int) -> APIError:
    return bad(
        f"{where}: the image is {size:,} bytes, over this server's limit of {cap:,}: send a smaller image",
        param=where,
        code="image_too_large",
    )


def _local(url: str, scheme: str, where: str, settings: ServerSettings) -> bytes:
    refusal = bad(
        f"{where}: this server does not read local files for requests: send a data:image/...;base64 URL",
        param=where,
        code="local_files_disabled",
    )
    root = settings.allowed_local_dir
    if root is None:
        raise refusal
    raw = unquote(urlsplit(url).path) if scheme == "file" else url
    path = Path(raw) if os.path.isabs(raw) else root / raw
    missing = bad(f"{where}: no such file under the allowed folder: check the path", param=where)
    try:
        real = path.resolve(strict=True)  # symlinks and '..' resolved before the containment check
    except (OSError, RuntimeError, ValueError):
        raise (missing if _inside(path.absolute(), root) else refusal) from None
    if not _inside(real, root):
        raise refusal  # the same answer whether or not the file exists
    if not real.is_file():
        raise missing
    size = real.stat().st_size
    if size > settings.max_image_bytes:
        raise _too_large(where, size, settings.max_image_bytes)
    with open(real, "rb") as f:
        return f.read(settings.max_image_bytes + 1)


def _inside(path: Path, root: Path) -> bool:
    return os.path.normpath(path) == str(root) or os.path.normpath(path).startswith(str(root) + os.sep)


def _remote(url: str, where: str, settings: ServerSettings) -> bytes:
    import httpx

    deadline = time.monotonic() + settings.remote_timeout_s
    transport = httpx.HTTPTransport(trust_env=False)
    transport._pool = _guarded_pool(settings.allow_private_networks)  # every connection, redirects too, is checked
    try:
        with (
            httpx.Client(
                transport=transport,
                follow_redirects=True,
                max_redirects=settings.max_redirects,
                timeout=settings.remote_timeout_s,
                trust_env=False,
            ) as client,
            client.stream("GET", url, headers={"Accept": "image/*, video/*"}) as response,
        ):
            if response.status_code != 200:
                raise bad(f"{where}: fetching {_short(url)} answered HTTP {response.status_code}", param=where)
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not kind.startswith(_MEDIA_TYPES):
                raise bad(f"{where}: {_short(url)} is {kind or 'untyped'!r}, not an image", param=where)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.max_image_bytes:
                raise _too_large(where, int(declared), settings.max_image_bytes)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > settings.max_image_bytes:
                    raise _too_large(where, len(data), settings.max_image_bytes)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("total time")
            return bytes(data)
    except _Refused as err:
        raise bad(f"{where}: {_short(url)} {err}", param=where, code="url_not_allowed") from None
    except httpx.TooManyRedirects:
        raise bad(f"{where}: {_short(url)} redirects more than {settings.max_redirects} times", param=where) from None
    except httpx.TimeoutException:
        raise bad(f"{where}: fetching {_short(url)} took over {settings.remote_timeout_s:g} s", param=where) from None
    except httpx.HTTPError as err:
        raise bad(f"{where}: could not fetch {_short(url)}: {type(err).__name__}", param=where) from None


class _Refused(Exception):
    pass


def _guarded_pool(allow_private: bool):
    import ssl

    import httpcore

    class Guarded(httpcore.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            address = check_address(host, port, allow_private)
            return super().connect_tcp(address, port, timeout, local_address, socket_options)

        def connect_unix_socket(self, *args, **kwargs):
            raise _Refused("is a unix socket")

    return httpcore.ConnectionPool(ssl_context=ssl.create_default_context(), network_backend=Guarded())


def check_address(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host`` and return an address to connect to; refuse non-public ones unless allowed.

    Every address the name resolves to must be public, and the connection goes to one of those very addresses, so a
    second lookup cannot swap in a private one (DNS rebinding).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise _Refused(f"does not resolve ({err})") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise _Refused("does not resolve")
    if not allow_private:
        for address in addresses:
            if not _is_public(address, port):
                raise _Refused(
                    "resolves to a private, loopback or link-local address, which this server does not fetch "
                    "(start it with --allow-private-networks to allow them)"
                )
    return addresses[0]


def _is_public(address: str, port: int) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local, multicast, reserved)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _short(url: str) -> str:
    """A URL as messages show it: without its user and password, and at most 80 characters."""
    url = _USERINFO.sub(r"\1***@", url)
    return url if len(url) <= 80 else url[:77] + "..."
