"""phi-onnx's attention kernels (export/ops) against onnxruntime's own GroupQueryAttention and a reference, and the
build step that routes a folder's attention to them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phi_onnx_export import ops

pytestmark = pytest.mark.skipif(ops.unsupported() is not None, reason=str(ops.unsupported()))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ops")
    assert ops.compile_library(folder) is None
    return folder / ops.LIBRARY


def _sessions(library, *, batch, seq, heads, kv_heads, dim, buffer, rot_half, interleaved, bf16):
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper

    def model(op, domain, extra):
        inputs = [
            helper.make_tensor_value_info("qkv", T.FLOAT, [batch, seq, (heads + 2 * kv_heads) * dim]),
            helper.make_tensor_value_info("past_key", T.FLOAT, [batch, kv_heads, buffer, dim]),
            helper.make_tensor_value_info("past_value", T.FLOAT, [batch, kv_heads, buffer, dim]),
            helper.make_tensor_value_info("seqlens_k", T.INT32, [batch]),
            helper.make_tensor_value_info("total", T.INT32, [1]),
            helper.make_tensor_value_info("cos", T.FLOAT, [4096, rot_half]),
            helper.make_tensor_value_info("sin", T.FLOAT, [4096, rot_half]),
        ]
        outputs = [helper.make_tensor_value_info(n, T.FLOAT, None) for n in ("out", "present_key", "present_value")]
        node = helper.make_node(op, ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"],
                                ["out", "present_key", "present_value"], domain=domain, num_heads=heads,
                                kv_num_heads=kv_heads, scale=0.0, do_rotary=1, rotary_interleaved=int(interleaved),
                                local_window_size=-1, softcap=0.0, **extra)  # fmt: skip
        graph = helper.make_graph([node], "attention", inputs, outputs)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = 2
    theirs = ort.InferenceSession(model("GroupQueryAttention", "com.microsoft", {}), providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(model("CausalAttention", ops.DOMAIN, {"bf16": int(bf16)}), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip
    return theirs, ours


def _feeds(rng, *, batch, seq, heads, kv_heads, dim, buffer, past, rot_half):
    positions = np.arange(4096)[:, None] / (10000 ** (np.arange(rot_half) / rot_half))[None]
    feeds = {
        "qkv": rng.standard_normal((batch, seq, (heads + 2 * kv_heads) * dim)).astype(np.float32),
        "past_key": np.zeros((batch, kv_heads, buffer, dim), np.float32),
        "past_value": np.zeros((batch, kv_heads, buffer, dim), np.float32),
        "seqlens_k": np.full((batch,), past + seq - 1, np.int32),
        "total": np.array([past + seq], np.int32),
        "cos": np.cos(positions).astype(np.float32),
        "sin": np.sin(positions).astype(np.float32),
    }
    feeds["past_key"][:, :, :past] = rng.standard_normal((batch, kv_heads, past, dim))
    feeds["past_value"][:, :, :past] = rng.standard_normal((batch, kv_heads, past, dim))
    return feeds


def _check_products(got, want, bf16: bool) -> None:
    """fp32 products: the reference to float rounding. bf16 products (where the CPU has AVX512-BF16): within bfloat16's
    8 bits, and visibly rounded, so a kernel that fell back to fp32 would not pass as bf16."""
    error = float(np.abs(got - want).max())
    if bf16 and ops.has_bf16():
        assert 1e-4 < error < 3e-2, error
    else:
        assert error < 2e-5, error


CASES = {
    # name: batch, seq, heads, kv_heads, dim, past, buffer (the cache's length: > past + seq when shared), rotary
    "bench-like": (1, 200, 16, 16, 64, 0, 200, 32, False),
    "grouped heads, odd length": (1, 37, 4, 2, 16, 0, 37, 8, False),
    "prompt after a cached prefix, shared buffer": (1, 45, 4, 4, 32, 60, 128, 16, False),
    "full-size head, partial interleaved rotary": (1, 70, 2, 1, 96, 5, 80, 24, True),
    "batch of two": (2, 33, 4, 4, 16, 0, 40, 8, False),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_causal_attention_matches_group_query_attention(library, case, bf16):
    batch, seq, heads, kv_heads, dim, past, buffer, rot_half, interleaved = CASES[case]
    shape = dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, dim=dim, buffer=buffer, rot_half=rot_half)
    theirs, ours = _sessions(library, interleaved=interleaved, bf16=bf16, **shape)
    feeds = _feeds(np.random.default_rng(len(case)), past=past, **shape)
    want = theirs.run(None, feeds)
    got = ours.run(None, feeds)
    total = past + seq
    assert got[0].shape == want[0].shape == (batch, seq, heads * dim)
    assert got[1].shape == want[1].shape and got[1].shape[2] == max(buffer, total)
    # the cache: past rows copied, new rows rotated keys and plain values, exactly as onnxruntime writes them
    np.testing.assert_allclose(got[1][:, :, :total], want[1][:, :, :total], atol=1e-5)
    np.testing.assert_array_equal(got[2][:, :, :total], want[2][:, :, :total])
    _check_products(got[0], want[0], bf16)


def test_a_right_padded_batch_attends_to_each_rows_own_tokens(library):
    shape = dict(batch=2, seq=40, heads=4, kv_heads=2, dim=32, buffer=48, rot_half=16)
    theirs, ours = _sessions(library, interleaved=False, bf16=False, **shape)
    feeds = _feeds(np.random.default_rng(7), past=0, **shape)
    feeds["seqlens_k"] = np.array([39, 29], np.int32)  # the second row has 30 tokens and 10 of padding
    want, got = theirs.run(None, feeds), ours.run(None, feeds)
    np.testing.assert_allclose(got[0][0], want[0][0], atol=2e-5)
    np.testing.assert_allclose(got[0][1, :30], want[0][1, :30], atol=2e-5)  # the padding's own rows are ignored


def test_a_bad_call_is_a_one_line_error_not_a_crash(library):
    import onnxruntime as ort

    shape = dict(batch=1, seq=8, heads=2, kv_heads=2, dim=16, buffer=8, rot_half=8)
    _, ours = _sessions(library, interleaved=False, bf16=False, **shape)
    feeds = _feeds(np.random.default_rng(0), past=0, **shape)
    feeds["seqlens_k"][:] = 11  # longer than the 8 tokens of a first prompt
    refused = ort.capi.onnxruntime_pybind11_state.InvalidArgument
    with pytest.raises(refused, match="CausalAttention: seqlens_k does not match"):
        ours.run(None, feeds)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, seq, heads, dim", [(3, 577, 6, 64), (2, 50, 4, 16), (1, 33, 2, 96)])
def test_bidirectional_attention_matches_the_exported_matmul_softmax_matmul(library, batch, seq, heads, dim, bf16):
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper

    width = heads * dim
    inputs = [helper.make_tensor_value_info(n, T.FLOAT, [batch, seq, width]) for n in "qkv"]
    output = [helper.make_tensor_value_info("out", T.FLOAT, None)]
    node = helper.make_node("BidirectionalAttention", ["q", "k", "v"], ["out"], domain=ops.DOMAIN, num_heads=heads,
                            scale=1.0, bf16=int(bf16))  # fmt: skip
    graph = helper.make_graph([node], "vision-attention", inputs, output)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                              ir_version=10)  # fmt: skip
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seq)
    q, k, v = (rng.standard_normal((batch, seq, width)).astype(np.float32) for _ in range(3))
    q *= dim**-0.5  # as the exported graph does before the block (scale=1.0)
    (got,) = session.run(None, {"q": q, "k": k, "v": v})
    split = [x.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3).astype(np.float64) for x in (q, k, v)]
    scores = split[0] @ split[1].transpose(0, 1, 3, 2)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = (probs @ split[2]).transpose(0, 2, 1, 3).reshape(batch, seq, width)
    _check_products(got, want, bf16)


def test_cpu_builds_route_the_prompt_to_the_kernel(tiny_model_dir):
    import onnx

    config = json.loads((tiny_model_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == ops.LIBRARY
    assert (tiny_model_dir / ops.LIBRARY).is_file()
    graph = onnx.load(str(tiny_model_dir / "phi-3-v-instruct-text.onnx"), load_external_data=False).graph
    routed = [n for n in graph.node if n.op_type == "If" and n.name.endswith("/prompt_or_step")]
    assert routed and not any(n.op_type == "GroupQueryAttention" for n in graph.node)
    for node in routed:
        branches = {a.name: a.g for a in node.attribute}
        assert [n.op_type for n in branches["then_branch"].node] == ["CausalAttention"]
        assert [n.op_type for n in branches["else_branch"].node] == ["GroupQueryAttention"]
        (causal,) = branches["then_branch"].node
        assert {a.name: a.i for a in causal.attribute if a.name == "bf16"} == {"bf16": 0}  # fp32 build
    assert config["model"]["vision"]["session_options"]["custom_ops_library"] == ops.LIBRARY
    vision = onnx.load(str(tiny_model_dir / "phi-3-v-instruct-vision.onnx"), load_external_data=False).graph
    fused = [n for n in vision.node if n.op_type == "BidirectionalAttention"]
    assert len(fused) == 2 and not any(n.op_type == "Softmax" for n in vision.node)  # tiny: 3 layers, 2 used


def test_without_a_compiler_the_build_keeps_onnxruntimes_attention(tmp_path, tiny_checkpoint, monkeypatch):
    import onnx

    from phi_onnx_export.build import build

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    lines = []
    out = build(tiny_checkpoint, tmp_path / "plain", precision="int4", device="cpu", log=lines.append)
    assert any("attention stays onnxruntime's" in line and "no-such-compiler" in line for line in lines)
    assert not (out / ops.LIBRARY).exists()
    config = json.loads((out / "genai_config.json").read_text())
    for graph in ("decoder", "vision"):
        assert "custom_ops_library" not in config["model"][graph].get("session_options", {})
    graph = onnx.load(str(out / "phi-3-v-instruct-text.onnx"), load_external_data=False).graph
    assert any(n.op_type == "GroupQueryAttention" for n in graph.node)
    vision = onnx.load(str(out / "phi-3-v-instruct-vision.onnx"), load_external_data=False).graph
    assert any(n.op_type == "Softmax" for n in vision.node)
