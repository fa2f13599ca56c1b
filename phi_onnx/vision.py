"""The vision graph, run by phi-onnx in its own onnxruntime session, and a cache of image features.

onnxruntime-genai runs the vision graph inside every generator, so a chat turn or a second question about the same
image encoded it again. phi-onnx instead runs the model's vision graph here, keeps recent features (keyed by the
decoded pixels and everything that changes them), and gives og a pass-through vision graph
(:mod:`phi_onnx.passthrough`) that takes the features as ``pixel_values``. The tokens generated are the same.

The session mirrors og's: the same graph file, the same execution provider and provider options from genai_config,
and on the CPU the same thread settings (:func:`phi_onnx._og.cpu_session_options`).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from phi_onnx import _og, preprocess
from phi_onnx.errors import ModelError, OptionsError
from phi_onnx.hub.modelinfo import ModelInfo
from phi_onnx.preprocess import Preprocessed

DEFAULT_IMAGE_CACHE_MB = 256
"""Default bound of the feature cache: about eight 16-crop images of the full fp32 model (30 MB each), sixteen in
fp16; 0 turns the cache off (the vision graph still runs here)."""

_DIGEST = "phi_onnx.digest"  # PIL ``info`` key where an image's pixel digest is memoised
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}


def pixel_digest(image: Image.Image, memo: bool = False) -> str:
    """A digest of an image's decoded pixels (mode, size and bytes).

    The file name, format and metadata do not enter: the same pixels from a PNG, a JPEG's decode or a numpy array
    share features. ``memo`` keeps the digest on the image (for images phi-onnx owns, such as a chat's, which are never
    modified; a caller's PIL image may be drawn on between calls, so its digest is computed every time).
    """
    cached = image.info.get(_DIGEST) if memo else None
    if isinstance(cached, str):
        return cached
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    value = digest.hexdigest()
    if memo:
        image.info[_DIGEST] = value
    return value


@dataclass(frozen=True)
class Features:
    """One image's vision output and the numbers the prompt needs."""

    features: np.ndarray  # [image_tokens, hidden]
    image_size: np.ndarray  # int64 [2]
    num_image_tokens: int

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)


class FeatureCache:
    """A thread-safe LRU of :class:`Features`, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple, Features] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple) -> Features | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, item: Features) -> None:
        if item.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = item
            self._bytes += item.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class VisionEncoder:
    """The model's vision graph in an onnxruntime session of its own, with the feature cache in front."""

    def __init__(self, info: ModelInfo, provider: str, threads: int | None, cache_bytes: int) -> None:
        import onnxruntime as ort  # installed with onnxruntime-genai

        vision = info.config["model"]["vision"]
        self.names = {
            "pixel_values": vision.get("inputs", {}).get("pixel_values", "pixel_values"),
            "image_sizes": vision.get("inputs", {}).get("image_sizes", "image_sizes"),
            "image_features": vision.get("outputs", {}).get("image_features", "image_features"),
        }
        declared = info.vision.input(self.names["pixel_values"])
        self.pixel_dtype = np.dtype(np.float16 if declared is not None and declared.dtype == "float16" else np.float32)
        out = info.vision.output(self.names["image_features"])
        self.feature_dtype = out.dtype if out is not None else "float32"
        self.hidden = info.hidden_size
        self.model_id = f"{info.vision.path.resolve()}:{info.vision.path.stat().st_mtime_ns}"
        options, providers = session_setup(ort, vision.get("session_options", {}), provider, threads, info.folder)
        try:
            self._session = ort.InferenceSession(str(info.vision.path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"onnxruntime could not load {info.vision.path}: {first}") from err
        self.cache = FeatureCache(cache_bytes)

    def from_frames(self, frames: Sequence[Image.Image], crops: Sequence[int], keys: tuple, slots: int | None):
        """A maker of the generator's image inputs (features) for frames cut by phi-onnx's HD transform; the
        transform runs only for images not in the cache (see :attr:`PreparedInputs.pixels`)."""

        def make() -> tuple[dict[str, np.ndarray], int, float, float]:
            hd_ms = 0.0

            def transform(frame: Image.Image, num_crops: int):
                nonlocal hd_ms
                begin = time.perf_counter()
                pre = preprocess.preprocess_images([frame], num_crops, crop_slots=slots)
                hd_ms += (time.perf_counter() - begin) * 1e3
                return pre

            makers = [(k, functools.partial(transform, f, c)) for f, c, k in zip(frames, crops, keys)]
            items, hits, vision_ms = self.encode(makers)
            return concat_features(items), hits, vision_ms, hd_ms

        return make

    def from_og_inputs(self, inputs: dict[str, np.ndarray], keys: tuple):
        """Like :meth:`from_frames`, for pixel values onnxruntime-genai's processor made (sliced per image)."""

        def make() -> tuple[dict[str, np.ndarray], int, float, float]:
            makers = [(k, functools.partial(_slice, inputs, i)) for i, k in enumerate(keys)]
            items, hits, vision_ms = self.encode(makers)
            return concat_features(items), hits, vision_ms, 0.0

        return make

    def encode(self, images: Sequence[tuple[tuple, Any]]) -> tuple[list[Features], int, float]:
        """Features for each image, from the cache or by running the vision graph.

        Args:
            images: (cache key, make) pairs; ``make()`` returns the image's Preprocessed tensors (pixel_values
                [1, crops, 3, 336, 336]) and is called only on a cache miss.

        Returns:
            (features per image, cache hits, milliseconds spent running the vision graph).
        """
        results: list[Features] = []
        hits = 0
        vision_ms = 0.0
        for key, make in images:
            full_key = (self.model_id, *key)
            found = self.cache.get(full_key)
            if found is not None:
                hits += 1
                results.append(found)
                continue
            pre = make()
            start = time.perf_counter()
            feats = self.run(pre.pixel_values, pre.image_sizes)
            vision_ms += (time.perf_counter() - start) * 1e3
            item = Features(feats, pre.image_sizes[0].copy(), int(pre.num_image_tokens[0, 0]))
            self.cache.put(full_key, item)
            results.append(item)
        return results, hits, vision_ms

    def run(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
        """Run the vision graph once: pixel_values [images, crops, 3, 336, 336] -> image_features [tokens, hidden]."""
        feeds = {
            self.names["pixel_values"]: np.ascontiguousarray(pixel_values, dtype=self.pixel_dtype),
            self.names["image_sizes"]: np.ascontiguousarray(image_sizes, dtype=np.int64),
        }
        return self._session.run([self.names["image_features"]], feeds)[0]


def concat_features(items: Sequence[Features]) -> dict[str, np.ndarray]:
    """The inputs og's generator takes with a pass-through vision graph: the features in place of pixel_values."""
    return {
        "pixel_values": np.concatenate([i.features for i in items], axis=0),
        "image_sizes": np.stack([i.image_size for i in items]).astype(np.int64),
        "num_image_tokens": np.array([[i.num_image_tokens] for i in items], dtype=np.int64),
    }


def provider_available(provider: str) -> bool:
    """Whether the plain onnxruntime package here can run the vision graph on this provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return _ORT_PROVIDERS[provider] in ort.get_available_providers()


def session_setup(ort, config: dict[str, Any], provider: str, threads: int | None, folder: Path):
    """onnxruntime SessionOptions and providers mirroring what og builds from a graph's genai_config session options
    (``config``) and phi-onnx's overlay, for the sessions phi-onnx opens itself (and the benchmark harness)."""
    options = ort.SessionOptions()
    library = _og.custom_ops_library(folder, config)
    if library is not None:  # phi-onnx's own attention kernels (CPU builds: phi_onnx_export.ops)
        options.register_custom_ops_library(str(library))
    settings = dict(config)
    if provider == "cpu":
        settings.update(_og.cpu_session_options(threads or _og.default_threads()))
    levels = {
        "ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    for key, value in settings.items():
        if key in ("intra_op_num_threads", "inter_op_num_threads"):
            setattr(options, key, int(value))
        elif key in ("enable_cpu_mem_arena", "enable_mem_pattern"):
            setattr(options, key, bool(value))
        elif key == "graph_optimization_level" and value in levels:
            options.graph_optimization_level = levels[value]
        elif key == "log_id":
            options.logid = str(value)
        elif key == "config_entries" and isinstance(value, dict):
            for entry, setting in value.items():
                options.add_session_config_entry(str(entry), str(setting))
    options.log_severity_level = 3
    provider_options: dict[str, str] = {}
    for entry in settings.get("provider_options", []) or []:
        if isinstance(entry, dict) and provider in entry and isinstance(entry[provider], dict):
            provider_options = {str(k): str(v) for k, v in entry[provider].items()}
    if provider == "cpu":
        return options, ["CPUExecutionProvider"]
    return options, [(_ORT_PROVIDERS[provider], provider_options), "CPUExecutionProvider"]


def image_keys(frames: Sequence[Image.Image], crops: Sequence[int], slots: int | None, og_processor: bool) -> tuple:
    """Each image's identity for the caches: its pixel digest and what changes its features (crops, crop slots, which
    processor cut it). Chat's own frames memoise their digest; a caller's image is hashed every call."""
    from phi_onnx.inputs import DECODED

    how = "onnxruntime-genai" if og_processor else "phi-onnx"
    return tuple(
        (pixel_digest(f, bool(f.info.get(DECODED))), c, slots, how) for f, c in zip(frames, crops, strict=True)
    )


def _slice(inputs: dict[str, np.ndarray], i: int) -> Preprocessed:
    """Image ``i`` of og processor outputs, as the vision session takes it."""
    return Preprocessed(
        pixel_values=inputs["pixel_values"][i : i + 1],
        image_sizes=inputs["image_sizes"][i : i + 1],
        num_image_tokens=inputs["num_image_tokens"].reshape(-1, 1)[i : i + 1],
    )


def open_vision(info: ModelInfo, provider: str, threads: int | None, cache_mb: float):
    """phi-onnx's vision session and the pass-through graph og gets instead (relative to the folder), or (None, None)
    with a warning when this machine cannot do it (the vision graph then runs inside og, without a feature cache)."""
    from phi_onnx import passthrough

    why = None
    if not provider_available(provider):
        why = f"the onnxruntime package here has no {provider} execution provider"
    else:
        encoder = VisionEncoder(info, provider, threads, int(cache_mb * 2**20))
        path = None
        try:
            path = passthrough.passthrough_file(encoder.feature_dtype, info.hidden_size, encoder.names)
            relative = passthrough.relative_to(path, info.folder)
        except OSError as err:
            relative, why = None, f"the cache directory {passthrough.cache_dir()} is not writable ({err.strerror})"
        if relative is not None:
            return encoder, relative
        why = why or f"no relative path leads from {info.folder} to {path}"
    warnings.warn(f"image features are not cached: {why}; the vision graph runs inside onnxruntime-genai", stacklevel=4)
    return None, None


def kv_dtype(info: ModelInfo) -> str:
    """The decoder's KV cache dtype (from its first past key input)."""
    names = info.config["model"]["decoder"].get("inputs", {})
    declared = info.decoder.input(names.get("past_key_names", "past_key_values.%d.key") % 0)
    return declared.dtype if declared is not None else "float32"


def check_reuse_options(vision: str, cache_mb: float, reserve: int, pool: int, pool_mb: float) -> None:
    """Refuse bad load options for the caches with a one-line OptionsError."""
    runners = ("phi-onnx", "onnxruntime-genai")
    if vision not in runners:
        raise OptionsError(f"unknown vision runner {vision!r}: choose one of {', '.join(runners)}")
    for name, value in (("image_cache_mb", cache_mb), ("kv_pool_mb", pool_mb)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise OptionsError(f"{name} must be a number of megabytes >= 0, got {value!r}")
    for name, value in (("kv_reserve", reserve), ("kv_pool", pool)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OptionsError(f"{name} must be a whole number >= 0, got {value!r}")
