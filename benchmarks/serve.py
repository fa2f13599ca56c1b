"""The HTTP server's cost and capacity: added time to first token, concurrency, and a soak.

    python -m phi_onnx_bench.serve ttft MODEL [--repeat 30]
    python -m phi_onnx_bench.serve load MODEL [--parallel 1 2 4] [--clients 1 4 16] [--max-tokens 32]
    python -m phi_onnx_bench.serve soak MODEL [--requests 500] [--clients 8]

Each mode starts ``phi-onnx serve MODEL`` on 127.0.0.1 (a free port) and talks to it with streaming HTTP clients.
``ttft`` alternates in-process ``model.stream`` and HTTP requests (the same prompt, greedy) so both see the same
machine, with a pause (``--gap-ms``) before each so one side's idle onnxruntime threads do not spin in the other's
measurement. Every figure is a median, and every run prints the share of the CPU that processes other than this one and
the server used (above 10 % the numbers are not trustworthy). Output is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_READY = re.compile(r"ready on http://127\.0\.0\.1:(\d+)")
IMAGE = Path(__file__).resolve().parents[1] / "phi_onnx" / "assets" / "example.jpg"


class Server:
    """``phi-onnx serve`` in a subprocess; ``cpu()`` is the CPU seconds of it and its workers."""

    def __init__(self, model: str, *args: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "phi_onnx", "serve", model, "--port", "0", "--model-name", "m",
                   "--log-level", "warning", *args]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            match = _READY.search(Path(self.log.name).read_text())
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                return
            if self.process.poll() is not None:
                raise SystemExit(Path(self.log.name).read_text()[-2000:])
            time.sleep(0.1)
        raise SystemExit("the server did not start within 300 s")

    def tree(self):
        import psutil

        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def cpu(self) -> float:
        return sum(sum(p.cpu_times()[:4]) for p in self.tree())

    def rss_mb(self) -> float:
        return sum(p.memory_info().rss for p in self.tree()) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def machine_busy() -> float:
    import os

    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Share:
    """The CPU share of everything but this process and the server, over a stretch of time."""

    def __init__(self, server: Server) -> None:
        import os
        import resource

        self.server, self.cores = server, os.cpu_count() or 1
        self._self = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        self.start = (machine_busy(), self._self() + server.cpu(), time.perf_counter())

    def done(self) -> float:
        busy, ours, wall = machine_busy(), self._self() + self.server.cpu(), time.perf_counter()
        other = (busy - self.start[0]) - (ours - self.start[1])
        return round(max(0.0, other) / ((wall - self.start[2]) * self.cores), 3)


def messages(num_crops: int | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe this image."}]
    if num_crops is not None:
        url = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def stream_once(client, url: str, body: dict) -> dict[str, Any]:
    """One streaming request: time to the first content delta, total time, tokens, status."""
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True,
                       "stream_options": {"include_usage": True}}) as response:  # fmt: skip
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "total_s": time.perf_counter() - start}
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"status": 200, "ttft_s": first, "total_s": time.perf_counter() - start, "tokens": tokens}


def ttft(args) -> dict[str, Any]:
    import httpx

    import phi_onnx

    server = Server(args.model, "--parallel", "1", "--threads", str(args.threads))
    model = phi_onnx.load(args.model, device="cpu", threads=args.threads)
    body = {"model": "m", "messages": messages(args.num_crops), "max_tokens": 2, "num_crops": args.num_crops or 4}
    local_msgs = [{"role": "user", "content": [{"type": "image", "image": str(IMAGE)}, {"type": "text",
                  "text": "Describe this image."}]}] if args.num_crops else messages(None)  # fmt: skip
    opts = {"max_new_tokens": 2, "num_crops": args.num_crops or 4}
    runs: dict[str, list[float]] = {"in_process_ms": [], "http_ms": []}
    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # warm-up
            stream_once(client, server.url, body)
            next(iter(model.stream(messages=local_msgs, options=opts)))
        share = Share(server)
        for _ in range(args.repeat):
            # A pause before each measurement: onnxruntime's pool threads spin for a while after a run, and on a
            # 2-core machine the other process's spinning threads would be timed too (both sides, unequally).
            time.sleep(args.gap_ms / 1e3)
            start = time.perf_counter()
            for chunk in model.stream(messages=local_msgs, options=opts):
                if chunk.text:
                    break
            runs["in_process_ms"].append((time.perf_counter() - start) * 1e3)
            time.sleep(args.gap_ms / 1e3)
            runs["http_ms"].append(stream_once(client, server.url, body)["ttft_s"] * 1e3)
        other = share.done()
    server.stop()
    local, http = statistics.median(runs["in_process_ms"]), statistics.median(runs["http_ms"])
    added = statistics.median(h - i for h, i in zip(runs["http_ms"], runs["in_process_ms"]))
    return {"mode": "ttft", "model": args.model, "num_crops": args.num_crops, "repeat": args.repeat,
            "gap_ms": args.gap_ms, "in_process_ms": round(local, 2), "http_ms": round(http, 2),
            "added_ms_median_of_pairs": round(added, 2), "other_cpu_share": other, "samples": runs}  # fmt: skip


def load(args) -> dict[str, Any]:
    import httpx

    rows = []
    for parallel in args.parallel:
        server = Server(args.model, "--parallel", str(parallel), "--max-queue", "256")
        body = {"model": "m", "messages": messages(args.num_crops), "max_tokens": args.max_tokens,
                "min_tokens": args.max_tokens, "num_crops": args.num_crops or 4}  # fmt: skip
        with httpx.Client(timeout=600) as client:
            stream_once(client, server.url, body)
        for clients in args.clients:
            total = max(args.min_requests, 2 * clients)
            results: list[dict[str, Any]] = []
            todo = list(range(total))
            worker = _load_worker(server.url, body, todo, results, threading.Lock())
            share = Share(server)
            start = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            ok = [r for r in results if r["status"] == 200]
            totals = sorted(r["total_s"] for r in ok)
            rows.append({
                "parallel": parallel, "clients": clients, "requests": total, "failed": total - len(ok),
                "requests_per_s": round(len(ok) / wall, 3),
                "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
                "ttft_p50_ms": round(statistics.median(r["ttft_s"] for r in ok) * 1e3),
                "latency_p50_ms": round(statistics.median(totals) * 1e3),
                "latency_p95_ms": round(totals[min(len(totals) - 1, int(0.95 * len(totals)))] * 1e3),
                "other_cpu_share": share.done(),
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr)
        server.stop()
    return {"mode": "load", "model": args.model, "num_crops": args.num_crops, "max_tokens": args.max_tokens,
            "rows": rows}  # fmt: skip


def _load_worker(url: str, body: dict, todo: list, results: list, lock: threading.Lock):
    """A client loop: take requests off ``todo`` until none are left, stream each, keep the outcomes."""

    def run() -> None:
        import httpx

        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                outcome = stream_once(client, url, body)
                with lock:
                    results.append(outcome)

    return run


def soak(args) -> dict[str, Any]:
    import httpx

    server = Server(args.model, "--parallel", "1", "--max-queue", str(args.max_queue))
    body = {"model": "m", "messages": messages(args.num_crops), "max_tokens": args.max_tokens,
            "num_crops": args.num_crops or 4}  # fmt: skip
    statuses: dict[int, int] = {}
    rss: list[tuple[int, float]] = []
    lock = threading.Lock()
    done = [0]

    def worker(count: int) -> None:
        """Each request is retried after a 429 (as a client honouring Retry-After would), at most 1,000 times."""
        with httpx.Client(timeout=600) as client:
            for _ in range(count):
                for _attempt in range(1000):
                    try:
                        status = stream_once(client, server.url, body)["status"]
                    except httpx.HTTPError:
                        status = -1
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1
                    if status != 429:
                        break
                    time.sleep(0.05)
                with lock:
                    done[0] += 1
                    if done[0] % 50 == 0:
                        rss.append((done[0], round(server.rss_mb(), 1)))

    share = Share(server)
    start = time.perf_counter()
    per = args.requests // args.clients
    threads = [threading.Thread(target=worker, args=(per,)) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    other = share.done()
    server.stop()
    after_warmup = [mb for n, mb in rss if n >= 100]
    return {"mode": "soak", "model": args.model, "requests": per * args.clients, "clients": args.clients,
            "answered": done[0], "failures": sum(n for code, n in statuses.items() if code not in (200, 429)),
            "max_queue": args.max_queue, "statuses": statuses, "wall_s": round(wall, 1),
            "rss_mb_by_requests": rss,
            "rss_growth_after_warmup": round(after_warmup[-1] / after_warmup[0] - 1, 4) if after_warmup else None,
            "other_cpu_share": other}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("ttft", "load", "soak"):
        p = sub.add_parser(name)
        p.add_argument("model")
        p.add_argument("--num-crops", type=int, default=4, help="crops of the one image; 0 sends text only")
    sub.choices["ttft"].add_argument("--repeat", type=int, default=30)
    sub.choices["ttft"].add_argument("--threads", type=int, default=2)
    sub.choices["ttft"].add_argument("--gap-ms", type=float, default=100, help="pause before each measurement")
    sub.choices["load"].add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    sub.choices["load"].add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    sub.choices["load"].add_argument("--max-tokens", type=int, default=32)
    sub.choices["load"].add_argument("--min-requests", type=int, default=8)
    sub.choices["soak"].add_argument("--requests", type=int, default=500)
    sub.choices["soak"].add_argument("--clients", type=int, default=8)
    sub.choices["soak"].add_argument("--max-queue", type=int, default=4)
    sub.choices["soak"].add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.num_crops == 0:
        args.num_crops = None
    result = {"ttft": ttft, "load": load, "soak": soak}[args.mode](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
