"""The scaling series and the prompt-pass profiler of the benchmark harness, on the tiny model (not timings)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


def test_series_covers_images_and_crops():
    from phi_onnx_bench.scaling import series

    assert series() == [(1, (1, 4, 9, 16)), (2, (4,)), (4, (4,)), (8, (4,))]
    assert series((1, 3), 2, (1,)) == [(1, (1, 2)), (3, (2,))]
    assert series((2,), 4, (9,)) == [(1, (9,)), (2, (4,))]


@pytest.fixture(scope="module")
def scaling_run(tiny_checkpoint, tiny_model_dir, example_image, tmp_path_factory):
    from phi_onnx_bench.scaling import markdown, plot, run_scaling
    from phi_onnx_bench.spec import PathSpec, Workload

    paths = [PathSpec("ort-fp32", "onnxruntime-genai", str(tiny_model_dir)),
             PathSpec("pytorch", "pytorch", str(tiny_checkpoint))]  # fmt: skip
    work = Workload(images=(str(example_image),), prompt="Describe.", new_tokens=2, warmup=0, repeat=1, num_crops=(4,))
    result = run_scaling(paths, work, image_counts=(1, 2), images_crops=4, crop_settings=(1, 4))
    out = tmp_path_factory.mktemp("scaling")
    return result, markdown(result), plot(result, out / "scaling.png")


def test_scaling_points_grow_with_the_prompt(scaling_run):
    result, _, _ = scaling_run
    got = {(p["path"], p["images"], p["num_crops"]): p for p in result["points"]}
    assert set(got) == {(label, n, c) for label in ("ort-fp32", "pytorch") for n, c in ((1, 1), (1, 4), (2, 4))}
    for label in ("ort-fp32", "pytorch"):
        one, four, two = got[(label, 1, 1)], got[(label, 1, 4)], got[(label, 2, 4)]
        assert one["prompt_tokens"] < four["prompt_tokens"] < two["prompt_tokens"]
        assert two["prompt_tokens"] > 2 * 757  # two images, 757 image tokens each at 4 crops
        assert all(p["time_to_first_token_ms"] > 0 for p in (one, four, two))
    assert got[("ort-fp32", 2, 4)]["prompt_tokens"] == got[("pytorch", 2, 4)]["prompt_tokens"]
    assert [r["images"] for r in result["runs"]] == [1, 2]
    json.dumps(result)  # the --json file


def test_scaling_table_and_chart(scaling_run):
    _, table, chart = scaling_run
    assert "| images | prompt tokens | ort-fp32 | pytorch |" in table
    assert "| 2 x 4 crops |" in table and "| 1 x 1 crops |" in table
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_refuses_num_crops(tiny_model_dir):
    from phi_onnx.cli.bench import bench

    result = CliRunner().invoke(bench, ["--model", str(tiny_model_dir), "--scaling", "--num-crops", "4"])
    assert result.exit_code == 2 and "--scaling chooses the crop settings itself" in result.stderr


def test_profile_splits_the_prompt_pass(tiny_model_dir, example_image):
    from phi_onnx_bench.profile import category, markdown, profile
    from phi_onnx_export.ops import LIBRARY

    assert category("GroupQueryAttention", "/model/layers.0/attn/GroupQueryAttention") == "attention"
    assert category("MatMul", "/img_processor/vision_model/encoder/layers.0/self_attn/MatMul") == "attention"
    assert category("MatMul", "/img_processor/vision_model/encoder/layers.0/self_attn/q_proj/MatMul") == "gemm"
    assert category("DynamicQuantizeMatMul", "/model/layers.0/mlp/down_proj/MatMul/int8") == "gemm"
    assert category("SimplifiedLayerNormalization", "/model/layers.0/input_layernorm") == "other"
    result = profile(tiny_model_dir, 4, [example_image], "Describe.", runs=2, threads=None)
    assert result["prompt_tokens"] > 757 and result["time_to_first_token_ms"] > 0
    assert set(result["graphs"]) == {"vision", "embedding", "decoder"}
    for graph in result["graphs"].values():
        assert graph["wall_ms"] > 0 and sum(graph["categories"].values()) <= graph["wall_ms"] * 1.05
    # CPU builds run the prompt through phi-onnx's causal kernel where it could be compiled (phi_onnx_export.ops)
    assert category("CausalAttention", "/model/layers.0/attn/GroupQueryAttention/causal") == "attention"
    kernel = "CausalAttention" if (tiny_model_dir / LIBRARY).is_file() else "GroupQueryAttention"
    assert result["graphs"]["decoder"]["ops"].get(kernel, 0) > 0
    assert result["graphs"]["vision"]["categories"]["attention"] > 0
    assert "| decoder |" in markdown(result)


def test_build_memory_per_stage(tmp_path):
    from phi_onnx_bench.buildmem import measure

    result = measure("tiny", "fp32", tmp_path / "built", interval=0.01)
    stages = dict(result["stages"])
    assert next(iter(stages)) == "imports" and any(s.startswith("building the fp32 decoder") for s in stages)
    assert result["peak_mb"] == max(stages.values()) >= stages["imports"] > 0
    assert result["weights_mb"] > 0 and (tmp_path / "built" / "genai_config.json").is_file()


def test_kernel_table_times_every_variant_and_chunked_attention_is_exact(tmp_path, capsys):
    from phi_onnx_bench.kernels import main

    out = tmp_path / "kernels.json"
    args = ["--tokens", "40", "--hidden", "128", "--intermediate", "256", "--heads", "2", "--repeat", "1"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["tokens"]["40"]
    assert {r["variant"] for r in result["gemm"]} == {
        "fp32 MatMul", "int8 DynamicQuantizeMatMul", "int4 MatMulNBits", "int8 MatMulNBits"
    }  # fmt: skip
    assert len(result["gemm"]) == 16 and all(r["ms"] > 0 for r in result["gemm"])
    chunked = [r for r in result["attention"] if r["kernel"].startswith("GroupQueryAttention")]
    assert [r["work"] for r in chunked] == [1.0, 0.75, 0.625, 0.562]
    assert all(r["max_diff"] < 1e-5 for r in chunked), "a prompt split in chunks must attend exactly as one pass"
    assert "| GroupQueryAttention, 4 chunks |" in capsys.readouterr().out
    from phi_onnx_export import ops

    if ops.unsupported() is None:  # phi-onnx's kernel, fp32 products: GroupQueryAttention's result to float rounding
        own = {r["kernel"]: r for r in result["attention"] if r["kernel"].startswith("phi-onnx CausalAttention")}
        assert len(own) == 2 and own["phi-onnx CausalAttention, fp32 products"]["max_diff"] < 1e-5
