"""The exceptions phi-onnx raises.

Every error the package raises on purpose derives from :class:`PhiOnnxError`, and most also subclass the builtin they
resemble, so callers can catch either. Messages say what was wrong, with the numbers, and how to fix it; the CLI
prints them as one line and exits with code 2.
"""

from __future__ import annotations


class PhiOnnxError(Exception):
    """Base class of every error phi-onnx raises on purpose."""


class OptionsError(PhiOnnxError, ValueError):
    """A generation option is unknown or out of range."""


class ImageError(PhiOnnxError, ValueError):
    """An image could not be read, is not an image, is truncated, empty or too large."""


class PromptError(PhiOnnxError, ValueError):
    """The prompt or messages are malformed, or their image tags do not match the images."""


class ContextLengthError(PhiOnnxError, ValueError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


class OutputError(PhiOnnxError, ValueError):
    """The generated text is not what was asked for (e.g. not JSON, or cut off before the value was complete)."""


class BatchError(PhiOnnxError, ValueError):
    """A batch job's input or output file is unusable (missing, of an unknown kind, duplicate ids, not our results)."""


class ModelError(PhiOnnxError, ValueError):
    """A model folder is missing, incomplete, or not a phi3v model."""


class ProviderError(PhiOnnxError, RuntimeError):
    """The execution provider asked for is not available on this machine."""


class DependencyError(PhiOnnxError, ImportError):
    """An optional package is needed for this operation and is not installed."""


class FetchError(PhiOnnxError, RuntimeError):
    """Downloading or verifying a model from the Hugging Face Hub failed."""


class ExportError(PhiOnnxError, RuntimeError):
    """Building ONNX graphs from a PyTorch checkpoint failed, or its input was invalid."""


def require(module: str, *, extra: str, purpose: str):
    """Import an optional module or raise a DependencyError with the install hint.

    Args:
        module: The module to import, e.g. ``"torch"``.
        extra: The phi-onnx extra that provides it, e.g. ``"export"``.
        purpose: What it is needed for, for the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DependencyError(
            f"{purpose} needs the '{module}' package, which is not installed: pip install 'phi-onnx[{extra}]'"
        ) from err
