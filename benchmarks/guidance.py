"""The cost of constrained decoding: decode tokens/s with and without a JSON schema, side by side in one process.

    python -m phi_onnx_bench.guidance MODEL [--image IMG] [--new-tokens 64] [--repeat 5]

Runs alternate (free, schema, free, schema, ...) so both see the same machine; each uses ``min_new_tokens`` so the
lengths match, greedy decoding, one 4-crop image. Prints medians, the ratio, and the share of the CPU other processes
used during the run (above 10 % the figures are not trustworthy).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from phi_onnx_bench.runner import background_share, cpu_snapshot

# A schema that never ends by itself (an array of free strings), so min/max_new_tokens fix the length.
SCHEMA = {
    "type": "object",
    "properties": {"lines": {"type": "array", "items": {"type": "string"}}},
    "required": ["lines"],
}


def main() -> None:
    import phi_onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--image", default=str(Path(phi_onnx.__file__).parent / "assets" / "example.jpg"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = phi_onnx.load(args.model, device="cpu")
    common = {"images": [args.image], "num_crops": 4, "max_new_tokens": args.new_tokens,
              "min_new_tokens": args.new_tokens}  # fmt: skip
    runs: dict[str, list[float]] = {"free": [], "json_schema": []}
    for kind in ("free", "json_schema"):  # warm-up
        model.generate("List what you see.", **common, **({"json_schema": SCHEMA} if kind != "free" else {}))
    before, t0 = cpu_snapshot(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.repeat):
        for kind in ("free", "json_schema"):
            extra = {"json_schema": SCHEMA} if kind != "free" else {}
            result = model.generate("List what you see.", **common, **extra)
            runs[kind].append(result.decode_tokens_per_s)
    other = background_share(before, cpu_snapshot(resource.RUSAGE_SELF), time.perf_counter() - t0)
    free, guided = statistics.median(runs["free"]), statistics.median(runs["json_schema"])
    print(json.dumps({"model": args.model, "new_tokens": args.new_tokens, "repeat": args.repeat,
                      "decode_tokens_per_s": {"free": round(free, 1), "json_schema": round(guided, 1)},
                      "ratio": round(guided / free, 3), "other_cpu_share": other,
                      "samples": runs}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
