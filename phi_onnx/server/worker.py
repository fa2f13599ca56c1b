"""The worker process: one loaded model, one generation at a time, driven over a pipe by the server's scheduler.

onnxruntime-genai holds the interpreter lock through the prompt pass and each decode step, so generations in threads
would stall the server's event loop (and each other) for seconds. Each worker is a process of its own: the event loop
never waits on the model, a crash takes down one worker and not the server, and ``parallel`` workers really run at
once.

Messages, main -> worker: ``("run", job_id, request)``, ``("cancel", job_id)``, ``("stop",)``.
Worker -> main: ``("ready", info)`` or ``("failed", message)`` once; then per job ``("error", job_id, kind, message)``
(with the message or part it names, ``messages[i]`` or ``messages[i].content[j]``, as a fifth item when it names one)
or ``("start", job_id, stats, first text)``, ``("text", job_id, text, generated)`` per later token, and
``("done", job_id, stats)``.
"""

from __future__ import annotations

import re
import signal
import traceback
from typing import Any

_MESSAGE = re.compile(r"message (\d+)\b")  # how the prompt builder names a message in its errors


def main(conn, load_kwargs: dict[str, Any]) -> None:
    """Load the model, say ready, then serve jobs until the pipe closes or ``stop`` arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from phi_onnx.errors import PhiOnnxError
    from phi_onnx.model import load

    try:
        model = load(**load_kwargs)
    except PhiOnnxError as err:
        conn.send(("failed", str(err)))
        return
    except Exception as err:
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", {"context_length": model.context_length, "device": model.device, "threads": model.threads}))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            if message[0] == "run" and _run(conn, model, message[1], message[2]) == "stop":
                return
            # a "cancel" for a job that already ended is dropped
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the server went away


def _run(conn, model, job_id: int, request: dict[str, Any]) -> str | None:
    """Run one job; returns "stop" when a stop message arrived during it."""
    from phi_onnx.errors import PhiOnnxError, PromptError
    from phi_onnx.options import GenerationOptions

    try:
        messages = _decoded(request["messages"], request["images"], model.max_frames, model.frame_sampling)
        options = request["options"]
        limit = request.get("max_prompt_tokens")
        if request.get("max_tokens_default") or limit is not None:
            # The prompt's exact length before the prompt pass, from the images' sizes (no HD transform).
            probe = GenerationOptions.from_mapping(options, max_new_tokens=max(1, options.get("min_new_tokens", 0)))
            prompt_tokens = model.count_tokens(messages=messages, options=probe)
            if limit is not None and prompt_tokens > limit:
                message = (
                    f"the prompt is {prompt_tokens:,} tokens, over this server's limit of {limit:,}: shorten it or "
                    "send fewer or smaller images"
                )
                conn.send(("error", job_id, "ContextLengthError", message))
                return None
            if request.get("max_tokens_default"):  # no max_tokens given: the default, capped by the context left
                room = model.context_length - prompt_tokens
                options = {**options, "max_new_tokens": max(1, min(options["max_new_tokens"], room))}
        stream = model.stream(messages=messages, options=options)
        first = next(stream)
    except StopIteration:  # pragma: no cover - a stream always yields its final chunk
        conn.send(("error", job_id, "RuntimeError", "the generation ended before it started"))
        return
    except _PartError as err:
        conn.send(("error", job_id, type(err.__cause__).__name__, str(err), err.where))
        return
    except PhiOnnxError as err:
        named = _MESSAGE.match(str(err)) if isinstance(err, PromptError) else None  # "message 2 (user) ..."
        where = (f"messages[{named.group(1)}]",) if named else ()  # the prompt builder numbers messages as sent
        conn.send(("error", job_id, type(err).__name__, str(err), *where))
        return
    except Exception as err:
        conn.send(("error", job_id, "internal", "".join(traceback.format_exception_only(err)).strip()))
        return
    conn.send(("start", job_id, _stats(first), first.text))
    chunk = first
    try:
        for chunk in stream:
            if conn.poll() and (why := _cancelled(conn, job_id)):
                stream.close()
                conn.send(("done", job_id, {**_stats(chunk), "finish_reason": "cancelled"}))
                return why
            _send_text(conn, job_id, chunk)
    except PhiOnnxError as err:
        conn.send(("done", job_id, {**_stats(chunk), "finish_reason": "error", "error": str(err)}))
        return
    except Exception as err:
        message = "".join(traceback.format_exception_only(err)).strip()
        conn.send(("done", job_id, {**_stats(chunk), "finish_reason": "error", "error": message, "internal": True}))
        return
    conn.send(("done", job_id, _stats(chunk)))


class _PartError(Exception):
    """An error in one part of the request (its cause is the library's error), named by its path."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def _send_text(conn, job_id: int, chunk) -> None:
    if chunk.text or chunk.finish_reason is None:
        conn.send(("text", job_id, chunk.text, chunk.generated_tokens))


def _cancelled(conn, job_id: int) -> str | None:
    """Read what arrived during a job: "cancel" (this job), "stop" (the worker), or None."""
    why = None
    while conn.poll():
        message = conn.recv()
        if message[0] == "stop":
            why = "stop"
        elif message[0] == "cancel" and message[1] == job_id and why is None:
            why = "cancel"
    return why


def _stats(chunk) -> dict[str, Any]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "image_tokens": chunk.image_tokens,
        "cached_tokens": chunk.cached_tokens,
        "generated_tokens": chunk.generated_tokens,
        "time_to_first_token_ms": chunk.time_to_first_token_ms,
        "decode_tokens_per_s": chunk.decode_tokens_per_s,
        "finish_reason": chunk.finish_reason,
    }


def _decoded(messages: list[dict], images: list, max_frames: int, sampling: str) -> list[dict]:
    """Messages with each image_url part replaced by the frames decoded from its bytes (``detail: low``: 1 crop)."""
    from phi_onnx.errors import ImageError
    from phi_onnx.images import load_frames
    from phi_onnx.model import CROPS, DECODED

    out = [dict(m) for m in messages]
    expanded: dict[tuple[int, int], list] = {}
    for i, p, data, detail in images:
        try:
            frames = load_frames(data, max_frames=max_frames, sampling=sampling)
        except ImageError as err:
            where = f"messages[{i}].content[{p}]"
            raise _PartError(f"{where}: {err}", where) from err
        for frame in frames:
            frame.info[DECODED] = True
            if detail == "low":
                frame.info[CROPS] = 1
        expanded[(i, p)] = frames
    for i, message in enumerate(out):
        if isinstance(message.get("content"), list):
            parts = []
            for p, part in enumerate(message["content"]):
                if (i, p) in expanded:
                    parts.extend({"type": "image", "image": f} for f in expanded[(i, p)])
                else:
                    parts.append(part)
            out[i] = {**message, "content": parts}
    return out


if __name__ == "__main__":  # started by the scheduler: python -m phi_onnx.server.worker FD
    import sys
    from multiprocessing.connection import Connection

    _conn = Connection(int(sys.argv[1]))
    main(_conn, _conn.recv())
