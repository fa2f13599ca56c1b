"""What reuse saves: chat follow-ups, second questions about an image, the cost of running vision in phi-onnx, memory.

    python -m phi_onnx_bench.reuse MODEL [MODEL ...] [--repeat 5] [--new-tokens 16] [--json out.json] [--only KIND]

For each model folder, one worker process loads the model twice, as it is now ("reuse": vision in phi-onnx's own
session with the feature cache, live generators kept) and as before ("before": vision inside onnxruntime-genai, no
feature cache, no KV reuse), and alternates them every round so both see the same machine. Every round starts from an
image never seen (the feature cache is cleared). A second worker measures the resident memory of 1 to 8 live
conversations, and a third how often re-tokenising an answer's text does not give back the generated ids. Answers
are fixed at --new-tokens (min_new_tokens) so rounds compare. Reports medians, ratios and the share of the CPU other
processes used during each worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from phi_onnx_bench.runner import background_share, cpu_snapshot

IMAGE = str(Path(__file__).resolve().parents[1] / "phi_onnx" / "assets" / "example.jpg")
FIRST, SECOND = "Describe this image.", "What colour is it?"
WORKERS = ("timing", "memory", "retokenise")


def _timing(folder: str, repeat: int, new: int) -> dict[str, list[float]]:
    import phi_onnx

    opts = {"max_new_tokens": new, "min_new_tokens": new}
    reuse = phi_onnx.load(folder, device="cpu", options=opts)
    before = phi_onnx.load(
        folder, device="cpu", options=opts, vision="onnxruntime-genai", image_cache_mb=0, kv_reserve=0, kv_pool=0
    )
    out: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        out.setdefault(name, []).append(value)

    for rep in range(repeat + 1):  # the first round warms up and is not kept
        reuse._vision.cache.clear()
        b_chat = before.chat()
        b1, b2 = b_chat.send(FIRST, images=[IMAGE]), b_chat.send(SECOND)
        r_chat = reuse.chat()
        r1, r2 = r_chat.send(FIRST, images=[IMAGE]), r_chat.send(SECOND)
        reuse._vision.cache.clear()
        o1 = before.generate(FIRST, images=[IMAGE])  # a fresh image, vision inside og (paired with q1)
        q1 = reuse.generate(FIRST, images=[IMAGE])  # a fresh image, vision run by phi-onnx
        q2 = reuse.generate(SECOND, images=[IMAGE])  # a new call about the same image
        if not rep:
            continue
        add("before_turn1_ttft_ms", b1.time_to_first_token_ms)
        add("before_turn2_ttft_ms", b2.time_to_first_token_ms)
        add("reuse_turn1_ttft_ms", r1.time_to_first_token_ms)
        add("reuse_turn2_ttft_ms", r2.time_to_first_token_ms)
        add("reuse_turn2_cached_tokens", r2.cached_tokens)
        add("reuse_turn2_prompt_tokens", r2.prompt_tokens)
        add("og_vision_first_call_ttft_ms", o1.time_to_first_token_ms)
        add("first_call_ttft_ms", q1.time_to_first_token_ms)
        add("first_call_vision_ms", q1.vision_ms)
        add("second_call_ttft_ms", q2.time_to_first_token_ms)
        add("second_call_image_cache_hits", q2.image_cache_hits)
    return out


def _memory(folder: str, new: int) -> dict[str, list[float]]:
    import gc

    import psutil

    import phi_onnx

    model = phi_onnx.load(folder, device="cpu", options={"max_new_tokens": new, "min_new_tokens": new})
    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731
    model.generate("warm up", images=[IMAGE])
    gc.collect()
    base = rss()
    out: dict[str, list[float]] = {}
    chats = []
    for n in range(1, 9):
        chat = model.chat()
        chat.send(FIRST, images=[IMAGE])
        chat.send(SECOND)
        chats.append(chat)
        gc.collect()
        out[f"rss_mb_{n}_conversations"] = [rss() - base]
    out["kv_mb_each"] = [chats[0].kv_bytes / 2**20]
    out["max_length_each"] = [chats[0].kv_bytes / model.kv_token_bytes]
    return out


def _retokenise(folder: str, new: int) -> dict[str, list[float]]:
    """How follow-ups (the whole conversation resent as messages, as OpenAI clients do) continue the generator: by
    exact ids, or only by the answer's text because re-tokenising it did not give back the generated ids."""
    import phi_onnx

    model = phi_onnx.load(folder, device="cpu", options={"max_new_tokens": new})
    continued = []
    for k in range(20):
        user = {"role": "user", "content": f"Question {k}: tell me something about the number {k * 7}."}
        model.sessions.clear()
        first = model.generate(messages=[user])
        follow = [user, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
        continued.append(float(model.generate(messages=follow).cached_tokens > 0))
    return {
        "follow_ups_continued": [sum(continued) / len(continued)],
        "share_by_exact_ids": [model.sessions.exact / len(continued)],
        "share_by_text_match": [model.sessions.by_text / len(continued)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=WORKERS, default=None, help="run one worker (no ratios)")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        folder, kind = args.worker
        if kind == "timing":
            result = _timing(folder, args.repeat, args.new_tokens)
        elif kind == "memory":
            result = _memory(folder, args.new_tokens)
        else:
            result = _retokenise(folder, args.new_tokens)
        print(json.dumps(result))
        return 0
    report: dict[str, Any] = {"command": " ".join(sys.argv), "models": {}}
    for folder in args.folders:
        figures: dict[str, Any] = {}
        for kind in (args.only,) if args.only else WORKERS:
            cmd = [sys.executable, "-m", "phi_onnx_bench.reuse", folder, "--worker", folder, kind]
            cmd += ["--repeat", str(args.repeat), "--new-tokens", str(args.new_tokens)]
            snap, t0 = cpu_snapshot(), time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            share = background_share(snap, cpu_snapshot(), time.perf_counter() - t0)
            raw = json.loads(done.stdout.strip().splitlines()[-1])
            figures[kind] = {k: statistics.median(v) for k, v in raw.items()} | {"other_cpu_share": share}
            print(f"{Path(folder).name} {kind}: {figures[kind]}", file=sys.stderr)
        report["models"][folder] = figures if args.only else figures | {"ratios": _ratios(figures)}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


def _ratios(f: dict[str, Any]) -> dict[str, float]:
    t, m = f["timing"], f["memory"]
    return {
        "reuse_turn2_over_turn1": t["reuse_turn2_ttft_ms"] / t["reuse_turn1_ttft_ms"],
        "before_turn2_over_turn1": t["before_turn2_ttft_ms"] / t["before_turn1_ttft_ms"],
        "second_call_over_first_call": t["second_call_ttft_ms"] / t["first_call_ttft_ms"],
        "vision_share_of_first_call": t["first_call_vision_ms"] / t["first_call_ttft_ms"],
        "fresh_image_phi_onnx_vision_over_og_vision": t["first_call_ttft_ms"] / t["og_vision_first_call_ttft_ms"],
        "chat_turn1_reuse_over_before": t["reuse_turn1_ttft_ms"] / t["before_turn1_ttft_ms"],
        "rss_8_conversations_over_1": m["rss_mb_8_conversations"] / m["rss_mb_1_conversations"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
