"""Inspect a phi3v model folder without loading any weights.

:func:`read_graph_io` reads an ONNX file's graph inputs and outputs with a minimal protobuf wire-format reader (no
``onnx`` package): it walks the file through ``mmap`` and skips initializers and nodes by length, so a multi-GB graph
costs milliseconds. :func:`inspect_model` checks a folder against what onnxruntime-genai's ``phi3v`` pipeline needs
(spec §3.4-3.6) and reports every problem in one :class:`~phi_onnx.errors.ModelError`.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi_onnx.errors import ModelError

#: The repos that hold the current (Nov 2024 onward) ONNX format, in order of preference.
OFFICIAL_REPOS = ("microsoft/Phi-3.5-vision-instruct-onnx", "microsoft/Phi-3-vision-128k-instruct-onnx")

# TensorProto.DataType values (onnx.proto3).
_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128", 16: "bfloat16",
    17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4e2m1", 24: "float8e8m0", 25: "uint2", 26: "int2",
}  # fmt: skip
_OTHER_TYPES = {4: "sequence", 5: "map", 8: "sparse_tensor", 9: "optional"}  # TypeProto oneof fields
_FLOATS = ("float32", "float16", "bfloat16")

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as declared in the ONNX file.

    ``shape`` holds an int for a fixed dimension, a str for a named (symbolic) one and None for an unnamed one; the
    whole shape is None when the file declares no shape (rank unknown).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        """The number of dimensions, or None when the graph does not declare a shape."""
        return None if self.shape is None else len(self.shape)


@dataclass(frozen=True)
class GraphInfo:
    """The declared interface of one ONNX graph."""

    path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opsets: dict[str, int] = field(default_factory=dict)
    external_data: frozenset[str] = frozenset()

    def input(self, name: str) -> TensorInfo | None:
        """Return the input called ``name``, or None."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        """Return the output called ``name``, or None."""
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class ModelInfo:
    """What phi-onnx needs to know about a checked phi3v model folder."""

    folder: Path
    config: dict[str, Any]
    model_type: str
    vision: GraphInfo
    embedding: GraphInfo
    decoder: GraphInfo
    context_length: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    crop_slots: int | None


# --------------------------------------------------------------------------------------------------------------------
# Protobuf wire format


class _ParseError(Exception):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _ParseError(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, start: int, end: int):
    """Yield (field number, wire type, value) for a message; length-delimited values are (start, end) ranges."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value = (pos, pos + length)
            pos += length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise _ParseError(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise _ParseError("truncated message")
        yield number, wire, value


def _text(buf: Any, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", errors="replace")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _dim(buf: Any, span: tuple[int, int]) -> Dim:
    dim: Dim = None
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 0:
            dim = _int64(value)
        elif number == 2 and wire == 2:
            dim = _text(buf, value) or None
    return dim


def _value_info(buf: Any, span: tuple[int, int]) -> TensorInfo:
    name, dtype, shape = "", "undefined", None
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 2:
            name = _text(buf, value)
        elif number == 2 and wire == 2:  # TypeProto
            for t_number, t_wire, t_value in _fields(buf, *value):
                if t_number in _OTHER_TYPES:
                    dtype = _OTHER_TYPES[t_number]
                if t_number != 1 or t_wire != 2:  # only tensor_type carries elem_type and shape
                    continue
                for n, w, v in _fields(buf, *t_value):
                    if n == 1 and w == 0:
                        dtype = _DTYPES.get(v, f"type{v}")
                    elif n == 2 and w == 2:
                        shape = tuple(_dim(buf, dv) for dn, dw, dv in _fields(buf, *v) if dn == 1 and dw == 2)
    return TensorInfo(name, dtype, shape)


def _external_location(buf: Any, span: tuple[int, int]) -> str | None:
    """The external-data file of one initializer (TensorProto field 13 entries), if any."""
    for number, wire, value in _fields(buf, *span):
        if number == 13 and wire == 2:
            entry = {n: _text(buf, v) for n, w, v in _fields(buf, *value) if w == 2}
            if entry.get(1) == "location":
                return entry.get(2)
    return None


def _scalars(buf: Any, span: tuple[int, int]):
    for number, wire, value in _fields(buf, *span):
        yield number, _text(buf, value) if wire == 2 else _int64(value) if wire == 0 else None


def read_graph_io(path: str | Path) -> GraphInfo:
    """Read the declared inputs, outputs, opsets and external-data files of an ONNX graph.

    Args:
        path: The ``.onnx`` file.

    Returns:
        The graph's interface. Weights are never read.

    Raises:
        ModelError: The file is missing, empty, or not a valid ONNX protobuf.
    """
    path = Path(path)
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    opsets: dict[str, int] = {}
    external: set[str] = set()
    if not path.is_file():
        raise ModelError(f"{path} does not exist: download or export the model again")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty: download or export it again")
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == 7 and wire == 2:  # graph
                    for g_number, g_wire, g_value in _fields(buf, *value):
                        if g_wire != 2:
                            continue
                        if g_number == 11:
                            inputs.append(_value_info(buf, g_value))
                        elif g_number == 12:
                            outputs.append(_value_info(buf, g_value))
                        elif g_number == 5 and (location := _external_location(buf, g_value)):
                            external.add(location)
                elif number == 8 and wire == 2:  # opset_import
                    entry = dict(_scalars(buf, value))
                    opsets[str(entry.get(1, ""))] = int(entry.get(2) or 0)
    except _ParseError as err:
        raise ModelError(f"{path} is not a valid ONNX file ({err}): download or export it again") from err
    except OSError as err:
        raise ModelError(f"{path} cannot be read ({err}): check the file's permissions") from err
    if not inputs and not outputs:
        raise ModelError(f"{path} declares no graph inputs or outputs: it is not an ONNX model, download it again")
    # Inputs that are also initializers (old exporters) are constants, not feeds; they are kept as declared.
    return GraphInfo(path, tuple(inputs), tuple(outputs), opsets, frozenset(external))


# --------------------------------------------------------------------------------------------------------------------
# Model folder


def _legacy_reason(model: dict[str, Any]) -> str | None:
    vision, embedding = model.get("vision") or {}, model.get("embedding") or {}
    if "visual_features" in (vision.get("outputs") or {}):
        return "its vision graph outputs 'visual_features'"
    if "text-embedding" in str(embedding.get("filename", "")):
        return f"its embedding graph is a text-only '{embedding['filename']}'"
    return None


def native_libraries(config: Any) -> dict[str, str]:
    """{graph: library} for each graph whose session options load a native operator library (``custom_ops_library``,
    which onnxruntime-genai loads and runs: phi-onnx's own CPU builds name their attention kernels there)."""
    graphs = config.get("model") if isinstance(config, dict) else None
    found = {}
    for graph, settings in graphs.items() if isinstance(graphs, dict) else ():
        options = settings.get("session_options") if isinstance(settings, dict) else None
        if isinstance(options, dict) and options.get("custom_ops_library"):
            found[graph] = str(options["custom_ops_library"])
    return found


def check_genai_config(config: Any, source: str) -> dict[str, Any]:
    """Check that a parsed genai_config.json describes a current-format phi3v model.

    Args:
        config: The parsed JSON.
        source: Where it came from, for messages (a path or ``repo/folder``).

    Returns:
        The ``model`` section.

    Raises:
        ModelError: It is not a phi3v config, or it is the 2024 format that onnxruntime-genai rejects.
    """
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ModelError(f"{source} has no 'model' section: it is not an onnxruntime-genai config")
    model_type = model.get("type")
    if model_type != "phi3v":
        raise ModelError(f"{source} says type '{model_type}', not 'phi3v': this is not a Phi-3-vision model folder")
    if reason := _legacy_reason(model):
        raise ModelError(
            f"{source} is the 2024 Phi-3-vision ONNX format ({reason}), which onnxruntime-genai >= 0.5 rejects: "
            f"fetch {OFFICIAL_REPOS[0]} or {OFFICIAL_REPOS[1]} instead"
        )
    return model


def _names(section: dict[str, Any], key: str, defaults: dict[str, str]) -> dict[str, str]:
    given = section.get(key) if isinstance(section.get(key), dict) else {}
    return {k: str(given.get(k, v)) for k, v in defaults.items()}


def _check_tensor(
    problems: list[str], graph: GraphInfo, name: str, *, output: bool, rank: int | None = None
) -> TensorInfo | None:
    kind = "output" if output else "input"
    tensor = graph.output(name) if output else graph.input(name)
    if tensor is None:
        declared = ", ".join(t.name for t in (graph.outputs if output else graph.inputs))
        problems.append(f"{graph.path.name} has no {kind} '{name}' (it has: {declared})")
    elif rank is not None and tensor.rank is not None and tensor.rank != rank:
        problems.append(f"{graph.path.name} {kind} '{name}' has rank {tensor.rank}, expected {rank}")
    return tensor


def _check_dim(problems: list[str], graph: GraphInfo, tensor: TensorInfo | None, hidden: int | None) -> None:
    last = tensor.shape[-1] if tensor is not None and tensor.shape else None
    if isinstance(last, int) and isinstance(hidden, int) and last != hidden:
        problems.append(f"{graph.path.name} '{tensor.name}' has last dimension {last}, decoder.hidden_size is {hidden}")


def _check_same_dtype(problems: list[str], a: TensorInfo | None, b: TensorInfo | None, what: str) -> None:
    if a is not None and b is not None and a.dtype != b.dtype:
        problems.append(f"{what}: {a.name} is {a.dtype} but {b.name} is {b.dtype}; they must match")


def _load_graph(problems: list[str], folder: Path, model: dict[str, Any], key: str) -> GraphInfo | None:
    section = model.get(key)
    if not isinstance(section, dict) or not section.get("filename"):
        problems.append(f"genai_config.json has no model.{key}.filename")
        return None
    path = folder / str(section["filename"])
    if not path.is_file():
        problems.append(f"{key} graph {path.name} (model.{key}.filename) is missing")
        return None
    try:
        graph = read_graph_io(path)
    except ModelError as err:
        problems.append(str(err))
        return None
    missing = sorted(loc for loc in graph.external_data if not (path.parent / loc).is_file())
    if missing:
        problems.append(f"{path.name} needs external data {', '.join(missing)}, which is missing")
    return graph


def inspect_model(folder: str | Path) -> ModelInfo:
    """Check a phi3v model folder and describe it, without loading weights.

    Args:
        folder: A folder with genai_config.json, the vision, embedding and decoder graphs and tokenizer.json.

    Returns:
        The folder's description.

    Raises:
        ModelError: The folder is missing, is not a current-format phi3v model, or its graphs do not follow the
            contract onnxruntime-genai needs. All problems found are listed in one message.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder {folder} does not exist: pass a folder that holds genai_config.json")
    if not folder.is_dir():
        raise ModelError(f"{folder} is a file, not a model folder: pass the folder that holds genai_config.json")
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no genai_config.json: pass an onnxruntime-genai model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{config_path} is not valid JSON ({err}): download or export the model again") from err
    model = check_genai_config(config, str(config_path))

    problems: list[str] = []
    decoder_cfg = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}
    hidden = decoder_cfg.get("hidden_size")
    if not isinstance(hidden, int) or hidden <= 0:
        problems.append("genai_config.json has no positive model.decoder.hidden_size (it sizes image_features)")
        hidden = None
    context = model.get("context_length")
    if not isinstance(context, int) or context <= 0:
        problems.append("genai_config.json has no positive model.context_length")
    eos = model.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
    if not eos_ids or not all(isinstance(i, int) for i in eos_ids):
        problems.append("genai_config.json has no model.eos_token_id (an id or a list of ids)")
    if not (folder / "tokenizer.json").is_file():
        problems.append("tokenizer.json is missing")

    vision = _load_graph(problems, folder, model, "vision")
    embedding = _load_graph(problems, folder, model, "embedding")
    decoder = _load_graph(problems, folder, model, "decoder")
    crop_slots = None
    image_out = embed_image_in = embed_out = decoder_in = None
    if vision is not None:
        names = _names(model["vision"], "inputs", {"pixel_values": "pixel_values", "image_sizes": "image_sizes"})
        pixels = _check_tensor(problems, vision, names["pixel_values"], output=False, rank=5)
        _check_tensor(problems, vision, names["image_sizes"], output=False, rank=2)
        out = _names(model["vision"], "outputs", {"image_features": "image_features"})["image_features"]
        image_out = _check_tensor(problems, vision, out, output=True, rank=2)
        _check_dim(problems, vision, image_out, hidden)
        if pixels is not None and pixels.dtype not in _FLOATS:
            problems.append(f"{vision.path.name} '{pixels.name}' is {pixels.dtype}, expected one of {_FLOATS}")
        if pixels is not None and pixels.shape and len(pixels.shape) > 1 and isinstance(pixels.shape[1], int):
            crop_slots = pixels.shape[1]
    if embedding is not None:
        names = _names(model["embedding"], "inputs", {"input_ids": "input_ids", "image_features": "image_features"})
        _check_tensor(problems, embedding, names["input_ids"], output=False, rank=2)
        embed_image_in = _check_tensor(problems, embedding, names["image_features"], output=False, rank=2)
        out = _names(model["embedding"], "outputs", {"inputs_embeds": "inputs_embeds"})["inputs_embeds"]
        embed_out = _check_tensor(problems, embedding, out, output=True, rank=3)
        _check_dim(problems, embedding, embed_out, hidden)
    if decoder is not None:
        name = _names(decoder_cfg, "inputs", {"inputs_embeds": "inputs_embeds"})["inputs_embeds"]
        decoder_in = _check_tensor(problems, decoder, name, output=False, rank=3)
    _check_same_dtype(problems, image_out, embed_image_in, "vision output vs embedding input")
    _check_same_dtype(problems, embed_out, decoder_in, "embedding output vs decoder input")

    if problems:
        raise ModelError(f"{folder} is not a usable phi3v model folder: " + "; ".join(problems))
    assert vision is not None and embedding is not None and decoder is not None  # no problems => all loaded
    return ModelInfo(
        folder=folder,
        config=config,
        model_type="phi3v",
        vision=vision,
        embedding=embedding,
        decoder=decoder,
        context_length=int(context),
        hidden_size=int(hidden),  # type: ignore[arg-type]
        eos_token_ids=tuple(int(i) for i in eos_ids),
        crop_slots=crop_slots,
    )
