"""Load and save Phi-3-V checkpoints in the official Hugging Face layout (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phi_onnx.errors import ExportError
from phi_onnx_export.config import Phi3VConfig
from phi_onnx_export.modeling import Phi3VModel

VISION_PREFIX = "model.vision_embed_tokens."
CLIP_PREFIX = VISION_PREFIX + "img_processor."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SHARD_LIMIT = 2 * 1024**3


def official_key(ours: str) -> str:
    """Our module's parameter name -> the official checkpoint's key."""
    if ours.startswith("lm."):
        return ours[3:]
    if ours.startswith("vision."):
        return VISION_PREFIX + ours[len("vision.") :]
    raise KeyError(ours)


def _normalise_key(key: str) -> str:
    """Accept both CLIP key styles (with and without ``vision_model.``) and the ``wte`` alias of embed_tokens."""
    if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + "vision_model."):
        return CLIP_PREFIX + "vision_model." + key[len(CLIP_PREFIX) :]
    if key == VISION_PREFIX + "wte.weight":
        return "model.embed_tokens.weight"
    return key


def check_checkpoint_dir(path: Path) -> list[Path]:
    """Raise ExportError unless ``path`` holds config.json, safetensors weights and a tokenizer; return the shards."""
    if not path.is_dir():
        raise ExportError(f"checkpoint folder {path} does not exist: pass --checkpoint a Hugging Face model folder")
    shards = sorted(path.glob("*.safetensors"))
    missing = [f for f in ("config.json", *TOKENIZER_FILES) if not (path / f).is_file()]
    if not shards:
        missing.append("*.safetensors")
    if missing:
        raise ExportError(
            f"checkpoint folder {path} is missing {', '.join(missing)}: it needs the Hugging Face files "
            "(config.json, model*.safetensors, tokenizer.json, tokenizer_config.json)"
        )
    return shards


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = torch.float32, attn_implementation: str = "eager"):
    """Load a phi3_v checkpoint into our module.

    Args:
        path: Folder with config.json, safetensors shards and tokenizer files.
        dtype: Parameter dtype of the returned module; None keeps each tensor's stored dtype.
        attn_implementation: transformers attention for the decoder ("eager" or "sdpa").

    Returns:
        ``(model, config)``; the model is in eval mode.

    Raises:
        ExportError: files are missing, the config is not phi3_v, or keys are unknown or missing (all listed).
    """
    from safetensors.torch import load_file

    path = Path(path)
    shards = check_checkpoint_dir(path)
    cfg = Phi3VConfig.from_file(path / "config.json")
    with torch.device("meta"):
        model = Phi3VModel(cfg, attn_implementation=attn_implementation)
    expected = {official_key(k): k for k in model.state_dict()}
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for shard in shards:
        for key, tensor in load_file(str(shard)).items():
            key = _normalise_key(key)
            if key in expected:
                state[expected[key]] = tensor if dtype is None else tensor.to(dtype)
            elif key != "model.embed_tokens.weight":
                unknown.append(key)
    missing = sorted(k for k, ours in expected.items() if ours not in state)
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} unknown keys ({', '.join(sorted(unknown)[:8])}{' …' if len(unknown) > 8 else ''})"
        )
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:8])}{' …' if len(missing) > 8 else ''})")
    if problems:
        raise ExportError(f"checkpoint {path} does not match Phi-3-V: " + "; ".join(problems))
    for key, tensor in state.items():
        expect = model.state_dict()[key].shape
        if tuple(tensor.shape) != tuple(expect):
            raise ExportError(
                f"checkpoint {path}: {official_key(key)} has shape {list(tensor.shape)}, config implies {list(expect)}"
            )
    model.load_state_dict(state, assign=True, strict=True)
    _rebuild_buffers(model)
    return model.eval(), cfg


def _rebuild_buffers(model: Phi3VModel) -> None:
    """Non-persistent buffers (rotary inv_freq) were created on the meta device: recompute them."""
    rot = model.lm.model.rotary_emb
    fresh = type(rot)(config=model.lm.config)
    for name, buf in fresh.named_buffers(recurse=False):
        setattr(rot, name, buf)
    for attr in ("attention_scaling", "original_inv_freq"):
        if hasattr(fresh, attr):
            setattr(rot, attr, getattr(fresh, attr))


def save_checkpoint(model: Phi3VModel, cfg: Phi3VConfig, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors shards with the official key names (deterministic bytes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tensors = {}
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        tensors[official_key(key)] = t.contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if size and size + nbytes > SHARD_LIMIT:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
