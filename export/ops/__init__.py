"""phi-onnx's own onnxruntime operators for CPU builds: attention for the prompt pass and for the vision tower.

onnxruntime's CPU GroupQueryAttention computes every score of a prompt, masks half of them away and keeps all of them
in memory between its two products; at 1,940 prompt tokens it is half of the `bench` decoder's prompt pass (see
BENCHMARKS.md). The exported vision tower keeps its whole score tensor in memory the same way. ``attention.cc``
implements both on blocks of query rows that stay in cache (the decoder's causally, skipping the masked half), with
bfloat16 products on CPUs that have AVX512-BF16. A CPU build compiles it into the model folder
(:func:`compile_library`: a C++ compiler is all it needs); :func:`use_causal_attention` routes the prompt pass of every
GroupQueryAttention node to it, keeping onnxruntime's kernel for single-token decode steps, and
:func:`use_bidirectional_attention` the vision tower's attention blocks.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

LIBRARY = "phi_onnx_ops.so"
DOMAIN = "phi_onnx"
SOURCE = Path(__file__).with_name("attention.cc")
PROMPT_MIN_TOKENS = 2  # passes of at least this many positions are prompts (the If branches); decode steps are 1
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-pthread"]


def compiler() -> str | None:
    """The C++ compiler to use: $CXX, else g++ or c++ on PATH (clang ignores the kernels' per-ISA pragmas)."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("c++")


def unsupported() -> str | None:
    """Why this machine cannot build or run the library (None if it can)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        here = f"{platform.system()} {platform.machine()}"
        return f"phi-onnx's attention kernels are for Linux on x86-64 (this is {here})"
    flags = _cpu_flags()
    if flags is not None and not ({"avx2", "fma"} <= flags or "avx512f" in flags):
        return "this CPU has neither AVX-512 nor AVX2 with FMA"
    if compiler() is None:
        if os.environ.get("CXX"):
            return f"CXX={os.environ['CXX']} is not a program on PATH; set CXX to a C++ compiler such as g++"
        return "no C++ compiler (g++) on PATH; install one or set CXX"
    return None


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def has_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (the kernel's bfloat16 products; without it the kernel computes in fp32)."""
    return "avx512_bf16" in (_cpu_flags() or ())


def compile_library(folder: Path) -> str | None:
    """Compile ``attention.cc`` to ``folder / LIBRARY``. Returns None, or why it could not (nothing written)."""
    reason = unsupported()
    if reason:
        return reason
    with tempfile.TemporaryDirectory(dir=folder) as work:
        staged = Path(work) / LIBRARY
        try:
            done = subprocess.run([compiler(), *_FLAGS, str(SOURCE), "-o", str(staged)], capture_output=True,
                                  text=True, timeout=300)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"the C++ compiler failed to run ({err})"
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            return f"the C++ compiler failed: {lines[0] if lines else done.returncode}"
        os.replace(staged, folder / LIBRARY)
    return None


def use_causal_attention(model, *, head_size: int, bf16: bool) -> int:
    """Route the prompt pass of each GroupQueryAttention node in ``model`` (an onnx ModelProto, edited in place) to
    phi_onnx.CausalAttention: ``If(sequence length >= 2, CausalAttention, GroupQueryAttention)``.

    Nodes the kernel does not cover (separate key/value inputs, position ids, attention bias, a local window, a
    softcap, a ``head_size`` that is not a multiple of 16) stay as they are. Returns how many nodes were routed.
    """
    if head_size <= 0 or head_size % 16:
        return 0
    from onnx import NodeProto, TensorProto, helper

    graph = model.graph
    if not any(_covered(n) for n in graph.node):
        return 0  # the graph stays as it was
    condition = prompt_condition(graph)
    nodes, routed = [], 0
    for node in graph.node:
        if not _covered(node):
            nodes.append(node)
            continue
        routed += 1
        outputs = list(node.output)
        attrs = _attrs(node)
        causal = helper.make_node("CausalAttention", list(node.input)[:9], [o + "/causal" for o in outputs],
                                  name=node.name + "/causal", domain=DOMAIN, bf16=int(bf16), **attrs)  # fmt: skip
        step = NodeProto()
        step.CopyFrom(node)
        del step.output[:]
        step.output.extend(o + "/gqa" for o in outputs)

        def branch(op, name):
            values = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in op.output]
            return helper.make_graph([op], name, [], values)

        nodes.append(helper.make_node("If", [condition], outputs, name=node.name + "/prompt_or_step",
                                      then_branch=branch(causal, node.name + "/prompt"),
                                      else_branch=branch(step, node.name + "/step")))  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    _import_domain(model)
    return routed


def prompt_condition(graph) -> str:
    """The name of a boolean scalar in ``graph`` (a decoder's, edited in place): this pass has at least
    PROMPT_MIN_TOKENS positions (inputs_embeds or input_ids). Made once, at the head of the graph, and shared by every
    If that tells prompts from decode steps (CPU int4 builds' int8 twins, the causal kernel)."""
    import numpy as np
    from onnx import helper, numpy_helper

    name = "/prompt/is_prompt"
    if any(name in n.output for n in graph.node):
        return name
    source = next(i.name for i in graph.input if i.name in ("inputs_embeds", "input_ids"))
    threshold = numpy_helper.from_array(np.array([PROMPT_MIN_TOKENS - 1], np.int64), "/prompt/threshold")
    graph.initializer.append(threshold)
    head = [
        helper.make_node("Shape", [source], ["/prompt/seq_len"], name="/prompt/Shape", start=1, end=2),
        helper.make_node("Greater", ["/prompt/seq_len", threshold.name], ["/prompt/prompt_1d"], name="/prompt/Greater"),
        helper.make_node("Squeeze", ["/prompt/prompt_1d"], [name], name="/prompt/Squeeze"),
    ]
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + rest)
    return name


def _covered(node) -> bool:
    """A GroupQueryAttention node the causal kernel computes exactly as onnxruntime does."""
    if node.op_type != "GroupQueryAttention":
        return False
    attrs = _attrs(node)
    inputs = list(node.input) + [""] * (12 - len(node.input))
    if inputs[1] or inputs[2] or any(inputs[9:]) or not all(inputs[i] for i in (0, 3, 4, 5, 6)):
        return False
    if attrs.get("local_window_size", -1) != -1 or attrs.get("softcap", 0.0) != 0.0:
        return False
    if not (inputs[7] and inputs[8]):  # the rotary caches (the kernel reads them even when do_rotary is 0)
        return False
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    return bool(heads and kv_heads and heads % kv_heads == 0)


def use_bidirectional_attention(model, *, heads: int, head_size: int, bf16: bool) -> int:
    """Replace each attention block of the exported vision tower in ``model`` (edited in place) with
    phi_onnx.BidirectionalAttention. Returns how many blocks it replaced.

    A block, as torch.onnx exports CLIP's attention (q already scaled): q, k and v [B, S, H D] each reshaped to
    [B, S, H, D] and transposed (k to [B, H, D, S]), MatMul, Softmax(-1), MatMul, transposed back and reshaped to
    [B, S, H D]. The kernel reads q, k and v where they are and writes the reshaped result; the nodes in between go.
    """
    from onnx import helper

    if heads <= 0 or head_size <= 0 or head_size % 16:
        return 0
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only_consumer(name):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    def source(name, perm):  # the [B, S, H D] tensor behind Transpose(perm)(Reshape(x)), or None
        t = producer.get(name)
        if t is None or t.op_type != "Transpose" or _attrs(t).get("perm") != perm:
            return None, []
        r = producer.get(t.input[0])
        if r is None or r.op_type != "Reshape" or len(consumers.get(r.output[0], [])) != 1:
            return None, []
        return r.input[0], [t, r]

    replaced, dropped, added = 0, set(), {}
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or _attrs(softmax).get("axis", -1) != -1:
            continue
        scores, probs = producer.get(softmax.input[0]), only_consumer(softmax.output[0])
        if scores is None or scores.op_type != "MatMul" or probs is None or probs.op_type != "MatMul":
            continue
        back = only_consumer(probs.output[0])
        final = only_consumer(back.output[0]) if back is not None else None
        if back is None or back.op_type != "Transpose" or _attrs(back).get("perm") != [0, 2, 1, 3]:
            continue
        if final is None or final.op_type != "Reshape" or probs.input[0] != softmax.output[0]:
            continue
        q, q_nodes = source(scores.input[0], [0, 2, 1, 3])
        k, k_nodes = source(scores.input[1], [0, 2, 3, 1])
        v, v_nodes = source(probs.input[1], [0, 2, 1, 3])
        if q is None or k is None or v is None:
            continue
        if any(len(consumers.get(n.output[0], [])) != 1 for n in (scores, *q_nodes, *k_nodes, *v_nodes)):
            continue
        block = [*q_nodes, *k_nodes, *v_nodes, scores, softmax, probs, back, final]
        dropped.update(id(n) for n in block)
        added[id(final)] = helper.make_node("BidirectionalAttention", [q, k, v], list(final.output),
                                            name=softmax.name.rsplit("/", 1)[0] + "/BidirectionalAttention",
                                            domain=DOMAIN, num_heads=heads, scale=1.0, bf16=int(bf16))  # fmt: skip
        replaced += 1
    if replaced:
        kept = [added.get(id(n), n) for n in graph.node if id(n) not in dropped or id(n) in added]
        del graph.node[:]
        graph.node.extend(_live(graph, kept))
        _import_domain(model)
    return replaced


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _import_domain(model) -> None:
    from onnx import helper

    if all(o.domain != DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _live(graph, nodes):
    """``nodes`` without those whose outputs nothing uses (the shape arithmetic of the removed reshapes)."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs read outer names too
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    needed.update(i for n in g.node for i in n.input if i)
    return list(reversed(live))
