"""`python -m phi_onnx` runs the CLI."""

from phi_onnx.cli import main

if __name__ == "__main__":
    main()
