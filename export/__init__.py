"""The export step: build phi3v ONNX model folders from PyTorch checkpoints (installed as phi_onnx_export)."""
