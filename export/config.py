"""Phi-3-V checkpoint configuration: read the official config.json and derive the text and vision settings.

The official config (model_type "phi3_v") names the vision tower only as CLIP ViT-L/14-336; its dimensions are implied.
Checkpoints written by phi-onnx (random-weight test models) record them explicitly under
``img_processor.vision_config``; when that key is absent the CLIP-L/14-336 dimensions apply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phi_onnx.errors import ExportError

CROP_SIZE = 336
PATCH_SIZE = 14
TOKENS_PER_CROP = 144  # 24x24 patches merged 2x2


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower's dimensions (defaults: CLIP ViT-L/14-336)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    image_size: int = CROP_SIZE
    patch_size: int = PATCH_SIZE

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """The Phi-3-mini decoder's dimensions."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_theta: float
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 32007
    pad_token_id: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Phi3VConfig:
    """Everything the PyTorch module and the export need, parsed from a checkpoint's config.json."""

    text: TextConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Phi3VConfig:
        if raw.get("model_type") != "phi3_v":
            raise ExportError(
                f"{source} has model_type {raw.get('model_type')!r}, not 'phi3_v': point --checkpoint at a "
                "Phi-3-vision or Phi-3.5-vision checkpoint"
            )
        try:
            text = _text_config(raw)
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(
                f"{source} is missing or has a bad text-model field ({err}): is it a phi3_v config?"
            ) from err
        img = raw.get("img_processor") or {}
        vision = VisionConfig(**(img.get("vision_config") or {}))
        if img.get("num_img_tokens", TOKENS_PER_CROP) != TOKENS_PER_CROP:
            raise ExportError(f"{source}: img_processor.num_img_tokens must be {TOKENS_PER_CROP}")
        if vision.image_size != CROP_SIZE or vision.patch_size != PATCH_SIZE:
            raise ExportError(f"{source}: the vision tower must use {CROP_SIZE}px crops and {PATCH_SIZE}px patches")
        return cls(text=text, vision=vision, raw=raw)

    @classmethod
    def from_file(cls, path: str | Path) -> Phi3VConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ExportError(f"{path} does not exist: a checkpoint folder needs config.json") from err
        except json.JSONDecodeError as err:
            raise ExportError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
        return cls.from_dict(raw, source=str(path))

    @property
    def image_dim_out(self) -> int:
        return self.vision.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout, with the vision dimensions written out."""
        t = self.text
        raw = dict(self.raw)
        raw.update(
            {
                "architectures": ["Phi3VForCausalLM"],
                "model_type": "phi3_v",
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "vocab_size": t.vocab_size,
                "max_position_embeddings": t.max_position_embeddings,
                "original_max_position_embeddings": t.original_max_position_embeddings,
                "rope_theta": t.rope_theta,
                "rope_scaling": {
                    "type": "su",
                    "short_factor": list(t.short_factor),
                    "long_factor": list(t.long_factor),
                },
                "rms_norm_eps": t.rms_norm_eps,
                "hidden_act": "silu",
                "bos_token_id": t.bos_token_id,
                "eos_token_id": 2,
                "pad_token_id": t.pad_token_id,
                "tie_word_embeddings": False,
                "sliding_window": t.max_position_embeddings,
                "torch_dtype": raw.get("torch_dtype", "bfloat16"),
                "embd_layer": {
                    "embedding_cls": "image",
                    "hd_transform_order": "sub_glb",
                    "projection_cls": "mlp",
                    "use_hd_transform": True,
                    "with_learnable_separator": True,
                },
                "img_processor": {
                    "image_dim_out": self.vision.hidden_size,
                    "model_name": "openai/clip-vit-large-patch14-336",
                    "name": "clip_vision_model",
                    "num_img_tokens": TOKENS_PER_CROP,
                    "vision_config": asdict(self.vision),
                },
            }
        )
        return raw

    def hf_text_config(self, attn_implementation: str = "eager"):
        """A transformers ``Phi3Config`` for the text decoder (LongRoPE as rope_type "longrope")."""
        from transformers import Phi3Config
        from transformers.utils import logging as hf_logging

        t = self.text
        rope = {
            "rope_type": "longrope",
            "type": "longrope",
            "short_factor": list(t.short_factor),
            "long_factor": list(t.long_factor),
            "original_max_position_embeddings": t.original_max_position_embeddings,
            "rope_theta": t.rope_theta,
        }
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # silence the advice to express LongRoPE via `factor`: we follow Phi-3
        try:
            cfg = self._phi3_config(Phi3Config, rope)
        finally:
            hf_logging.set_verbosity(level)
        cfg.architectures = ["Phi3ForCausalLM"]
        cfg._attn_implementation = attn_implementation
        return cfg

    def _phi3_config(self, phi3_config, rope: dict):
        t = self.text
        return phi3_config(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            max_position_embeddings=t.max_position_embeddings,
            original_max_position_embeddings=t.original_max_position_embeddings,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta,
            rope_scaling=rope,
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id,
            tie_word_embeddings=False,
            hidden_act="silu",
            attention_dropout=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            sliding_window=None,
        )


def _text_config(raw: dict[str, Any]) -> TextConfig:
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    short = tuple(float(x) for x in rope.get("short_factor") or [1.0] * (head_dim // 2))
    long = tuple(float(x) for x in rope.get("long_factor") or [1.0] * (head_dim // 2))
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise ValueError(f"rope factors must have head_dim/2 = {head_dim // 2} entries")
    return TextConfig(
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
        vocab_size=int(raw["vocab_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 4096)),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        short_factor=short,
        long_factor=long,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        bos_token_id=int(raw.get("bos_token_id", 1)),
    )
