"""One benchmark path in its own process: ``python -m phi_onnx_bench.worker SPEC.json OUT.json``.

SPEC.json holds ``{"path": PathSpec, "workload": Workload}``; OUT.json receives every sample, the load time, peak
RSS and package versions. Library chatter goes to stderr; the runner shows it only when the worker fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from phi_onnx_bench.spec import PRIVATE, PathSpec, Samples, Workload, write_json


def measure(spec: PathSpec, work: Workload) -> dict[str, Any]:
    """Run one path and return its raw figures (samples as lists)."""
    if spec.kind == "onnxruntime-genai":
        from phi_onnx_bench import ort_path as path
    elif spec.kind == "pytorch":
        from phi_onnx_bench import torch_path as path
    else:
        raise ValueError(f"unknown path kind {spec.kind!r}")
    PRIVATE.start()
    result = path.run(spec, work)
    for run in result["runs"].values():
        samples = run["samples"]
        run["samples"] = dataclasses.asdict(samples) if isinstance(samples, Samples) else samples
    return {"path": spec.to_dict(), **result}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m phi_onnx_bench.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    data = json.loads(Path(args[0]).read_text())
    spec = PathSpec(**data["path"])
    work = Workload.from_dict(data["workload"])
    write_json(args[1], measure(spec, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
