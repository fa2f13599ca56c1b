"""The job's output file: one JSON line per result, resumable, checked before any model loads.

Each line is written with a single ``write`` on a file opened for appending and reaches the operating system before
the next item starts. On a rerun the ids already in the file are skipped; a half-written last line (the process died
inside ``write``) is cut off and its item runs again, so nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from phi_onnx.batch.inputs import Request
from phi_onnx.errors import BatchError
from phi_onnx.images import shorten


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
        try:
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
        except OSError as err:  # the folder cannot take the new file (read-only, full): the output is untouched
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise BatchError(
                f"--retry-errors cannot rewrite {str(real)!r} ({err.strerror}): it writes a new file next to it "
                "first, so the folder must be writable and have room; the output is unchanged"
            ) from err
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


def check_output(
    output: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    requests: Iterable[Request] = (),
    retry_errors: bool = False,
):
    """Check, before any model is loaded, that ``output`` can take a job's results; returns (ids done, lines to retry).

    Refuses an output that is one of the ``inputs`` (the job would read its own results as requests, or write over
    them) or one of the ``requests``' image files, and everything :class:`ResultFile` refuses: a folder, a FIFO or
    device, another job's file, a file that is not a batch result, a path that cannot be created. A new output is not
    created here (a job that then fails before its first item leaves no empty file): its folder is checked instead.
    """
    path = Path(output).expanduser()
    for source in inputs:
        with contextlib.suppress(OSError):
            if path.exists() and os.path.samefile(path, source):
                raise BatchError(
                    f"--output {str(path)!r} is the job's input: give the results their own file, e.g. results.jsonl"
                )
    refuse_own_image(path, requests)
    if not path.exists():
        _check_creatable(path)
        return set(), 0
    with ResultFile(path, repair=False) as out:
        return set(out.done), out.failed_before if retry_errors else 0


def refuse_own_image(output: Path, requests: Iterable[Request]) -> None:
    """Refuse an output that is one of the requests' local image files (the job would write its results into it).

    Cheap on a million items: the output is looked up once, and only images with its file name are compared.

    Raises:
        BatchError: Naming the item.
    """
    try:
        mine = os.stat(output)
    except OSError:
        return  # not there yet: no image can be it
    names = {output.name, os.path.basename(os.path.realpath(output))}
    for request in requests:
        for source in _local_images(request):
            if os.path.basename(source) not in names:
                continue
            with contextlib.suppress(OSError):
                theirs = os.stat(source)
                if (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino):
                    raise BatchError(
                        f"--output {str(output)!r} is an image of the job (item {shorten(str(request.id))!r}): give "
                        "the results their own file, e.g. results.jsonl, outside the inputs"
                    )


def _local_images(request: Request) -> Iterator[str]:
    """The request's image sources that are local paths (not data: or http(s) URLs)."""
    sources: list[Any] = list(request.images)
    for message in request.messages or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, Mapping):
                continue
            value = part.get("image_url") if part.get("type") == "image_url" else part.get("image")
            sources.append(value.get("url") if isinstance(value, Mapping) else value)
    for source in sources:
        if isinstance(source, str) and not source[:8].lower().startswith(("data:", "http://", "https://")):
            yield source


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
