"""Build a phi3v model folder that onnxruntime-genai runs, from a Phi-3-V PyTorch checkpoint.

Output (the same file names as Microsoft's published folders, so built and fetched models look alike)::

    phi-3-v-instruct-vision.onnx     pixel_values [images, crop_slots, 3, 336, 336], image_sizes -> image_features
    phi-3-v-instruct-embedding.onnx  input_ids [batch, seq], image_features -> inputs_embeds
    phi-3-v-instruct-text.onnx       the decoder, from onnxruntime_genai.models.builder (exclude_embeds=true)
    genai_config.json, processor_config.json, tokenizer files

The build runs in a temporary folder beside the output and is moved into place at the end: a failed build leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi_onnx.errors import ExportError

PRECISIONS = ("fp32", "fp16", "int4")
DEVICES = ("cpu", "cuda")
OPSET = 17
GRAPH_PREFIX = "phi-3-v-instruct"

PROCESSOR_CONFIG = {
    "processor": {
        "name": "image_processing",
        "transforms": [
            {
                "operation": {
                    "name": "decode_image",
                    "domain": "com.microsoft.extensions",
                    "type": "DecodeImage",
                    "attrs": {"color_space": "BGR"},
                }
            },
            {"operation": {"name": "convert_to_rgb", "domain": "com.microsoft.extensions", "type": "ConvertRGB"}},
            {
                "operation": {
                    "name": "phi3_image_transform",
                    "domain": "com.microsoft.extensions",
                    "type": "Phi3ImageTransform",
                    "attrs": {"num_crops": 16, "num_img_tokens": 144},
                }
            },
        ],
    }
}


@dataclass(frozen=True)
class BuildPlan:
    checkpoint: Path
    output: Path
    precision: str
    device: str
    int8_prefill: bool = False
    portable: bool = False

    @property
    def io_dtype(self) -> str:
        """Dtype of pixel_values, image_features and inputs_embeds (the published builds' convention)."""
        return "float32" if self.device == "cpu" or self.precision == "fp32" else "float16"


def check_options(precision: str, device: str) -> None:
    """Validate precision and device (no file needed)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise ExportError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if precision == "fp16" and device == "cpu":
        raise ExportError("precision fp16 does not run on the CPU: use --precision fp32 or int4 with --device cpu")


def check_plan(
    checkpoint: str | Path,
    output: str | Path,
    precision: str,
    device: str,
    force: bool,
    int8_prefill: bool | None = None,
    portable: bool = False,
) -> BuildPlan:
    """Validate every argument before any work, so bad input writes nothing."""
    from phi_onnx_export.checkpoint import check_checkpoint_dir
    from phi_onnx_export.config import Phi3VConfig

    check_options(precision, device)
    checkpoint, output = Path(checkpoint), Path(output)
    check_checkpoint_dir(checkpoint)
    Phi3VConfig.from_file(checkpoint / "config.json")
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is not a folder: choose another --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(f"output folder {output} is not empty: choose another --output or pass --force to replace it")
    if output.resolve() == checkpoint.resolve():
        raise ExportError("--output is the checkpoint folder: choose a separate output folder")
    cpu_int4 = precision == "int4" and device == "cpu"
    if int8_prefill and not cpu_int4:
        raise ExportError("--int8-prefill applies to --precision int4 --device cpu builds only: drop it")
    prefill = cpu_int4 if int8_prefill is None else int8_prefill
    return BuildPlan(checkpoint, output, precision, device, prefill, portable)


def build(
    checkpoint: str | Path,
    output: str | Path,
    precision: str = "fp32",
    device: str = "cpu",
    *,
    force: bool = False,
    int8_prefill: bool | None = None,
    portable: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export a Phi-3-V checkpoint to an onnxruntime-genai phi3v folder.

    Args:
        checkpoint: Hugging Face folder (config.json with model_type phi3_v, safetensors, tokenizer files).
        output: Folder to create; must be empty or absent unless ``force``.
        precision: "fp32", "fp16" (cuda only) or "int4" (decoder weights MatMulNBits, block 32).
        device: "cpu" or "cuda": the execution provider the graphs are tuned for.
        force: Replace a non-empty output folder.
        int8_prefill: CPU int4 only (default on there): give the decoder an int8 copy of its int4 weights that the
            prompt pass runs on the CPU's integer GEMM kernels (about 2x faster time to first token at the real
            size). Costs memory: the int8 copy is twice the int4 decoder body. CPU int4 builds quantize the vision
            graph to int8 either way.
        log: Progress callback (default: lines on stderr).

    Returns:
        The output folder.
    """
    log = log or _stderr
    plan = check_plan(checkpoint, output, precision, device, force, int8_prefill, portable)
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.output.name}.build-", dir=plan.output.parent))
    try:
        _build_into(plan, staging, log)
        _apply_umask(staging)
        if plan.output.exists():
            shutil.rmtree(plan.output)
        os.replace(staging, plan.output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log(f"done: {plan.output}")
    return plan.output


def verbose() -> bool:
    """Whether the tools the build runs (the model builder, the quantizer) may print their progress and INFO lines.

    Off by default; ``phi-onnx export -v`` (and ``phi-onnx bench -v``) set ``PHI_ONNX_VERBOSE=1``, which worker
    processes inherit.
    """
    return os.environ.get("PHI_ONNX_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def tool_output():
    """Send a third-party tool's prints, progress bars and logging to stderr when verbose, else nowhere."""
    if verbose():
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    import logging

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        root.setLevel(level)


def _apply_umask(folder: Path) -> None:
    """Give the built tree the permissions a normal file creation would (mkdtemp makes 0700, some writers 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _stderr(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def _build_into(plan: BuildPlan, out: Path, log: Callable[[str], None]) -> None:
    from phi_onnx_export.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    log(f"loading {plan.checkpoint}")
    # In the checkpoint's own dtype (bfloat16 for the published ones): half the memory of fp32 for the decoder, which
    # the model builder reads from it (exactly: bfloat16 widens to fp32 without loss).
    model, cfg = load_checkpoint(plan.checkpoint, dtype=None)
    stored = model.embed_tokens.weight.dtype
    names = {part: f"{GRAPH_PREFIX}-{part}.onnx" for part in ("vision", "embedding", "text")}
    with tempfile.TemporaryDirectory(dir=out) as work:
        work = Path(work)
        log("exporting the vision graph (CLIP, HD feature transform, projector)")
        model.vision.float()  # the graphs compute in fp32 (fp16 builds convert them afterwards)
        export_vision(model, out / names["vision"], plan.io_dtype)
        log("exporting the embedding graph")
        model.embed_tokens.float()
        export_embedding(model, out / names["embedding"], plan.io_dtype)
        model.embed_tokens.to(stored)
        log(f"building the {plan.precision} decoder with onnxruntime_genai.models.builder")
        text_dir = work / "hf-text"
        with tool_output():
            model.lm.save_pretrained(text_dir, safe_serialization=True)
        del model
        for f in plan.checkpoint.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "chat_template")):
                shutil.copy2(f, text_dir / f.name)
                shutil.copy2(f, out / f.name)
        cpu_int4 = plan.precision == "int4" and plan.device == "cpu"
        # CPU int4: the builder writes fp32 and quantize_decoder makes the int4 (and int8 prompt) weights one at a
        # time; the builder's own int4 pass holds the whole model in fp32 several times over (an estimated 48 GB at
        # full size).
        build_decoder(text_dir, out, names["text"], plan, work / "cache", precision="fp32" if cpu_int4 else None)
        shutil.rmtree(text_dir)
        # The builder re-saves the tokenizer files and loses chat_template, add_bos_token and added_tokens_decoder:
        # the folder carries the checkpoint's own files, as Microsoft's published folders do.
        for f in plan.checkpoint.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "chat_template")):
                shutil.copy2(f, out / f.name)
        if cpu_int4:
            from phi_onnx_export.cpu_int4 import quantize_decoder, quantize_vision_int8

            fp32 = work / "fp32"
            fp32.mkdir()
            for name in (names["text"], names["text"] + ".data"):
                os.replace(out / name, fp32 / name)
            twins = " with int8 weights for the prompt pass" if plan.int8_prefill else ""
            log(f"quantizing the decoder to int4{twins}")
            quantize_decoder(fp32 / names["text"], out / names["text"], int8_prefill=plan.int8_prefill)
            shutil.rmtree(fp32)
            # With or without the int8 prompt copy: int8 vision weights are a quarter of fp32's and about 3x faster
            # (full size, 16 crops: 9.5 s against 28 s), so even the lean folder gets them.
            log("quantizing the vision graph to int8")
            quantize_vision_int8(out / names["vision"], work)
    write_genai_config(out, names, cfg.text.hidden_size)
    if plan.device == "cpu" and not plan.portable:
        use_own_attention(out, names, cfg.vision, bf16=plan.precision == "int4", log=log)
    (out / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
    log(f"built in {time.perf_counter() - t0:.1f} s")


def use_own_attention(out: Path, names: dict[str, str], vision, *, bf16: bool, log: Callable[[str], None]) -> bool:
    """CPU builds: compile phi-onnx's attention kernels into the folder (phi_onnx_export.ops) and route the decoder's
    prompt pass and the vision tower's attention to them. Where they cannot be built (no C++ compiler, another
    platform) the folder keeps onnxruntime's kernels and works the same, slower on long prompts. Returns whether it
    did.

    ``bf16``: the kernels' products in bfloat16 on CPUs with AVX512-BF16 (int4 builds: their int8 prompt weights are
    coarser than that already); fp32 builds keep fp32 products, within 1e-6 of onnxruntime's kernels.
    """
    import onnx

    from phi_onnx_export import ops

    reason = ops.compile_library(out)
    if reason:
        log(f"attention stays onnxruntime's: {reason}")
        return False
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    text = onnx.load(str(out / names["text"]), load_external_data=False)
    routed = ops.use_causal_attention(text, head_size=int(config["model"]["decoder"]["head_size"]), bf16=bf16)
    image = onnx.load(str(out / names["vision"]), load_external_data=False)
    heads = vision.num_attention_heads
    fused = ops.use_bidirectional_attention(image, heads=heads, head_size=vision.hidden_size // heads, bf16=bf16)
    if not routed and not fused:
        (out / ops.LIBRARY).unlink()
        log("attention stays onnxruntime's: no attention node the kernels cover")
        return False
    for graph, model, changed in (("decoder", text, routed), ("vision", image, fused)):
        if changed:
            onnx.save(model, str(out / names["text" if graph == "decoder" else "vision"]))
            config["model"][graph].setdefault("session_options", {})["custom_ops_library"] = ops.LIBRARY
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    kind = "bfloat16" if bf16 and ops.has_bf16() else "fp32"
    log(
        f"attention: phi-onnx's kernels ({kind} products, {ops.LIBRARY}) for the prompt pass of {routed} decoder "
        f"layers and {fused} vision layers"
    )
    return True


def _export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict, io_dtype: str) -> None:
    import torch

    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), _quiet_warnings():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    if io_dtype == "float16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = onnx.load(str(path))
        proto = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=True)
        onnx.save(proto, str(path))
    _externalise(path)


def _externalise(path: Path) -> None:
    """Move weights to ``<name>.data`` like the published graphs (keeps the .onnx small to inspect)."""
    import onnx

    proto = onnx.load(str(path))
    data = path.name + ".data"
    if (path.parent / data).exists():
        (path.parent / data).unlink()
    onnx.save(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_vision(model, path: Path, io_dtype: str = "float32") -> None:
    """Vision graph: ``pixel_values [images, crop_slots, 3, 336, 336]``, ``image_sizes [images, 2]`` ->
    ``image_features [image_tokens, hidden]`` (rank 2, as onnxruntime-genai allocates it)."""
    import torch

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = model.vision

        def forward(self, pixel_values, image_sizes):
            return self.embed(pixel_values, image_sizes)

    # Two images of different grids and more slots than either needs, so nothing shape-specific is baked in.
    pixels = torch.randn(2, 7, 3, 336, 336)
    sizes = torch.tensor([[672, 1008], [336, 672]], dtype=torch.int64)
    axes = {
        "pixel_values": {0: "num_images", 1: "max_num_crops"},
        "image_sizes": {0: "num_images"},
        "image_features": {0: "num_image_tokens"},
    }
    _export(Vision(), (pixels, sizes), path, ["pixel_values", "image_sizes"], ["image_features"], axes, io_dtype)


def export_embedding(model, path: Path, io_dtype: str = "float32") -> None:
    """Embedding graph: ``input_ids [batch, seq]`` (negative = image slot), ``image_features [tokens, hidden]`` ->
    ``inputs_embeds [batch, seq, hidden]``; works with zero image features."""
    import torch

    from phi_onnx_export.modeling import merge_embeddings

    class Embedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = model.embed_tokens

        def forward(self, input_ids, image_features):
            return merge_embeddings(input_ids, image_features, self.embed_tokens)

    hidden = model.config.text.hidden_size
    ids = torch.tensor([[5, 6, -1, -1, -1, 7, -2, -2, 8]], dtype=torch.int64)
    feats = torch.randn(5, hidden)
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "image_features": {0: "num_image_tokens"},
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
    }
    _export(Embedding(), (ids, feats), path, ["input_ids", "image_features"], ["inputs_embeds"], axes, io_dtype)


def build_decoder(
    text_dir: Path, out: Path, filename: str, plan: BuildPlan, cache: Path, precision: str | None = None
) -> None:
    """Run onnxruntime-genai's model builder on the text part (embeddings excluded: ours feed inputs_embeds), at
    ``precision`` (default: the plan's)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    # prune_lm_head: the prompt pass computes logits for the last position only (generation reads nothing else);
    # for a 2k-token image prompt that skips a [2k x hidden] x [hidden x 32064] MatMul and a 250 MB logits copy.
    extra = ["exclude_embeds=true", f"filename={filename}", "prune_lm_head=true"]
    builder_precision = precision or plan.precision
    if builder_precision == "int4":
        extra.append("int4_block_size=32")
        if plan.device == "cpu":
            extra.append("int4_accuracy_level=4")
    with tool_output(), _quiet_warnings():
        opts = parse_extra_options(None, str(text_dir), str(out), builder_precision, plan.device, str(cache), extra)
        create_model(None, str(text_dir), str(out), builder_precision, plan.device, str(cache), **opts)


def write_genai_config(out: Path, names: dict[str, str], hidden_size: int) -> None:
    """Turn the builder's text-only genai_config.json into a phi3v one."""
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text())
    model = cfg["model"]
    model["type"] = "phi3v"
    model["eos_token_id"] = [32007, 32000]
    model["decoder"]["hidden_size"] = hidden_size
    session = model["decoder"].get("session_options", {})
    model["vision"] = {
        "filename": names["vision"],
        "session_options": dict(session),
        "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
        "outputs": {"image_features": "image_features"},
    }
    model["embedding"] = {
        "filename": names["embedding"],
        "session_options": dict(session),
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    search = cfg.setdefault("search", {})
    # Greedy by default; max_length stays modest so raw onnxruntime-genai users do not allocate a 128k KV cache
    # (phi-onnx itself always passes prompt tokens + max_new_tokens).
    search.update(
        {
            "do_sample": False,
            "num_beams": 1,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "max_length": min(8192, model.get("context_length", 8192)),
            "past_present_share_buffer": True,
        }
    )
    path.write_text(json.dumps(cfg, indent=4) + "\n")
