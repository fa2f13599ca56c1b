"""Tests for phi_onnx.hub.modelinfo: the ONNX interface reader and the model folder checks."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hubserver import build_fake_model, write_onnx

from phi_onnx.errors import ModelError
from phi_onnx.hub.modelinfo import GraphInfo, TensorInfo, inspect_model, read_graph_io

PREFIX = "phi-3.5-v-instruct"


def _edit_config(folder: Path, edit) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    edit(config["model"])
    path.write_text(json.dumps(config))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_fake_model(tmp_path / "model")


# --------------------------------------------------------------------------------------------------------------------
# read_graph_io


def test_reads_names_dtypes_and_every_kind_of_dim(tmp_path: Path) -> None:
    path = write_onnx(
        tmp_path / "g.onnx",
        [
            ("pixel_values", "float16", ["num_images", 17, 3, 336, 336]),
            ("ids", "int64", [None, -1]),
            ("mask", "int32", None),
            ("scale", "bfloat16", []),
        ],
        [("out", "float32", ["n", 3072])],
    )
    info = read_graph_io(path)
    assert isinstance(info, GraphInfo) and info.path == path
    assert info.inputs == (
        TensorInfo("pixel_values", "float16", ("num_images", 17, 3, 336, 336)),
        TensorInfo("ids", "int64", (None, -1)),
        TensorInfo("mask", "int32", None),
        TensorInfo("scale", "bfloat16", ()),
    )
    assert info.outputs == (TensorInfo("out", "float32", ("n", 3072)),)
    assert info.input("mask").rank is None and info.input("scale").rank == 0
    assert info.output("out").rank == 2 and info.input("nope") is None and info.output("ids") is None
    assert info.opsets == {"": 17}
    assert info.external_data == frozenset()


def test_matches_onnx_on_the_fake_decoder(tmp_path: Path) -> None:
    import onnx

    folder = build_fake_model(tmp_path / "m", dtype="float16", data_bytes=1 << 20)
    path = folder / f"{PREFIX}-text.onnx"
    proto = onnx.load(str(path), load_external_data=False)

    def expected(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim)
            out.append((v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return out

    info = read_graph_io(path)
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == expected(proto.graph.input)
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == expected(proto.graph.output)
    assert info.external_data == {f"{PREFIX}-text.onnx.data"}


def test_skips_a_large_inline_initializer_quickly(tmp_path: Path) -> None:
    path = write_onnx(tmp_path / "big.onnx", [("x", "float32", [1])], [("y", "float32", [1])])
    import numpy as np
    import onnx

    proto = onnx.load(str(path))
    big = np.random.default_rng(0).standard_normal((16 << 20) // 4, dtype=np.float32)  # 16 MiB inline
    proto.graph.initializer.append(onnx.numpy_helper.from_array(big, "w"))
    onnx.save_model(proto, str(path))
    assert path.stat().st_size > 16 << 20
    start = time.perf_counter()
    info = read_graph_io(path)
    assert time.perf_counter() - start < 0.5  # skipping by length, not decoding 4M floats
    assert [t.name for t in info.inputs] == ["x"] and info.external_data == frozenset()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty"),
        (b"<html>Not found</html>", "is not a valid ONNX file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n", "is not a valid ONNX file"),
    ],
)
def test_refuses_files_that_are_not_onnx(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=fragment):
        read_graph_io(path)


def test_refuses_a_truncated_graph_and_a_missing_file(tmp_path: Path) -> None:
    path = write_onnx(tmp_path / "g.onnx", [("x", "float32", [1, 2])], [("y", "float32", [1, 2])])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="is not a valid ONNX file"):
        read_graph_io(path)
    with pytest.raises(ModelError, match="does not exist"):
        read_graph_io(tmp_path / "missing.onnx")


# --------------------------------------------------------------------------------------------------------------------
# inspect_model: happy paths


def test_inspects_a_fake_cpu_model(model: Path) -> None:
    info = inspect_model(model)
    assert info.folder == model and info.model_type == "phi3v"
    assert info.context_length == 131072 and info.hidden_size == 16
    assert info.eos_token_ids == (32007, 32001, 32000)
    assert info.crop_slots is None  # the crop dimension is symbolic
    assert info.vision.output("image_features").shape == ("num_image_tokens", 16)
    assert info.embedding.output("inputs_embeds").dtype == "float32"
    assert info.decoder.input("inputs_embeds").dtype == "float32"
    assert info.config["model"]["type"] == "phi3v"


def test_inspects_an_fp16_model_with_fixed_crops_and_external_data(tmp_path: Path) -> None:
    folder = build_fake_model(tmp_path / "m", dtype="float16", crops=17, data_bytes=4096)
    _edit_config(folder, lambda m: m.update(eos_token_id=32007))
    info = inspect_model(folder)
    assert info.crop_slots == 17
    assert info.eos_token_ids == (32007,)
    assert info.vision.input("pixel_values").dtype == "float16"


def test_uses_the_io_names_genai_config_gives(model: Path) -> None:
    write_onnx(
        model / f"{PREFIX}-vision.onnx",
        [("pixels", "float32", ["n", 17, 3, 336, 336]), ("sizes", "int64", ["n", 2])],
        [("features", "float32", ["t", 16])],
    )

    def rename(m):
        m["vision"]["inputs"] = {"pixel_values": "pixels", "image_sizes": "sizes"}
        m["vision"]["outputs"] = {"image_features": "features"}

    _edit_config(model, rename)
    assert inspect_model(model).crop_slots == 17


# --------------------------------------------------------------------------------------------------------------------
# inspect_model: refusals


def test_refuses_a_missing_folder_and_a_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        inspect_model(tmp_path / "f")
    with pytest.raises(ModelError, match=re.escape("has no genai_config.json")):
        inspect_model(tmp_path)


def test_refuses_invalid_json(model: Path) -> None:
    (model / "genai_config.json").write_text("{not json")
    with pytest.raises(ModelError, match=re.escape("genai_config.json is not valid JSON")):
        inspect_model(model)


def test_refuses_a_text_only_model(model: Path) -> None:
    _edit_config(model, lambda m: m.update(type="phi3"))
    with pytest.raises(ModelError) as err:
        inspect_model(model)
    assert str(err.value) == (
        f"{model / 'genai_config.json'} says type 'phi3', not 'phi3v': this is not a Phi-3-vision model folder"
    )


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m["vision"].update(outputs={"visual_features": "visual_features"}), "outputs 'visual_features'"),
        (lambda m: m["embedding"].update(filename="phi-3-v-128k-instruct-text-embedding.onnx"), "text-only"),
    ],
)
def test_refuses_the_2024_format(model: Path, edit, reason: str) -> None:
    _edit_config(model, edit)
    with pytest.raises(ModelError) as err:
        inspect_model(model)
    message = str(err.value)
    assert "2024 Phi-3-vision ONNX format" in message and reason in message
    assert "microsoft/Phi-3.5-vision-instruct-onnx" in message
    assert "microsoft/Phi-3-vision-128k-instruct-onnx" in message


def test_refuses_missing_files(model: Path) -> None:
    (model / f"{PREFIX}-embedding.onnx").unlink()
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as err:
        inspect_model(model)
    message = str(err.value)
    assert "\n" not in message
    assert f"embedding graph {PREFIX}-embedding.onnx (model.embedding.filename) is missing" in message
    assert "tokenizer.json is missing" in message
    assert message.count("; ") == 1


def test_refuses_missing_external_data(tmp_path: Path) -> None:
    folder = build_fake_model(tmp_path / "m", data_bytes=4096)
    (folder / f"{PREFIX}-text.onnx.data").unlink()
    with pytest.raises(ModelError, match=re.escape(f"{PREFIX}-text.onnx needs external data {PREFIX}-text.onnx.data")):
        inspect_model(folder)


def test_refuses_a_missing_hidden_size(model: Path) -> None:
    _edit_config(model, lambda m: m["decoder"].pop("hidden_size"))
    with pytest.raises(ModelError, match=re.escape("no positive model.decoder.hidden_size")):
        inspect_model(model)


VISION_OK = [("pixel_values", "float32", ["n", "c", 3, 336, 336]), ("image_sizes", "int64", ["n", 2])]


@pytest.mark.parametrize(
    ("graph", "inputs", "outputs", "fragment"),
    [
        (
            "vision",
            [("pixel_values", "float32", ["n", 3, 336, 336]), ("image_sizes", "int64", ["n", 2])],
            [("image_features", "float32", ["t", 16])],
            "input 'pixel_values' has rank 4, expected 5",
        ),
        (
            "vision",
            VISION_OK[:1],
            [("image_features", "float32", ["t", 16])],
            "has no input 'image_sizes' (it has: pixel_values)",
        ),
        (
            "vision",
            VISION_OK,
            [("image_features", "float32", ["n", "t", 16])],
            "output 'image_features' has rank 3, expected 2",
        ),
        ("vision", VISION_OK, [("image_features", "float32", ["t", 32])], "has last dimension 32, decoder.hidden_size"),
        (
            "vision",
            [("pixel_values", "int64", ["n", "c", 3, 336, 336]), ("image_sizes", "int64", ["n", 2])],
            [("image_features", "float32", ["t", 16])],
            "'pixel_values' is int64",
        ),
        (
            "vision",
            VISION_OK,
            [("image_features", "float16", ["t", 16])],
            "vision output vs embedding input: image_features is float16 but image_features is float32",
        ),
        (
            "embedding",
            [("input_ids", "int64", ["b", "s"])],
            [("inputs_embeds", "float32", ["b", "s", 16])],
            "has no input 'image_features'",
        ),
        (
            "embedding",
            [("input_ids", "int64", ["b", "s"]), ("image_features", "float32", ["t", 16])],
            [("inputs_embeds", "float16", ["b", "s", 16])],
            "embedding output vs decoder input: inputs_embeds is float16 but inputs_embeds is float32",
        ),
        (
            "text",
            [("embeds", "float32", ["b", "s", 16])],
            [("logits", "float32", ["b", "s", 32064])],
            "has no input 'inputs_embeds' (it has: embeds)",
        ),
    ],
)
def test_refuses_graphs_that_break_the_contract(model: Path, graph, inputs, outputs, fragment: str) -> None:
    write_onnx(model / f"{PREFIX}-{graph}.onnx", inputs, outputs)
    with pytest.raises(ModelError) as err:
        inspect_model(model)
    assert fragment in str(err.value)
    assert str(err.value).startswith(f"{model} is not a usable phi3v model folder: ")


def test_lists_every_problem_in_one_message(model: Path) -> None:
    _edit_config(model, lambda m: m.update(context_length=0, eos_token_id=None))
    (model / f"{PREFIX}-vision.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError) as err:
        inspect_model(model)
    problems = str(err.value).split(": ", 1)[1].split("; ")
    assert len(problems) == 3, problems
    assert "context_length" in problems[0] and "eos_token_id" in problems[1] and "not a valid ONNX" in problems[2]
