"""A pass-through vision graph for onnxruntime-genai, written without the ``onnx`` package.

phi-onnx runs the real vision graph itself (:mod:`phi_onnx.vision`) and hands onnxruntime-genai the image features as
``pixel_values``; og's own vision step must then return its input unchanged. The graph is one Identity node:
``pixel_values [tokens, hidden]`` (and an unused ``image_sizes``, which og always feeds) to ``image_features``.

The runtime does not depend on ``onnx`` (a 17 MB wheel) for these ~200 bytes: the ModelProto is encoded here with the
protobuf wire format (field numbers from onnx/onnx.proto3). The test suite checks the bytes with ``onnx.checker``.

og joins ``vision.filename`` to the model folder as a string, so an absolute path does not work; the file is written to
phi-onnx's cache directory (never the user's model folder) and referred to by a path relative to the folder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

ELEM_TYPES = {"float32": 1, "int64": 7, "float16": 10, "bfloat16": 16}
_IR_VERSION = 8
_OPSET = 17


def cache_dir() -> Path:
    """phi-onnx's cache directory: ``$PHI_ONNX_CACHE``, else ``$XDG_CACHE_HOME/phi-onnx``, else ~/.cache/phi-onnx."""
    override = os.environ.get("PHI_ONNX_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "phi-onnx"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dims: tuple[int | str, ...]) -> bytes:
    # ValueInfoProto{1: name, 2: TypeProto{1: Tensor{1: elem_type, 2: TensorShapeProto{1: Dimension{1 | 2}}}}}
    shape = b"".join(_field(1, _field(1, d) if isinstance(d, int) else _field(2, d)) for d in dims)
    tensor = _field(1, elem_type) + _field(2, shape)
    return _field(1, name) + _field(2, _field(1, tensor))


def passthrough_model(dtype: str, hidden: int, names: dict[str, str] | None = None) -> bytes:
    """The serialized ModelProto of the pass-through vision graph.

    Args:
        dtype: The image features' dtype ("float32", "float16" or "bfloat16"), as the real vision graph outputs it.
        hidden: The features' width (the decoder's hidden size).
        names: Graph names of ``pixel_values``, ``image_sizes`` and ``image_features`` (genai_config may rename them).

    Returns:
        ModelProto bytes, loadable by onnxruntime.
    """
    defaults = {"pixel_values": "pixel_values", "image_sizes": "image_sizes", "image_features": "image_features"}
    names = {**defaults, **(names or {})}
    elem = ELEM_TYPES[dtype]
    node = _field(1, names["pixel_values"]) + _field(2, names["image_features"]) + _field(3, "passthrough")
    node += _field(4, "Identity")
    graph = _field(1, node) + _field(2, "phi_onnx_vision_passthrough")
    graph += _field(11, _value_info(names["pixel_values"], elem, ("image_tokens", hidden)))
    graph += _field(11, _value_info(names["image_sizes"], ELEM_TYPES["int64"], ("num_images", 2)))
    graph += _field(12, _value_info(names["image_features"], elem, ("image_tokens", hidden)))
    opset = _field(1, "") + _field(2, _OPSET)
    return _field(1, _IR_VERSION) + _field(2, "phi-onnx") + _field(7, graph) + _field(8, opset)


def passthrough_file(dtype: str, hidden: int, names: dict[str, str] | None = None) -> Path:
    """Write the pass-through graph into the cache directory once (content-addressed) and return its path.

    Raises:
        OSError: The cache directory cannot be written.
    """
    data = passthrough_model(dtype, hidden, names)
    folder = cache_dir() / "passthrough"
    path = folder / f"vision-passthrough-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
    if path.is_file() and path.read_bytes() == data:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: concurrent loads see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def relative_to(path: Path, folder: Path) -> str | None:
    """``path`` as og will find it from ``folder`` (a relative path), or None where none exists (other drive)."""
    try:
        return os.path.relpath(path.resolve(), folder.resolve())
    except ValueError:
        return None
