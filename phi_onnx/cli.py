"""The phi-onnx command line."""

import click


@click.group()
def main() -> None:
    """Run Phi-3-vision / Phi-3.5-vision on ONNX Runtime GenAI."""
