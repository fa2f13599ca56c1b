"""`phi-onnx info`: what a model folder holds and what this machine can run it on."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from phi_onnx import _og

PACKAGES = (
    "phi-onnx",
    "onnxruntime-genai",
    "onnxruntime-genai-cuda",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "pillow",
    "huggingface-hub",
    "torch",
    "transformers",
    "onnx",
)


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def describe(model: str | Path | None) -> dict[str, Any]:
    """A JSON-able description of the machine and, if given, a model folder (validated, weights not loaded)."""
    data: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions(),
    }
    try:
        data["providers"] = {p: ("available" if why is None else why) for p, why in _og.provider_status().items()}
    except ImportError as err:
        data["providers"] = {"error": str(err)}
    if model is None:
        return data
    from phi_onnx.hub.modelinfo import inspect_model, native_libraries

    info = inspect_model(Path(model).expanduser())
    data["model"] = {
        "folder": str(info.folder),
        "type": info.model_type,
        "context_length": info.context_length,
        "hidden_size": info.hidden_size,
        "eos_token_ids": list(info.eos_token_ids),
        "crop_slots": info.crop_slots if info.crop_slots is not None else "dynamic",
        "size_mb": round(sum(f.stat().st_size for f in info.folder.iterdir() if f.is_file()) / 2**20, 1),
        "graphs": {
            role: {
                "file": graph.path.name,
                "inputs": {t.name: _tensor(t) for t in graph.inputs},
                "outputs": {t.name: _tensor(t) for t in graph.outputs},
            }
            for role, graph in (("vision", info.vision), ("embedding", info.embedding), ("decoder", info.decoder))
        },
        # native operator libraries the folder loads (phi-onnx's CPU builds: its attention kernels), per graph
        "custom_ops": native_libraries(info.config),
    }
    return data


def _tensor(t) -> str:
    dims = "?" if t.shape is None else ", ".join("?" if d is None else str(d) for d in t.shape)
    return f"{t.dtype} [{dims}]"


def render(data: dict[str, Any]) -> str:
    lines = []
    if "model" in data:
        m = data["model"]
        lines += [
            f"model      {m['folder']}",
            f"type       {m['type']} (context {m['context_length']:,} tokens, hidden {m['hidden_size']}, "
            f"{m['size_mb']:,} MB, crop slots {m['crop_slots']})",
        ]
        for role, graph in m["graphs"].items():
            lines.append(f"{role:<10} {graph['file']}")
            for kind in ("inputs", "outputs"):
                shown = [f"{n}: {t}" for n, t in graph[kind].items()]
                if len(shown) > 4:
                    shown = [*shown[:3], f"... {len(shown) - 3} more"]
                lines.append(f"  {kind:<8} " + "; ".join(shown))
        if m.get("custom_ops"):
            libraries = ", ".join(f"{lib} ({role})" for role, lib in m["custom_ops"].items())
            lines.append(f"kernels    {libraries}: native operators, built with the folder")
    lines.append("providers  " + ", ".join(f"{p}: {s}" for p, s in data["providers"].items()))
    lines.append("packages   " + ", ".join(f"{n} {v}" for n, v in data["packages"].items()))
    lines.append(f"python     {data['python']} on {data['platform']}")
    return "\n".join(lines)
