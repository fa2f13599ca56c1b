"""Helpers that turn a request into the generator's inputs: the HD transform cache for conversation images, message
expansion (frames), frame time labels, and the tokenizer facts the model needs at load."""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx import _og, preprocess
from phi_onnx.errors import ModelError
from phi_onnx.images import load_frames
from phi_onnx.preprocess import Preprocessed
from phi_onnx.prompt import PHI3_SPECIAL_TOKENS
from phi_onnx.video import TIMESTAMP

DECODED = "phi_onnx.decoded"  # set in PIL ``info`` of frames we decoded; such frames are not decoded again
CROPS = "phi_onnx.num_crops"  # set in PIL ``info`` by Chat: the crops an image keeps for the whole conversation
_CACHE_SIZE = 32  # conversation images whose HD transform is kept (a chat re-sends its images every turn)


class HDCache:
    """The HD transform per image. Conversation images (marked DECODED by Chat) keep their result while they live,
    so each chat turn does not transform the whole history again; other images are not retained. Thread-safe."""

    def __init__(self, crop_slots: int | None) -> None:
        self.slots = crop_slots
        self.items: OrderedDict[tuple[int, int, int | None], tuple[weakref.ref, Preprocessed]] = OrderedDict()
        self._lock = threading.Lock()
        self._dead: list[tuple[int, int, int | None]] = []  # keys whose image died (appended by weakref callbacks)

    def transform(self, frames: Sequence[Any], crops: Sequence[int]) -> Preprocessed:
        """The HD transform of ``frames`` (each with its own crops), batched as the vision graph takes them."""
        slots = self.slots
        with self._lock:
            self._purge_dead()
        parts = []
        for frame, num_crops in zip(frames, crops):
            if not frame.info.get(DECODED):
                parts.append(preprocess.preprocess_images([frame], num_crops, crop_slots=slots))
                continue
            key = (id(frame), num_crops, slots)
            with self._lock:
                hit = self.items.get(key)
                if hit is not None and hit[0]() is frame:
                    self.items.move_to_end(key)
                    parts.append(hit[1])
                    continue
            done = preprocess.preprocess_images([frame], num_crops, crop_slots=slots)
            drop = functools.partial(_forget, self._dead, key)  # binds the list, not self: no cycle
            with self._lock:
                self.items[key] = (weakref.ref(frame, drop), done)
                if len(self.items) > _CACHE_SIZE:
                    self.items.popitem(last=False)
            parts.append(done)
        return stack(parts)

    def _purge_dead(self) -> None:
        """Drop cache entries whose image died (call with the lock held)."""
        while self._dead:
            key = self._dead.pop()
            entry = self.items.get(key)
            if entry is not None and entry[0]() is None:
                self.items.pop(key)


def stack(parts: Sequence[Preprocessed]) -> Preprocessed:
    """One batch from per-image HD transforms (crops padded to the widest)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.pixel_values.shape[1] for p in parts)
    pixels = np.zeros((len(parts), width, *parts[0].pixel_values.shape[2:]), np.float32)
    for i, p in enumerate(parts):
        pixels[i, : p.pixel_values.shape[1]] = p.pixel_values[0]
    return Preprocessed(
        pixel_values=pixels,
        image_sizes=np.concatenate([p.image_sizes for p in parts]),
        num_image_tokens=np.concatenate([p.num_image_tokens for p in parts]),
    )


def _forget(dead: list, key: tuple, _ref: weakref.ref) -> None:
    # Runs inside garbage collection, possibly while this thread holds the cache lock: only record the key.
    dead.append(key)


def added_tokens(folder: Path) -> tuple[str, ...]:
    """The tokenizer's added tokens (its control tokens), read from tokenizer.json; Phi-3's set is always included."""
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        added = [t["content"] for t in data.get("added_tokens", [])]
    except FileNotFoundError as err:
        raise ModelError(f"{folder} has no tokenizer.json: re-download or re-export the model") from err
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelError(
            f"{path} is unreadable or corrupt ({_og.first_line(err)}): re-download or re-export it"
        ) from err
    return tuple(dict.fromkeys([*PHI3_SPECIAL_TOKENS, *(t for t in added if isinstance(t, str) and t)]))


def end_tokens(tokenizer: _og.Tokenizer) -> list[int]:
    """The ids of ``<|end|>`` and ``<|endoftext|>`` (``<|end|>`` first)."""
    ids = []
    for text in ("<|end|>", "<|endoftext|>"):
        encoded = tokenizer.encode(text)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if not ids:
        raise ModelError("the tokenizer has no <|end|> token: is this a Phi-3-vision tokenizer?")
    return ids


def time_label(frame) -> str:
    """``[m:ss.s] `` for a video frame, nothing for other images."""
    seconds = frame.info.get(TIMESTAMP)
    if seconds is None:
        return ""
    return f"[{int(seconds // 60)}:{seconds % 60:04.1f}] "


def expand_message(message: Any, max_frames: int, sampling: str = "uniform") -> Any:
    """Replace each image part with one part per frame (decoded with Pillow)."""
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), list):
        return message
    parts = []
    for part in message["content"]:
        if isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
            src = part.get("image") if part.get("type") == "image" else part.get("image_url")
            if isinstance(src, Mapping):
                src = src.get("url")
            if getattr(src, "info", {}).get(DECODED):
                parts.append({"type": "image", "image": src})
                continue
            if src is not None:
                frames = load_frames(src, max_frames=max_frames, sampling=sampling)
                parts.extend({"type": "image", "image": f} for f in frames)
                continue
        parts.append(part)
    return {**message, "content": parts}
