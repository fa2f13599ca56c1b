"""CUDA checks: run where a GPU is lent (``pytest -m gpu``); skipped on CPU-only machines."""

from __future__ import annotations

import pytest

from phi_onnx import _og

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_ready():
    try:
        reason = _og.provider_status()["cuda"]
    except ImportError as err:
        pytest.skip(str(err))
    if reason is not None:
        pytest.skip(f"CUDA not usable here: {reason}")


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_build_generates_like_the_cpu_model(
    cuda_ready, tmp_path, tiny_checkpoint, tiny_model, example_image, precision
):
    import phi_onnx
    from phi_onnx_export.build import build

    out = build(tiny_checkpoint, tmp_path / precision, precision=precision, device="cuda", log=lambda m: None)
    model = phi_onnx.load(out, device="cuda")
    assert model.device == "cuda"
    gpu = model.generate("What is this?", images=[example_image], max_new_tokens=8)
    cpu = tiny_model.generate("What is this?", images=[example_image], max_new_tokens=8)
    assert gpu.image_tokens == cpu.image_tokens == 1921
    agree = sum(a == b for a, b in zip(gpu.token_ids, cpu.token_ids))
    assert agree >= (6 if precision == "fp16" else 1), f"{agree}/8 greedy tokens agree"


def test_auto_picks_cuda(cuda_ready, tiny_model_dir):
    import phi_onnx

    assert phi_onnx.load(tiny_model_dir).device == "cuda"
