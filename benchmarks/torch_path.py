"""The PyTorch path: the checkpoint through our Phi3VModel (eager, SDPA attention; torch.compile optional), in fp32 or
in bf16 (weights in bfloat16 and the whole generation under ``torch.autocast("cpu", dtype=torch.bfloat16)``, what a
user with a bf16-capable CPU runs; skipped with the reason on CPUs without native bf16 arithmetic).

It gets what the onnxruntime-genai path gets: the image bytes, decoded and HD-transformed by phi_onnx's own
preprocessing (timed), the prompt tokenised the same way (the checkpoint's tokenizer.json, no BOS, image slots
spliced in), greedy decoding with a KV cache, end-of-turn masked until the fixed number of new tokens (as
onnxruntime-genai's min_length does). Prefill computes logits for the last position only, as transformers'
``generate`` does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from phi_onnx_bench.spec import PRIVATE, PathSpec, Samples, Workload, peak_rss_mb, reset_peak_rss, rss_figures

DEFAULT_EOS = (32000, 32007)
PRECISIONS = ("fp32", "bf16")


def cpu_kernels() -> dict[str, Any]:
    """What PyTorch can use on this CPU: its kernel ISA level, native bf16 (AVX512-BF16) and AMX tiles, and the
    matching /proc/cpuinfo flags."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    cpu = torch.cpu
    probe = {name: bool(getattr(cpu, f"_is_{name}_supported", lambda: False)())
             for name in ("avx512_bf16", "amx_tile", "amx_fp16", "vnni")}  # fmt: skip
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **probe,
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpuinfo_flags": sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f"))),
    }


def bf16_skip_reason(kernels: dict[str, Any]) -> str | None:
    """Why the bf16 path is not worth running here (None: run it). Without AVX512-BF16 or AMX, oneDNN emulates bf16
    with fp32 arithmetic plus conversions, slower than fp32: not a configuration anyone would choose."""
    if kernels.get("avx512_bf16") or kernels.get("amx_tile"):
        return None
    return (f"this CPU has no native bf16 arithmetic (no avx512_bf16 or amx_bf16 in /proc/cpuinfo; PyTorch kernel "
            f"level {kernels.get('cpu_capability')}), so bf16 would be emulated and slower than fp32")  # fmt: skip


def run(spec: PathSpec, work: Workload) -> dict[str, Any]:
    """Load the checkpoint, then per num_crops setting: warm-ups and timed generations.

    A bf16 spec on a CPU without native bf16 returns ``{"skipped": reason, "runs": {}, "kernels": ...}``.
    """
    import torch
    from tokenizers import Tokenizer

    from phi_onnx import _og
    from phi_onnx_export.checkpoint import load_checkpoint

    if spec.precision not in PRECISIONS:
        raise ValueError(f"PyTorch precision {spec.precision!r}: choose one of {', '.join(PRECISIONS)}")
    kernels = cpu_kernels()
    bf16 = spec.precision == "bf16"
    if bf16 and (reason := bf16_skip_reason(kernels)):
        return {"skipped": reason, "runs": {}, "kernels": kernels, "load_ms": 0.0, "peak_rss_mb": peak_rss_mb(),
                "peak_gpu_mb": None, "vision_method": "skipped"}  # fmt: skip
    threads = work.threads or _og.default_threads()
    torch.set_num_threads(threads)
    images = [Path(p).read_bytes() for p in work.images]
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, _ = load_checkpoint(spec.source, dtype=dtype, attn_implementation="sdpa")
    tokenizer = Tokenizer.from_file(str(Path(spec.source) / "tokenizer.json"))
    if spec.compile:
        model.vision = torch.compile(model.vision, dynamic=True)
        model.lm = torch.compile(model.lm, dynamic=True)
    load_ms = (time.perf_counter() - t0) * 1e3
    load_peak = reset_peak_rss()
    eos = sorted(set(DEFAULT_EOS) | set(_eos_ids(Path(spec.source))))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def generate_one(crops: int) -> dict[str, Any]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return generate(model, encode, images, work.prompt, crops, work.new_tokens, eos)

    runs: dict[str, Any] = {}
    for crops in work.num_crops:
        for _ in range(work.warmup):
            generate_one(crops)
        samples = Samples()
        result: dict[str, Any] = {}
        for _ in range(work.repeat):
            result = generate_one(crops)
            t = result["times"]
            samples.preprocess_ms.append(t["preprocess_ms"])
            samples.vision_ms.append(t["vision_ms"])
            samples.time_to_first_token_ms.append(t["ttft_ms"])
            prefill_ms = t["ttft_ms"] - t["preprocess_ms"] - t["vision_ms"]
            if prefill_ms > 0:
                samples.prefill_tokens_per_s.append(result["prompt_tokens"] / (prefill_ms / 1e3))
            samples.decode_tokens_per_s.append(t["decode_tokens_per_s"])
            samples.end_to_end_ms.append(t["e2e_ms"])
        runs[str(crops)] = {
            "prompt_tokens": result.get("prompt_tokens", 0),
            "image_tokens": result.get("image_tokens", 0),
            "generated_tokens": len(result.get("tokens", [])),
            "tokens": result.get("tokens", []),
            "samples": samples,
        }
    return {
        "load_ms": load_ms,
        "threads": torch.get_num_threads(),
        "runs": runs,
        **rss_figures(load_peak, peak_rss_mb()),
        "peak_private_mb": PRIVATE.peak_mb(),
        "model_files_mb": sum(f.stat().st_size for f in Path(spec.source).glob("*.safetensors")) / 2**20,
        "peak_gpu_mb": None,
        "attention": "sdpa",
        "compiled": spec.compile,
        "dtype": str(dtype).removeprefix("torch."),
        "autocast": "torch.autocast('cpu', dtype=torch.bfloat16)" if bf16 else None,
        "kernels": kernels,
        "vision_method": "Phi3VModel.image_features timed inside each generation",
    }


def _eos_ids(checkpoint: Path) -> list[int]:
    path = checkpoint / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id", [])
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def generate(model, encode, images: list[bytes], prompt: str, num_crops: int, new_tokens: int,
             eos: list[int]) -> dict[str, Any]:  # fmt: skip
    """One greedy generation of exactly ``new_tokens`` tokens, timed from the image bytes to the last token.

    Returns:
        ``tokens``, ``prompt_tokens``, ``image_tokens`` and ``times`` (preprocess_ms, vision_ms, ttft_ms,
        decode_tokens_per_s, e2e_ms).
    """
    import numpy as np
    import torch
    from transformers import DynamicCache

    from phi_onnx.images import load_frames
    from phi_onnx.preprocess import preprocess_images
    from phi_onnx.prompt import prompt_from_text, splice_image_tokens

    start = time.perf_counter()
    frames = [f for src in images for f in load_frames(src)]
    text = prompt_from_text(prompt, len(frames))
    pre = preprocess_images(frames, num_crops) if frames else None
    counts = pre.num_image_tokens[:, 0].tolist() if pre is not None else []
    ids = torch.from_numpy(splice_image_tokens(text, encode, counts, bos_id=1).astype(np.int64))  # as phi-onnx
    preprocessed = time.perf_counter()
    tokens: list[int] = []
    with torch.inference_mode():
        feats = None
        if pre is not None:
            feats = model.image_features(torch.from_numpy(pre.pixel_values), torch.from_numpy(pre.image_sizes))
        seen = time.perf_counter()
        cache = DynamicCache(config=model.lm.config)
        out = model.lm(inputs_embeds=model.embed(ids, feats), past_key_values=cache, use_cache=True, logits_to_keep=1)
        for step in range(new_tokens):
            logits = out.logits[0, -1]
            logits[eos] = float("-inf")  # end-of-turn suppressed until the fixed length, as min_length does
            token = int(logits.argmax())
            tokens.append(token)
            if step == 0:
                first = time.perf_counter()
            if step + 1 == new_tokens:
                break
            embeds = model.embed(torch.tensor([[token]]))
            out = model.lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    end = time.perf_counter()
    decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else 0.0
    return {
        "tokens": tokens,
        "prompt_tokens": int(ids.shape[1]),
        "image_tokens": int((ids < 0).sum()),
        "times": {
            "preprocess_ms": (preprocessed - start) * 1e3,
            "vision_ms": (seen - preprocessed) * 1e3,
            "ttft_ms": (first - start) * 1e3,
            "decode_tokens_per_s": decode,
            "e2e_ms": (end - start) * 1e3,
        },
    }
