"""Batch throughput: `phi-onnx batch` against a plain loop over model.generate, and on Ray Data with 1 and 2 workers.

    python -m phi_onnx_bench.batch [MODEL] [--images 20] [--new-tokens 32] [--num-crops 4] [--repeat 3] [--json OUT]

Every run is its own process (paths alternate: loop, batch, ray-1, ray-2, loop, ...), on the same folder of images
(``example.jpg`` shifted, so every image has the same size and token count but different pixels), greedy, a fixed
number of new tokens (min = max). The loop and the job each warm up on one image after loading and are timed from the
first item to the last; the Ray runs are timed from the job's start (actor start-up and model loading included: the
"job" rate) and from the first result on (the "steady" rate). For each run the share of the machine's CPU used by
processes outside the run's own process tree is sampled; over 10 % the figures are not trustworthy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROMPT = "Describe this image in detail."
PATHS = ("loop", "batch", "ray-1", "ray-2")


def _images(folder: Path, count: int) -> None:
    from PIL import Image

    base = Image.open(Path(__file__).resolve().parents[1] / "phi_onnx" / "assets" / "example.jpg").convert("RGB")
    width, height = base.size
    for i in range(count):
        dx, dy = (i * 7) % 40, (i * 5) % 30
        base.crop((dx, dy, dx + width - 40, dy + height - 30)).resize((width, height)).save(folder / f"img{i:03d}.png")


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of one path, in this process."""
    import phi_onnx
    from phi_onnx.batch import read_requests, run_job

    opts = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_crops": args.num_crops}
    folder = Path(args.folder)
    files = sorted(folder.glob("*.png"))
    out = Path(args.out_dir) / f"{args.worker}.jsonl"
    if args.worker in ("loop", "batch"):
        t0 = time.perf_counter()
        model = phi_onnx.load(args.model, device="cpu")
        load_s = time.perf_counter() - t0
        model.generate(PROMPT, images=[files[0]], **opts)  # warm-up
        if args.worker == "loop":
            t0 = time.perf_counter()
            results = [model.generate(PROMPT, images=[f], **opts) for f in files]
            seconds = time.perf_counter() - t0
            generate_s = sum(r.elapsed_ms for r in results) / 1e3
            tokens = sum(r.generated_tokens for r in results)
            return {
                "items": len(files),
                "seconds": seconds,
                "load_s": load_s,
                "tokens": tokens,
                "generate_s": generate_s,
            }
        summary = run_job(model, read_requests(folder, prompt=PROMPT), out, options=opts, progress=False)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        tokens = sum(line["generated_tokens"] for line in lines)
        generate_s = sum(line["elapsed_ms"] for line in lines) / 1e3
        return {
            "items": summary.done,
            "seconds": summary.seconds,
            "load_s": load_s,
            "tokens": tokens,
            "generate_s": generate_s,
        }
    import ray

    from phi_onnx.batch.ray import RayJob

    workers = int(args.worker.split("-")[1])
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    init_s = time.perf_counter() - t0
    job = RayJob(
        args.model,
        workers=workers,
        cpus_per_worker=cores / workers,
        load_options={"device": "cpu", "threads": max(1, cores // workers)},
    )
    summary = job.run(read_requests(folder, prompt=PROMPT), out, options=opts, progress=False)
    ray.shutdown()
    tokens = sum(json.loads(line)["generated_tokens"] for line in out.read_text().splitlines())
    return {
        "items": summary.done,
        "seconds": summary.seconds,
        "init_s": init_s,
        "first_result_s": summary.first_result_s,
        "steady_items_per_s": summary.steady_items_per_s,
        "tokens": tokens,
    }


class _OtherLoad:
    """Samples every process's CPU time; what processes outside ``root``'s tree used is the other load."""

    def __init__(self, root: int, period: float = 0.5) -> None:
        import psutil

        self.psutil, self.root, self.period = psutil, root, period
        self.other = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()
        self._thread.start()

    def _snapshot(self) -> tuple[dict[int, float], set[int]]:
        times: dict[int, float] = {}
        for proc in self.psutil.process_iter(["cpu_times"]):
            cpu = proc.info["cpu_times"]
            if cpu is not None:
                times[proc.pid] = cpu.user + cpu.system
        try:
            ours = {p.pid for p in self.psutil.Process(self.root).children(recursive=True)} | {self.root, os.getpid()}
        except self.psutil.NoSuchProcess:
            ours = {os.getpid()}
        return times, ours

    def _run(self) -> None:
        before, _ = self._snapshot()
        while not self._stop.wait(self.period):
            after, ours = self._snapshot()
            self.other += sum(t - before[pid] for pid, t in after.items() if pid in before and pid not in ours)
            before = after

    def share(self) -> float:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self.start
        return round(self.other / (wall * (os.cpu_count() or 1)), 3)


def _run(path: str, args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    out_dir = Path(tempfile.mkdtemp(dir=work))
    cmd = [sys.executable, "-m", "phi_onnx_bench.batch", args.model, "--worker", path, "--folder", str(folder)]
    cmd += ["--out-dir", str(out_dir), "--new-tokens", str(args.new_tokens), "--num-crops", str(args.num_crops)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    load = _OtherLoad(proc.pid)
    stdout, stderr = proc.communicate(timeout=1800)
    share = load.share()
    if proc.returncode != 0:
        raise SystemExit(f"{path} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["items_per_s"] = result["items"] / result["seconds"]
    result["other_load"] = share
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="Model folder (default: the bench int4 model).")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--json", default=None, help="Write every run's figures here.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from phi_onnx_bench.models import cached_checkpoint, cached_model

        args.model = str(cached_model(cached_checkpoint("bench"), "int4"))
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    paths = args.paths.split(",")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "images"
        folder.mkdir()
        _images(folder, args.images)
        for rep in range(args.repeat):
            for path in paths:
                result = _run(path, args, folder, work)
                runs[path].append(result)
                print(f"[{rep + 1}/{args.repeat}] {path}: {result['items_per_s']:.3f} items/s, other load "
                      f"{result['other_load']:.0%}", file=sys.stderr, flush=True)  # fmt: skip
    report = _report(runs, args)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


def _report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    med = {p: statistics.median(r["items_per_s"] for r in rs) for p, rs in runs.items() if rs}
    lines = [
        f"{args.images} images ({args.num_crops} crops), {args.new_tokens} new tokens each, {args.repeat} runs per "
        f"path, {os.cpu_count()} cores; medians",
        "",
        "| path | items/s (job) | items/s (after the first result) | first result s | s per item | other load |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for path, rs in runs.items():
        steady = [r["steady_items_per_s"] for r in rs if r.get("steady_items_per_s")]
        first = [r["first_result_s"] for r in rs if r.get("first_result_s") is not None]
        lines.append(
            f"| {path} | {med[path]:.3f} | {statistics.median(steady):.3f} | {statistics.median(first):.1f} | "
            if steady
            else f"| {path} | {med[path]:.3f} | - | - | "
        )
        lines[-1] += f"{1 / med[path]:.2f} | {max(r['other_load'] for r in rs):.0%} (max) |"
    lines.append("")
    for path in ("loop", "batch"):  # what the path spends outside model.generate: noise-free, unlike the rates
        outside = [(r["seconds"] - r["generate_s"]) / r["items"] * 1e3 for r in runs.get(path, []) if "generate_s" in r]
        if outside:
            lines.append(f"{path}: {statistics.median(outside):.2f} ms per item outside model.generate (median)")
    if "loop" in med and "batch" in med:
        lines += [f"phi-onnx batch / plain loop: {med['batch'] / med['loop']:.3f} "
                      f"(overhead {100 * (med['loop'] / med['batch'] - 1):+.1f} %)"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
