"""What installing phi-onnx puts on a machine, and what importing the runtime pulls in."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_no_generic_top_level_modules(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("phi_onnx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"phi_onnx", "phi_onnx_export", "phi_onnx_bench", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert "phi_onnx/assets/example.jpg" in names, "the example image ships with the package"
    assert "phi_onnx_export/modeling.py" in names
    for init in sorted((ROOT / "phi_onnx").glob("*/__init__.py")):  # every subpackage ships (server, batch, ...)
        assert f"phi_onnx/{init.parent.name}/__init__.py" in names, f"pyproject's packages lacks {init.parent.name}"


def test_runtime_and_cli_import_without_torch():
    code = (
        "import sys, phi_onnx, phi_onnx.cli, phi_onnx.hub, phi_onnx.model, phi_onnx.preprocess\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the runtime imported {done.stdout.strip()}"
