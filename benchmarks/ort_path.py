"""The onnxruntime-genai path: a model folder through phi_onnx, measured exactly as users see it (stream chunks).

Vision time: onnxruntime-genai runs the vision graph inside the generator and reports no per-graph time, so the
harness times the same vision graph separately, in the same process, with an onnxruntime InferenceSession built
with the session options the generator uses (threads, optimisation level, config entries from genai_config.json),
on the very pixel_values and image_sizes the generation got. Prefill is then estimated as time to first token minus
preprocessing minus that vision time (median).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx_bench.spec import PRIVATE, UNCACHED, PathSpec, Samples, Workload, peak_rss_mb, reset_peak_rss, rss_figures


def run(spec: PathSpec, work: Workload) -> dict[str, Any]:
    """Load the folder, then per num_crops setting: warm-ups, timed generations, and standalone vision timings."""
    import phi_onnx

    images = [Path(p).read_bytes() for p in work.images]
    t0 = time.perf_counter()
    model = phi_onnx.load(spec.source, device="cpu", threads=work.threads, **UNCACHED)
    load_ms = (time.perf_counter() - t0) * 1e3
    load_peak = reset_peak_rss()
    runs: dict[str, Any] = {}
    prepared = {}
    for crops in work.num_crops:
        opts = {"max_new_tokens": work.new_tokens, "min_new_tokens": work.new_tokens, "num_crops": crops}
        for _ in range(work.warmup):
            model.generate(work.prompt, images=images, **opts)
        samples = Samples()
        tokens: list[int] = []
        last = None
        for _ in range(work.repeat):
            ids = []
            for chunk in model.stream(work.prompt, images=images, **opts):
                if chunk.token_id is not None:
                    ids.append(chunk.token_id)
                last = chunk
            assert last is not None
            samples.preprocess_ms.append(last.preprocess_ms)
            samples.time_to_first_token_ms.append(last.time_to_first_token_ms)
            samples.decode_tokens_per_s.append(last.decode_tokens_per_s)
            samples.end_to_end_ms.append(last.elapsed_ms)
            tokens = ids
        prepared[crops] = model.prepare(work.prompt, images, options=model.options.updated(**opts))
        runs[str(crops)] = {
            "prompt_tokens": last.prompt_tokens if last else 0,
            "image_tokens": last.image_tokens if last else 0,
            "generated_tokens": last.generated_tokens if last else 0,
            "tokens": tokens,
            "samples": samples,
        }
    peak_rss, peak_private = peak_rss_mb(), PRIVATE.peak_mb()  # before the extra vision session
    session = graph_session(model.folder, "vision", model.threads)
    for crops in work.num_crops:
        samples = runs[str(crops)]["samples"]
        samples.vision_ms.extend(_time_vision(session, model.folder, prepared[crops].inputs, work))
        vision = float(np.median(samples.vision_ms)) if samples.vision_ms else 0.0
        for ttft, pre in zip(samples.time_to_first_token_ms, samples.preprocess_ms, strict=True):
            if ttft - pre - vision > 0:  # an estimate: on tiny models noise can exceed the prefill itself
                samples.prefill_tokens_per_s.append(_rate(runs[str(crops)]["prompt_tokens"], ttft - pre - vision))
    return {
        "load_ms": load_ms,
        "threads": model.threads,
        "runs": runs,
        **rss_figures(load_peak, peak_rss),
        "peak_private_mb": peak_private,
        "model_files_mb": sum(f.stat().st_size for f in Path(model.folder).iterdir() if f.is_file()) / 2**20,
        "peak_gpu_mb": None,
        "session_options": _genai_session_options(model.folder),
        "vision_method": "onnxruntime InferenceSession on the vision graph, same session options and inputs",
    }


def _rate(tokens: int, ms: float) -> float:
    return tokens / (ms / 1e3)


def _genai_session_options(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    return {g: cfg[g].get("session_options", {}) for g in ("vision", "embedding", "decoder") if g in cfg}


def graph_session(folder: Path, graph: str, threads: int | None, profile_prefix: str | None = None):
    """An InferenceSession on one graph of the folder ("vision", "embedding", "decoder") with the options
    onnxruntime-genai gives it, optionally with onnxruntime's profiler writing ``<profile_prefix>_<time>.json``."""
    import onnxruntime as ort

    from phi_onnx.vision import session_setup

    cfg = json.loads((folder / "genai_config.json").read_text())["model"][graph]
    so, _ = session_setup(ort, cfg.get("session_options", {}), "cpu", threads, folder)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(folder / cfg["filename"]), so, providers=["CPUExecutionProvider"])


def _time_vision(session, folder: Path, inputs: dict[str, np.ndarray], work: Workload) -> list[float]:
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["vision"]
    names = cfg.get("inputs", {})
    feed = {
        names.get("pixel_values", "pixel_values"): inputs["pixel_values"],
        names.get("image_sizes", "image_sizes"): inputs["image_sizes"].astype(np.int64),
    }
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in wanted}
    for _ in range(max(work.warmup, 1)):
        session.run(None, feed)
    times = []
    for _ in range(work.repeat):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times
