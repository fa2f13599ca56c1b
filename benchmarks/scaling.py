"""How the time to first token grows with the prompt: more images at a fixed crop setting, more crops for one image.

Every point is a full side-by-side run (:func:`phi_onnx_bench.runner.run_benchmark`: every path in its own process,
warm-ups, repetitions, medians, the CPU share of other processes); the points differ only in the images and
num_crops of the workload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phi_onnx.errors import DependencyError
from phi_onnx_bench.runner import run_benchmark
from phi_onnx_bench.spec import PathSpec, Workload

IMAGE_COUNTS = (1, 2, 4, 8)  # at IMAGES_CROPS crops each
IMAGES_CROPS = 4
CROP_SETTINGS = (1, 4, 9, 16)  # for one image


def series(image_counts: Sequence[int] = IMAGE_COUNTS, images_crops: int = IMAGES_CROPS,
           crop_settings: Sequence[int] = CROP_SETTINGS) -> list[tuple[int, tuple[int, ...]]]:  # fmt: skip
    """The runs to make, as (number of images, num_crops settings): one image at every crop setting (and at
    ``images_crops``), then each larger image count at ``images_crops``."""
    one = tuple(sorted({*crop_settings, images_crops} if 1 in image_counts else set(crop_settings)))
    runs = [(1, one)] if one else []
    return runs + [(n, (images_crops,)) for n in sorted(image_counts) if n > 1]


def run_scaling(paths: Sequence[PathSpec], base: Workload, *, image_counts: Sequence[int] = IMAGE_COUNTS,
                images_crops: int = IMAGES_CROPS, crop_settings: Sequence[int] = CROP_SETTINGS,
                command: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the scaling series and gather one point per (images, num_crops, path).

    ``base.images[0]`` is repeated to make the multi-image prompts; ``base.num_crops`` is ignored.
    """
    runs = []
    for count, crops in series(image_counts, images_crops, crop_settings):
        work = dataclasses.replace(base, images=(base.images[0],) * count, num_crops=crops)
        if log:
            log(f"scaling: {count} image(s) at num_crops {', '.join(map(str, crops))}")
        runs.append({"images": count, "result": run_benchmark(paths, work, command=command, log=log)})
    points = []
    for run in runs:
        for path in run["result"]["paths"]:
            for crops, data in path["runs"].items():
                ttft = data["figures"]["time_to_first_token_ms"]
                points.append({"path": path["label"], "images": run["images"], "num_crops": int(crops),
                               "prompt_tokens": data["prompt_tokens"], "time_to_first_token_ms": ttft["median"],
                               "p90_ms": ttft["p90"], "background_cpu": path.get("background_cpu")})  # fmt: skip
    first = runs[0]["result"] if runs else {}
    return {"schema": 1, "kind": "scaling", "command": command, "machine": first.get("machine"),
            "packages": first.get("packages"), "workload": base.to_dict(), "images_crops": images_crops,
            "points": points, "background_cpu_max": max((p["background_cpu"] or 0.0 for p in points), default=0.0),
            "runs": runs}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """Two tables: first token (ms) per path against the image count, and against num_crops for one image."""
    points = result["points"]
    labels = list(dict.fromkeys(p["path"] for p in points))
    crops = result["images_crops"]
    by = {(p["path"], p["images"], p["num_crops"]): p for p in points}

    def table(title: str, keys: list[tuple[int, int]]) -> list[str]:
        tokens = {k: next((p["prompt_tokens"] for p in points if (p["images"], p["num_crops"]) == k), 0) for k in keys}
        head = [f"| {title} | prompt tokens | " + " | ".join(labels) + " |", "|---|--:|" + "--:|" * len(labels)]
        rows = []
        for k in keys:
            cells = [by.get((label, *k), {}).get("time_to_first_token_ms") for label in labels]
            rows.append(f"| {k[0]} x {k[1]} crops | {tokens[k]:,} | "
                        + " | ".join("–" if c is None else f"{c:,.0f}" for c in cells) + " |")  # fmt: skip
        return head + rows

    images = sorted({(p["images"], p["num_crops"]) for p in points if p["num_crops"] == crops})
    single = sorted({(1, p["num_crops"]) for p in points if p["images"] == 1})
    busy = f"Other processes used up to {result['background_cpu_max']:.0%} of the CPU during these runs."
    lines = ["First token, ms (median), by number of images:", "", *table("images", images), "",
             "By num_crops, one image:", "", *table("image", single), "", busy]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """One PNG: first token against prompt tokens, per path, for the image-count series and the crop series.

    Raises:
        DependencyError: matplotlib is not installed (the ``bench`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise DependencyError("--plot needs matplotlib, which is not installed: pip install 'phi-onnx[bench]'") from err
    points, crops = result["points"], result["images_crops"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = ((f"1, 2, 4, 8 images at {crops} crops", lambda p: p["num_crops"] == crops, "images"),
              ("one image at 1, 4, 9, 16 crops", lambda p: p["images"] == 1, "num_crops"))  # fmt: skip
    for ax, (title, keep, note) in zip(axes, panels, strict=True):
        for label in dict.fromkeys(p["path"] for p in points):
            mine = sorted((p for p in points if p["path"] == label and keep(p)), key=lambda p: p["prompt_tokens"])
            if not mine:
                continue
            xs = [p["prompt_tokens"] for p in mine]
            ax.plot(xs, [p["time_to_first_token_ms"] / 1e3 for p in mine], marker="o", label=label)
        for p in points:
            if keep(p) and p["path"] == points[0]["path"]:
                ax.annotate(str(p[note]), (p["prompt_tokens"], 0), textcoords="offset points", xytext=(0, 3),
                            fontsize=7, ha="center")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("time to first token (s)")
    m = result.get("machine") or {}
    fig.suptitle(f"{m.get('cpu', '?')} ({m.get('cores_available', '?')} cores); medians of "
                 f"{result['workload']['repeat']} runs", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
