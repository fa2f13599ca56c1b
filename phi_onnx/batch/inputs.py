"""What a batch job reads: a folder of images, a JSONL file of requests, or a CSV with an image column.

Every input becomes a :class:`Request` with a unique id. A line or row that is unusable (not JSON, an unknown field,
a remote URL) becomes a request that carries its error, so it gets its own result line and never stops the job.
The operator of a batch job is trusted: local paths are read, relative to the JSONL or CSV file.
"""

from __future__ import annotations

import contextvars
import csv
import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from phi_onnx.errors import BatchError
from phi_onnx.images import shorten
from phi_onnx.options import GenerationOptions

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi"})
_REMOTE: contextvars.ContextVar[bool] = contextvars.ContextVar("remote_images", default=False)
CHAT_URL = "/v1/chat/completions"
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "url")
_OPTION_NAMES = frozenset(f for f in GenerationOptions.__dataclass_fields__)
_RECORD_KEYS = frozenset(
    {"id", "custom_id", "prompt", "image", "images", "messages", "system", "body", "method", "url"}
)
_OPENAI_OPTIONS = {  # OpenAI chat-completions names -> GenerationOptions names
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}


@dataclass(frozen=True)
class Request:
    """One input of a batch job.

    Attributes:
        id: Unique within the job; the result line carries it, and a rerun skips ids already written.
        prompt: The question (with ``images``), or None with ``messages``.
        images: Image or video sources: absolute paths or data: URLs.
        messages: OpenAI-style messages instead of prompt and images.
        system: A system prompt (with ``prompt``).
        options: Generation options for this request only (over the job's defaults).
        error: Why this input is unusable (it then gets an error line without running the model).
        error_type: The error's class name.
        remote: Which remote image URLs may be fetched: "public" addresses only, or "private" ones too; None
            refuses them when the input is read.
    """

    id: str
    prompt: str | None = None
    images: tuple[str, ...] = ()
    messages: list[Any] | None = None
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    remote: str | None = None  # "public" or "private": fetch http(s) images under the server's policy; None: refused

    def __post_init__(self) -> None:
        if isinstance(self.images, str | os.PathLike):  # one image, not a sequence of characters
            object.__setattr__(self, "images", (os.fspath(self.images),))
        elif not isinstance(self.images, tuple):
            object.__setattr__(self, "images", tuple(self.images))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Request:
        data = json.loads(text)
        data["images"] = tuple(data["images"])
        return cls(**data)


def read_requests(
    source: str | os.PathLike,
    *,
    prompt: str | None = None,
    system: str | None = None,
    image_column: str | None = None,
    remote_images: str | None = None,
) -> list[Request]:
    """Read a batch job's inputs.

    Args:
        source: A folder (every image and video file under it, sorted by path), a ``.jsonl`` file of requests, or a
            ``.csv`` file with an image column.
        prompt: The prompt for folder items, and for JSONL / CSV items that give none.
        system: A system prompt for items in prompt form that give none.
        image_column: The CSV column with image paths (default: the first of image, image_path, path, file,
            filename, url).
        remote_images: None refuses ``http(s)`` image URLs (that item's error); "public" fetches them from public
            addresses only, "private" from private networks too: the policy of ``phi-onnx serve``.

    Returns:
        The requests in input order, ids unique.

    Raises:
        BatchError: The source is missing, of an unknown kind, empty, or has duplicate ids.
    """
    if remote_images not in (None, "public", "private"):
        raise BatchError(f"remote_images must be None, 'public' or 'private', got {remote_images!r}")
    path = Path(source).expanduser()
    token = _REMOTE.set(remote_images is not None)
    try:
        requests = _read(path, prompt, system, image_column)
    finally:
        _REMOTE.reset(token)
    if not requests:
        raise BatchError(f"batch input {str(path)!r} holds no items: add images or request lines")
    check_unique(requests, repr(str(path)))
    if remote_images is not None:
        requests = [replace(r, remote=remote_images) for r in requests]
    return requests


def _read(path: Path, prompt: str | None, system: str | None, image_column: str | None) -> list[Request]:
    if path.is_dir():
        if not prompt:
            raise BatchError(f"{str(path)!r} is a folder of images: give the question with --prompt")
        return list(_folder(path, prompt, system))
    if not path.exists():
        raise BatchError(f"batch input {str(path)!r} does not exist: give a folder, a .jsonl or a .csv file")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return list(_jsonl(path, prompt, system))
    if path.suffix.lower() == ".csv":
        return list(_csv(path, prompt, system, image_column))
    raise BatchError(
        f"batch input {str(path)!r} is neither a folder nor a .jsonl or .csv file: rename it or convert it"
    )


def _folder(folder: Path, prompt: str, system: str | None) -> Iterator[Request]:
    media = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in media and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    for file in files:
        rid = file.relative_to(folder).as_posix()
        if file.is_file():
            yield Request(id=rid, prompt=prompt, images=(str(file),), system=system)
        elif file.is_symlink() and not file.exists():  # counted, with its error line: not dropped in silence
            yield Request(
                id=rid,
                error=f"{shorten(rid)!r} does not exist (a broken link): its target "
                f"{shorten(os.readlink(file))!r} is missing; fix the link or remove it",
                error_type="ImageError",
            )


def _jsonl(path: Path, prompt: str | None, system: str | None) -> Iterator[Request]:
    base = path.parent.resolve()
    with _opened(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                yield _bad(f"line-{number}", f"{where} is not JSON ({err}): write one JSON object per line")
                continue
            if not isinstance(record, dict):
                yield _bad(f"line-{number}", f"{where} is {json_kind(record)}, not a JSON object: write one per line")
                continue
            yield _from_record(record, f"line-{number}", where, base, prompt, system)


def _csv(path: Path, prompt: str | None, system: str | None, image_column: str | None) -> Iterator[Request]:
    base = path.parent.resolve()
    with _opened(path) as lines:
        reader = csv.DictReader(lines)
        columns = reader.fieldnames or []
        column = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
        if column is None or column not in columns:
            wanted = f"column {image_column!r}" if image_column else f"image column ({', '.join(IMAGE_COLUMNS)})"
            fix = "name the column with --image-column"
            if any(";" in c for c in columns):  # Excel in many locales saves "CSV" with semicolons
                fix = "the file seems to use ';' between fields: save it with commas (,) as the separator"
            raise BatchError(
                f"{str(path)!r} has no {wanted}; its columns are {', '.join(map(repr, columns)) or 'none'}: {fix}"
            )
        for number, row in enumerate(reader, 1):
            record: dict[str, Any] = {"image": row.get(column) or ""}
            if row.get("id"):
                record["id"] = row["id"]
            if row.get("prompt"):
                record["prompt"] = row["prompt"]
            yield _from_record(record, f"row-{number}", f"row {number}", base, prompt, system)


class _opened:
    """A text file opened for reading, with a BatchError (not a traceback) when it cannot be."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        try:
            self.file = open(self.path, encoding="utf-8-sig", newline="")  # a BOM (Excel, Notepad) is not data
        except OSError as err:
            raise BatchError(f"cannot read {str(self.path)!r} ({err.strerror}): check the path") from err
        return _decoded(self.file, self.path)

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _decoded(file, path: Path) -> Iterator[str]:
    try:
        yield from file
    except UnicodeDecodeError as err:
        where = f"{err.reason} at byte {err.start}"
        raise BatchError(f"{str(path)!r} is not UTF-8 text ({where}): save it as UTF-8") from err


def _from_record(
    record: dict[str, Any], default_id: str, where: str, base: Path, prompt: str | None, system: str | None
) -> Request:
    """A request from a JSON object (or a CSV row); an unusable record becomes a request carrying its error."""
    raw_id = record.get("id", record.get("custom_id", default_id))
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or str(raw_id) == "":
        return _bad(default_id, f"{where}: id must be a non-empty string or a number, got {_json_text(raw_id)}")
    if "id" in record and "custom_id" in record and str(record["custom_id"]) != str(raw_id):
        return _bad(
            default_id,
            f"{where}: id {_json_text(raw_id)} and custom_id {_json_text(record['custom_id'])} differ: give one",
        )
    rid = str(raw_id)
    try:
        return _parse(record, rid, where, base, prompt, system)
    except _Unusable as err:
        return _bad(rid, str(err))


class _Unusable(ValueError):
    """An input record that cannot run: it becomes that item's error line."""


def _parse(record: dict, rid: str, where: str, base: Path, prompt: str | None, system: str | None) -> Request:
    options: dict[str, Any] = {}
    _check_openai_route(record, where)
    if "body" in record:  # OpenAI's batch format: {"custom_id", "method", "url", "body": {chat completion request}}
        body = record["body"]
        if not isinstance(body, dict):
            raise _Unusable(f"{where}: body must be a chat-completions request object")
        record = {**{k: v for k, v in record.items() if k != "body"}, **_openai_body(body, where, options)}
    for key, value in record.items():
        if key in _OPTION_NAMES:
            options[key] = value
        elif key in _OPENAI_OPTIONS:
            options[_OPENAI_OPTIONS[key]] = value
        elif key not in _RECORD_KEYS:
            known = sorted(_RECORD_KEYS | _OPTION_NAMES)
            hint = difflib.get_close_matches(key, known, n=1)
            raise _Unusable(
                f"{where}: unknown field {key!r}: "
                + (f"did you mean {hint[0]!r}?" if hint else f"use {', '.join(known)}")
            )
    messages = record.get("messages")
    images = record.get("images", [])
    if "image" in record:
        images = [record["image"], *(images if isinstance(images, list) else [images])]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise _Unusable(f"{where}: images must be a list of paths or URLs")
    if messages is not None:
        if not isinstance(messages, list):
            raise _Unusable(f"{where}: messages must be a list of {{'role', 'content'}} objects")
        if "prompt" in record or images or "system" in record:
            raise _Unusable(f"{where}: give either messages, or a prompt with images, not both")
        return Request(id=rid, messages=_resolve_messages(messages, where, base), options=options)
    for key in ("prompt", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise _Unusable(f"{where}: {key} must be a string, got {json_kind(record[key])}")
    schema = options.get("json_schema")
    if schema is not None and not isinstance(schema, dict | str | bool):  # JSON text and true / false are schemas too
        raise _Unusable(f"{where}: json_schema must be a JSON object (a schema), got {json_kind(schema)}")
    text = record.get("prompt", prompt)
    if not isinstance(text, str) or not text:
        raise _Unusable(f"{where}: no prompt: give a 'prompt' field, or --prompt for the whole job")
    sources = tuple(_resolve(s, f"{where} image {i + 1}", base) for i, s in enumerate(images))
    return Request(id=rid, prompt=text, images=sources, system=record.get("system", system), options=options)


def _openai_body(body: dict[str, Any], where: str, options: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions body read exactly as ``phi-onnx serve`` reads it: what it cannot honour is refused."""
    from phi_onnx.server.schema import APIError, parse_chat

    try:
        request = parse_chat({**body, "model": body.get("model") or "batch"}, default_max_tokens=1)
    except APIError as err:
        raise _Unusable(f"{where}: {err.message}") from None
    given = {k: v for k, v in request.options.items() if k != "max_new_tokens"}
    if body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None:
        given["max_new_tokens"] = request.options["max_new_tokens"]  # else the job's --max-new-tokens applies
    options.update(given)
    return {"messages": request.messages}


def _resolve_messages(messages: Sequence[Any], where: str, base: Path) -> list[Any]:
    """Messages with every image source made absolute (relative paths are relative to the input file)."""
    out = []
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _Unusable(f"{where} message {m} is {json_kind(message)}, not a {{'role', 'content'}} object")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _Unusable(f"{where} message {m} content is {json_kind(content)}: give a string or a list of parts")
        if not isinstance(content, list):
            out.append(message)  # the model checks the rest and says what is wrong
            continue
        parts = []
        for p, part in enumerate(content):
            label = f"{where} message {m} part {p}"
            if not isinstance(part, Mapping):
                raise _Unusable(f"{label} is {json_kind(part)}, not a {{'type': ...}} object")
            if isinstance(part, Mapping) and part.get("type") == "image_url":
                value = part.get("image_url")
                url = value.get("url") if isinstance(value, Mapping) else value
                if isinstance(url, str) and url:
                    part = {**part, "image_url": {"url": _resolve(url, label, base)}}
            elif isinstance(part, Mapping) and part.get("type") == "image" and isinstance(part.get("image"), str):
                part = {**part, "image": _resolve(part["image"], label, base)}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def _resolve(source: str, where: str, base: Path) -> str:
    """An image source a batch job reads: a data: URL, or a local path (relative to the input file's folder)."""
    if not source.strip():
        raise _Unusable(f"{where}: the image path is empty: give a path or a data: URL")
    lowered = source[:8].lower()
    if lowered.startswith("data:"):
        return source
    if lowered.startswith(("http://", "https://")) and _REMOTE.get():
        return source  # fetched when the item runs, under the server's policy
    if lowered.startswith(("http://", "https://")):
        raise _Unusable(
            f"{where}: remote URL {shorten(source)!r} is not fetched unless the job allows it: add "
            "--allow-remote-images, or download the images and give their paths or data: URLs"
        )
    if lowered.startswith("file://"):
        source = source[7:]
    elif "://" in source[:16]:
        raise _Unusable(f"{where}: {shorten(source)!r} is not a path or a data: URL")
    return str((base / os.path.expanduser(source)).resolve())


def _check_openai_route(record: dict[str, Any], where: str) -> None:
    """An OpenAI batch line for another endpoint (embeddings, responses) or method is that line's error."""
    url, method = record.get("url"), record.get("method")
    if url is not None and url != CHAT_URL:
        raise _Unusable(
            f"{where}: url is {_json_text(url)}: a batch job answers {CHAT_URL} lines only (chat completions)"
        )
    if method is not None and method != "POST":
        raise _Unusable(f'{where}: method is {_json_text(method)}: OpenAI batch lines use "POST"')


def json_kind(value: Any) -> str:
    """How JSON names the kind of ``value``: null, true or false, a number, a string, a list, an object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _json_text(value: Any) -> str:
    """``value`` as its JSON text, cut short: null, 5, "a", [1, 2] (never Python's None or True)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return shorten(text, 60)


def _bad(rid: str, message: str) -> Request:
    return Request(id=rid, error=message, error_type="BatchError")


def check_unique(requests: Sequence[Request], where: str) -> None:
    """Refuse a job whose ids repeat (compared as the text the result lines hold: 5 and "5" are the same id).

    Raises:
        BatchError: Naming the id and the two items.
    """
    seen: dict[str, int] = {}
    for index, request in enumerate(requests):
        key = str(request.id)
        if key in seen:
            raise BatchError(
                f"id {shorten(key)!r} appears twice in {where} (items {seen[key] + 1} and {index + 1}): ids must be "
                "unique so a rerun can skip finished items"
            )
        seen[key] = index
