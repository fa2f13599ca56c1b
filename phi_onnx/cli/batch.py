"""`phi-onnx batch`: a resumable job over a folder of images, a JSONL of requests or a CSV, locally or on Ray."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from phi_onnx.cli.main import _load, _options, model_flags, option_flags


@click.command()
@click.argument("source", metavar="INPUT")
@click.argument("model", required=False)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSONL result file; an existing one is resumed (ids in it are skipped).",
)
@click.option("-p", "--prompt", default=None, help="The question for folder items (and items that give none).")
@click.option("-s", "--system", default=None, help="A system prompt for items that give none.")
@click.option("--image-column", default=None, help="CSV: the column with image paths (default: image, path, ...).")
@click.option("--max-frames", type=click.IntRange(min=1), default=16, show_default=True, help="Most frames per video.")
@click.option("--allow-remote-images", is_flag=True,
              help="Fetch http(s) image URLs (public addresses only, as phi-onnx serve does).")  # fmt: skip
@click.option("--allow-private-networks", is_flag=True, help="With --allow-remote-images: private addresses too.")
@click.option("--retry-errors", is_flag=True, help="Run again the items whose line in OUTPUT is an error.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line on stderr.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray Data: alone, a local instance; or a cluster address (auto, ray://head:10001).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --ray: model replicas (Ray actors), each loading the model once.",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    default=None,
    help="With --ray: GPUs per worker (default 1 when the cluster has GPUs, else 0).",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --ray: CPUs reserved per worker (default 1); CPU workers use this many threads.",
)
@option_flags
@model_flags
def batch(
    source: str,
    model: str | None,
    output: Path,
    prompt: str | None,
    system: str | None,
    image_column: str | None,
    retry_errors: bool,
    quiet: bool,
    ray_address: str | None,
    workers: int,
    gpus_per_worker: float | None,
    cpus_per_worker: float | None,
    **kw: Any,
) -> None:
    """Answer many inputs, one JSON line each in OUTPUT; rerun the same command to resume.

    INPUT is a folder of images and videos (with --prompt), a .jsonl file of requests ({"id", "prompt", "images"},
    {"id", "messages"}, or OpenAI batch lines {"custom_id", "body"}; options such as json_schema or max_new_tokens per
    line), or a .csv file with an image column (and optional id and prompt columns). Paths are relative to the file.
    A bad item gets an error line and the job goes on. Each line carries the id, the answer (the parsed JSON value
    with --json-schema or a per-line json_schema), token counts and timings.

    \b
    Examples:
      phi-onnx batch ./scans --prompt "Extract the total." --json-schema total.json -o totals.jsonl
      phi-onnx batch requests.jsonl ./my-model -o results.jsonl --max-new-tokens 128
      phi-onnx batch photos.csv --image-column file --prompt "Caption this photo." -o captions.jsonl
      phi-onnx batch ./scans -p "Describe it." -o out.jsonl --ray --workers 2          # Ray Data, local
      phi-onnx batch ./scans -p "Describe it." -o out.jsonl --ray auto --workers 8     # an existing cluster
    """
    from phi_onnx.batch import check_output, read_requests
    from phi_onnx.batch.job import not_done
    from phi_onnx.errors import BatchError
    from phi_onnx.options import GenerationOptions

    if ray_address is None and (workers != 1 or gpus_per_worker is not None or cpus_per_worker is not None):
        raise click.UsageError("--workers, --gpus-per-worker and --cpus-per-worker need --ray")
    if ray_address is not None and ray_address != "local" and Path(ray_address).expanduser().exists():
        raise click.UsageError(
            f"--ray took {ray_address!r} as the cluster address: put --ray after the arguments, or write --ray=ADDRESS"
        )
    remote = None
    if kw.get("allow_remote_images"):
        remote = "private" if kw.get("allow_private_networks") else "public"
    elif kw.get("allow_private_networks"):
        raise BatchError("--allow-private-networks needs --allow-remote-images: add it, or drop the first")
    requests = read_requests(source, prompt=prompt, system=system, image_column=image_column, remote_images=remote)
    options = GenerationOptions.from_mapping(_options(kw))
    done, to_retry = check_output(
        output, inputs=[source], requests=requests, retry_errors=retry_errors
    )  # before any model loads
    if not to_retry and not not_done(requests, done):
        click.echo(f"batch: all {len(requests)} items are already in {output}; nothing to do", err=True)
        return
    try:
        if ray_address is not None:
            from phi_onnx.batch.ray import RayJob

            job = RayJob(
                model,
                address=ray_address,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                cpus_per_worker=cpus_per_worker,
                load_options=_load_options(kw),
            )
            summary = job.run(requests, output, options=options, progress=not quiet, retry_errors=retry_errors)
        else:
            from phi_onnx.batch import run_job

            lm = _load(model, kw)
            summary = run_job(lm, requests, output, options=options, progress=not quiet, retry_errors=retry_errors)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting must not print a traceback
        click.echo(f"\ninterrupted: finished items are in {output}; run the same command to resume", err=True)
        sys.exit(130)
    rate = f", {summary.items_per_s:.2f} items/s" if summary.done else ""
    if ray_address is not None and summary.first_result_s is not None:
        rate += f" (first result after {summary.first_result_s:.1f} s: Ray and model start-up)"
    click.echo(
        f"batch: {summary.done} done ({summary.failed} failed) in {summary.seconds:.1f} s{rate}, "
        f"{summary.skipped} skipped; results in {output}",
        err=True,
    )


def _load_options(kw: dict[str, Any]) -> dict[str, Any]:
    """The load() keywords the CLI flags give, for Ray workers to load the model the same way."""
    return {
        "device": kw["device"],
        "threads": kw["threads"],
        "preprocessor": kw["preprocessor"],
        "variant": kw["variant"],
        "max_frames": kw.get("max_frames") or 16,
        "frame_sampling": kw.get("frame_sampling") or "uniform",
        "frame_times": bool(kw.get("frame_times")),
    }
