"""The one place that calls onnxruntime-genai.

The og Python API has changed between releases (0.4 -> 0.18: ``compute_logits`` went away, ``set_inputs`` and
``append_tokens`` arrived, NamedTensors became assignable). Every call the package makes goes through here, so a new
release means one module to adapt.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from phi_onnx.errors import DependencyError, ModelError, OptionsError, ProviderError

PROVIDERS = ("cpu", "cuda", "dml")
_SESSION_GRAPHS = ("decoder", "vision", "embedding")


@functools.cache
def og() -> ModuleType:
    """Import onnxruntime_genai or raise a DependencyError naming the package to install."""
    try:
        import onnxruntime_genai
    except ImportError as err:
        raise DependencyError(
            "onnxruntime-genai is not installed: pip install 'phi-onnx[cpu]' (or 'phi-onnx[cuda]' on an NVIDIA GPU)"
        ) from err
    return onnxruntime_genai


def version() -> str:
    return getattr(og(), "__version__", "unknown")


@functools.cache
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a GPU or driver).

    ``og.is_cuda_available()`` only says the CUDA build of onnxruntime-genai is installed; it answers True on machines
    with no GPU at all, so ask the driver itself.
    """
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def provider_status() -> dict[str, str | None]:
    """For each provider: None if usable here, else why not (with the package to install)."""
    mod = og()
    status: dict[str, str | None] = {"cpu": None}
    if not _safe(mod, "is_cuda_available"):
        status["cuda"] = "the installed onnxruntime-genai has no CUDA support: pip install 'phi-onnx[cuda]'"
    elif cuda_device_count() == 0:
        status["cuda"] = "no NVIDIA GPU or driver found on this machine"
    else:
        status["cuda"] = None
    status["dml"] = None if _safe(mod, "is_dml_available") else "DirectML needs Windows and onnxruntime-genai-directml"
    return status


def _safe(mod: ModuleType, fn: str) -> bool:
    try:
        return bool(getattr(mod, fn)())
    except Exception:
        return False


def resolve_provider(device: str) -> str:
    """Map "auto" | "cpu" | "cuda" | "dml" (also "gpu" for cuda) to a usable provider, or raise ProviderError."""
    if not isinstance(device, str):
        raise ProviderError(f"device must be a string (auto, cpu, cuda or dml), got {device!r}")
    asked = device.lower().strip()
    asked = "cuda" if asked == "gpu" else asked
    status = provider_status()
    if asked == "auto":
        return "cuda" if status["cuda"] is None else "cpu"
    if asked not in PROVIDERS:
        raise ProviderError(f"unknown device '{device}': choose auto, cpu, cuda or dml")
    reason = status[asked]
    if reason is not None:
        available = ", ".join(p for p, why in status.items() if why is None)
        named = f"'{device}' (CUDA)" if asked != device.lower().strip() else f"'{asked}'"
        raise ProviderError(f"device {named} is not available ({reason}); available here: {available}")
    return asked


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_session_options(threads: int) -> dict[str, Any]:
    """The onnxruntime session options phi-onnx gives each of the three graphs on the CPU."""
    return {"intra_op_num_threads": threads, "inter_op_num_threads": 1}


def custom_ops_library(folder: Path, config: Mapping[str, Any]) -> Path | None:
    """The operator library a graph's genai_config session options name (``custom_ops_library``, relative to the
    model folder, as onnxruntime-genai resolves it), for the onnxruntime sessions phi-onnx opens itself. A name that
    leaves the folder or does not exist is a one-line ModelError, as og refuses it too."""
    name = config.get("custom_ops_library")
    if not name:
        return None
    relative = Path(str(name))
    if relative.is_absolute() or ".." in relative.parts:  # og refuses these too (the file may be a link: HF caches)
        raise ModelError(f"genai_config.json names a custom_ops_library outside {folder} ({name}): re-export the model")
    path = folder / relative
    if not path.is_file():
        raise ModelError(
            f"{folder} lacks {name}, the operator library its genai_config.json names: re-export the model"
        )
    return path


def session_overlay(provider: str, threads: int | None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The genai_config overlay phi-onnx applies: on the CPU, the thread settings on all three phi3v sessions.

    onnxruntime's default is not "all cores" everywhere (with default settings onnxruntime-genai ran on one core of
    this project's 2-core machines), so the count is always explicit. og's overlay replaces a graph's
    ``session_options`` as a whole, so each graph's options from the folder's ``config`` (its genai_config.json) are
    carried over under phi-onnx's: the operator library of phi-onnx's CPU builds among them.
    """
    if provider != "cpu":
        return {}
    options = cpu_session_options(threads or default_threads())
    graphs = config.get("model", {}) if isinstance(config, Mapping) else {}

    def own(graph: str) -> dict[str, Any]:
        settings = graphs.get(graph) if isinstance(graphs, Mapping) else None
        found = settings.get("session_options") if isinstance(settings, Mapping) else None
        return dict(found) if isinstance(found, Mapping) else {}

    return {"model": {graph: {"session_options": {**own(graph), **options}} for graph in _SESSION_GRAPHS}}


def open_model(
    folder: Path,
    provider: str,
    threads: int | None,
    vision_file: str | None = None,
    config: Mapping[str, Any] | None = None,
):
    """Create ``og.Model`` for a phi3v folder on a provider, with :func:`session_overlay` applied.

    ``vision_file`` replaces the vision graph; it must be a path relative to the folder (og joins it to the folder as
    a string, so an absolute path does not work). ``config``: the folder's genai_config.json as already read (read
    here if not given).
    """
    mod = og()
    if config is None:
        try:
            config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}  # og reports an unreadable config itself
    try:
        og_config = mod.Config(str(folder))
        og_config.clear_providers()
        if provider != "cpu":
            og_config.append_provider(provider)
        overlay = session_overlay(provider, threads, config)
        if vision_file is not None:
            overlay.setdefault("model", {}).setdefault("vision", {})["filename"] = vision_file
        if overlay:
            og_config.overlay(json.dumps(overlay))
        return mod.Model(og_config)
    except RuntimeError as err:
        raise ModelError(f"onnxruntime-genai could not load {folder}: {first_line(err)}") from err


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (for one-line errors)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Tokenizer:
    """og's tokenizer: encoding without BOS (as og's Phi processor does) and streaming decode."""

    def __init__(self, model, folder: Path | None = None) -> None:
        try:
            self._tok = og().Tokenizer(model)
        except RuntimeError as err:
            where = f"the tokenizer files in {folder}" if folder is not None else "the model's tokenizer"
            raise ModelError(
                f"onnxruntime-genai could not load {where} ({first_line(err)}): re-download or re-export the "
                "tokenizer.json and tokenizer_config.json"
            ) from err

    def bos_id(self) -> int:
        """The BOS id (``<s>``, 1 in Phi-3's vocabulary)."""
        try:
            return int(self._tok.bos_token_id)
        except (AttributeError, TypeError, ValueError):
            return 1

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tok.encode(text)] if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int32))

    def stream(self):
        return self._tok.create_stream()


def _contiguous(value: np.ndarray) -> np.ndarray:
    # og checks numpy's type number, and int64 arrays from some producers carry "longlong" (same bits, other number).
    return np.ascontiguousarray(value, dtype=np.dtype(value.dtype.name))


_GUIDANCE_NAMES = {"json_schema": "json_schema", "regex": "regex", "lark_grammar": "grammar"}


def _new_generator(model, search: Mapping[str, Any], guidance: tuple[str, str] | None):
    mod = og()
    params = mod.GeneratorParams(model)
    params.set_search_options(**search)
    if guidance is None:
        return mod.Generator(model, params), params
    kind, data = guidance
    try:
        params.set_guidance(kind, data)
        return mod.Generator(model, params), params  # the grammar is compiled here
    except RuntimeError as err:
        reason = _grammar_reason(err).removeprefix("Error creating grammar: ")
        raise OptionsError(f"{_GUIDANCE_NAMES.get(kind, kind)} is not usable: {reason}") from err


def _grammar_reason(err: BaseException) -> str:
    """llguidance's message in one line: its first line, and where that ends with "parse error:", the line that says
    what the error is (the regex crate puts it after a caret diagram)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    if text.endswith(":"):
        detail = next((line for line in lines[1:] if line.startswith("error:")), None)
        if detail is not None:
            text = f"{text} {detail.removeprefix('error:').strip()}"
    return text if len(text) <= 300 else text[:297] + "..."


def check_guidance(model, guidance: tuple[str, str]) -> None:
    """Compile a json_schema / regex / Lark grammar on a throwaway generator, so a bad one is an OptionsError
    before any image is processed; llguidance says what is wrong."""
    generator, params = _new_generator(model, {"max_length": 8}, guidance)
    del generator, params


@contextlib.contextmanager
def _generator(
    model, inputs: Mapping[str, np.ndarray], search: Mapping[str, Any], guidance: tuple[str, str] | None = None
):
    """A generator with the prompt inputs set; released on exit (also when a caller abandons its loop)."""
    mod = og()
    generator, params = _new_generator(model, search, guidance)
    try:
        named = mod.NamedTensors()
        for key, value in inputs.items():
            if key == "input_ids":
                value = value.astype(np.int32, copy=False)  # og reads input_ids as int32 whatever the dtype
            named[key] = _contiguous(value)
        generator.set_inputs(named)
        yield generator
    finally:
        del generator
        del params


def run_tokens(
    model, inputs: Mapping[str, np.ndarray], search: Mapping[str, Any], guidance: tuple[str, str] | None = None
) -> Iterator[int]:
    """Run the prompt and yield each generated token id until the search stops.

    ``inputs`` holds ``input_ids`` (int32 [1, S], negative ids mark image slots) and, with images, ``pixel_values``,
    ``image_sizes`` and ``num_image_tokens``. ``guidance`` is (kind, data) for constrained decoding. The generator is
    released as soon as the loop ends or is abandoned.
    """
    with _generator(model, inputs, search, guidance) as generator:
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


def run_tokens_with_logits(
    model, inputs: Mapping[str, np.ndarray], search: Mapping[str, Any]
) -> Iterator[tuple[int, np.ndarray]]:
    """Like :func:`run_tokens`, with the logits the decoder returned at each step (a copy per step: for parity
    checks, not for serving)."""
    with _generator(model, inputs, search) as generator:
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0]), np.array(generator.get_output("logits"))


class LiveGenerator:
    """An og generator that may serve several turns: a prompt, then appended tokens, each followed by a generation.

    What og 0.18 does, checked on the tiny model (tests/test_reuse.py keeps checking it):

    - A generated token is added to the sequence before its KV exists; ``append_tokens`` right after a generation step
      gives wrong tokens unless the logits of that token are computed first (``get_logits``), which :meth:`append`
      does. :attr:`pending` says a token waits for its KV.
    - When og itself stops at an end-of-sequence id, that id is *not* in the sequence and has no KV: the next turn's
      ids bring it back (``<|end|>`` starts them).
    - When og stops at ``max_length`` nothing more can be appended: :attr:`full`.

    :meth:`sequence` is therefore always exactly the ids the KV cache holds once :meth:`append` has run.
    """

    def __init__(self, model, search: Mapping[str, Any], guidance: tuple[str, str] | None = None) -> None:
        self.max_length = int(search["max_length"])
        self.guided = guidance is not None
        self._generator, self._params = _new_generator(model, search, guidance)
        self.pending = False  # the last token of the sequence still lacks its KV
        self.full = False  # og stopped at max_length
        self.probe: list[np.ndarray] | None = None  # tests set a list here to get a copy of each step's logits

    def start(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Set the prompt: input_ids and, with images, pixel_values (or features), image_sizes, num_image_tokens."""
        named = og().NamedTensors()
        for key, value in inputs.items():
            if key == "input_ids":
                value = value.astype(np.int32, copy=False)
            named[key] = _contiguous(value)
        self._generator.set_inputs(named)
        self.pending = False

    def append(self, ids: Sequence[int], min_length: int = 0) -> None:
        """Prefill more tokens after what the generator holds (text only: no image slots); ``min_length`` is the
        new turn's (og reads the search options at each step, so setting them on a live generator works)."""
        self._params.set_search_options(min_length=min_length)
        if self.pending:
            self._generator.get_logits()  # computes the KV of the last generated token
            self.pending = False
        self._generator.append_tokens(np.asarray(ids, dtype=np.int32))

    @property
    def length(self) -> int:
        """Tokens in the sequence (the KV cache holds them all, or all but a pending one)."""
        return int(self._generator.token_count())

    def tokens(self) -> Iterator[int]:
        """Generate until og stops or the caller stops iterating."""
        generator = self._generator
        while not generator.is_done():
            generator.generate_next_token()
            done = generator.is_done()
            self.pending = not done
            self.full = done and self.length >= self.max_length
            if self.probe is not None:
                self.probe.append(np.array(generator.get_output("logits")).reshape(-1))
            yield int(generator.get_next_tokens()[0])

    def sequence(self) -> list[int]:
        """The ids the generator holds (image slots negative)."""
        return [int(t) for t in self._generator.get_sequence(0)]

    def close(self) -> None:
        self._generator = None
        self._params = None


def processor_inputs(model, prompt: str, png_images: Sequence[bytes]) -> dict[str, np.ndarray]:
    """og's own MultiModalProcessor (always 16 crops). Only ever given images that Pillow decoded and re-encoded:
    og's decoder can abort the process on untrusted input."""
    mod = og()
    processor = model.create_multimodal_processor()
    images = mod.Images.open_bytes(*png_images) if png_images else None
    named = processor(prompt, images=images)
    return {key: _contiguous(np.array(named[key].as_numpy())) for key in named.keys()}  # noqa: SIM118 (og.NamedTensors is not iterable)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
