"""OpenAI's chat-completions request and response shapes, mapped to phi-onnx's messages and options.

Parsing is done by hand rather than with pydantic models so that every refusal is OpenAI's error body naming the
parameter, and so that a parameter we cannot honour is refused instead of silently dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phi_onnx.errors import OptionsError
from phi_onnx.options import GenerationOptions


class APIError(Exception):
    """An error answered with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Sampling parameters: request name -> (option name, OpenAI's range). Extensions are spelled as vLLM spells them.
_NUMBERS: dict[str, tuple[str, type, float, float]] = {
    "temperature": ("temperature", float, 0.0, 2.0),
    "top_p": ("top_p", float, 0.0, 1.0),
    "seed": ("seed", int, -(2**63), 2**63 - 1),
    "top_k": ("top_k", int, -1, 1_000_000),
    "min_tokens": ("min_new_tokens", int, 0, 131072),
    "repetition_penalty": ("repetition_penalty", float, 0.0, 10.0),
    "num_crops": ("num_crops", int, 1, 64),
}
# OpenAI parameters we cannot honour, with the values that mean "off" (accepted).
_OFF: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, ()),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, ()),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ("text",)),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "verbosity": (None,),
}
# Accepted and without effect on the answer (identifiers and metadata for the caller's own bookkeeping).
_IGNORED = ("user", "metadata", "safety_identifier", "prompt_cache_key")
_KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_grammar",
    *_NUMBERS,
    *_OFF,
    *_IGNORED,
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 16


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    images: list[tuple[int, int, str, str]] = field(default_factory=list)  # (message, part, url, detail)
    constraint: str | None = None  # the request parameter that constrains the output (response_format, guided_*)


def parse_chat(body: object, default_max_tokens: int) -> ChatRequest:
    """Validate a chat-completions body; every refusal names the parameter.

    Raises:
        APIError: 400 for anything malformed or unsupported.
    """
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad(f"unrecognized request argument: {unknown[0]}", param=unknown[0], code="unknown_parameter")
    for name, offs in _OFF.items():
        value = body.get(name)
        if value is None:
            continue
        if any(isinstance(off, bool) for off in offs) and not isinstance(value, bool):
            raise bad(f"{name} must be true or false, got {_show(value)}", param=name)
        if any(_is_number(off) for off in offs) and not _is_number(value):
            raise bad(f"{name} must be a number, got {_show(value)}", param=name)
        probe = tuple(value) if isinstance(value, list) else value
        if not any(probe == off for off in offs if off is not None):
            raise bad(f"{name}={_show(value)} is not supported by this server: remove it", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: name the served model (GET /v1/models lists it)", param="model")
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "include_obfuscation"}:
            raise bad("stream_options must be an object with include_usage", param="stream_options")
        if not stream:
            raise bad("stream_options is only allowed with stream=true", param="stream_options")
        include_usage = _flag(stream_options, "include_usage", "stream_options.include_usage")
    options = _options(body, default_max_tokens)
    constraint = _constraint(body)
    messages, images = _messages(body.get("messages"))
    return ChatRequest(model, messages, options, stream, include_usage, images, constraint and constraint[0])


def _options(body: dict, default_max_tokens: int) -> dict[str, Any]:
    options: dict[str, Any] = {}
    given = {k: body.get(k) for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise bad("max_tokens and max_completion_tokens differ: give one of them", param="max_completion_tokens")
    for name, value in given.items():
        options["max_new_tokens"] = _number(name, value, int, 1, 131072)
        _check_option(name, "max_new_tokens", options["max_new_tokens"])
    for name, (option, kind, low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is not None:
            options[option] = _number(name, value, kind, low, high)
            if option == "top_k" and options[option] == -1:  # vLLM's spelling of "no limit"
                options[option] = 0
            if option == "seed":  # og takes a 31-bit seed; the same request seed still gives the same text
                options[option] %= 2**31 - 1
            _check_option(name, option, options[option])
    options.setdefault("max_new_tokens", max(default_max_tokens, options.get("min_new_tokens", 0)))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
            raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
        options["stop"] = tuple(stops)
    constraint = _constraint(body)
    if constraint is not None:
        options[constraint[1]] = constraint[2]
    try:
        GenerationOptions.from_mapping(options)
    except OptionsError as err:  # the one check across fields: min_tokens against max_tokens
        raise bad(str(err), param="min_tokens" if "min_new_tokens" in str(err) else None) from None
    return options


def _constraint(body: dict) -> tuple[str, str, Any] | None:
    """(request parameter, option, value) of the one output constraint, if any."""
    found: list[tuple[str, str, Any]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(("response_format", "json_schema", {"type": "object"}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise bad("response_format.json_schema must be an object with a schema", param="response_format")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise bad("response_format.json_schema.schema must be a JSON object", param="response_format")
            found.append(("response_format", "json_schema", schema))
        elif kind != "text":
            raise bad(f"response_format type {kind!r}: use text, json_object or json_schema", param="response_format")
    for name, option in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_grammar", "grammar")):
        if body.get(name) is not None:
            found.append((name, option, body[name]))
    if len(found) > 1:
        raise bad(f"give one of {found[0][0]} and {found[1][0]}, not both", param=found[1][0])
    if not found:
        return None
    name, option, value = found[0]
    _check_option(name, option, value)
    return name, option, value


def _messages(messages: object) -> tuple[list[dict[str, Any]], list[tuple[int, int, str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    images: list[tuple[int, int, str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"{where}.role {_show(role)} is not supported: use system, developer, user or assistant", where)
        if message.get("tool_calls") or message.get("function_call") or message.get("audio"):
            raise bad(f"{where} carries tool calls or audio, which this server does not support", param=where)
        unknown = sorted(set(message) - {"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"})
        if unknown:
            raise bad(f"{where} has the unknown field {unknown[0]!r}", param=f"{where}.{unknown[0]}")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for p, part in enumerate(content):
                parts.append(_part(part, i, p, images))
            content = parts
        elif content is not None and not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        out.append({"role": _ROLES[role], "content": content})
    return out, images


def _part(part: object, i: int, p: int, images: list) -> dict[str, Any]:
    where = f"messages[{i}].content[{p}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where} is a text part without a text string", param=where)
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        detail = (spec.get("detail") if isinstance(spec, dict) else None) or "auto"
        if not isinstance(url, str) or not url:
            raise bad(f"{where} is an image_url part without a url", param=where)
        if detail not in ("auto", "low", "high"):
            raise bad(f"{where}.image_url.detail must be auto, low or high", param=where)
        images.append((i, p, url, detail))
        return {"type": "image_url", "image_url": {"url": url}}
    raise bad(f"{where} has type {_show(kind)}: this server takes text and image_url parts", param=where)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # True == 1 in Python, not in JSON


def _number(name: str, value: object, kind: type, low: float, high: float) -> float | int:
    ok = _is_number(value) and not (isinstance(value, float) and not math.isfinite(value))
    if ok and kind is int and isinstance(value, float):
        ok = value.is_integer()
        value = int(value) if ok else value
    if not ok or not low <= value <= high:  # compared exactly: an int of any size, never turned into a float
        what, shown = ("a whole number", "{:,}") if kind is int else ("a number", "{:g}")
        span = f"between {shown.format(low)} and {shown.format(high)}"
        raise bad(f"{name} must be {what} {span}, got {_show(value)}", param=name)
    return kind(value)


def _check_option(name: str, option: str, value: object) -> None:
    """Our own range of one option (narrower than OpenAI's in places, e.g. top_p > 0), named by its request name."""
    alone = {option: value, "max_new_tokens": max(1, value)} if option == "min_new_tokens" else {option: value}
    try:
        GenerationOptions.from_mapping(alone)
    except OptionsError as err:
        raise bad(f"{name}: {err}", param=name) from None


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{param or name} must be true or false, got {_show(value)}", param=param or name)
    return value


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**60:
        return f"a number of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def completion(request_id: str, model: str, text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }


def chunk(request_id: str, model: str, created: int, delta: dict | None, finish: str | None, usage=False) -> dict:
    """A ``chat.completion.chunk``: a delta on choice 0, or (``delta`` None) the usage-only chunk."""
    out: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not False:
        out["usage"] = usage
    return out


def usage(prompt: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
