"""What one benchmark run measures: the workload every path gets, and the paths themselves."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PATH_KINDS = ("onnxruntime-genai", "pytorch")


@dataclass(frozen=True)
class Workload:
    """The same inputs for every path: images, prompt, greedy decoding of a fixed number of new tokens.

    Attributes:
        images: Image files; each repetition reads them as bytes before the clock starts.
        prompt: The user's text (the images go before it, as ``phi-onnx run`` does).
        new_tokens: Tokens generated per repetition (min = max, end-of-turn suppressed until then).
        warmup: Untimed generations per num_crops setting, before the timed ones.
        repeat: Timed generations per num_crops setting.
        num_crops: HD crop settings to measure, in order.
        threads: CPU threads for each path (None: all cores available to the process).
    """

    images: tuple[str, ...]
    prompt: str
    new_tokens: int
    warmup: int
    repeat: int
    num_crops: tuple[int, ...]
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(**{**data, "images": tuple(data["images"]), "num_crops": tuple(data["num_crops"])})


@dataclass(frozen=True)
class PathSpec:
    """One way of running the model, measured in its own process.

    Attributes:
        label: Short name in tables and ratios ("ort-int4", "pytorch").
        kind: "onnxruntime-genai" (a model folder through phi_onnx) or "pytorch" (a checkpoint through our
            PyTorch Phi-3-V, SDPA attention).
        source: The model folder or the checkpoint folder.
        compile: PyTorch only: wrap the vision tower and the decoder in torch.compile.
        precision: What the weights are in ("fp32", "int4", ...), for the tables.
    """

    label: str
    kind: str
    source: str
    compile: bool = False
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Samples:
    """Per-repetition figures of one path at one num_crops setting."""

    preprocess_ms: list[float] = field(default_factory=list)
    vision_ms: list[float] = field(default_factory=list)
    time_to_first_token_ms: list[float] = field(default_factory=list)
    prefill_tokens_per_s: list[float] = field(default_factory=list)
    decode_tokens_per_s: list[float] = field(default_factory=list)
    end_to_end_ms: list[float] = field(default_factory=list)


FIGURES = tuple(Samples.__dataclass_fields__)


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """Median, 10th and 90th percentiles (nearest rank), min, max and count of a list of samples.

    For times the slow tail is p90; for rates (tokens/s) it is p10.
    """
    if not values:
        return {"median": None, "p10": None, "p90": None, "min": None, "max": None, "n": 0}
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return {"median": round(median, 3), "p10": round(rank(0.1), 3), "p90": round(rank(0.9), 3),
            "min": round(ordered[0], 3), "max": round(ordered[-1], 3), "n": n}  # fmt: skip


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...) in MiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PrivateMemory:
    """Samples this process's private (anonymous) resident memory every ``interval`` s in a thread, on Linux.

    Peak RSS also counts the pages of files mapped into the process: onnxruntime maps a model's external data and keeps
    the mapping after prepacking the weights into its own buffers, so RSS shows those weights twice although the file
    pages are clean page cache the kernel reclaims under pressure. Private memory is what the process itself holds.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, None

    def _watch(self) -> None:
        while self.peak_mb() is not None:
            time.sleep(self.interval)

    def start(self) -> PrivateMemory:
        """Sample until the process ends (a daemon thread)."""
        import threading

        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def peak_mb(self) -> float | None:
        """The highest private memory seen so far, this moment included (None off Linux)."""
        value = status_mb("RssAnon")
        if value is not None:
            self.peak = max(self.peak or 0.0, value)
        return self.peak


# How the harness loads an onnxruntime-genai folder: no image feature cache and no kept generators, so every timed run
# pays for its image and its whole prompt, as PyTorch's do (benchmarks/reuse.py measures what those save).
UNCACHED = {"image_cache_mb": 0, "kv_pool": 0}

PRIVATE = PrivateMemory()  # started by the worker process, read by the paths next to peak_rss_mb()


def reset_peak_rss() -> float | None:
    """This process's peak resident memory so far (MiB), then restart the count from the current RSS, so that a later
    :func:`peak_rss_mb` is the peak since (Linux: ``/proc/self/clear_refs`` 5). The paths call it after loading: the
    loading and the generating peaks differ (onnxruntime reads its weight files while packing them, and phi-onnx gives
    those pages back afterwards: phi_onnx.memory). None where it cannot restart the count."""
    peak = status_mb("VmHWM")
    if peak is None:
        return None
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return None
    return peak


def rss_figures(load_peak: float | None, run_peak: float) -> dict[str, float | None]:
    """A path's RSS figures from :func:`reset_peak_rss`'s loading peak and the peak since: the whole run's peak and,
    where the count could be restarted, the peak once loaded."""
    return {
        "peak_rss_mb": max(run_peak, load_peak or 0.0),
        "run_peak_rss_mb": run_peak if load_peak is not None else None,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    On Linux this is ``VmHWM`` of the current address space: ``ru_maxrss`` survives fork and exec, so a worker started
    by a large parent would report at least the parent's size at the fork.
    """
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
