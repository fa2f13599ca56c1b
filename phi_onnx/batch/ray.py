"""The batch job on Ray Data: one phi-onnx model per Ray actor, the same result lines and the same resume semantics.

The driver reads the inputs and the result file exactly as the local job does, hands the pending requests to Ray Data
(``from_items``, small blocks so results come back as they finish), maps them over a pool of actors that each load the
model once (``map_batches`` with an ``ActorPoolStrategy``), and appends each result line to the output as it streams
back. Workers read image files by path, so on a multi-node cluster the inputs must be on storage every node sees.

Python recipe::

    import ray
    from phi_onnx.batch import read_requests
    from phi_onnx.batch.ray import RayJob

    ray.init(address="auto")  # or let RayJob start a local instance
    job = RayJob("/shared/models/phi-3.5-vision", workers=8, gpus_per_worker=1)
    requests = read_requests("/shared/scans", prompt="Extract the total.")
    job.run(requests, "/shared/totals.jsonl", options={"max_new_tokens": 64})
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.batch.inputs import Request, check_unique
from phi_onnx.batch.job import JobSummary, Progress, _plan, _say, answer, not_done, summarise
from phi_onnx.batch.output import ResultFile, refuse_own_image
from phi_onnx.errors import BatchError, PhiOnnxError, require
from phi_onnx.options import GenerationOptions

MAX_RETRIES = 3  # a block whose worker died is tried again on a new worker this many times, then the job stops
MAX_BLOCKS = 100_000  # one request per block up to this many, so each result streams back as soon as it is done


_FAILED = "phi_onnx_worker_failed"  # the key of a worker's answer that stops the job (no result line has it)


class _Worker:
    """A Ray actor: loads the model once, then answers batches of requests (JSON text in, result-line JSON out).

    A worker that cannot start (the model does not load, a job-wide option does not work with it) does not raise in
    ``__init__``: Ray would print its actor-death tracebacks and hand the driver an error that has lost the cause.
    It answers every request with ``{_FAILED: {"type", "message"}}`` instead, and the driver raises that error.
    """

    def __init__(self, model: str | None, load_options: dict[str, Any], defaults: GenerationOptions) -> None:
        import phi_onnx

        self.failed: dict[str, str] | None = None
        try:
            self.model = phi_onnx.load(model, **load_options)
            self.defaults = self.model.check_options(defaults)  # bad job-wide options fail the job, not each item
        except PhiOnnxError as err:
            self.failed = {"type": type(err).__name__, "message": str(err)}
        except Exception as err:  # e.g. a node without onnxruntime: its type and message go to the driver
            self.failed = {
                "type": "BatchError",
                "message": f"a Ray worker could not start ({type(err).__name__}: {err})",
            }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.failed is not None:
            return {"line": np.array([json.dumps({_FAILED: self.failed})] * len(batch["request"]), dtype=object)}
        lines = [
            json.dumps(answer(self.model, Request.from_json(str(text)), self.defaults), ensure_ascii=False)
            for text in batch["request"]
        ]
        return {"line": np.array(lines, dtype=object)}


class RayJob:
    """A batch job run by Ray Data across ``workers`` model replicas.

    Args:
        model: A model folder every worker can read (shared storage on a cluster), a Hub repo id (each node fetches
            it once into its cache), or None for the default official model.
        address: "local" to start (or join) a Ray instance on this machine, or a cluster address ("auto",
            "ray://head:10001"). When Ray is already initialised in this process, that instance is used.
        workers: Model replicas (Ray actors); each loads the model once.
        gpus_per_worker: GPUs each worker reserves; default 1 when the cluster has GPUs, else 0.
        cpus_per_worker: CPUs each worker reserves (default 1); a CPU worker runs this many threads unless
            ``load_options`` sets ``threads``.
        load_options: Keywords for :func:`phi_onnx.load` on each worker (device, threads, preprocessor, ...).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        address: str = "local",
        workers: int = 1,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float | None = None,
        load_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise BatchError(f"workers must be a positive whole number, got {workers!r}")
        local = model is not None and Path(model).expanduser().exists()
        self.model = str(Path(model).expanduser().resolve()) if local else (str(model) if model else None)
        if local:
            from phi_onnx.hub.modelinfo import inspect_model

            inspect_model(Path(self.model))  # a broken folder is one ModelError here, not an actor crash per worker
        self.address = address
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.load_options = dict(load_options or {})

    def run(
        self,
        requests: Iterable[Request],
        output: str | os.PathLike,
        *,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        progress: bool = True,
        retry_errors: bool = False,
    ) -> JobSummary:
        """Answer every request not already in ``output``; the same lines and resume rules as :func:`run_job`."""
        ray = require("ray", extra="ray", purpose="phi-onnx batch --ray")
        defaults = options if isinstance(options, GenerationOptions) else GenerationOptions.from_mapping(options)
        requests = list(requests)
        check_unique(requests, "the job's requests")
        refuse_own_image(Path(output).expanduser(), requests)
        started = False
        try:
            with ResultFile(output, retry_errors=retry_errors) as out:  # the output is checked before Ray starts
                pending = not_done(requests, out.done)
                _say(None, _plan(len(requests), len(requests) - len(pending), out) + f" on Ray, {self.workers} workers")
                started = bool(pending) and self._connect(ray)  # nothing to do starts no Ray
                bar = Progress(len(pending), enabled=progress)
                start = time.perf_counter()
                try:
                    if pending:
                        with _quiet_ray_data():
                            for row in self._dataset(ray, pending, defaults).iter_rows():
                                line = str(row["line"])
                                result = json.loads(line)
                                if _FAILED in result:
                                    raise _worker_error(result[_FAILED])
                                out.write(line)
                                bar.update(result["error"] is not None)
                except ray.exceptions.RayError as err:
                    raise _unwrap(err) from err
                finally:
                    bar.close()
                return summarise(bar, len(requests), len(requests) - len(pending), start, out.repaired)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Initialise Ray unless it already is; True when this job started it (and so shuts it down)."""
        if ray.is_initialized():
            return False
        address = None if self.address in ("local", "") else self.address
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise BatchError(
                f"cannot reach the Ray cluster at {self.address!r} ({str(err).splitlines()[0] if str(err) else err}): "
                "start it with 'ray start --head', or run --ray without an address for a local instance"
            ) from err
        return True

    def _dataset(self, ray: Any, pending: list[Request], defaults: GenerationOptions) -> Any:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # phi-onnx prints its own progress line
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        cpus = self.cpus_per_worker or 1.0
        load = dict(self.load_options)
        if gpus > 0 and load.get("device", "auto") == "auto":
            load["device"] = "cuda"
        if gpus == 0 and load.get("threads") is None:
            load["threads"] = max(1, int(cpus))
        rows = [{"request": r.to_json()} for r in pending]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
        with warnings.catch_warnings():
            # ray_remote_args_fn is deprecated (to go in Ray 2.64, hence the pin in the ray extra) and is the only way
            # to bound retries: Ray Data's default retries a task forever, so an item that crashes its worker (a
            # native crash in a graph) would hang the job; with the bound, the job stops with an error instead.
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
            return ds.map_batches(
                _Worker,
                fn_constructor_kwargs={"model": self.model, "load_options": load, "defaults": defaults},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.workers),
                num_cpus=cpus,
                num_gpus=gpus,
                ray_remote_args_fn=_bounded_retries,
            )


def _bounded_retries() -> dict[str, Any]:
    """Remote arguments of each worker: a task whose worker died is retried MAX_RETRIES times, not forever."""
    return {"max_task_retries": MAX_RETRIES}


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's notes and tracebacks off the terminal while the job runs: its start-up notes would break the
    progress line, and a failure is reported in one line by the job (Ray Data's log file still has the details)."""
    import ray.data  # noqa: F401 (its import sets up the "ray.data" logger: before the levels are changed here)

    logger = logging.getLogger("ray.data")
    consoles = [
        h for h in logger.handlers if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler)
    ]
    levels = [h.level for h in consoles]
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    for handler in consoles:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler, before in zip(consoles, levels):
            handler.setLevel(before)


def _worker_error(failed: Mapping[str, str]) -> PhiOnnxError:
    """The error a worker could not start with, as its phi-onnx class (a BatchError for any other)."""
    from phi_onnx import errors

    kind = getattr(errors, str(failed.get("type")), None)
    message = str(failed.get("message"))
    if isinstance(kind, type) and issubclass(kind, PhiOnnxError):
        return kind(message)
    return BatchError(message)


def _unwrap(err: BaseException) -> BaseException:
    """The phi-onnx error a worker raised (e.g. the model failed to load), or a one-line BatchError."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PhiOnnxError):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return BatchError(f"the Ray job failed ({first.strip()[:200]}): see the Ray logs of the workers")
