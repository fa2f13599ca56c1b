"""Where the prompt pass spends its time: onnxruntime's profiler on the three graphs, as onnxruntime-genai runs them.

``python -m phi_onnx_bench.profile FOLDER [--num-crops 16] [--image IMG] [--runs 3] [--json OUT]``

The decoder is profiled inside onnxruntime-genai: the folder is copied into a temporary directory whose
genai_config.json turns on ``enable_profiling`` for the decoder session, and ``phi_onnx.load`` runs it as users do
(same session options, threads and generator), one new token per run, so every decoder run is the prompt pass. The
vision and embedding graphs are profiled in onnxruntime InferenceSessions with the generator's session options, on
the same inputs (onnxruntime-genai 0.18 profiles only its decoder session). Per graph, the node events of each run
are summed by category (attention, GEMM, the rest); the medians over the runs after the first (a warm-up) are printed
as a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

GRAPHS = ("vision", "embedding", "decoder")
# The last two: phi-onnx's own kernels (phi_onnx_export.ops) for the decoder's prompt pass and the vision tower
ATTENTION_OPS = {"GroupQueryAttention", "Attention", "MultiHeadAttention", "Softmax", "SparseAttention",
                 "CausalAttention", "BidirectionalAttention"}  # fmt: skip
GEMM_OPS = {"MatMul", "Gemm", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat",
            "FusedMatMul", "QGemm", "QLinearMatMul", "DynamicQuantizeLinear", "Conv"}  # fmt: skip
CONTROL_OPS = {"If", "Loop", "Scan"}  # their time is their subgraph's nodes, counted on their own


def category(op: str, node: str) -> str:
    """attention, gemm or other, for one profiled node. Activation-by-activation MatMuls inside attention blocks
    (Q K^T and weights x V in the exported CLIP graph) count as attention, weight MatMuls as GEMMs."""
    if op in ATTENTION_OPS:
        return "attention"
    if op in ("MatMul", "FusedMatMul") and "attn" in node and "proj" not in node:
        return "attention"
    if op in GEMM_OPS:
        return "gemm"
    return "other"


def profiled_copy(folder: Path, work: Path) -> Path:
    """``work/model``: copies of every file of ``folder`` and a genai_config.json with profiling on for the decoder.
    Not links: onnxruntime refuses external weights behind a symbolic link leaving the folder or with several hard
    links. (onnxruntime-genai 0.18 applies ``enable_profiling`` to the decoder session only.)"""
    import shutil

    out = work / "model"
    out.mkdir()
    for item in folder.iterdir():
        if item.name != "genai_config.json" and item.is_file():
            shutil.copy2(item, out / item.name)
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["enable_profiling"] = str(work / "prof-decoder")
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def summarize_profile(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``model_run`` of one session's profile: wall ms and node ms per category and per op type."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])  # fmt: skip
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    out = []
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        cats: dict[str, float] = defaultdict(float)
        ops: dict[str, float] = defaultdict(float)
        for e in nodes:
            if start <= e["ts"] <= end:
                op = e.get("args", {}).get("op_name", "?")
                if op in CONTROL_OPS:
                    continue
                ms = e["dur"] / 1e3
                cats[category(op, e["name"])] += ms
                ops[op] += ms
        out.append({"wall_ms": run["dur"] / 1e3, "categories": dict(cats), "ops": dict(ops)})
    return out


def profile(folder: Path, num_crops: int, images: list[Path], prompt: str, runs: int, threads: int | None):
    """Profile ``runs`` prompt passes (the first one dropped as a warm-up) and return per-graph medians.

    The decoder is profiled inside onnxruntime-genai (one-token generations, so each decoder run is the prompt
    pass); the vision and embedding graphs in onnxruntime InferenceSessions built with the session options the
    generator gives them, on the very inputs the generation got.
    """
    import phi_onnx
    from phi_onnx_bench.ort_path import graph_session
    from phi_onnx_bench.spec import UNCACHED

    data = [p.read_bytes() for p in images]
    with tempfile.TemporaryDirectory(prefix="phi-onnx-profile-") as tmp:
        work = Path(tmp)
        model = phi_onnx.load(profiled_copy(folder, work), device="cpu", threads=threads, **UNCACHED)
        opts = {"max_new_tokens": 1, "num_crops": num_crops}
        ttft = []
        for _ in range(runs):
            last = None
            for chunk in model.stream(prompt, images=data, **opts):
                last = chunk
            assert last is not None
            ttft.append(last.time_to_first_token_ms)
        inputs = model.prepare(prompt, data, options=model.options.updated(**opts)).inputs
        used_threads = model.threads
        del model, chunk, last
        gc.collect()  # onnxruntime writes the decoder's profile when the session closes
        files = sorted(work.glob("prof-decoder*.json"))
        if not files:
            raise RuntimeError("onnxruntime-genai wrote no decoder profile")
        graphs = {"decoder": _median_runs(summarize_profile(json.loads(files[-1].read_text()))[1:])}
        vision = graph_session(folder, "vision", used_threads, str(work / "prof-vision"))
        feed = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"].astype("int64")}
        feats = [vision.run(None, feed)[0] for _ in range(runs)][-1]
        embedding = graph_session(folder, "embedding", used_threads, str(work / "prof-embedding"))
        for _ in range(runs):
            embedding.run(None, {"input_ids": inputs["input_ids"].astype("int64"), "image_features": feats})
        for name, session in (("vision", vision), ("embedding", embedding)):
            events = json.loads(Path(session.end_profiling()).read_text())
            graphs[name] = _median_runs(summarize_profile(events)[1:])
    return {"folder": str(folder), "num_crops": num_crops, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "threads": used_threads, "time_to_first_token_ms": round(statistics.median(ttft[1:]), 1),
            "graphs": {g: graphs[g] for g in GRAPHS}}  # fmt: skip


def _median_runs(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    if not per_run:
        return {"wall_ms": None, "categories": {}, "ops": {}}

    def med(key: str) -> dict[str, float]:
        names = {n for r in per_run for n in r[key]}
        return {n: round(statistics.median(r[key].get(n, 0.0) for r in per_run), 1) for n in sorted(names)}

    return {"wall_ms": round(statistics.median(r["wall_ms"] for r in per_run), 1), "categories": med("categories"),
            "ops": dict(sorted(med("ops").items(), key=lambda kv: -kv[1]))}  # fmt: skip


def markdown(result: dict[str, Any], top: int = 6) -> str:
    """The profile as a markdown table: per graph, wall time, attention / GEMM / other node time, top op types."""
    lines = [f"{result['folder']}: num_crops {result['num_crops']}, {result['prompt_tokens']:,} prompt tokens, "
             f"first token {result['time_to_first_token_ms']:,.0f} ms (median)", "",
             "| graph | run ms | attention ms | GEMM ms | other ms | top op types (ms) |",
             "|---|--:|--:|--:|--:|---|"]  # fmt: skip
    for graph, g in result["graphs"].items():
        c = g["categories"]
        tops = ", ".join(f"{op} {ms:,.0f}" for op, ms in list(g["ops"].items())[:top])
        lines.append(f"| {graph} | {g['wall_ms'] or 0:,.0f} | {c.get('attention', 0):,.0f} | {c.get('gemm', 0):,.0f} | "
                     f"{c.get('other', 0):,.0f} | {tops} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi_onnx_bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--num-crops", type=int, default=16)
    parser.add_argument("--image", type=Path, action="append")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--runs", type=int, default=4, help="one-token generations (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from phi_onnx.cli.bench import EXAMPLE_IMAGE

    images = args.image or [EXAMPLE_IMAGE]
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = profile(args.folder, args.num_crops, images, args.prompt, max(args.runs, 2), args.threads)
    print(markdown(result), end="")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
