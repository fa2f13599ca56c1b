"""The PyTorch path: the checkpoint through our Phi3VModel (eager, SDPA attention; torch.compile optional).

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

from phi_onnx_bench.spec import PathSpec, Samples, Workload, peak_rss_mb

DEFAULT_EOS = (32000, 32007)


def run(spec: PathSpec, work: Workload) -> dict[str, Any]:
    """Load the checkpoint, then per num_crops setting: warm-ups and timed generations."""
    import torch
    from tokenizers import Tokenizer

    from phi_onnx import _og
    from phi_onnx_export.checkpoint import load_checkpoint

    threads = work.threads or _og.default_threads()
    torch.set_num_threads(threads)
    images = [Path(p).read_bytes() for p in work.images]
    t0 = time.perf_counter()
    model, _ = load_checkpoint(spec.source, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = Tokenizer.from_file(str(Path(spec.source) / "tokenizer.json"))
    if spec.compile:
        model.vision = torch.compile(model.vision, dynamic=True)
        model.lm = torch.compile(model.lm, dynamic=True)
    load_ms = (time.perf_counter() - t0) * 1e3
    eos = sorted(set(DEFAULT_EOS) | set(_eos_ids(Path(spec.source))))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    runs: dict[str, Any] = {}
    for crops in work.num_crops:
        for _ in range(work.warmup):
            generate(model, encode, images, work.prompt, crops, work.new_tokens, eos)
        samples = Samples()
        result: dict[str, Any] = {}
        for _ in range(work.repeat):
            result = generate(model, encode, images, work.prompt, crops, work.new_tokens, eos)
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
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": None,
        "attention": "sdpa",
        "compiled": spec.compile,
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
