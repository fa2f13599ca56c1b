"""Load a phi3v model folder and generate: prompt plus images, or OpenAI-style messages."""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx import _og
from phi_onnx.errors import ModelError, OptionsError
from phi_onnx.generation import Chunk, Generation, collect
from phi_onnx.hub.modelinfo import ModelInfo, inspect_model
from phi_onnx.images import ImageInput, load_frames
from phi_onnx.inputs import CROPS, DECODED, HDCache, added_tokens, end_tokens, expand_message, time_label
from phi_onnx.memory import release_mapped_weights
from phi_onnx.options import GenerationOptions
from phi_onnx.preprocess import image_token_count
from phi_onnx.prompt import IMAGE_TAG, build_prompt, prompt_from_text, splice_image_tokens
from phi_onnx.sessions import DEFAULT_POOL_MB, DEFAULT_POOL_SIZE, DEFAULT_RESERVE_TOKENS, SessionPool
from phi_onnx.video import TIMESTAMP
from phi_onnx.vision import DEFAULT_IMAGE_CACHE_MB, VisionEncoder

PREPROCESSORS = ("auto", "phi-onnx", "onnxruntime-genai")
TOKEN_IDS = ("microsoft", "onnxruntime-genai")

DEFAULT_MAX_FRAMES = 16
_GUIDANCE_CHECKED = 256  # distinct constraints remembered as valid, so each is compiled up front only once
__all__ = ["CROPS", "DECODED", "PhiVision", "PreparedInputs", "load"]


@dataclass(frozen=True)
class PreparedInputs:
    """What goes into the generator, and what it cost to make."""

    inputs: dict[str, np.ndarray]
    prompt: str
    prompt_tokens: int
    image_tokens: int
    num_crops: int | None
    preprocess_ms: float
    frame_times: tuple[float, ...] = ()
    image_keys: tuple = ()  # each image's identity (pixel digest and what changes its features)
    pixels: Callable[[], tuple[dict[str, np.ndarray], int, float, float]] | None = None
    """When set, ``inputs`` holds only input_ids and this makes the image inputs on demand (a continued generator
    needs none): (inputs, feature cache hits, vision ms, HD transform ms)."""


def load(
    model: str | Path | None = None,
    device: str = "auto",
    *,
    threads: int | None = None,
    options: GenerationOptions | Mapping[str, Any] | None = None,
    preprocessor: str = "auto",
    max_frames: int = DEFAULT_MAX_FRAMES,
    variant: str = "auto",
    revision: str | None = None,
    token_ids: str = "microsoft",
    frame_sampling: str = "uniform",
    frame_times: bool = False,
    vision: str = "phi-onnx",
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
    kv_reserve: int = DEFAULT_RESERVE_TOKENS,
    kv_pool: int = DEFAULT_POOL_SIZE,
    kv_pool_mb: float = DEFAULT_POOL_MB,
) -> PhiVision:
    """Load a Phi-3-vision / Phi-3.5-vision ONNX model.

    Args:
        model: A local model folder, a Hugging Face repo id, or None for the default official model.
        device: "auto" (CUDA when a GPU is really usable, else CPU), "cpu", "cuda" or "dml".
        threads: CPU threads per session; default all cores available to this process.
        options: Default generation options for this model (each call may override them).
        preprocessor: "auto", "phi-onnx" (our HD transform, honours num_crops) or "onnxruntime-genai" (og's own
            processor: always 16 crops).
        max_frames: Most frames taken from an animated image or a folder of frames (sampled evenly).
        variant: For a Hub repo: "auto", "cpu-int4", "gpu-int4" or a folder in the repo.
        revision: For a Hub repo: a branch, tag or commit.
        frame_sampling: For video files: "uniform" (frames evenly over the clip) or "scenes" (the first frame of each
            shot, topped up or thinned to max_frames).
        frame_times: Put each video frame's time (e.g. ``[0:12.5]``) before its image tag in the prompt, for "when
            does X happen" questions (prompt mode).
        token_ids: "microsoft" (default): the ids Microsoft's Phi3VProcessor gives, with ``<s>`` at the start and after
            every image, as the model was tuned and evaluated; "onnxruntime-genai": og's processor's ids (no BOS).
        vision: "phi-onnx" (default) runs the vision graph in phi-onnx's own onnxruntime session and caches image
            features; "onnxruntime-genai" leaves it inside og's generator (no feature cache).
        image_cache_mb: Bound of the image feature cache in MB (0: no cache).
        kv_reserve: Tokens of KV room a kept generator has beyond its answer, for follow-up turns (see README).
        kv_pool: Generators kept for stateless ``messages`` callers whose next request extends the conversation.
        kv_pool_mb: Bound of the KV memory those kept generators hold together, in MB.

    Returns:
        A :class:`PhiVision` ready to generate.
    """
    provider = _og.resolve_provider(device)
    if model is None or not Path(model).expanduser().exists():
        from phi_onnx.hub import fetch, resolve_model

        folder = (
            fetch(str(model), variant=variant, cuda=provider == "cuda", revision=revision)
            if model is not None and (variant != "auto" or revision)
            else resolve_model(model, cuda=provider == "cuda")
        )
    else:
        folder = Path(model).expanduser()
    return PhiVision(
        folder,
        provider,
        threads=threads,
        options=options,
        preprocessor=preprocessor,
        max_frames=max_frames,
        token_ids=token_ids,
        frame_sampling=frame_sampling,
        frame_times=frame_times,
        vision=vision,
        image_cache_mb=image_cache_mb,
        kv_reserve=kv_reserve,
        kv_pool=kv_pool,
        kv_pool_mb=kv_pool_mb,
    )


class PhiVision:
    """A loaded model. Create it with :func:`load`."""

    def __init__(
        self,
        folder: Path,
        provider: str,
        *,
        threads: int | None = None,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        preprocessor: str = "auto",
        max_frames: int = DEFAULT_MAX_FRAMES,
        token_ids: str = "microsoft",
        frame_sampling: str = "uniform",
        frame_times: bool = False,
        vision: str = "phi-onnx",
        image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
        kv_reserve: int = DEFAULT_RESERVE_TOKENS,
        kv_pool: int = DEFAULT_POOL_SIZE,
        kv_pool_mb: float = DEFAULT_POOL_MB,
    ) -> None:
        from phi_onnx.sessions import kv_bytes_per_token
        from phi_onnx.video import SAMPLING
        from phi_onnx.vision import check_reuse_options, kv_dtype, open_vision

        check_reuse_options(vision, image_cache_mb, kv_reserve, kv_pool, kv_pool_mb)

        if frame_sampling not in SAMPLING:
            raise OptionsError(f"unknown frame_sampling {frame_sampling!r}: choose one of {', '.join(SAMPLING)}")
        if token_ids not in TOKEN_IDS:
            raise OptionsError(f"unknown token_ids {token_ids!r}: choose one of {', '.join(TOKEN_IDS)}")
        if preprocessor not in PREPROCESSORS:
            raise OptionsError(f"unknown preprocessor '{preprocessor}': choose one of {', '.join(PREPROCESSORS)}")
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise OptionsError(f"max_frames must be a positive whole number, got {max_frames!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OptionsError(f"threads must be a positive whole number, got {threads!r}")
        self.info: ModelInfo = inspect_model(folder)
        self.folder = self.info.folder
        self.device = provider
        self.threads = threads or (_og.default_threads() if provider == "cpu" else None)
        self.options = _as_options(options) if options is not None else GenerationOptions()
        self.preprocessor = preprocessor
        self.max_frames = max_frames
        self.frame_sampling = frame_sampling
        self.frame_times = bool(frame_times)
        self._vision: VisionEncoder | None = None
        vision_file = None
        if vision == "phi-onnx":
            self._vision, vision_file = open_vision(self.info, provider, self.threads, image_cache_mb)
        self._model = _og.open_model(self.folder, provider, self.threads, vision_file, self.info.config)
        # onnxruntime keeps the weight files mapped after packing them: give their pages back (see phi_onnx.memory)
        self.released_bytes = release_mapped_weights(self.folder)
        self.kv_reserve = kv_reserve
        self.kv_token_bytes = kv_bytes_per_token(self.info.config, kv_dtype(self.info))
        self.sessions = SessionPool(kv_pool, int(kv_pool_mb * 2**20))  # live generators for stateless callers
        self._probe: dict[str, Any] | None = None  # tests: see phi_onnx.runner
        self._pixel_dtype = _pixel_dtype(self.info)
        self._tokenizer = _og.Tokenizer(self._model, self.folder)
        self.reserved_tokens: tuple[str, ...] = added_tokens(self.folder)
        self.token_ids = token_ids
        self._bos = self._tokenizer.bos_id() if token_ids == "microsoft" else None
        self.vocab_size = int(self.info.config["model"].get("vocab_size") or 0) or None
        ends = end_tokens(self._tokenizer)
        self._eos = frozenset(self.info.eos_token_ids) | frozenset(ends)
        self._turn_end = frozenset(ends[:1])  # <|end|>: where a history's answer ends
        self._hd = HDCache(self.info.crop_slots)
        self._pre_cache = self._hd.items
        self._guidance_ok: set[tuple[str, str]] = set()
        self._pre_lock = threading.Lock()  # shared state may be used by threads serving several requests

    def __repr__(self) -> str:
        return f"PhiVision({str(self.folder)!r}, device={self.device!r})"

    @property
    def context_length(self) -> int:
        return self.info.context_length

    def stream(
        self,
        prompt: str | None = None,
        images: Sequence[ImageInput] | ImageInput = (),
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        system: str | None = None,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        **option_values: Any,
    ) -> Iterator[Chunk]:
        """Generate an answer chunk by chunk.

        Give either ``prompt`` (plain text, optionally with ``<|image_N|>`` tags) plus ``images``, or ``messages``
        (OpenAI style: roles system/user/assistant, content a string or a list of text and image parts).

        Args:
            prompt: The question. Without tags, the images go before the text.
            images: Paths, bytes, PIL images, numpy arrays or data: URLs; animated images and folders become frames.
            messages: A conversation instead of prompt and images.
            system: A system prompt, with ``prompt`` (with messages, give a system message instead).
            options: Generation options (a GenerationOptions or a dict); keywords override single fields.

        Returns:
            An iterator of chunks of new text with running numbers; the last carries ``finish_reason``. Inputs are
            checked and images decoded before this returns, so bad input raises here, not mid-stream.
        """
        start = time.perf_counter()
        opts = self._options(options, option_values)
        pool = self.sessions if messages is not None else None  # prompt-mode calls have no history to continue
        return self._stream(start, opts, pool, prompt, images, messages, system)

    def _stream(self, start: float, opts: GenerationOptions, pool: SessionPool | None, *request) -> Iterator[Chunk]:
        """Check and prepare a request (``prompt, images, messages, system``), then run it (thread-safe)."""
        from phi_onnx.runner import run

        prompt, images, messages, system = request
        prepared = self._prepare(prompt, images, messages, system, opts, start, lazy=True)
        return run(self, prepared, opts, start, pool)

    def generate(
        self,
        prompt: str | None = None,
        images: Sequence[ImageInput] | ImageInput = (),
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        system: str | None = None,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        **option_values: Any,
    ) -> Generation:
        """Generate a whole answer; the same arguments as :meth:`stream`."""
        start = time.perf_counter()
        opts = self._options(options, option_values)
        pool = self.sessions if messages is not None else None
        return collect(self._stream(start, opts, pool, prompt, images, messages, system))

    def chat(self, system: str | None = None, **option_values: Any):
        """Start a multi-turn conversation (see :class:`phi_onnx.chat.Chat`)."""
        from phi_onnx.chat import Chat

        return Chat(self, system=system, options=self._options(None, option_values))

    def prepare(
        self,
        prompt: str | None = None,
        images: Sequence[ImageInput] | ImageInput = (),
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        system: str | None = None,
        options: GenerationOptions | None = None,
        start: float | None = None,
    ) -> PreparedInputs:
        """Decode images, run the HD transform and tokenise: the inputs of the folder's own graphs, without generating.

        The token budget is checked from the images' sizes before the HD transform, so a request that cannot fit in
        the context is refused before the expensive step.
        """
        start = time.perf_counter() if start is None else start
        return self._prepare(prompt, images, messages, system, options or self.options, start, lazy=False)

    def count_tokens(
        self,
        prompt: str | None = None,
        images: Sequence[ImageInput] | ImageInput = (),
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        system: str | None = None,
        options: GenerationOptions | None = None,
    ) -> int:
        """The prompt's length in tokens (image tokens included), as :meth:`stream` would feed it.

        Images are decoded and measured but not cut into crops where phi-onnx runs the vision graph (the count follows
        from their sizes), so this costs a fraction of :meth:`prepare`. Raises the errors :meth:`stream` would for a
        prompt that cannot fit in the context.
        """
        opts = options or self.options
        return self._prepare(prompt, images, messages, system, opts, time.perf_counter(), lazy=True).prompt_tokens

    def _prepare(self, prompt, images, messages, system, opts: GenerationOptions, start: float, lazy: bool):
        """:meth:`prepare`; with ``lazy`` and phi-onnx's vision session, the image inputs are image features made on
        demand (from the feature cache where it can), so a continued generator costs no image work at all."""
        from phi_onnx.vision import image_keys

        self._check_options(opts)
        text, frames = self._prompt_and_frames(prompt, images, messages, system)
        num_crops = opts.crops_for(len(frames)) if frames else None
        use_og = self._use_og_processor(num_crops, opts) if frames else False
        crops = [int(f.info.get(CROPS, num_crops)) for f in frames] if not use_og else [16] * len(frames)
        encode = functools.lru_cache(maxsize=None)(self._tokenizer.encode)  # each chunk tokenised once per call
        self._check_budget(text, frames, crops, opts, encode)
        keys = image_keys(frames, crops, self.info.crop_slots, use_og)
        pixels = None
        if use_og:
            inputs = self._og_inputs(text, frames)
            num_crops = 16
            if lazy and self._vision is not None:
                pixels = self._vision.from_og_inputs(inputs, keys)
                inputs = {"input_ids": inputs["input_ids"]}
        elif frames and lazy and self._vision is not None:
            counts = [image_token_count(f.width, f.height, c) for f, c in zip(frames, crops)]
            inputs = {"input_ids": splice_image_tokens(text, encode, counts, bos_id=self._bos)}
            pixels = self._vision.from_frames(frames, crops, keys, self.info.crop_slots)
        elif frames:
            pre = self._hd.transform(frames, crops)
            ids = splice_image_tokens(text, encode, pre.num_image_tokens[:, 0].tolist(), bos_id=self._bos)
            inputs = {
                "input_ids": ids,
                "pixel_values": pre.pixel_values.astype(self._pixel_dtype, copy=False),
                "image_sizes": pre.image_sizes,
                "num_image_tokens": pre.num_image_tokens,
            }
        else:
            inputs = {"input_ids": splice_image_tokens(text, encode, [], bos_id=self._bos)}
        ids = inputs["input_ids"]
        image_tokens = int((ids < 0).sum())
        opts.max_length(ids.shape[1], self.context_length)  # raises ContextLengthError with the numbers
        times = tuple(f.info[TIMESTAMP] for f in frames if TIMESTAMP in f.info)
        elapsed = (time.perf_counter() - start) * 1e3
        return PreparedInputs(inputs, text, int(ids.shape[1]), image_tokens, num_crops, elapsed, times, keys, pixels)

    def check_options(self, options: GenerationOptions | Mapping[str, Any] | None = None) -> GenerationOptions:
        """The options merged over this model's defaults, or the OptionsError :meth:`generate` would raise for them
        (limits of this model's vocabulary and context, a JSON schema, regex or grammar that does not compile), without
        generating. Batch jobs call it once before their first item."""
        opts = options if isinstance(options, GenerationOptions) else self.options.updated(options)
        self._check_options(opts)
        return opts

    def _check_options(self, opts: GenerationOptions) -> None:
        """Limits that come from the model rather than from the option itself."""
        if self.vocab_size is not None and opts.top_k > self.vocab_size:
            raise OptionsError(
                f"top_k is {opts.top_k:,} but this model's vocabulary has {self.vocab_size:,} tokens: use top_k <= "
                f"{self.vocab_size:,} (0 means no limit)"
            )
        opts.max_length(1, self.context_length)  # max_new_tokens alone may already exceed the context
        guidance = opts.guidance()
        if guidance is not None and guidance not in self._guidance_ok:
            _og.check_guidance(self._model, guidance)
            with self._pre_lock:  # compiled once per distinct schema / regex / grammar; bounded for long-lived servers
                if len(self._guidance_ok) >= _GUIDANCE_CHECKED:
                    self._guidance_ok.clear()
                self._guidance_ok.add(guidance)

    def _check_budget(self, text: str, frames: list, crops: list[int], opts: GenerationOptions, encode) -> None:
        """Refuse a prompt whose image tokens (known from the image sizes) and text cannot fit, before any HD work.

        The text chunks are tokenised here exactly as :func:`splice_image_tokens` will (``encode`` is memoised by the
        caller, so they are tokenised once), BOS ids included: the count is the prompt's real length.
        """
        if not frames:
            return  # nothing expensive happens before the exact check after tokenisation
        image_tokens = sum(image_token_count(f.width, f.height, c) for f, c in zip(frames, crops))
        chunks = IMAGE_TAG.split(text)[::2]
        text_tokens = sum(len(encode(c)) for c in chunks if c) + (len(chunks) if self._bos is not None else 0)
        opts.max_length(image_tokens + text_tokens, self.context_length)

    def _og_inputs(self, text: str, frames: list) -> dict[str, np.ndarray]:
        try:
            return _og.processor_inputs(self._model, text, [_og.png_bytes(f) for f in frames])
        except RuntimeError as err:
            raise ModelError(
                f"onnxruntime-genai's processor failed on {self.folder} ({_og.first_line(err)}): check "
                "processor_config.json, or use preprocessor='phi-onnx'"
            ) from err

    def _prompt_and_frames(self, prompt, images, messages, system) -> tuple[str, list]:
        if messages is not None:
            if prompt is not None or _as_list(images):
                raise OptionsError("give either messages, or a prompt with images, not both")
            if system is not None:
                raise OptionsError("with messages, give the system prompt as a {'role': 'system'} message")
            expanded = [expand_message(m, self.max_frames, self.frame_sampling) for m in messages]
            built = build_prompt(expanded, self.reserved_tokens)
            return built.text, list(built.images)
        if prompt is None:
            raise OptionsError("nothing to answer: give a prompt (and images) or messages")
        if not isinstance(prompt, str):
            raise OptionsError(f"prompt must be a string, got {type(prompt).__name__}")
        frames = [
            f
            for src in _as_list(images)
            for f in load_frames(src, max_frames=self.max_frames, sampling=self.frame_sampling)
        ]
        labels = [time_label(f) for f in frames] if self.frame_times else None
        text = prompt_from_text(prompt, len(frames), system=system, reserved=self.reserved_tokens, labels=labels)
        return text, frames

    def _use_og_processor(self, num_crops: int, opts: GenerationOptions) -> bool:
        if self.preprocessor == "onnxruntime-genai":
            if opts.num_crops is not None and opts.num_crops != 16:
                raise OptionsError(
                    f"num_crops {opts.num_crops} cannot be honoured: onnxruntime-genai's processor always cuts 16 "
                    "crops; drop num_crops or use preprocessor='phi-onnx'"
                )
            return True
        slots = self.info.crop_slots
        if slots is not None and num_crops + 1 > slots:
            if self.preprocessor == "phi-onnx":
                raise OptionsError(
                    f"num_crops {num_crops} needs {num_crops + 1} crop slots but this model's vision graph has "
                    f"{slots}: use num_crops <= {slots - 1}"
                )
            warnings.warn(
                f"this model's vision graph fixes {slots} crop slots; num_crops {num_crops} does not fit, so "
                "onnxruntime-genai's own processor (16 crops) is used instead",
                stacklevel=4,
            )
            return True
        return False

    def _options(self, options, values: Mapping[str, Any]) -> GenerationOptions:
        base = self.options if options is None else _as_options(options)
        return base.updated(values) if values else base


def _pixel_dtype(info: ModelInfo) -> np.dtype:
    """The dtype the vision graph declares for pixel_values (float16 in CUDA builds, float32 otherwise)."""
    name = info.config["model"].get("vision", {}).get("inputs", {}).get("pixel_values", "pixel_values")
    declared = info.vision.input(name)
    return np.dtype(np.float16 if declared is not None and declared.dtype == "float16" else np.float32)


def _as_options(options: GenerationOptions | Mapping[str, Any]) -> GenerationOptions:
    if isinstance(options, GenerationOptions):
        return options
    if isinstance(options, Mapping):
        return GenerationOptions.from_mapping(options)
    raise OptionsError(f"options must be a GenerationOptions or a dict, got {type(options).__name__}")


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, bytes, Path)) or not isinstance(images, Sequence):
        return [images]
    return list(images)
