"""CPU int4 builds: an int8 prompt path for the decoder and int8 vision weights.

On the CPU, MatMulNBits (int4 weights) runs a long prompt at about fp32 GEMM speed, while int8 weights run on the
integer GEMM kernels (AMX/VNNI). These passes trade memory for time to first token; see BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

from phi_onnx.errors import ExportError
from phi_onnx_export.build import _quiet_warnings
from phi_onnx_export.ops import prompt_condition


def quantize_decoder(
    src: Path, dst: Path, *, int8_prefill: bool, block_size: int = 32, accuracy_level: int = 4
) -> None:
    """Quantize the model builder's fp32 decoder ``src`` to int4 at ``dst``, one weight at a time.

    Every MatMul with a constant 2-D weight becomes MatMulNBits (4 bits, symmetric, per-block scales: the kernel and
    layout of onnxruntime's MatMulNBitsQuantizer, which the model builder's own int4 path runs; the node and tensor
    names are the builder's too). Weights are read through memory maps and written to ``dst``'s data file as they are
    made, so the peak memory is one weight, not the model: the builder's in-memory int4 pass needs about 3x the fp32
    weights, an estimated 48 GB for the full-size decoder.

    With ``int8_prefill`` every decoder-body MatMulNBits gets an int8 twin for prompt processing. On the CPU,
    MatMulNBits (int4 weights, int8 compute) runs large prompts at about fp32 GEMM speed, while DynamicQuantizeMatMul
    with int8 weights runs on the integer GEMM kernels (VNNI/AMX: 2.5-3.5x faster on this project's CPUs, see
    BENCHMARKS.md). Each becomes ``If(sequence_length >= 2, int8 twin, int4 original)``: prompts go through int8
    weights requantized from the int4 ones (per-column scales, so both paths approximate the same int4 weights),
    single-token decode steps keep the memory-light int4 kernel. The lm_head stays int4 (it sees one position once the
    head is pruned). Memory: the int8 copy is twice the int4 body (together 3/4 of fp32).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if "inputs_embeds" not in {i.name for i in graph.input}:
        raise ExportError(f"{src.name} has no inputs_embeds input: was it built with exclude_embeds=true?")
    inits = {t.name: t for t in graph.initializer}
    data = dst.parent / (dst.name + ".data")
    with _DataWriter(data, src.parent) as writer:
        nodes = []
        # prompts (2 positions or more) take the int8 branch, decode steps the int4 one
        condition = prompt_condition(graph) if int8_prefill else None
        quantized: set[str] = set()
        new_inits = []
        for node in graph.node:
            weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
            if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
                nodes.append(node)
                continue
            w = writer.array(weight)  # [K, N] float32, memory-mapped
            k, n = w.shape
            blocks = (k + block_size - 1) // block_size
            if blocks * block_size != k:
                w = np.pad(w, ((0, blocks * block_size - k), (0, 0)))
            packed = np.zeros((n, blocks, block_size // 2), np.uint8)
            scales = np.zeros((n, blocks), np.float32)
            zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)  # unused: symmetric
            quantize_matmul_4bits(packed, np.ascontiguousarray(w), scales, zero_points, block_size, n, k, True)
            del w
            quantized.add(weight.name)
            b4 = writer.tensor(packed, weight.name + "_Q4")
            s4 = writer.tensor(scales, weight.name + "_scales")
            step = helper.make_node("MatMulNBits", [node.input[0], b4.name, s4.name], [node.output[0]],
                                    name=node.name + "_Q4", domain="com.microsoft", K=k, N=n, bits=4,
                                    block_size=block_size, accuracy_level=accuracy_level)  # fmt: skip
            if not int8_prefill or "lm_head" in node.name:
                new_inits += [b4, s4]
                nodes.append(step)
                continue
            w8, col = _int8_twin(packed, scales, k, n, block_size)
            out = node.output[0]
            w8t = writer.tensor(w8, step.name + "/W_int8")
            s8t = writer.tensor(col, step.name + "/W_int8_scale")
            del w8, col
            int8 = helper.make_node("DynamicQuantizeMatMul", [node.input[0], w8t.name, s8t.name], [out + "/int8"],
                                    name=step.name + "/int8", domain="com.microsoft")  # fmt: skip
            prompt = helper.make_graph([int8], step.name + "/prompt", [],
                                       [helper.make_tensor_value_info(out + "/int8", TensorProto.FLOAT, None)],
                                       [w8t, s8t])  # fmt: skip
            step.output[0] = out + "/int4"
            decode = helper.make_graph([step], step.name + "/step", [],
                                       [helper.make_tensor_value_info(out + "/int4", TensorProto.FLOAT, None)],
                                       [b4, s4])  # fmt: skip
            nodes.append(helper.make_node("If", [condition], [out], name=step.name + "/dual",
                                          then_branch=prompt, else_branch=decode))  # fmt: skip
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [t for t in graph.initializer if t.name not in quantized]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *new_inits])
        writer.relocate(model)  # every other external tensor (norms, rotary caches in subgraphs) into the new file
    onnx.save(model, str(dst))


def _int8_twin(packed, scales, k: int, n: int, block: int):
    """The int4 weights of a MatMulNBits ([N, blocks, block/2] packed, [N, blocks] scales) as int8 [K, N] with
    per-column scales."""
    import numpy as np

    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1, block).astype(np.int8) - np.int8(8)
    w = (q * scales[:, :, None]).reshape(n, -1)[:, :k].T  # [K, N] float32, the int4 weights
    col = np.abs(w).max(0) / 127.0
    col[col == 0] = 1.0
    w8 = np.clip(np.round(w / col), -127, 127).astype(np.int8)
    return w8, col.astype(np.float32)


_NEW = "phi_onnx.written"  # marks tensors already in the new data file until relocate() is done


class _DataWriter:
    """Appends tensors to one external data file and reads the source model's external tensors via memory maps."""

    def __init__(self, path: Path, source_dir: Path) -> None:
        self.path, self.source_dir = path, source_dir
        self.file = None
        self.offset = 0

    def __enter__(self):
        self.file = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def array(self, tensor):
        """A tensor's values: a read-only memory map of its external data, or its inline data."""
        import numpy as np
        from onnx import helper, numpy_helper

        info = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location != 1 or "location" not in info:
            return numpy_helper.to_array(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.memmap(self.source_dir / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=tuple(tensor.dims))  # fmt: skip

    def tensor(self, array, name: str):
        """A TensorProto named ``name`` whose data is appended to the file (small ones stay inline)."""
        import numpy as np
        from onnx import numpy_helper

        if array.nbytes < 1024:
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        proto = numpy_helper.from_array(np.zeros((0,), array.dtype), name)
        del proto.dims[:]
        proto.dims.extend(array.shape)
        self._external(proto, np.ascontiguousarray(array).tobytes())
        return proto

    def _external(self, proto, payload: bytes) -> None:
        from onnx import TensorProto

        pad = -self.offset % 64
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(payload)
        proto.ClearField("raw_data")
        proto.data_location = TensorProto.EXTERNAL
        del proto.external_data[:]
        fields = (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(payload))),
                  (_NEW, "1"))  # fmt: skip
        for key, value in fields:
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(payload)

    def relocate(self, model) -> None:
        """Copy every tensor still pointing into the source's data file into this one, and move large inline ones
        there too (initializers and attribute tensors, subgraphs included), as onnx's own external-data save does."""
        from onnx.external_data_helper import _get_all_tensors

        tensors = list(_get_all_tensors(model))
        for proto in tensors:
            if proto.data_location == 1 and all(e.key != _NEW for e in proto.external_data):
                self._external(proto, self.array(proto).tobytes())
            elif proto.data_location != 1 and len(proto.raw_data) >= 1024:  # the builder's inline rotary caches
                self._external(proto, proto.raw_data)
        for proto in tensors:
            kept = [(e.key, e.value) for e in proto.external_data if e.key != _NEW]
            del proto.external_data[:]
            for key, value in kept:
                entry = proto.external_data.add()
                entry.key, entry.value = key, value


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
