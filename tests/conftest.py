"""Shared fixtures: a tiny random-weight Phi-3-V, built once per content hash, run with the real onnxruntime-genai."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PHI_ONNX_TEST_CACHE", ROOT / ".cache" / "test-models"))


def _source_hash(*parts: str) -> str:
    """Hash of everything that decides the built bytes: the export code and the build arguments (the harness's key)."""
    import onnxruntime_genai
    import torch
    import transformers

    from phi_onnx_bench.models import content_key, export_sources

    versions = (onnxruntime_genai.__version__, torch.__version__, transformers.__version__)
    return content_key(export_sources(), [*parts, *versions])


def build_cached(
    size: str = "tiny", precision: str = "fp32", seed: int = 0, portable: bool = False
) -> tuple[Path, Path]:
    """(checkpoint folder, model folder) for a random-weight model, rebuilt only when the export code changes."""
    from phi_onnx_export.build import build
    from phi_onnx_export.tiny import write_random_checkpoint

    key = _source_hash(size, precision, str(seed), str(portable))
    base = CACHE / f"{size}-{precision}{'-portable' if portable else ''}-s{seed}-{key}"
    ckpt, model = base / "checkpoint", base / "model"
    if not (model / "genai_config.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        write_random_checkpoint(ckpt, size=size, seed=seed)
        build(ckpt, model, precision=precision, device="cpu", portable=portable, log=lambda _msg: None)
    return ckpt, model


@pytest.fixture(scope="session")
def tiny_build() -> tuple[Path, Path]:
    return build_cached("tiny", "fp32")


@pytest.fixture(scope="session")
def tiny_portable_model_dir() -> Path:
    """The tiny model built with --portable: onnxruntime's kernels only, like Microsoft's published folders."""
    return build_cached("tiny", "fp32", portable=True)[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_build) -> Path:
    return tiny_build[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_build) -> Path:
    return tiny_build[1]


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import phi_onnx

    return phi_onnx.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def example_image() -> Path:
    return ROOT / "phi_onnx" / "assets" / "example.jpg"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole run: 2 CPUs, no dashboard (Ray's start-up is paid once)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
