"""Random-weight benchmark models, built once and cached by content hash in the user cache (see :func:`cache_dir`).

The checkpoint depends only on the code that writes it; each built folder also depends on the build code and the
package versions, so changing ``export/build.py`` (e.g. a new optimisation) rebuilds the folders and reuses the
checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path


def cache_dir() -> Path:
    """Where benchmark models are kept: ``$PHI_ONNX_CACHE/bench-models``, else the user cache directory
    (``$XDG_CACHE_HOME/phi-onnx/bench-models``, by default ``~/.cache/phi-onnx/bench-models``), never site-packages.
    ``PHI_ONNX_BENCH_CACHE`` names the folder itself."""
    if os.environ.get("PHI_ONNX_BENCH_CACHE"):
        return Path(os.environ["PHI_ONNX_BENCH_CACHE"]).expanduser()
    if os.environ.get("PHI_ONNX_CACHE"):
        return Path(os.environ["PHI_ONNX_CACHE"]).expanduser() / "bench-models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "phi-onnx" / "bench-models"


_CHECKPOINT_SOURCES = ("config.py", "modeling.py", "checkpoint.py", "tiny.py")


def _export_dir() -> Path:
    import phi_onnx_export

    return Path(phi_onnx_export.__file__).resolve().parent


def export_sources() -> list[Path]:
    """Every file of the export step that decides a built folder's bytes: its Python and its C++ kernel."""
    src = _export_dir()
    return [p for p in src.rglob("*") if p.suffix in (".py", ".cc") and "__pycache__" not in p.parts]


def content_key(files: Iterable[Path], parts: Iterable[str]) -> str:
    """16 hex digits of the files (named relative to the export package) and the parts: a built folder's cache key,
    here and in the tests' model cache."""
    digest = hashlib.sha256()
    root = _export_dir()
    for path in sorted(files):
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(name.encode() + path.read_bytes())
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _versions() -> list[str]:
    import onnxruntime
    import onnxruntime_genai
    import torch
    import transformers

    return [onnxruntime_genai.__version__, onnxruntime.__version__, torch.__version__, transformers.__version__]


def cached_checkpoint(size: str, seed: int = 0, cache: Path | None = None) -> Path:
    """A random-weight checkpoint of ``size`` ("tiny", "bench", "full"), written once per content hash."""
    from phi_onnx_export.tiny import write_random_checkpoint

    src = _export_dir()
    key = content_key((src / name for name in _CHECKPOINT_SOURCES), [size, str(seed), *_versions()[2:]])
    folder = (cache or cache_dir()) / f"{size}-s{seed}-{key}" / "checkpoint"
    if not (folder / "config.json").is_file():
        _log(f"writing the random {size} checkpoint to {folder}")
        staging = folder.with_name("checkpoint.partial")
        shutil.rmtree(staging, ignore_errors=True)
        write_random_checkpoint(staging, size=size, seed=seed)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


def cached_model(checkpoint: Path, precision: str, device: str = "cpu") -> Path:
    """The folder built from ``checkpoint`` at ``precision``, rebuilt only when the export code or versions change."""
    from phi_onnx_export.build import build

    key = content_key(export_sources(), [precision, device, *_versions()])
    folder = checkpoint.parent / f"{precision}-{device}-{key}"
    if not (folder / "genai_config.json").is_file():
        _log(f"building the {precision} {device} folder {folder} (once; cached)")
        build(checkpoint, folder, precision=precision, device=device, force=True, log=_log)
        for stale in checkpoint.parent.glob(f"{precision}-{device}-*"):  # built by older export code
            if stale != folder and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return folder


def bench_models(size: str, precisions: Iterable[str], seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """(checkpoint, {precision: model folder}) for a random model of ``size``, from the cache when possible."""
    checkpoint = cached_checkpoint(size, seed)
    return checkpoint, {p: cached_model(checkpoint, p) for p in precisions}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
