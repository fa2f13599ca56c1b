"""`phi-onnx export`: build model folders from PyTorch checkpoints (needs the `export` extra)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from phi_onnx.errors import require


def _export_modules(purpose: str):
    require("torch", extra="export", purpose=purpose)
    require("transformers", extra="export", purpose=purpose)
    require("onnx", extra="export", purpose=purpose)
    import phi_onnx_export

    return phi_onnx_export


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show the model builder's and quantizer's own progress output.")
def export(verbose: bool) -> None:
    """Build onnxruntime-genai model folders from Phi-3-V PyTorch checkpoints.

    \b
    Examples:
      phi-onnx export build --checkpoint ./my-finetune --output ./onnx --precision int4 --device cpu
      phi-onnx export tiny --output ./tiny
      phi-onnx export verify ./tiny --checkpoint ./tiny.checkpoint
      phi-onnx export -v tiny --output ./tiny        # with the builder's progress bars
    """
    if verbose:
        os.environ["PHI_ONNX_VERBOSE"] = "1"


@export.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Hugging Face phi3_v folder.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Folder to create.")
@click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 (cuda) or int4.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: the provider the graphs target.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option(
    "--int8-prefill/--no-int8-prefill",
    default=None,
    help="CPU int4: an int8 weight copy for the prompt pass (faster first token, more memory). Default on.",
)
@click.option(
    "--portable",
    is_flag=True,
    help="CPU: onnxruntime's own attention kernels only, no native library in the folder (to share it; slower "
    "first token on long prompts).",
)
def build(
    checkpoint: Path, output: Path, precision: str, device: str, force: bool, int8_prefill: bool | None, portable: bool
) -> None:
    """Export vision, embedding and decoder graphs plus configs from a checkpoint.

    \b
    Examples:
      phi-onnx export build --checkpoint ./Phi-3.5-vision-instruct --output ./onnx-cpu --precision int4
      phi-onnx export build --checkpoint ./my-finetune --output ./onnx-cuda --precision fp16 --device cuda
      phi-onnx export build --checkpoint ./ckpt --output ./small --precision int4 --no-int8-prefill   # least memory
      phi-onnx export build --checkpoint ./ckpt --output ./share --precision int4 --portable   # to upload to the Hub
    """
    from phi_onnx_export.build import check_plan

    check_plan(checkpoint, output, precision, device, force, int8_prefill, portable)  # validate before heavy imports
    _export_modules("phi-onnx export build")
    from phi_onnx_export.build import build as do_build

    folder = do_build(checkpoint, output, precision, device, force=force, int8_prefill=int8_prefill, portable=portable)
    click.echo(str(folder))


@export.command()
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Model folder to create.")
@click.option("--size", type=click.Choice(["tiny", "bench", "full"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 (cuda) or int4.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Where to keep the random checkpoint (default: OUTPUT.checkpoint beside the model).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace existing folders.")
def tiny(output: Path, size: str, seed: int, precision: str, device: str, checkpoint: Path | None, force: bool) -> None:
    """Write a random-weight Phi-3-V checkpoint with the real architecture and build it.

    The checkpoint (official layout) stays beside the model for `phi-onnx export verify` and benchmarks.

    \b
    Examples:
      phi-onnx export tiny --output ./tiny
      phi-onnx export tiny --output ./bench-int4 --size bench --precision int4
    """
    from phi_onnx.errors import ExportError

    _export_modules("phi-onnx export tiny")
    from phi_onnx_export.build import build as do_build
    from phi_onnx_export.build import check_options, check_plan
    from phi_onnx_export.tiny import write_random_checkpoint

    checkpoint = checkpoint or output.with_name(output.name + ".checkpoint")
    if checkpoint.exists() and not checkpoint.is_dir():
        raise ExportError(f"checkpoint {checkpoint} exists and is not a folder: choose another --checkpoint")
    if checkpoint.exists() and any(checkpoint.iterdir()) and not force:
        raise ExportError(f"checkpoint folder {checkpoint} is not empty: choose another --output or pass --force")
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is not a folder: choose another --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(f"output folder {output} is not empty: choose another --output or pass --force to replace it")
    check_options(precision, device)  # before anything is written
    created = not checkpoint.exists()
    try:
        click.echo(f"[export] writing a random {size} checkpoint (seed {seed}) to {checkpoint}", err=True)
        write_random_checkpoint(checkpoint, size=size, seed=seed)
        check_plan(checkpoint, output, precision, device, force)
        click.echo(str(do_build(checkpoint, output, precision, device, force=force)))
    except BaseException:
        if created:  # a failed command leaves nothing behind
            shutil.rmtree(checkpoint, ignore_errors=True)
        raise


@export.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="The checkpoint it was built from.")
@click.option("--new-tokens", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    default=None,
    help="For fp16/int4 builds: fail unless this fraction of greedy tokens agrees (otherwise only reported).",
)
def verify(model_dir: Path, checkpoint: Path, new_tokens: int, min_agreement: float | None) -> None:
    """Check a built folder against the PyTorch reference: token counts, prompt logits, greedy tokens.

    \b
    Examples:
      phi-onnx export verify ./tiny --checkpoint ./tiny.checkpoint
      phi-onnx export verify ./tiny-int4 --checkpoint ./tiny-int4.checkpoint --min-agreement 0.5
    """
    _export_modules("phi-onnx export verify")
    from phi_onnx_export.verify import verify as do_verify

    report = do_verify(model_dir, checkpoint, new_tokens=new_tokens, min_agreement=min_agreement)
    click.echo(report.render())
    if not report.passed:
        sys.exit(1)
