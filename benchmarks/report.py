"""Render a benchmark result: a markdown report for stdout and BENCHMARKS.md, and an optional chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_onnx.errors import DependencyError

RATES = ("prefill_tokens_per_s", "decode_tokens_per_s")


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _cell(fig: dict[str, Any], digits: int = 0, tail: str = "p90") -> str:
    if fig["median"] is None:
        return "–"
    if fig["n"] < 2:
        return _num(fig["median"], digits)
    return f"{_num(fig['median'], digits)} ({_num(fig[tail], digits)})"


def markdown(result: dict[str, Any]) -> str:
    """The whole report as markdown: setup, per-path figures, ratios, greedy agreement and targets."""
    m, w, pk = result["machine"], result["workload"], result["packages"]
    names = ("onnxruntime-genai", "onnxruntime", "torch", "transformers")
    versions = ", ".join(f"{k} {pk[k]}" for k in names if k in pk)
    lines = [
        f"Machine: {m['cpu']}, {m['cores_available']} cores, {_num(m['memory_gib'], 1)} GiB; {versions}.",
        f"Workload: {', '.join(Path(i).name for i in w['images'])}; prompt {w['prompt']!r}; {w['new_tokens']} new "
        f"tokens (greedy, min = max); {w['warmup']} warm-up + {w['repeat']} timed runs per num_crops; "
        f"threads {w['threads'] or 'all'}. Medians, slow tail in brackets (p90 of times, p10 of rates).",
        "",
        "| path | precision | num_crops | prompt tokens | load s | preprocess ms | vision ms | first token ms | "
        "prefill tokens/s | decode tokens/s | end-to-end ms | peak RSS MB | private MB | other load |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    skipped = [p for p in result["paths"] if p.get("skipped")]
    for p in result["paths"]:
        for crops, run in p["runs"].items():
            f = run["figures"]
            bg = p.get("background_cpu")
            lines.append(
                f"| {p['label']} | {p['precision']} | {crops} | {run['prompt_tokens']:,} | {p['load_ms'] / 1e3:.1f} | "
                f"{_cell(f['preprocess_ms'])} | {_cell(f['vision_ms'])} | {_cell(f['time_to_first_token_ms'])} | "
                f"{_cell(f['prefill_tokens_per_s'], 0, 'p10')} | {_cell(f['decode_tokens_per_s'], 1, 'p10')} | "
                f"{_cell(f['end_to_end_ms'])} | {_num(p['peak_rss_mb'])} | {_num(p.get('peak_private_mb'))} | "
                f"{'–' if bg is None else f'{bg:.0%}'} |"
            )
    lines += [f"- {p['label']}: skipped, {p['skipped']}" for p in skipped]
    sized = [p for p in result["paths"] if p.get("model_files_mb") and not p.get("skipped")]
    if sized:
        lines += ["", "Memory against the model's files (as stored: the folder, or the checkpoint's safetensors; "
                  "once loaded = the peak while generating; private = anonymous memory, without the pages of mapped "
                  "files):"]  # fmt: skip
        for p in sized:
            files, private, running = p["model_files_mb"], p.get("peak_private_mb"), p.get("run_peak_rss_mb")
            mine = f", private {private / files:.2f}x" if private else ""
            after = f" ({running / files:.2f}x once loaded)" if running else ""
            lines.append(
                f"- {p['label']}: files {_num(files)} MB; peak RSS {p['peak_rss_mb'] / files:.2f}x{after}{mine}"
            )
    kernels = next((p["kernels"] for p in result["paths"] if p.get("kernels")), None)
    if kernels:
        flags = " ".join(kernels["cpuinfo_flags"]) or "none of the relevant flags"
        lines += ["", f"CPU kernels (PyTorch's view): level {kernels['cpu_capability']}, avx512_bf16 "
                  f"{_yes(kernels['avx512_bf16'])}, AMX tiles {_yes(kernels['amx_tile'])}, VNNI "
                  f"{_yes(kernels['vnni'])}; /proc/cpuinfo: {flags}."]  # fmt: skip
    fastest = result.get("fastest_pytorch_ratios") or []
    if fastest:
        lines += ["", "| onnxruntime-genai / fastest PyTorch | num_crops | first token | (against) | decode tokens/s | "
                  "(against) |", "|---|--:|--:|---|--:|---|"]  # fmt: skip
        for r in fastest:
            lines.append(f"| {r['onnxruntime_genai']} | {r['num_crops']} | {_x(r.get('time_to_first_token'))} | "
                         f"{r.get('first_token_vs', '–')} | {_x(r.get('decode_tokens_per_s'))} | "
                         f"{r.get('decode_vs', '–')} |")  # fmt: skip
    if result["ratios"]:
        agree = {(a["onnxruntime_genai"], a["pytorch"], a["num_crops"]): a for a in result["token_agreement"]}
        lines += ["", "| onnxruntime-genai / PyTorch | num_crops | first token | decode tokens/s | end-to-end | "
                  "vision | greedy tokens equal |", "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for r in result["ratios"]:
            a = agree.get((r["onnxruntime_genai"], r["pytorch"], r["num_crops"]), {})
            lines.append(
                f"| {r['onnxruntime_genai']} / {r['pytorch']} | {r['num_crops']} | {_x(r['time_to_first_token'])} | "
                f"{_x(r['decode_tokens_per_s'])} | {_x(r['end_to_end'])} | {_x(r['vision'])} | "
                f"{_num(100 * a['agreement']) + ' %' if a else '–'} |"
            )
    if result["num_crops_ratios"]:
        lines.append("")
        lines += [f"- {r['path']}: first token at num_crops {r['few']} / {r['many']} = {_x(r['time_to_first_token'])}"
                  for r in result["num_crops_ratios"]]  # fmt: skip
    if result["targets"]:
        lines += ["", "Targets:"]
        if not result.get("trustworthy", True):
            lines.append(
                f"- NOT JUDGED: other processes used up to {result.get('background_cpu_max', 0):.0%} of the CPU during "
                "the run (over 10 %), so these figures are not trustworthy; rerun on a quiet machine"
            )
        marks = {True: "x", False: " ", None: "?"}
        lines += [f"- [{marks[t['met']]}] {t['target']}: measured {_x(t['value'])}" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Bar charts of time to first token and decode speed per path and num_crops, saved as PNG.

    Raises:
        DependencyError: matplotlib is not installed (the ``bench`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise DependencyError("--plot needs matplotlib, which is not installed: pip install 'phi-onnx[bench]'") from err
    paths = [p for p in result["paths"] if p["runs"]]  # skipped paths have none
    crops = sorted({int(c) for p in paths for c in p["runs"]}, reverse=True)
    labels = [p["label"] for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("time_to_first_token_ms", "time to first token (ms, lower is better)"),
              ("decode_tokens_per_s", "decode (tokens/s, higher is better)"))  # fmt: skip
    width = 0.8 / max(len(crops), 1)
    for ax, (figure, title) in zip(axes, panels, strict=True):
        for j, c in enumerate(crops):
            values = [(p["runs"].get(str(c)) or {}).get("figures", {}).get(figure, {}).get("median") or 0
                      for p in paths]  # fmt: skip
            xs = [i + (j - (len(crops) - 1) / 2) * width for i in range(len(labels))]
            bars = ax.bar(xs, values, width, label=f"num_crops {c}")
            ax.bar_label(bars, fmt="%.0f" if figure.endswith("_ms") else "%.1f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    m, w = result["machine"], result["workload"]
    fig.suptitle(f"{m['cpu']} ({m['cores_available']} cores); {w['new_tokens']} new tokens; medians of "
                 f"{w['repeat']} runs", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
