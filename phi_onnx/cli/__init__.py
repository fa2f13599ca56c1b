"""The phi-onnx command line (thin click commands over the library)."""

from phi_onnx.cli.main import main

__all__ = ["main"]
