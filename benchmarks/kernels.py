"""The kernels of the prompt pass, one op at a time: what onnxruntime's CPU provider can do with each GEMM and with
causal attention at the decoder's shapes.

``python -m phi_onnx_bench.kernels [--tokens 776 1940] [--hidden 1024 --intermediate 2816 --heads 16] [--json OUT]``

Each variant is a one-node (or few-node) graph in an InferenceSession with the harness's thread count, timed on
random inputs (median of ``--repeat`` runs after a warm-up); GFLOP/s counts 2 FLOPs per multiply-add of the work the
op needs (for attention: the causal half of QK^T and PV, whatever the kernel computes). What it answers:

- GEMMs: the decoder's four projections as fp32 MatMul, DynamicQuantizeMatMul (int8 weights, the int4 build's prompt
  path), MatMulNBits with 4-bit and 8-bit weights (accuracy level 4: int8 compute).
- Attention: GroupQueryAttention as the builder emits it (packed QKV, rotary inside, empty past); the same prompt
  split into chunks that each attend to the cache so far (less work: (n+1)/2n of the full S x S); MultiHeadAttention
  without a mask (MLAS's flash-style path, not causal: a lower bound on what a fused kernel does with S x S); the
  ONNX Attention op (opset 23) with and without is_causal; phi-onnx's own CausalAttention (phi_onnx_export.ops, what
  CPU builds run), with fp32 and with bf16 products.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _session(nodes, inputs, outputs, initializers, threads: int | None, opset: int = 17, library: Path | None = None):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "kernel", inputs, outputs, initializers)
    domains = [("", opset), ("com.microsoft", 1), ("phi_onnx", 1)]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(name, v) for name, v in domains])
    model.ir_version = 10 if opset >= 21 else 9
    options = ort.SessionOptions()
    if library is not None:
        options.register_custom_ops_library(str(library))
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _time(session, feed: dict[str, np.ndarray], repeat: int) -> float:
    session.run(None, feed)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gemms(tokens: int, hidden: int, intermediate: int, threads: int | None, repeat: int):
    """ms per decoder projection and weight format at ``tokens`` rows."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    kv = hidden  # num_key_value_heads == num_attention_heads in the bench and full sizes
    shapes = {"qkv_proj": (hidden, hidden + 2 * kv), "o_proj": (hidden, hidden),
              "gate_up_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden)}  # fmt: skip
    rows = []
    for name, (k, n) in shapes.items():
        x = rng.standard_normal((1, tokens, k), np.float32)
        w = rng.standard_normal((k, n), np.float32) / np.float32(np.sqrt(k))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        col = np.abs(w).max(0) / 127
        int8 = [numpy_helper.from_array(np.round(w / col).astype(np.int8), "w"),
                numpy_helper.from_array(col.astype(np.float32), "s")]  # fmt: skip
        variants = {
            "fp32 MatMul": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")]),
            "int8 DynamicQuantizeMatMul": (
                [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")],
                int8,
            ),
        }
        for bits in (4, 8):
            blocks = k // 32
            if bits == 4:
                q = rng.integers(0, 16, (n, blocks, 32), dtype=np.uint8)
                packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
            else:
                packed = rng.integers(0, 256, (n, blocks, 32), dtype=np.uint8)
            scales = (rng.random(n * blocks, np.float32) * 0.01).astype(np.float32)
            node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n,
                                    bits=bits, block_size=32, accuracy_level=4)  # fmt: skip
            variants[f"int{bits} MatMulNBits"] = (
                [node], [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
            )  # fmt: skip
        gflop = 2 * tokens * k * n / 1e9
        for variant, (nodes, inits) in variants.items():
            ms = _time(_session(nodes, inputs, outputs, inits, threads), {"x": x}, repeat)
            rows.append({"op": name, "K": k, "N": n, "variant": variant, "ms": round(ms, 2),
                         "gflop_s": round(gflop / ms * 1e3, 1)})  # fmt: skip
    return rows


def attention(tokens: int, hidden: int, heads: int, threads: int | None, repeat: int):
    """ms of one layer's prompt attention at ``tokens``, per kernel."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d = hidden // heads
    causal_gflop = 2 * 2 * heads * d * tokens * (tokens + 1) / 2 / 1e9
    cos = rng.standard_normal((max(4096, tokens), d // 2), np.float32)
    sin = rng.standard_normal((max(4096, tokens), d // 2), np.float32)
    rope = [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")]
    qkv = rng.standard_normal((1, tokens, 3 * hidden), np.float32)
    cache = np.zeros((1, heads, 0, d), np.float32)
    feed = {"qkv": qkv, "pk": cache, "pv": cache}
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, tokens, 3 * hidden]),
              helper.make_tensor_value_info("pk", TensorProto.FLOAT, [1, heads, None, d]),
              helper.make_tensor_value_info("pv", TensorProto.FLOAT, [1, heads, None, d])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "k", "v")]
    rows = []

    def gqa(i: int, x: str, past: tuple[str, str], end: int, out: list[str]):
        lengths = [numpy_helper.from_array(np.array([end - 1], np.int32), f"seqlens{i}"),
                   numpy_helper.from_array(np.array(end, np.int32), f"total{i}")]  # fmt: skip
        node = helper.make_node("GroupQueryAttention", [x, "", "", *past, f"seqlens{i}", f"total{i}", "cos", "sin"],
                                out, name=f"gqa{i}", domain="com.microsoft", num_heads=heads, kv_num_heads=heads,
                                scale=1 / np.sqrt(d), do_rotary=1, local_window_size=-1)  # fmt: skip
        return node, lengths

    reference = None
    for chunks in (1, 2, 4, 8):
        sizes = [tokens // chunks + (i < tokens % chunks) for i in range(chunks)]
        ends = np.cumsum(sizes)
        nodes, inits = [], list(rope)
        if chunks > 1:
            inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
            nodes.append(helper.make_node("Split", ["qkv", "sizes"], [f"x{i}" for i in range(chunks)], axis=1))
        past = ("pk", "pv")
        for i in range(chunks):
            last = i == chunks - 1
            node, lengths = gqa(i, f"x{i}" if chunks > 1 else "qkv", past, int(ends[i]),
                                [f"o{i}", "k" if last else f"k{i}", "v" if last else f"v{i}"])  # fmt: skip
            nodes.append(node)
            inits += lengths
            past = (f"k{i}", f"v{i}")
        nodes.append(helper.make_node("Concat", [f"o{i}" for i in range(chunks)], ["o"], axis=1))
        session = _session(nodes, inputs, outputs, inits, threads)
        got = session.run(None, feed)
        if reference is None:
            reference = got
        same = max(float(np.abs(a - b).max()) for a, b in zip(got, reference, strict=True))
        work = (chunks + 1) / (2 * chunks)
        ms = _time(session, feed, repeat)
        rows.append({"kernel": f"GroupQueryAttention, {chunks} chunk{'s' * (chunks > 1)}", "ms": round(ms, 2),
                     "gflop_s": round(causal_gflop / ms * 1e3, 1), "work": round(work, 3),
                     "max_diff": same})  # fmt: skip

    rows += _own_kernels(tokens, heads, d, feed, inputs, outputs, rope, reference, causal_gflop, threads, repeat)
    q = rng.standard_normal((1, tokens, hidden), np.float32)
    flat = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, tokens, hidden]) for n in ("q", "k", "v")]
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads)
    ms = _time(_session([node], flat, outputs[:1], [], threads), {"q": q, "k": q, "v": q}, repeat)
    rows.append({"kernel": "MultiHeadAttention, no mask (not causal)", "ms": round(ms, 2),
                 "gflop_s": round(causal_gflop / ms * 1e3, 1), "work": None})  # fmt: skip
    heads_first = rng.standard_normal((1, heads, tokens, d), np.float32)
    split = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, heads, tokens, d]) for n in ("q", "k", "v")]
    for causal in (0, 1):
        node = helper.make_node("Attention", ["q", "k", "v"], ["o"], is_causal=causal)
        session = _session([node], split, outputs[:1], [], threads, opset=23)
        ms = _time(session, {"q": heads_first, "k": heads_first, "v": heads_first}, repeat)
        rows.append({"kernel": f"Attention (opset 23), is_causal={causal}", "ms": round(ms, 2),
                     "gflop_s": round(causal_gflop / ms * 1e3, 1), "work": None})  # fmt: skip
    return rows


def _own_kernels(tokens, heads, d, feed, inputs, outputs, rope, reference, causal_gflop, threads, repeat):
    """phi-onnx's CausalAttention (phi_onnx_export.ops) on the same prompt, fp32 and bf16 products; none where the
    library cannot be compiled here."""
    import tempfile

    from onnx import helper, numpy_helper

    from phi_onnx_export import ops

    rows = []
    with tempfile.TemporaryDirectory() as work:
        if ops.compile_library(Path(work)) is not None:
            return rows
        lengths = [numpy_helper.from_array(np.array([tokens - 1], np.int32), "seqlens"),
                   numpy_helper.from_array(np.array([tokens], np.int32), "total")]  # fmt: skip
        for bf16 in (0, 1):
            node = helper.make_node("CausalAttention", ["qkv", "", "", "pk", "pv", "seqlens", "total", "cos", "sin"],
                                    ["o", "k", "v"], domain=ops.DOMAIN, num_heads=heads, kv_num_heads=heads,
                                    scale=1 / np.sqrt(d), do_rotary=1, local_window_size=-1, bf16=bf16)  # fmt: skip
            session = _session([node], inputs, outputs, [*rope, *lengths], threads, library=Path(work) / ops.LIBRARY)
            got = session.run(None, feed)
            same = max(float(np.abs(a - b).max()) for a, b in zip(got, reference, strict=True))
            ms = _time(session, feed, repeat)
            kind = "bf16 products" if bf16 and ops.has_bf16() else "fp32 products"
            rows.append({"kernel": f"phi-onnx CausalAttention, {kind}", "ms": round(ms, 2),
                         "gflop_s": round(causal_gflop / ms * 1e3, 1), "work": 0.5, "max_diff": same})  # fmt: skip
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for tokens, part in result["tokens"].items():
        lines += [f"GEMMs at {int(tokens):,} tokens (ms, GFLOP/s):", "",
                  "| projection | K x N | " + " | ".join(part["variants"]) + " |",
                  "|---|---|" + "--:|" * len(part["variants"])]  # fmt: skip
        for op in dict.fromkeys(r["op"] for r in part["gemm"]):
            cells = {r["variant"]: r for r in part["gemm"] if r["op"] == op}
            first = next(iter(cells.values()))
            lines.append(
                f"| {op} | {first['K']} x {first['N']} | "
                + " | ".join(f"{c['ms']:,.1f} ({c['gflop_s']:,.0f})" for c in cells.values())
                + " |"
            )
        lines += ["", f"Attention, one layer, {int(tokens):,} tokens (GFLOP/s of the causal work):", "",
                  "| kernel | ms | GFLOP/s | S x S share scheduled |", "|---|--:|--:|--:|"]  # fmt: skip
        for r in part["attention"]:
            work = "" if r["work"] is None else f"{r['work']:.2f}"
            lines.append(f"| {r['kernel']} | {r['ms']:,.1f} | {r['gflop_s']:,.0f} | {work} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi_onnx_bench.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[776, 1940])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import resource

    from phi_onnx_bench.runner import background_share, cpu_snapshot, machine_info

    before, t0 = cpu_snapshot(resource.RUSAGE_SELF), time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "tokens": {}}
    for tokens in args.tokens:
        gemm = gemms(tokens, args.hidden, args.intermediate, args.threads, args.repeat)
        result["tokens"][str(tokens)] = {
            "gemm": gemm,
            "variants": list(dict.fromkeys(r["variant"] for r in gemm)),
            "attention": attention(tokens, args.hidden, args.heads, args.threads, args.repeat),
        }
    after = cpu_snapshot(resource.RUSAGE_SELF)
    result["background_cpu"] = background_share(before, after, time.perf_counter() - t0)
    print(markdown(result))
    print(f"other processes used {100 * (result['background_cpu'] or 0):.0f}% of the CPU")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
