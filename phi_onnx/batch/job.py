"""Resumable batch jobs: each pending request answered in turn, its line appended to the output as it completes.

The output file, and what a rerun skips or repairs, are :mod:`phi_onnx.batch.output`'s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from phi_onnx.batch.inputs import Request, check_unique
from phi_onnx.batch.output import ResultFile, refuse_own_image
from phi_onnx.errors import PhiOnnxError
from phi_onnx.options import GenerationOptions

_NUMBERS = (
    "finish_reason",
    "prompt_tokens",
    "image_tokens",
    "generated_tokens",
    "time_to_first_token_ms",
    "preprocess_ms",
    "decode_tokens_per_s",
    "elapsed_ms",
    "num_crops",
)


@dataclass(frozen=True)
class JobSummary:
    """What a run of a batch job did.

    Attributes:
        total: Items in the input.
        skipped: Items already in the output from an earlier run, not run again.
        done: Items answered in this run.
        failed: Of those, how many have an error line.
        seconds: Wall time of this run's items.
        repaired: Whether a half-written last line was cut off the output.
        first_result_s: From the start of this run's items to the first result line (on Ray: worker start-up and
            model loading included); None when nothing ran.
    """

    total: int
    skipped: int
    done: int
    failed: int
    seconds: float
    repaired: bool = False
    first_result_s: float | None = None

    @property
    def items_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_items_per_s(self) -> float | None:
        """Items per second after the first result: the rate once start-up is paid (None under two items)."""
        if self.first_result_s is None or self.done < 2 or self.seconds <= self.first_result_s:
            return None
        return (self.done - 1) / (self.seconds - self.first_result_s)


def answer(model: Any, request: Request, defaults: GenerationOptions) -> dict[str, Any]:
    """Run one request and return its result line (a dict). Errors of the request are the line's error, not raised.

    Args:
        model: A loaded :class:`phi_onnx.PhiVision`.
        request: The request.
        defaults: The job's generation options; the request's own options override them.

    Returns:
        ``{"id", "answer", <token counts and timings>, "error": None}``, with ``answer`` the parsed JSON value when
        the request has a ``json_schema``; or ``{"id", "answer": None, "error", "error_type"}``.
    """
    if request.error is not None:
        return _error_line(request.id, request.error_type or "BatchError", request.error)
    try:
        if request.remote is not None:
            request = _fetched(request)
        opts = defaults.updated(request.options) if request.options else defaults
        if request.messages is not None:
            result = model.generate(messages=request.messages, options=opts)
        else:
            result = model.generate(request.prompt, list(request.images), system=request.system, options=opts)
    except PhiOnnxError as err:
        return _error_line(request.id, type(err).__name__, str(err))
    except Exception as err:  # one item's unexpected failure is recorded on its line, with its type
        return _error_line(request.id, type(err).__name__, f"unexpected error: {err}")
    line: dict[str, Any] = {"id": request.id, "answer": result.text}
    line.update({name: getattr(result, name) for name in _NUMBERS})
    if result.frame_times:
        line["frame_times"] = list(result.frame_times)
    line["error"] = None
    if opts.json_schema is not None:
        try:
            line["answer"] = result.json()
        except PhiOnnxError as err:
            line.update(answer=None, text=result.text, error=str(err), error_type=type(err).__name__)
    return line


def _fetched(request: Request) -> Request:
    """The request with each http(s) image replaced by its bytes, fetched under ``phi-onnx serve``'s policy.

    Raises:
        ImageError: A URL the policy refuses (a private address unless allowed, a redirect to one, a non-image, too
            many bytes or redirects) or that could not be fetched; the message names it.
    """
    from dataclasses import replace

    from phi_onnx.errors import ImageError
    from phi_onnx.server.media import fetch_image
    from phi_onnx.server.schema import APIError
    from phi_onnx.server.settings import ServerSettings

    policy = ServerSettings(allow_remote_images=True, allow_private_networks=request.remote == "private")

    def get(source, where: str):
        if not (isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))):
            return source
        try:
            return fetch_image(source, where, policy)
        except APIError as err:
            raise ImageError(err.message) from None

    if request.messages is None:
        images = tuple(get(s, f"image {i + 1}") for i, s in enumerate(request.images))
        return replace(request, images=images)
    messages = []
    for m, message in enumerate(request.messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = []
            for p, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
                    part = {"type": "image", "image": get(url, f"message {m} part {p}")}
                parts.append(part)
            message = {**message, "content": parts}
        messages.append(message)
    return replace(request, messages=messages)


def _error_line(rid: str, kind: str, message: str) -> dict[str, Any]:
    return {"id": rid, "answer": None, "error": " ".join(message.split()), "error_type": kind}


class Progress:
    """A one-line progress report on stderr: items, items/s, ETA and failures.

    On a terminal the line is redrawn in place (at most 10 times a second); otherwise a line is printed every
    ``every_s`` seconds, so logs stay short.
    """

    def __init__(self, total: int, *, stream: IO[str] | None = None, enabled: bool = True, every_s: float = 10.0):
        self.total = total
        self.count = 0
        self.failed = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.1 if self.tty else every_s
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first item completed
        self._shown = 0.0

    def update(self, failed: bool) -> None:
        self.count += 1
        self.failed += failed
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if now - self._shown >= self.every_s or self.count == self.total:
            self._shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.count) / rate if rate > 0 else float("nan")
        eta = _clock(left) if left == left else "?"
        pct = 100 * self.count / self.total if self.total else 100
        return (
            f"batch: {self.count}/{self.total} items ({pct:.0f}%), {rate:.2f} items/s, ETA {eta}, {self.failed} failed"
        )

    def _show(self, now: float) -> None:
        if not self.enabled:
            return
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(("\r\x1b[2K" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.count:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\n")


def _clock(left: float) -> str:
    seconds: int = round(left)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def run_job(
    model: Any,
    requests: Iterable[Request],
    output: str | os.PathLike,
    *,
    options: GenerationOptions | Mapping[str, Any] | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    log: Callable[[str], None] | None = None,
) -> JobSummary:
    """Answer every request not already in ``output``, appending one line per request as it completes.

    Args:
        model: A loaded :class:`phi_onnx.PhiVision`.
        requests: From :func:`phi_onnx.batch.read_requests`, or built in Python; ids unique (5 and "5" are one id).
        output: The JSONL result file; created, or resumed when it exists.
        options: The job's generation options (each request's own options override them).
        progress: Show the progress line on stderr.
        retry_errors: Run again the items whose line in ``output`` is an error (their old lines are removed).
        log: Where to say what the job found (items, already done); default stderr.

    Returns:
        A :class:`JobSummary`.

    Raises:
        BatchError: Two requests have the same id; the output cannot be opened, is another job's, or is not a batch
            result file.
    """
    requests = list(requests)
    check_unique(requests, "the job's requests")
    refuse_own_image(Path(output).expanduser(), requests)
    defaults = model.check_options(_defaults(model, options))  # bad job-wide options stop the job, not each item
    with ResultFile(output, retry_errors=retry_errors) as out:
        pending = not_done(requests, out.done)
        _say(log, _plan(len(requests), len(requests) - len(pending), out))
        bar = Progress(len(pending), enabled=progress)
        start = time.perf_counter()
        try:
            for request in pending:
                line = answer(model, request, defaults)
                out.write(line)
                bar.update(line["error"] is not None)
        finally:
            bar.close()
        return summarise(bar, len(requests), len(requests) - len(pending), start, out.repaired)


def not_done(requests: list[Request], done: Collection[str]) -> list[Request]:
    """The requests whose id is not among the ``done`` ids of an output (compared as the text the lines hold: 5
    matches "5")."""
    return [r for r in requests if str(r.id) not in done]


def summarise(bar: Progress, total: int, skipped: int, start: float, repaired: bool) -> JobSummary:
    """The summary of a run whose items the progress ``bar`` counted, started at ``start`` (perf_counter)."""
    first = bar.first - start if bar.first is not None else None
    return JobSummary(total, skipped, bar.count, bar.failed, time.perf_counter() - start, repaired, first)


def _defaults(model: Any, options: GenerationOptions | Mapping[str, Any] | None) -> GenerationOptions:
    if options is None:
        return model.options
    if isinstance(options, GenerationOptions):
        return options
    return model.options.updated(options)


def _plan(total: int, skipped: int, out: ResultFile) -> str:
    text = f"batch: {total} items, {skipped} already in {out.path}"
    if out.repaired:
        text += " (a half-written last line was cut off; its item runs again)"
    if out.retried:
        text += f" ({out.retried} error lines removed to run again)"
    return f"{text}, {total - skipped} to do"


def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)
        return
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)
