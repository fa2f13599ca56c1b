"""Resumable batch jobs: one result line per input, written as each completes, skipped on a rerun.

The output is JSON Lines. Each line is written with a single ``write`` on a file opened for appending and reaches the
operating system before the next item starts, so a killed job loses at most the item in flight. On a rerun the ids
already in the file are skipped; a half-written last line (the process died inside ``write``) is cut off and its item
runs again, so nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from phi_onnx.batch.inputs import Request, check_unique
from phi_onnx.errors import BatchError, PhiOnnxError
from phi_onnx.images import shorten
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


class ResultFile:
    """The job's JSONL output, opened for appending after reading which ids it already holds.

    Use as a context manager; :attr:`done` holds the ids already written and :meth:`write` appends one line.
    With ``retry_errors``, the error lines of earlier runs are taken out of the file first (by writing the other
    lines to a new file that replaces it), so their items run again and each id still has one line.
    """

    def __init__(self, path: str | os.PathLike, *, retry_errors: bool = False, repair: bool = True) -> None:
        self.path = Path(path).expanduser()
        self.retry_errors = retry_errors
        self.repair = repair  # False: a check that changes nothing (a half-written last line is left for the job)
        self.done: set[str] = set()
        self.failed_before = 0
        self.retried = 0
        self.repaired = False
        self._fd: int | None = None
        self._created = False  # this run made the file: a job that fails before its first line takes it away

    def __enter__(self) -> ResultFile:
        if self.path.is_dir():
            raise BatchError(f"--output {str(self.path)!r} is a folder: give a .jsonl file path")
        self._created = not os.path.lexists(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise BatchError(f"cannot open --output {str(self.path)!r} ({err.strerror}): check the path") from err
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):  # a FIFO or device: the scan would block or read input
                raise BatchError(
                    f"--output {str(self.path)!r} is not a regular file (resuming reads it back): give a .jsonl file "
                    "path, and read the results from it"
                )
            _lock(self._fd, self.path)
            self._scan()
            if self.retry_errors and self.failed_before:
                self._drop_errors()
        except BaseException:
            self.close()
            raise
        return self

    def _drop_errors(self) -> None:
        """Replace the file by its lines without errors (crash-safe: a new file renamed over the old one).

        A symlinked output has its target rewritten (the link stays a link), and the new file keeps the old one's
        permission bits.
        """
        real = Path(os.path.realpath(self.path))
        staging = real.with_name(real.name + ".retry-tmp")
        mode = stat.S_IMODE(os.fstat(self._fd).st_mode)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(self._fd, "rb", closefd=False) as old, open(fd, "wb") as new:
            os.fchmod(fd, mode)  # after creation: the umask does not apply to fchmod
            old.seek(0)
            for raw in old:
                if raw.strip() and json.loads(raw).get("error") is None:
                    new.write(raw)
            new.flush()
            os.fsync(new.fileno())
        os.replace(staging, real)
        retried = self.failed_before
        self.close()
        self.done, self.failed_before = set(), 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        _lock(self._fd, self.path)
        self._scan()
        self.retried = retried

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._created and self._fd is not None and os.fstat(self._fd).st_size == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # no empty file is left by a job that failed before any item
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _scan(self) -> None:
        end = 0  # the offset after the last complete line
        tail = b""
        with open(self._fd, "rb", closefd=False) as file:
            file.seek(0)
            for number, raw in enumerate(file, 1):  # line by line: an output of millions of lines is not read whole
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                end += len(raw)
                if raw.strip():
                    self._add(raw, number)
        if tail:  # a line cut short by a killed process: drop it, its item runs again
            if not tail.lstrip().startswith(b'{"id"'):
                raise BatchError(
                    f"--output {str(self.path)!r} ends with text that is not a result line: is it the right file? "
                    "Give a new path, or the JSONL an earlier phi-onnx batch run wrote"
                )
            if self.repair:
                os.ftruncate(self._fd, end)
            self.repaired = True

    def _add(self, raw: bytes, number: int) -> None:
        try:
            line = json.loads(raw)
            rid = line["id"]
        except (ValueError, KeyError, TypeError) as err:
            raise BatchError(
                f"--output {str(self.path)!r} line {number} is not a phi-onnx batch result "
                f"({shorten(raw.decode('utf-8', 'replace').strip(), 60)!r}): give a new path, or the JSONL an "
                "earlier run wrote"
            ) from err
        self.done.add(str(rid))
        self.failed_before += line.get("error") is not None

    def write(self, line: Mapping[str, Any] | str) -> None:
        """Append one result line (a dict, or its JSON text) with a single write; it is in the file on return."""
        text = line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
        data = (text.rstrip("\n") + "\n").encode("utf-8")
        if self._fd is None:
            raise BatchError("the result file is closed")
        end = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:  # a regular file takes the whole line in one write; the loop covers signals mid-write
                view = view[os.write(self._fd, view) :]
        except OSError as err:  # a full disk or quota, an I/O error: no half line is left behind
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)
            raise BatchError(
                f"cannot write to --output {str(self.path)!r} ({err.strerror}): free space (or fix the disk) and run "
                "the same command again; the lines already written are kept and their items are skipped"
            ) from err


def check_output(output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), retry_errors: bool = False):
    """Check, before any model is loaded, that ``output`` can take a job's results; returns (ids done, lines to retry).

    Refuses an output that is one of the ``inputs`` (the job would read its own results as requests, or write over
    them), and everything :class:`ResultFile` refuses: a folder, a FIFO or device, another job's file, a file that is
    not a batch result, a path that cannot be created. A new output is not created here (a job that then fails
    before its first item leaves no empty file): its folder is checked instead.
    """
    path = Path(output).expanduser()
    for source in inputs:
        with contextlib.suppress(OSError):
            if path.exists() and os.path.samefile(path, source):
                raise BatchError(
                    f"--output {str(path)!r} is the job's input: give the results their own file, e.g. results.jsonl"
                )
    if not path.exists():
        _check_creatable(path)
        return set(), 0
    with ResultFile(path, repair=False) as out:
        return set(out.done), out.failed_before if retry_errors else 0


def _check_creatable(path: Path) -> None:
    """Refuse a new output whose folder (or the nearest existing folder above it) this process cannot write."""
    folder = Path(os.path.realpath(path)).parent  # a dangling symlink: its target is the file created
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BatchError(f"cannot create --output {str(path)!r}: {str(folder)!r} is not a folder; check the path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BatchError(
            f"cannot create --output {str(path)!r}: the folder {str(folder)!r} is not writable; check the path"
        )


def _lock(fd: int, path: Path) -> None:
    """One job per output file: two writers would duplicate lines."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks through fcntl; run one job per output file
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        raise BatchError(
            f"another phi-onnx batch job is writing {str(path)!r}: wait for it, or give a different --output"
        ) from err


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
    defaults = model.check_options(_defaults(model, options))  # bad job-wide options stop the job, not each item
    with ResultFile(output, retry_errors=retry_errors) as out:
        pending = not_done(requests, out)
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


def not_done(requests: list[Request], out: ResultFile) -> list[Request]:
    """The requests whose id is not in ``out`` yet (ids compared as the text the lines hold: 5 matches "5")."""
    return [r for r in requests if str(r.id) not in out.done]


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
