"""Parity: the exported folder through onnxruntime-genai against our PyTorch Phi-3-V, on the same inputs.

Both sides get the same pixel_values, image_sizes and input_ids (from onnxruntime-genai's own processor, fed images
we draw here). Checks, every one collected before the verdict:

- image-token counts equal (h*w+1)*144 + 1 + (h+1)*12 for shapes from 10:1 to 1:10;
- prompt logits agree (max |delta| <= 1e-4 for fp32 builds; the last position when the decoder prunes its head);
- the logits of every decode step agree (same tolerance);
- greedy continuations agree token for token (fp32: asserted; int4: reported as an agreement rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi_onnx.errors import ExportError

# fp32 graphs against fp32 PyTorch: differences come only from kernel summation order (GQA, MatMul blocking).
LOGITS_TOLERANCE_FP32 = 1e-4
COUNT_SHAPES = ((600, 400), (336, 336), (1000, 100), (100, 1000), (4000, 300), (2000, 1500), (50, 100), (1344, 1344))
CASES = {
    "text only": (),
    "1 image": ((600, 400),),
    "3 images": ((600, 400), (1000, 100), (200, 1000)),
}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    asserted: bool = True


@dataclass
class Report:
    model: Path
    precision: str
    checks: list[Check] = field(default_factory=list)
    min_agreement: float | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.asserted)

    def add(self, name: str, passed: bool, detail: str, asserted: bool = True) -> None:
        self.checks.append(Check(name, passed, detail, asserted))

    def render(self) -> str:
        lines = [f"parity of {self.model} ({self.precision}) against the PyTorch reference"]
        for c in self.checks:
            mark = ("PASS" if c.passed else "FAIL") if c.asserted else "INFO"
            lines.append(f"  {mark}  {c.name}: {c.detail}")
        if not self.passed:
            lines.append("MISMATCH: see FAIL lines above")
        elif any(not c.asserted for c in self.checks) and self.min_agreement is None:
            lines.append(
                f"all asserted checks passed; the {self.precision} greedy agreement above is reported, NOT checked "
                "(pass --min-agreement to check it)"
            )
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


def test_image(width: int, height: int, seed: int):
    """A deterministic, structured RGB test image (gradients plus shapes plus mild noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127 + 100 * np.sin(x / 23.0) * np.cos(y / 17.0)
    img = np.stack([r, g, b], -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def expected_tokens(image_sizes: np.ndarray) -> list[int]:
    return [(h * w + 1) * 144 + 1 + (h + 1) * 12 for h, w in (image_sizes // 336).tolist()]


def verify(
    model_dir: str | Path,
    checkpoint: str | Path,
    *,
    new_tokens: int = 32,
    cases: dict[str, tuple] | None = None,
    count_shapes: tuple = COUNT_SHAPES,
    min_agreement: float | None = None,
) -> Report:
    """Run every parity check and return the report (never raises on a mismatch; see ``Report.passed``).

    ``min_agreement`` (0..1) turns the greedy agreement of non-fp32 builds from a reported figure into a check.
    """
    import json

    import torch

    from phi_onnx import _og
    from phi_onnx_export.checkpoint import load_checkpoint

    model_dir = Path(model_dir)
    if not (model_dir / "genai_config.json").is_file():
        raise ExportError(f"{model_dir} has no genai_config.json: pass a folder built by `phi-onnx export build`")
    precision = _precision(model_dir)
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise ExportError(f"min_agreement is {min_agreement}: give a fraction between 0 and 1, e.g. 0.9")
    report = Report(model_dir, precision, min_agreement=min_agreement)
    og_model = _og.open_model(model_dir, "cpu", None)
    torch_model, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    eos = set(json.loads((model_dir / "genai_config.json").read_text())["model"]["eos_token_id"])

    def process(prompt: str, sizes: tuple) -> dict[str, np.ndarray]:
        images = [_og.png_bytes(test_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
        return _og.processor_inputs(og_model, prompt, images)

    counts_ok, bad = True, []
    for w, h in count_shapes:
        got = process("<|user|>\n<|image_1|>\nx<|end|>\n<|assistant|>\n", ((w, h),))
        want = expected_tokens(got["image_sizes"])[0]
        n = int(got["num_image_tokens"][0, 0])
        slots = int((got["input_ids"] < 0).sum())
        if n != want or slots != want:
            counts_ok = False
            bad.append(f"{w}x{h}: {n} tokens, {slots} slots, formula {want}")
    report.add(
        "image-token counts",
        counts_ok,
        f"{len(count_shapes)} shapes match (h*w+1)*144+1+(h+1)*12" if counts_ok else "; ".join(bad),
    )

    for name, sizes in (cases or CASES).items():
        tags = "".join(f"<|image_{i + 1}|>\n" for i in range(len(sizes)))
        prompt = f"<|user|>\n{tags}What is shown in this image?<|end|>\n<|assistant|>\n"
        inputs = process(prompt, sizes)
        _compare(report, name, inputs, og_model, torch_model, new_tokens, eos, precision)
    return report


def _precision(model_dir: Path) -> str:
    from phi_onnx.hub.modelinfo import read_graph_io

    text = next(model_dir.glob("*-text.onnx"), None)
    if text is None:
        return "unknown"
    raw = text.read_bytes() if text.stat().st_size < 64 * 1024**2 else b""
    dtype = read_graph_io(text).input("inputs_embeds").dtype
    if b"MatMulNBits" in raw:
        return "int4"
    return "fp16" if dtype == "float16" else "fp32"


def _og_run(og_model, inputs: dict[str, np.ndarray], new_tokens: int):
    """(prompt logits, last-position logits of every decode step, tokens) from onnxruntime-genai."""
    from phi_onnx import _og

    search = {"max_length": inputs["input_ids"].shape[1] + new_tokens, "do_sample": False}
    tokens, logits, steps = [], None, []
    for token, current in _og.run_tokens_with_logits(og_model, inputs, search):
        if logits is None:
            logits = current
        else:
            steps.append(current[0, -1].astype(np.float32))
        tokens.append(token)
    return logits, steps, tokens


def _torch_run(model, inputs: dict[str, np.ndarray], new_tokens: int, eos: set[int]):
    """(prompt logits, last-position logits of every decode step, tokens) from the PyTorch reference."""
    import torch
    from transformers import DynamicCache

    ids = torch.from_numpy(inputs["input_ids"].astype(np.int64))
    with torch.no_grad():
        feats = None
        if "pixel_values" in inputs:
            pixels = torch.from_numpy(inputs["pixel_values"].astype(np.float32))
            feats = model.image_features(pixels, torch.from_numpy(inputs["image_sizes"].astype(np.int64)))
        cache = DynamicCache(config=model.lm.config)
        out = model.lm(inputs_embeds=model.embed(ids, feats), past_key_values=cache, use_cache=True)
        logits = out.logits.float().numpy()
        tokens, steps = [], []
        step = out.logits[0, -1]
        for i in range(new_tokens):
            tok = int(step.argmax())
            tokens.append(tok)
            if tok in eos or i == new_tokens - 1:
                break
            out = model.lm(inputs_embeds=model.embed(torch.tensor([[tok]])), past_key_values=cache, use_cache=True)
            step = out.logits[0, -1]
            steps.append(step.float().numpy())
    return logits, steps, tokens


def _compare(report: Report, name: str, inputs, og_model, torch_model, new_tokens: int, eos, precision) -> None:
    og_logits, og_steps, og_tokens = _og_run(og_model, inputs, new_tokens)
    ref_logits, ref_steps, ref_tokens = _torch_run(torch_model, inputs, new_tokens, eos)
    seq = inputs["input_ids"].shape[1]
    positions = f"all {seq} positions"
    if og_logits.shape[1] != seq:  # a decoder built with prune_lm_head returns the last position only
        ref_logits = ref_logits[:, -og_logits.shape[1] :]
        positions = f"last of {seq} positions"
    delta = float(np.max(np.abs(og_logits.astype(np.float32) - ref_logits)))
    scale = float(np.max(np.abs(ref_logits)))
    if precision == "fp32":
        report.add(
            f"{name}: prompt logits ({positions})",
            delta <= LOGITS_TOLERANCE_FP32,
            f"max |delta| {delta:.2e} (tolerance {LOGITS_TOLERANCE_FP32:.0e}, logits up to {scale:.1f})",
        )
        shared = min(len(og_steps), len(ref_steps))
        step_delta = max((float(np.max(np.abs(a - b))) for a, b in zip(og_steps, ref_steps)), default=0.0)
        report.add(
            f"{name}: decode-step logits",
            step_delta <= LOGITS_TOLERANCE_FP32,
            f"max |delta| {step_delta:.2e} over {shared} steps (tolerance {LOGITS_TOLERANCE_FP32:.0e})",
        )
        same = og_tokens == ref_tokens
        first = next((i for i, (a, b) in enumerate(zip(og_tokens, ref_tokens)) if a != b), None)
        detail = (
            f"{len(og_tokens)} tokens identical"
            if same
            else (
                f"differ at step {first}: onnx {og_tokens[first : first + 4]} vs torch {ref_tokens[first : first + 4]}"
                if first is not None
                else f"lengths differ: onnx {len(og_tokens)}, torch {len(ref_tokens)}"
            )
        )
        report.add(f"{name}: greedy tokens", same, detail)
    else:
        agree = sum(a == b for a, b in zip(og_tokens, ref_tokens))
        rate = agree / max(len(ref_tokens), 1)
        top1 = float(np.mean(og_logits[0].argmax(-1) == ref_logits[0].argmax(-1)))
        report.add(
            f"{name}: prompt logits",
            math.isfinite(delta),
            f"max |delta| {delta:.3f} (not asserted for {precision})",
            False,
        )
        wanted = report.min_agreement
        report.add(
            f"{name}: greedy agreement",
            wanted is None or rate >= wanted,
            f"{rate:.0%} of {len(ref_tokens)} tokens; prompt top-1 agreement {top1:.0%}"
            + (f" (at least {wanted:.0%} required)" if wanted is not None else " (reported, not checked)"),
            asserted=wanted is not None,
        )
