"""Slots, queue and worker processes: at most ``parallel`` generations at once, a bounded queue, cancellation.

The scheduler lives on the server's event loop. Each worker process runs one job at a time; a job waits in a FIFO
queue (bounded: one more is refused with :class:`QueueFull`) until a worker is idle. A cancelled job is dropped from
the queue, or stopped by its worker within one decode step; its worker is free again when it says the job is done,
so no two jobs ever share a worker. A worker that dies fails its job, and a new worker takes its place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from phi_onnx.errors import ModelError

log = logging.getLogger("phi_onnx.server")
_ids = itertools.count(1)
_AFFINITY_KEYS = 4096  # conversations whose last worker is remembered
_REAP_S = 5.0  # how long a worker whose pipe closed may take to exit before it is killed


class QueueFull(Exception):
    """Every worker is busy and the queue is at its limit."""


@dataclass(eq=False)
class Job:
    """One request's generation: the messages its worker sends arrive on ``events``."""

    request: dict[str, Any]
    id: int = field(default_factory=lambda: next(_ids))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    worker: _Worker | None = None
    affinity: str | None = None
    cancelled: bool = False
    finished: bool = False


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Any
    job: Job | None = None
    ready: bool = False


class Scheduler:
    """Runs jobs on ``parallel`` worker processes, each with its own copy of the model."""

    def __init__(self, load_kwargs: dict[str, Any], parallel: int, max_queue: int) -> None:
        self.load_kwargs = load_kwargs
        self.parallel = parallel
        self.max_queue = max_queue
        self.info: dict[str, Any] = {}
        self._workers: list[_Worker] = []
        self._waiting: collections.deque[Job] = collections.deque()
        self._affinity: collections.OrderedDict[str, _Worker] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(1 for w in self._workers if w.job is not None)

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self._workers if w.ready)

    def busy(self) -> bool:
        return bool(self._waiting) or self.running > 0

    async def start(self) -> None:
        """Start the workers and wait until every one has loaded the model.

        Raises:
            ModelError: A worker could not load the model (its one-line reason).
        """
        self._loop = asyncio.get_running_loop()
        waits = [self._spawn() for _ in range(self.parallel)]
        results = await asyncio.gather(*waits, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]

    def _spawn(self) -> asyncio.Future:
        # A fresh interpreter running the worker module, not multiprocessing's spawn: that would re-import the
        # caller's __main__ (a script that builds the app at top level would start itself again).
        parent_end, child_end = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "phi_onnx.server.worker", str(child_end.fileno())],
            pass_fds=[child_end.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child_end.close()
        parent = Connection(parent_end.detach())
        parent.send(self.load_kwargs)
        worker = _Worker(process, parent)
        self._workers.append(worker)
        ready = self._loop.create_future()
        self._loop.add_reader(parent.fileno(), self._readable, worker, ready)
        return ready

    def submit(self, request: dict[str, Any], affinity: str | None = None) -> Job:
        """Queue a job; it starts as soon as a worker is free.

        Args:
            request: What the worker runs.
            affinity: A key of the conversation (its opening messages): when the worker that served the same key
                last is idle, the job goes there, where that conversation's cached prefix lives.

        Raises:
            QueueFull: ``max_queue`` jobs are already waiting.
        """
        if len(self._waiting) >= self.max_queue and not self._idle_worker():
            raise QueueFull
        job = Job(request)
        job.affinity = affinity
        self._waiting.append(job)
        self._dispatch()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job: dropped if still queued, else its worker stops it within one decode step."""
        if job.finished or job.cancelled:
            return
        job.cancelled = True
        if job.worker is None:
            self._waiting.remove(job)
            self._finish(job, ("done", job.id, {"finish_reason": "cancelled"}))
        else:
            with contextlib.suppress(OSError):  # a worker that is gone fails the job in _readable
                job.worker.conn.send(("cancel", job.id))

    def abandon(self) -> int:
        """Give up on every queued and running job (the server stops): each gets a ``("shutdown",)`` event and is
        cancelled. Returns how many there were."""
        jobs = [*self._waiting, *(w.job for w in self._workers if w.job is not None)]
        for job in jobs:
            if not job.finished:
                job.events.put_nowait(("shutdown",))
                self.cancel(job)
        return len(jobs)

    def _idle_worker(self) -> _Worker | None:
        return next((w for w in self._workers if w.ready and w.job is None), None)

    def _dispatch(self) -> None:
        while self._waiting and (worker := self._idle_worker()) is not None:
            job = self._waiting.popleft()
            preferred = self._affinity.get(job.affinity) if job.affinity else None
            if preferred is not None and preferred.ready and preferred.job is None:
                worker = preferred
            if job.affinity:
                self._affinity[job.affinity] = worker
                self._affinity.move_to_end(job.affinity)
                while len(self._affinity) > _AFFINITY_KEYS:
                    self._affinity.popitem(last=False)
            job.worker, worker.job = worker, job
            job.started_at = time.perf_counter()
            try:
                worker.conn.send(("run", job.id, job.request))
            except OSError:
                self._lost(worker)

    def _readable(self, worker: _Worker, ready: asyncio.Future) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._lost(worker, ready)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self.info = message[1]
            if not ready.done():
                ready.set_result(None)
            self._dispatch()
        elif kind == "failed":
            if not ready.done():
                ready.set_exception(ModelError(message[1]))
            self._remove(worker)
        elif worker.job is not None and message[1] == worker.job.id:
            job = worker.job
            if kind in ("done", "error"):
                worker.job = None
                self._finish(job, message)
                self._dispatch()
            else:
                job.events.put_nowait(message)

    def _finish(self, job: Job, message: tuple) -> None:
        job.finished = True
        job.events.put_nowait(message)

    def _lost(self, worker: _Worker, ready: asyncio.Future | None = None) -> None:
        """A worker died: fail its job at once, start another in its place unless the server is stopping, and reap
        the dead one (its exit code is logged once the process has really exited)."""
        job = worker.job
        worker.job = None
        self._remove(worker)
        if job is not None:
            self._finish(job, ("error", job.id, "internal", f"worker process {worker.process.pid} exited"))
        self._loop.create_task(self._reap(worker, job, ready))
        if (ready is None or ready.done()) and not self._stopping:
            self._spawn()

    async def _reap(self, worker: _Worker, job: Job | None, ready: asyncio.Future | None) -> None:
        # The pipe closes a moment before the process is gone: wait for its exit (killing one that closed its end of
        # the pipe and lingers), so that no zombie is left and the log says how it ended.
        deadline = time.monotonic() + _REAP_S
        while (code := worker.process.poll()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if code is None:
            worker.process.kill()
            code = await asyncio.to_thread(worker.process.wait)
        if ready is not None and not ready.done():
            ready.set_exception(ModelError(f"a worker process exited while loading the model (exit code {code})"))
        elif job is not None:
            log.error("worker process %s exited (code %s) during job %s", worker.process.pid, code, job.id)
        elif not self._stopping:
            log.warning("worker process %s exited (code %s)", worker.process.pid, code)

    def _remove(self, worker: _Worker) -> None:
        worker.ready = False  # also in the affinity map: never dispatched to again
        if worker in self._workers:
            self._workers.remove(worker)
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(worker.conn.fileno())
        worker.conn.close()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker (running jobs are cancelled); kill those that do not exit within ``timeout``."""
        self._stopping = True
        for job in list(self._waiting):
            self.cancel(job)
        workers = list(self._workers)
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        deadline = time.monotonic() + timeout
        for worker in workers:
            while worker.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(5)
            self._remove(worker)
