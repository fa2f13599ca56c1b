"""Peak memory of a build, per stage: ``python -m phi_onnx_bench.buildmem --size bench --precision int4 OUT``.

Builds the cached random checkpoint of ``--size`` into OUT with ``export/build.py``'s ``build()`` while a thread
samples this process's resident memory every 50 ms, and prints the peak of each stage (the build's own progress
messages name the stages) with the size of the stored weights (fp32 for tiny and bench, bfloat16 for full).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from phi_onnx_bench.spec import status_mb


def _rss_mb() -> float:
    return status_mb("VmRSS") or 0.0


def measure(size: str, precision: str, out: Path, interval: float = 0.05) -> dict[str, Any]:
    """Build and return ``{"stages": [[message, peak MB], ...], "peak_mb", "weights_mb", "seconds"}``."""
    from phi_onnx_bench.models import cached_checkpoint
    from phi_onnx_export.build import build

    checkpoint = cached_checkpoint(size)
    stages: dict[str, float] = {"imports": _rss_mb()}
    current = ["imports"]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            stage = current[0]
            stages[stage] = max(stages.get(stage, 0.0), _rss_mb())
            time.sleep(interval)

    def log(message: str) -> None:
        current[0] = message.split(" /")[0].split(" (")[0][:80]

    sampler = threading.Thread(target=watch, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    build(checkpoint, out, precision=precision, device="cpu", force=True, log=log)
    seconds = time.perf_counter() - t0
    time.sleep(2 * interval)
    done.set()
    sampler.join()
    weights = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 2**20  # as stored (full: bf16)
    peak = round(max(stages.values()))
    return {"size": size, "precision": precision, "stages": [[k, round(v)] for k, v in stages.items()],
            "peak_mb": peak, "weights_mb": round(weights), "seconds": round(seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi_onnx_bench.buildmem", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="where to build (replaced)")
    parser.add_argument("--size", default="bench", choices=("tiny", "bench", "full"))
    parser.add_argument("--precision", default="int4", choices=("fp32", "int4"))
    args = parser.parse_args(argv)
    result = measure(args.size, args.precision, args.out)
    for stage, peak in result["stages"]:
        print(f"{peak:8,} MB  {stage}")
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
