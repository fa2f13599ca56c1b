"""``python -m phi_onnx_bench``: the same command as ``phi-onnx bench``."""

from phi_onnx.cli.bench import bench

bench(prog_name="phi-onnx bench")
