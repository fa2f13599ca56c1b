"""Run each path in its own process, one after the other, and put the figures, ratios and targets together."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phi_onnx.cli.info import versions
from phi_onnx.errors import PhiOnnxError
from phi_onnx_bench.spec import FIGURES, PathSpec, Workload, summarize

# The targets of issues 5 and 12, checked in every report. "Fastest PyTorch": of the PyTorch paths in the run (fp32,
# bf16, compiled), the one with the lowest median first token (for first-token targets) or the highest median decode
# rate (for decode targets), per num_crops.
TTFT_RATIO_MAX = {"int4": 0.7}  # time to first token, onnxruntime-genai / fastest PyTorch, by ORT precision
TTFT_FP32_RATIO_MAX = 1.0  # time to first token, ort-fp32 / PyTorch fp32 eager
DECODE_RATIO_MIN = {"int4": 3.0}  # decode tokens/s, onnxruntime-genai / fastest PyTorch, by ORT precision
DECODE_FP32_RATIO_MIN = 1.2  # decode tokens/s, ort-fp32 / PyTorch fp32 eager
CROPS_TTFT_RATIO_MAX = 0.45  # time to first token at num_crops 4 / num_crops 16


class BenchError(PhiOnnxError, RuntimeError):
    """A benchmark path failed to run."""


def run_benchmark(
    paths: Sequence[PathSpec],
    work: Workload,
    *,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every path in its own worker process, one after the other, and gather the report.

    Args:
        paths: What to run (onnxruntime-genai folders and/or the PyTorch checkpoint).
        work: The workload every path gets: images, prompt, new tokens, warm-ups, repetitions, num_crops, threads.
        command: The command line as typed, recorded in the report.
        log: Progress callback (default: lines on stderr).

    Returns:
        The JSON-able report: machine, package versions, workload, per-path figures, ratios, agreement, targets.
    """
    log = log or _stderr
    results = []
    with tempfile.TemporaryDirectory(prefix="phi-onnx-bench-") as tmp:
        for i, spec in enumerate(paths):
            log(f"{spec.label}: {spec.kind} on {spec.source} ({i + 1}/{len(paths)})")
            results.append(_run_worker(spec, work, Path(tmp) / f"{i}", log))
    return {
        "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "packages": versions(),
        "workload": work.to_dict(),
        "paths": results,
        "ratios": ratios(results),
        "fastest_pytorch_ratios": fastest_ratios(results),
        "num_crops_ratios": crops_ratios(results),
        "token_agreement": token_agreement(results),
        "targets": targets(results),
        "background_cpu_max": max((r.get("background_cpu") or 0.0 for r in results), default=0.0),
        "trustworthy": all((r.get("background_cpu") or 0.0) <= BACKGROUND_MAX for r in results),
    }


def _stderr(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _run_worker(spec: PathSpec, work: Workload, base: Path, log: Callable[[str], None]) -> dict[str, Any]:
    spec_file, out_file = base.with_suffix(".spec.json"), base.with_suffix(".out.json")
    spec_file.write_text(json.dumps({"path": spec.to_dict(), "workload": work.to_dict()}))
    before, t0 = cpu_snapshot(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "phi_onnx_bench.worker", str(spec_file), str(out_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_file.is_file():
        tail = "; ".join(line for line in proc.stdout.strip().splitlines()[-3:])
        raise BenchError(f"the {spec.label} worker failed (exit {proc.returncode}): {tail}")
    raw = json.loads(out_file.read_text())
    result = {**spec.to_dict(), **{k: v for k, v in raw.items() if k not in ("path", "runs")}}
    result["background_cpu"] = background_share(before, cpu_snapshot(), wall)
    result["runs"] = {}
    if raw.get("skipped"):
        log(f"  skipped: {raw['skipped']}")
    for crops, run in raw["runs"].items():
        figures = {name: summarize(run["samples"][name]) for name in FIGURES}
        result["runs"][crops] = {**{k: v for k, v in run.items() if k != "samples"}, "figures": figures,
                                 "samples": run["samples"]}  # fmt: skip
        log(f"  num_crops {crops}: first token {figures['time_to_first_token_ms']['median']:.0f} ms, "
            f"decode {figures['decode_tokens_per_s']['median']:.1f} tokens/s")  # fmt: skip
    return result


def cpu_snapshot(who: int = resource.RUSAGE_CHILDREN) -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of ``who``: our finished children by default, or this
    process with ``resource.RUSAGE_SELF``), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(v) for v in fields]
    busy = (sum(values[:8]) - values[3] - values[4]) / ticks  # all but idle and iowait
    ours = resource.getrusage(who)
    return busy, ours.ru_utime + ours.ru_stime


def background_share(before, after, wall: float) -> float | None:
    """Share of the machine's CPU that other processes used while a worker ran (0 = a quiet machine)."""
    if before is None or after is None or wall <= 0:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3)


FLAG_PREFIXES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx", "fma")
"""/proc/cpuinfo flags recorded with every run: the ones that decide which fp32/bf16/int8 kernels can run."""


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and GPUs of this machine."""
    model = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in (platform.processor(), platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(FLAG_PREFIXES))
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = None
    from phi_onnx import _og

    return {
        "cpu": model,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "cores_available": _og.default_threads(),
        "memory_gib": round(memory, 1) if memory else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "cuda_devices": _og.cuda_device_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _median(path: dict[str, Any], crops: str, figure: str) -> float | None:
    run = path["runs"].get(crops)
    return run["figures"][figure]["median"] if run else None


def _pairs(results: list[dict[str, Any]]):
    for ort in (r for r in results if r["kind"] == "onnxruntime-genai"):
        for ref in (r for r in results if r["kind"] == "pytorch"):
            for crops in ort["runs"]:
                if crops in ref["runs"]:
                    yield ort, ref, crops


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """onnxruntime-genai / PyTorch medians per num_crops: time to first token (lower is better for ORT) and decode
    tokens/s (higher is better), plus end-to-end time."""
    out = []
    for ort, ref, crops in _pairs(results):
        row: dict[str, Any] = {"onnxruntime_genai": ort["label"], "pytorch": ref["label"], "num_crops": int(crops)}
        for figure in ("time_to_first_token_ms", "decode_tokens_per_s", "end_to_end_ms", "vision_ms"):
            a, b = _median(ort, crops, figure), _median(ref, crops, figure)
            row[figure.removesuffix("_ms")] = round(a / b, 3) if a and b else None
        out.append(row)
    return out


def fastest_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per onnxruntime-genai path and num_crops: its time to first token over the fastest PyTorch path's (lowest
    median) and its decode rate over the fastest PyTorch decode (highest median), naming those paths."""
    out = []
    refs = [r for r in results if r["kind"] == "pytorch" and r["runs"]]
    for ort in (r for r in results if r["kind"] == "onnxruntime-genai"):
        for crops in ort["runs"]:
            ttft = [(m, r["label"]) for r in refs if (m := _median(r, crops, "time_to_first_token_ms"))]
            decode = [(m, r["label"]) for r in refs if (m := _median(r, crops, "decode_tokens_per_s"))]
            if not ttft and not decode:
                continue
            row: dict[str, Any] = {"onnxruntime_genai": ort["label"], "num_crops": int(crops)}
            if ttft:
                best, label = min(ttft)
                ours = _median(ort, crops, "time_to_first_token_ms")
                row.update(first_token_vs=label, time_to_first_token=round(ours / best, 3) if ours else None)
            if decode:
                best, label = max(decode)
                ours = _median(ort, crops, "decode_tokens_per_s")
                row.update(decode_vs=label, decode_tokens_per_s=round(ours / best, 3) if ours else None)
            out.append(row)
    return out


def crops_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per path: time to first token at the fewest crops over that at the most crops."""
    out = []
    for r in results:
        crops = sorted(int(c) for c in r["runs"])
        if len(crops) < 2:
            continue
        few = _median(r, str(crops[0]), "time_to_first_token_ms")
        many = _median(r, str(crops[-1]), "time_to_first_token_ms")
        out.append({"path": r["label"], "few": crops[0], "many": crops[-1],
                    "time_to_first_token": round(few / many, 3) if few and many else None})  # fmt: skip
    return out


def token_agreement(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedy tokens of the last repetition, onnxruntime-genai against PyTorch: same prompt length, share of equal
    positions (fp32 should agree fully; int4 approximates)."""
    out = []
    for ort, ref, crops in _pairs(results):
        a, b = ort["runs"][crops], ref["runs"][crops]
        same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
        out.append({"onnxruntime_genai": ort["label"], "pytorch": ref["label"], "num_crops": int(crops),
                    "prompt_tokens_equal": a["prompt_tokens"] == b["prompt_tokens"],
                    "agreement": round(same / max(len(b["tokens"]), 1), 3)})  # fmt: skip
    return out


BACKGROUND_MAX = 0.10
"""Above this share of the CPU used by other processes during a path's run, its figures are not judged."""


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not judged, the machine was
    busy with other work during the run)."""
    out = _targets(results)
    if any((r.get("background_cpu") or 0.0) > BACKGROUND_MAX for r in results):
        for target in out:
            target["met"] = None
    return out


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    precision = {r["label"]: r.get("precision", "") for r in results}

    def check(name: str, value: float | None, limit: float, most: bool) -> None:
        met = value is not None and (value <= limit if most else value >= limit)
        out.append({"target": f"{name} {'<=' if most else '>='} {limit}", "value": value, "met": met})

    for row in fastest_ratios(results):
        where = f"num_crops {row['num_crops']}"
        limit = TTFT_RATIO_MAX.get(precision[row["onnxruntime_genai"]])
        if limit is not None and "first_token_vs" in row:
            check(f"time to first token {row['onnxruntime_genai']} / fastest PyTorch ({row['first_token_vs']}), "
                  f"{where}", row["time_to_first_token"], limit, most=True)  # fmt: skip
        floor = DECODE_RATIO_MIN.get(precision[row["onnxruntime_genai"]])
        if floor is not None and "decode_vs" in row:
            check(f"decode tokens/s {row['onnxruntime_genai']} / fastest PyTorch ({row['decode_vs']}), {where}",
                  row["decode_tokens_per_s"], floor, most=False)  # fmt: skip
    reference = next((r for r in results if r["kind"] == "pytorch" and r.get("precision", "fp32") == "fp32"
                      and not r.get("compile")), None)  # fmt: skip
    fp32 = [r for r in results if r["kind"] == "onnxruntime-genai" and r.get("precision") == "fp32"]
    for row in ratios([*fp32, reference] if reference else []):
        name = f"{row['onnxruntime_genai']} / {row['pytorch']}, num_crops {row['num_crops']}"
        check(f"time to first token {name}", row["time_to_first_token"], TTFT_FP32_RATIO_MAX, most=True)
        check(f"decode tokens/s {name}", row["decode_tokens_per_s"], DECODE_FP32_RATIO_MIN, most=False)
    for row in crops_ratios([r for r in results if r["kind"] == "onnxruntime-genai"]):
        if (row["few"], row["many"]) == (4, 16):
            check(f"time to first token {row['path']}, num_crops 4 / 16", row["time_to_first_token"],
                  CROPS_TTFT_RATIO_MAX, most=True)  # fmt: skip
    return out
