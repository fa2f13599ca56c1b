"""The latency harness: onnxruntime-genai against PyTorch on the same weights (installed as phi_onnx_bench)."""
