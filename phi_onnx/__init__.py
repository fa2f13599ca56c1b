"""phi-onnx: Phi-3-vision and Phi-3.5-vision on ONNX Runtime GenAI."""

from phi_onnx.chat import Chat
from phi_onnx.errors import (
    BatchError,
    ContextLengthError,
    DependencyError,
    ExportError,
    FetchError,
    ImageError,
    ModelError,
    OptionsError,
    OutputError,
    PhiOnnxError,
    PromptError,
    ProviderError,
)
from phi_onnx.generation import Chunk, Generation
from phi_onnx.model import PhiVision, load
from phi_onnx.options import GenerationOptions

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "Chat",
    "Chunk",
    "ContextLengthError",
    "DependencyError",
    "ExportError",
    "FetchError",
    "Generation",
    "GenerationOptions",
    "ImageError",
    "ModelError",
    "OptionsError",
    "OutputError",
    "PhiOnnxError",
    "PhiVision",
    "PromptError",
    "ProviderError",
    "__version__",
    "load",
]
