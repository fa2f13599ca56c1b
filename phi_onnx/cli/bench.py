"""`phi-onnx bench`: onnxruntime-genai against the PyTorch reference on the same weights and inputs."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from phi_onnx.errors import OptionsError, PhiOnnxError, require

EXAMPLE_IMAGE = Path(__file__).parents[1] / "assets" / "example.jpg"
SIZES = ("tiny", "bench", "full")
PRECISIONS = ("fp32", "int4")
TORCH_PRECISIONS = ("fp32", "bf16")
DEFAULT_PROMPT = "Describe this image in detail."


class _OneLineErrors(click.Command):
    """Bad arguments and phi-onnx errors as one line on stderr with exit code 2 (also when run on its own)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:  # fmt: skip
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            raise _Fail(err.format_message()) from err

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PhiOnnxError as err:
            raise _Fail(str(err)) from err


class _Fail(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:  # always stderr, whatever click passes
        click.echo(f"error: {self.message}", err=True)


def _check(value: int | None, name: str, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise OptionsError(f"{name} is {value}, outside {low}..{high}")


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A model folder to run through onnxruntime-genai (repeatable).",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="The PyTorch checkpoint the --model folders were built from (the PyTorch path).",
)
@click.option(
    "--size",
    type=click.Choice(SIZES),
    default=None,
    help="Build (once, cached) a random checkpoint of this size and its folders, and compare them. "
    "Default when neither --model nor --checkpoint is given: bench.",
)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(PRECISIONS),
    help="Folders to build with --size (repeatable; default fp32 and int4).",
)
@click.option(
    "--against",
    type=click.Choice(["pytorch", "none"]),
    default=None,
    help="Compare with the PyTorch reference (default when a checkpoint is known) or not.",
)
@click.option(
    "--torch-precision",
    "torch_precisions",
    multiple=True,
    type=click.Choice(TORCH_PRECISIONS),
    help="PyTorch paths to run (repeatable; default fp32 and bf16). bf16 loads bfloat16 weights and runs under "
    "torch.autocast; it is skipped, with the reason, on CPUs without AVX512-BF16 or AMX.",
)
@click.option("--compile", "compile_", is_flag=True, help="Also run each PyTorch path under torch.compile.")
@click.option(
    "-i",
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image for every run (repeatable; default: the bundled 600x400 example.jpg).",
)
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True, help="The question.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Tokens generated per run (fixed).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per num_crops and path.")
@click.option("--repeat", type=int, default=5, show_default=True, help="Timed runs per num_crops and path.")
@click.option(
    "--num-crops", "num_crops", multiple=True, type=int, help="HD crops per image (repeatable; default 16 and 4)."
)
@click.option("--threads", type=int, default=None, help="CPU threads for every path (default: all cores).")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None, help="Write every figure here.")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), default=None,
              help="Write a PNG chart here (needs matplotlib: pip install 'phi-onnx[bench]').")  # fmt: skip
@click.option("--scaling", is_flag=True,
              help="Time to first token against prompt size instead: 1, 2, 4 and 8 copies of the image at 4 crops, "
              "and one image at 1, 4, 9 and 16 crops, every path (--plot draws it).")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Show the model builder's and quantizer's own output.")
def bench(models: tuple[Path, ...], checkpoint: Path | None, size: str | None, precisions: tuple[str, ...],
          against: str | None, torch_precisions: tuple[str, ...], compile_: bool, images: tuple[Path, ...],
          prompt: str, new_tokens: int, warmup: int, repeat: int, num_crops: tuple[int, ...], threads: int | None,
          json_file: Path | None, plot_file: Path | None, scaling: bool, verbose: bool) -> None:  # fmt: skip
    """Time onnxruntime-genai against the PyTorch reference: same weights, images, prompt, greedy decoding and number
    of new tokens; each path in its own process, warm-ups, repetitions, medians and ratios.

    Prints a markdown table on stdout (progress on stderr); --json keeps every figure, --plot draws a chart.

    \b
    Examples:
      phi-onnx bench                                    # random `bench` model: fp32 + int4 folders vs PyTorch
      phi-onnx bench --size tiny --new-tokens 4 --repeat 1
      phi-onnx bench --model ./phi-3.5-v-cpu-int4 --num-crops 4      # any folder, onnxruntime-genai only
      phi-onnx bench --checkpoint ./my-finetune --model ./onnx-fp32 --model ./onnx-int4 --json out.json --plot out.png
      phi-onnx bench --scaling --new-tokens 8 --repeat 3 --plot scaling.png   # first token against prompt size
    """
    from phi_onnx_bench.spec import Workload

    if verbose:
        os.environ["PHI_ONNX_VERBOSE"] = "1"
    _check(new_tokens, "--new-tokens", 1, 4096)
    _check(warmup, "--warmup", 0, 100)
    _check(repeat, "--repeat", 1, 1000)
    _check(threads, "--threads", 1, 1024)
    for c in num_crops:
        _check(c, "--num-crops", 1, 64)
    for image in images:
        if not image.is_file():
            raise OptionsError(f"image {image} does not exist: pass an image file with --image")
    if plot_file is not None:
        require("matplotlib", extra="bench", purpose="--plot")
    if scaling and num_crops:
        raise OptionsError("--scaling chooses the crop settings itself (1, 4, 9, 16; images at 4): drop --num-crops")
    if scaling and len(images) > 1:
        raise OptionsError("--scaling repeats one image 1, 2, 4 and 8 times: give at most one --image")
    work = Workload(
        images=tuple(str(i.resolve()) for i in images) or (str(EXAMPLE_IMAGE),), prompt=prompt,
        new_tokens=new_tokens, warmup=warmup, repeat=repeat, num_crops=tuple(dict.fromkeys(num_crops)) or (16, 4),
        threads=threads,
    )  # fmt: skip
    paths = plan_paths(models, checkpoint, size, precisions, against, compile_, torch_precisions)
    from phi_onnx_bench.report import markdown, plot
    from phi_onnx_bench.runner import run_benchmark

    if scaling:
        from phi_onnx_bench import scaling as series

        result = series.run_scaling(paths, work, command=_command_line(), log=_progress)
        _write_json(json_file, result)
        if plot_file is not None:
            click.echo(f"[bench] wrote {series.plot(result, plot_file)}", err=True)
        sys.stdout.write(series.markdown(result))
        return
    result = run_benchmark(paths, work, command=_command_line())
    _write_json(json_file, result)
    if plot_file is not None:
        click.echo(f"[bench] wrote {plot(result, plot_file)}", err=True)
    sys.stdout.write(markdown(result))


def _progress(message: str) -> None:
    click.echo(f"[bench] {message}", err=True)


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        click.echo(f"[bench] wrote {path}", err=True)


def _command_line() -> str | None:
    """The command as typed (``phi-onnx bench ...``), for the JSON; None when called from Python."""
    argv = sys.argv
    if Path(argv[0]).name == "phi-onnx" and "bench" in argv:
        args = argv[argv.index("bench") + 1 :]
    elif Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name in ("benchmarks", "phi_onnx_bench"):
        args = argv[1:]
    else:
        return None
    return " ".join(["phi-onnx bench", *(shlex.quote(a) for a in args)])


def plan_paths(models: tuple[Path, ...], checkpoint: Path | None, size: str | None, precisions: tuple[str, ...],
               against: str | None, compile_: bool, torch_precisions: tuple[str, ...] = ()) -> list:  # fmt: skip
    """Turn the options into the list of paths to run, validating them before any work."""
    from phi_onnx.hub.modelinfo import inspect_model
    from phi_onnx_bench.spec import PathSpec

    if size is not None and (models or checkpoint is not None):
        raise OptionsError("give either --size or --model/--checkpoint, not both")
    if precisions and size is None and (models or checkpoint is not None):
        raise OptionsError("--precision chooses the folders --size builds; with --model, the folders are given")
    if checkpoint is not None and not models:
        raise OptionsError("--checkpoint needs the folders built from it: add --model DIR (phi-onnx export build "
                           "makes one), or use --size for a random model")  # fmt: skip
    if not models and checkpoint is None:
        size = size or "bench"
    if against == "pytorch" and checkpoint is None and size is None:
        raise OptionsError("--against pytorch needs the checkpoint the folders were built from: add --checkpoint")
    if (compile_ or torch_precisions) and against == "none":
        option = "--compile" if compile_ else "--torch-precision"
        raise OptionsError(f"{option} is for the PyTorch path, which --against none leaves out")
    with_pytorch = against != "none" and (checkpoint is not None or size is not None)
    if with_pytorch or size is not None:
        for module in ("torch", "transformers"):
            require(module, extra="export", purpose="phi-onnx bench with a PyTorch checkpoint or --size")
    for folder in models:
        inspect_model(folder)  # ModelError with the reason when it is not a phi3v folder
    if checkpoint is not None:
        from phi_onnx_export.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(checkpoint)
    folders: dict[str, Path] = {}
    if size is not None:
        from phi_onnx_bench.models import bench_models

        checkpoint, built = bench_models(size, precisions or PRECISIONS)
        folders = {f"ort-{p}": folder for p, folder in built.items()}
    else:
        for folder in models:
            label = f"ort-{folder_precision(folder)}"
            folders[label if label not in folders else f"{label}:{folder.name}"] = folder
    paths = [PathSpec(label, "onnxruntime-genai", str(f), precision=label.split("-", 1)[1].split(":")[0])
             for label, f in folders.items()]  # fmt: skip
    if with_pytorch:
        for precision in torch_precisions or TORCH_PRECISIONS:
            label = "pytorch" if precision == "fp32" else f"pytorch-{precision}"
            paths.append(PathSpec(label, "pytorch", str(checkpoint), precision=precision))
            if compile_:
                paths.append(
                    PathSpec(f"{label}-compile", "pytorch", str(checkpoint), compile=True, precision=precision)
                )
    return paths


def folder_precision(folder: Path) -> str:
    """ "int4" when the decoder holds MatMulNBits, else the dtype of its inputs_embeds ("fp16" or "fp32")."""
    from phi_onnx.hub.modelinfo import inspect_model

    info = inspect_model(folder)
    with open(info.decoder.path, "rb") as f:
        head = f.read(64 * 2**20)  # nodes come before the initializers in the file
    if b"MatMulNBits" in head:
        return "int4"
    embeds = info.decoder.input("inputs_embeds")
    return "fp16" if embeds is not None and embeds.dtype == "float16" else "fp32"
