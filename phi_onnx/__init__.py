"""phi-onnx: Phi-3-vision and Phi-3.5-vision on ONNX Runtime GenAI."""

from phi_onnx.errors import (
    ContextLengthError,
    DependencyError,
    ExportError,
    FetchError,
    ImageError,
    ModelError,
    OptionsError,
    PhiOnnxError,
    PromptError,
    ProviderError,
)

__version__ = "0.1.0"

__all__ = [
    "ContextLengthError",
    "DependencyError",
    "ExportError",
    "FetchError",
    "ImageError",
    "ModelError",
    "OptionsError",
    "PhiOnnxError",
    "PromptError",
    "ProviderError",
    "__version__",
]
