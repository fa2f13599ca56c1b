"""Analytic FLOPs of the prompt pass: the vision tower on the crops against the decoder on the prompt.

Only matrix products are counted (2 FLOPs per multiply-add): they are all but a few percent of the work. Norms,
activations, softmax, rotary embeddings and the 2x2 merge are left out. What is counted is what our Phi3VModel
computes (and the exported graphs with it):

- vision, per crop: the 14x14 patch convolution, then every CLIP layer but the last (Phi-3-V reads
  ``hidden_states[-2]``) on 577 tokens (576 patches + CLS), full (bidirectional) attention; then the image projection
  (``4C -> hidden -> hidden``) on the 144 merged tokens of each crop plus the two separator rows;
- decoder: every layer on the prompt tokens (QKV, output, gate/up, down projections) and causal attention (each
  position attends to itself and the ones before it: ``S (S + 1) / 2`` query-key pairs), unless
  ``causal=False``, which counts the full ``S x S`` score matrix as a masked kernel computes it; logits for the last
  position only (the exported graph prunes the lm_head, PyTorch uses ``logits_to_keep=1``).
"""

from __future__ import annotations

from typing import Any

from phi_onnx_export.config import CROP_SIZE, PATCH_SIZE, TOKENS_PER_CROP, Phi3VConfig


def vision_flops(cfg: Phi3VConfig, crops: int) -> int:
    """FLOPs of the vision tower and the image projection on ``crops`` crops (global images included)."""
    v = cfg.vision
    d, inner = v.hidden_size, v.intermediate_size
    tokens = (CROP_SIZE // PATCH_SIZE) ** 2 + 1
    conv = (tokens - 1) * 3 * PATCH_SIZE**2 * d
    layer = tokens * (4 * d * d + 2 * d * inner) + 2 * tokens * tokens * d  # projections, then QK^T and AV
    clip = conv + (v.num_hidden_layers - 1) * layer
    hidden = cfg.text.hidden_size
    rows = crops * TOKENS_PER_CROP + 2  # + sub_GN and glb_GN, projected with the bank
    projection = rows * (4 * d * hidden + hidden * hidden)
    return 2 * (crops * clip + projection)


def decoder_flops(cfg: Phi3VConfig, prompt_tokens: int, causal: bool = True) -> int:
    """FLOPs of the decoder's prompt pass over ``prompt_tokens`` tokens, logits for the last position only."""
    t = cfg.text
    d, inner, s = t.hidden_size, t.intermediate_size, prompt_tokens
    kv = d // t.num_attention_heads * t.num_key_value_heads
    weights = d * (d + 2 * kv) + d * d + 2 * d * inner + inner * d  # qkv, o, gate+up, down
    pairs = s * (s + 1) // 2 if causal else s * s
    layer = s * weights + 2 * pairs * d  # QK^T and AV over the attended pairs, all heads
    return 2 * (t.num_hidden_layers * layer + d * t.vocab_size)


def prefill_balance(cfg: Phi3VConfig, crops: int, prompt_tokens: int, causal: bool = True) -> dict[str, Any]:
    """Vision and decoder prefill FLOPs of one prompt and their ratio (vision / decoder)."""
    vision, decoder = vision_flops(cfg, crops), decoder_flops(cfg, prompt_tokens, causal)
    return {"crops": crops, "prompt_tokens": prompt_tokens, "vision_gflop": round(vision / 1e9, 1),
            "decoder_gflop": round(decoder / 1e9, 1), "ratio": round(vision / decoder, 3)}  # fmt: skip
