"""CPU int4 builds: an int8 prompt path for the decoder and int8 vision weights.

On the CPU, MatMulNBits (int4 weights) runs a long prompt at about fp32 GEMM speed, while int8 weights run on the
integer GEMM kernels (AMX/VNNI). These passes trade memory for time to first token; see BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

from phi_onnx.errors import ExportError
from phi_onnx_export.build import _quiet_warnings

PREFILL_MIN_TOKENS = 2  # passes of at least this many tokens (the prompt) take the int8 branch; decode steps the int4


def dual_path_decoder(path: Path) -> None:
    """Give every int4 MatMulNBits of the decoder body an int8 twin for prompt processing.

    On the CPU, MatMulNBits (int4 weights, int8 compute) runs large prompts at about fp32 GEMM speed, while
    DynamicQuantizeMatMul with int8 weights uses the AMX/VNNI integer GEMM kernels (several times faster on a
    2k-token prompt on this project's 2-core Xeon; see BENCHMARKS.md). Each MatMulNBits becomes
    ``If(sequence_length >= 2, int8 twin, int4 original)``: prompts go through int8 weights dequantized from the int4
    ones (per-column scales, so both paths approximate the same int4 weights), single-token decode steps keep the
    memory-light int4 kernel. The lm_head stays int4 (it sees one position once the head is pruned). Memory: the int8
    copy is twice the int4 body (together 3/4 of fp32).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    embeds = "inputs_embeds"
    if embeds not in {i.name for i in graph.input}:
        raise ExportError(f"{path.name} has no inputs_embeds input: was it built with exclude_embeds=true?")
    threshold = numpy_helper.from_array(np.array([PREFILL_MIN_TOKENS - 1], np.int64), "/dual/threshold")
    nodes = [
        helper.make_node("Shape", [embeds], ["/dual/seq_len"], name="/dual/Shape", start=1, end=2),
        helper.make_node("Greater", ["/dual/seq_len", threshold.name], ["/dual/prompt_1d"], name="/dual/Greater"),
        helper.make_node("Squeeze", ["/dual/prompt_1d"], ["/dual/is_prompt"], name="/dual/Squeeze"),
    ]
    moved: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMulNBits" or "lm_head" in node.name or len(node.input) != 3:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4:
            nodes.append(node)
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        packed = numpy_helper.to_array(inits[node.input[1]])  # [N, blocks, block/2], low nibble first
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1, block).astype(np.int16) - 8
        w = (q * scales[:, :, None]).reshape(n, -1)[:, :k].T  # [K, N] float32, the int4 weights
        col = np.abs(w).max(0) / 127.0
        col[col == 0] = 1.0
        w8 = numpy_helper.from_array(np.clip(np.round(w / col), -127, 127).astype(np.int8), node.name + "/W_int8")
        s8 = numpy_helper.from_array(col.astype(np.float32), node.name + "/W_int8_scale")
        out = node.output[0]
        int8 = helper.make_node("DynamicQuantizeMatMul", [node.input[0], w8.name, s8.name], [out + "/int8"],
                                name=node.name + "/int8", domain="com.microsoft")  # fmt: skip
        prompt = helper.make_graph(
            [int8],
            node.name + "/prompt",
            [],
            [helper.make_tensor_value_info(out + "/int8", TensorProto.FLOAT, None)],
            [w8, s8],
        )
        step = onnx.NodeProto()
        step.CopyFrom(node)
        step.output[0] = out + "/int4"
        decode = helper.make_graph(
            [step],
            node.name + "/step",
            [],
            [helper.make_tensor_value_info(out + "/int4", TensorProto.FLOAT, None)],
            [inits[node.input[1]], inits[node.input[2]]],
        )
        moved.update(node.input[1:])
        nodes.append(helper.make_node("If", ["/dual/is_prompt"], [out], name=node.name + "/dual",
                                      then_branch=prompt, else_branch=decode))  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend([*kept, threshold])
    _save_external(model, path)


def quantize_vision_int8(path: Path, work: Path) -> None:
    """Int4 CPU builds: the vision graph's weight MatMuls/Gemms to dynamic int8 (per-channel weights), which run on
    the integer GEMM kernels (AMX/VNNI); see BENCHMARKS.md for the measured effect."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from phi_onnx_export.build import tool_output

    staged = work / "vision-int8.onnx"
    with tool_output(), _quiet_warnings():
        quantize_dynamic(str(path), str(staged), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)  # fmt: skip
    _save_external(onnx.load(str(staged)), path)


def _save_external(model, path: Path) -> None:
    """Save with every weight (subgraph initializers too) in ``<name>.data`` beside the graph."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    data = path.parent / (path.name + ".data")
    if data.exists():
        data.unlink()
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data.name, size_threshold=1024,
                                   convert_attribute=True)  # fmt: skip
    onnx.save(model, str(path))
