"""The phi-onnx command line: run, chat, serve, batch, fetch, info, export, bench.

Generated text goes to stdout; progress, stats and warnings to stderr. Package errors become one line on stderr and
exit code 2; unexpected exceptions keep their traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from phi_onnx.errors import PhiOnnxError
from phi_onnx.options import FIELDS

EXAMPLE_IMAGE = Path(__file__).parents[1] / "assets" / "example.jpg"


def one_line(text: str) -> str:
    """A message on one line: line breaks inside it become spaces."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def _fail(message: str, code: int = 2) -> NoReturn:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def _stdout_open() -> bool:
    """False after `>&-` (no stdout object, or one on a closed descriptor); in-memory streams count as open."""
    if sys.stdout is None:
        return False
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, io.UnsupportedOperation):
        return True
    except (OSError, ValueError):
        return False
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Group(click.Group):
    """Turns phi-onnx errors and usage errors into one line on stderr and exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        if not _stdout_open():
            _fail("standard output is closed, so there is nowhere to write the answer: redirect it to a file instead")
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "phi-onnx"
            _fail(f"{err.format_message()} (see '{where} --help')", err.exit_code)
        except click.ClickException as err:
            _fail(err.format_message(), err.exit_code)
        except click.Abort:
            _fail("aborted", 130)
        except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, like other Unix tools
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PhiOnnxError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _warnings_to_stderr() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phi-onnx")
def main() -> None:
    """Run Phi-3-vision and Phi-3.5-vision on ONNX Runtime GenAI.

    \b
    Examples:
      phi-onnx run -i dog.jpg "Describe this image."
      phi-onnx chat
      phi-onnx export tiny --output ./tiny && phi-onnx run ./tiny -i dog.jpg "What is this?"
    """
    _warnings_to_stderr()


def option_flags(fn):
    """Add one CLI flag per generation option (the same names, types and ranges as GenerationOptions)."""
    for f in reversed(FIELDS):
        flag = "--" + f.name.replace("_", "-")
        if f.kind is bool:
            fn = click.option(f"{flag}/--greedy", f.name, default=None, help=f.help)(fn)
        else:
            kind = click.INT if f.kind is int else click.FLOAT
            fn = click.option(flag, f.name, type=kind, default=None, help=f.help)(fn)
    fn = click.option("--stop", multiple=True, help="Stop at this string (repeatable).")(fn)
    fn = click.option("--grammar", "grammar_file", default=None, metavar="FILE",
                      help="Constrain the answer to a Lark grammar read from FILE.")(fn)  # fmt: skip
    fn = click.option("--regex", default=None, help="Constrain the answer to match this regular expression.")(fn)
    fn = click.option("--json-schema", "json_schema", default=None, metavar="FILE_OR_JSON",
                      help="Constrain the answer to JSON matching this schema (a file, or the JSON).")(fn)  # fmt: skip
    return fn


def model_flags(fn):
    fn = click.option("--frame-times", is_flag=True, help="Put each video frame's time before it in the prompt.")(fn)
    fn = click.option(
        "--frame-sampling",
        type=click.Choice(["uniform", "scenes"]),
        default="uniform",
        show_default=True,
        help="Video frames: evenly over the clip, or the first frame of each shot.",
    )(fn)
    fn = click.option(
        "--preprocessor",
        type=click.Choice(["auto", "phi-onnx", "onnxruntime-genai"]),
        default="auto",
        help="Image preprocessing: ours (honours num_crops) or onnxruntime-genai's (16 crops).",
    )(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")(
        fn
    )
    fn = click.option("-d", "--device", default="auto", show_default=True, help="auto, cpu, cuda or dml.")(fn)
    fn = click.option(
        "--variant",
        default="auto",
        show_default=True,
        help="For a Hub model: auto, cpu-int4, gpu-int4 or a folder in the repo.",
    )(fn)
    return fn


def _options(values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in FIELDS}
    opts = {k: v for k, v in values.items() if k in names and v is not None}
    if values.get("stop"):
        opts["stop"] = tuple(values["stop"])
    if values.get("json_schema"):
        opts["json_schema"] = _file_or_text(values["json_schema"], "--json-schema")
    if values.get("regex"):
        opts["regex"] = values["regex"]
    if values.get("grammar_file"):
        opts["grammar"] = _read_text(Path(values["grammar_file"]), "--grammar")
    return opts


def _file_or_text(value: str, flag: str) -> str:
    """A flag that takes a file or the text itself: JSON text starts with '{'; anything else is a file."""
    return value if value.lstrip().startswith("{") else _read_text(Path(value), flag)


def _read_text(path: Path, flag: str) -> str:
    from phi_onnx.errors import OptionsError

    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise OptionsError(f"{flag} {str(path)!r} cannot be read ({reason}): give a readable UTF-8 file") from err


def _load(model: str | None, kw: dict[str, Any]):
    from phi_onnx.model import load

    return load(
        model,
        device=kw["device"],
        threads=kw["threads"],
        preprocessor=kw["preprocessor"],
        variant=kw["variant"],
        max_frames=kw.get("max_frames") or 16,
        frame_sampling=kw.get("frame_sampling") or "uniform",
        frame_times=bool(kw.get("frame_times")),
    )


def _stats(result) -> str:
    return (
        f"[{result.prompt_tokens} prompt tokens ({result.image_tokens} image, {result.cached_tokens} cached), "
        f"{result.generated_tokens} generated; first token {result.time_to_first_token_ms:.0f} ms (preprocess "
        f"{result.preprocess_ms:.0f} ms, vision {result.vision_ms:.0f} ms, {result.image_cache_hits} cached images), "
        f"{result.decode_tokens_per_s:.1f} tokens/s; {result.finish_reason}]"
    )


@main.command()
@click.argument("args", nargs=-1, metavar="[MODEL] PROMPT")
@click.option("-m", "--model", "model_opt", default=None, help="Model folder or Hub repo (default: the official one).")
@click.option(
    "-i", "--image", "images", multiple=True, help="An image, animated GIF/WebP or folder of frames (repeatable)."
)
@click.option("-s", "--system", default=None, help="A system prompt.")
@click.option("--max-frames", type=click.IntRange(min=1), default=16, show_default=True, help="Most frames per video.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@option_flags
@model_flags
def run(
    args: tuple[str, ...], model_opt: str | None, images: tuple[str, ...], system: str | None, as_json: bool, **kw: Any
) -> None:
    """Answer one prompt about images, streaming the answer to stdout.

    \b
    Examples:
      phi-onnx run -i dog.jpg "Describe this image."
      phi-onnx run ./my-model -i page1.png -i page2.png "Compare the two pages."
      phi-onnx run -i clip.gif --num-crops 4 "What happens in this video?"
      phi-onnx run -i clip.mp4 --max-frames 8 --frame-sampling scenes "Summarise this clip."
      phi-onnx run --json -i chart.png "What does this chart show?" | jq .text
      cat question.txt | phi-onnx run -i scan.png -      # the prompt from standard input
      phi-onnx run -i receipt.jpg --json-schema receipt.schema.json "Extract the total." --json | jq .value
    """
    if not args:
        raise click.UsageError('give a PROMPT, e.g. phi-onnx run -i dog.jpg "Describe this image."')
    if len(args) > 2:
        raise click.UsageError(f"expected [MODEL] PROMPT, got {len(args)} arguments: quote the prompt")
    if len(args) == 1 and _looks_like_model(args[0]):
        raise click.UsageError(
            f"the prompt is missing ('{args[0]}' is a model): phi-onnx run {args[0]} -i IMAGE \"Your question.\""
        )
    model, prompt = (args[0], args[1]) if len(args) == 2 else (model_opt, args[0])
    if len(args) == 2 and model_opt:
        raise click.UsageError("give the model either as an argument or with --model, not both")
    if prompt == "-":
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise click.UsageError("the prompt read from standard input is empty")
    lm = _load(model, kw)
    opts = _options(kw)
    from phi_onnx.generation import collect

    with _interrupt_ends_the_process():
        chunks = lm.stream(prompt, list(images), system=system, **opts)
        if as_json:
            result = collect(chunks)
            data = result.to_dict()
            data.pop("token_ids")
            data["model"] = str(lm.folder)
            data["device"] = lm.device
            if "json_schema" in opts:
                try:
                    data["value"] = result.json()
                except PhiOnnxError as err:
                    data["value"], data["value_error"] = None, str(err)
            click.echo(json.dumps(data, ensure_ascii=False))
            return
        result = collect(_echo(chunks))
        click.echo()
        click.echo(_stats(result), err=True)
        if result.frame_times:
            times = ", ".join(f"{t:g}" for t in result.frame_times)
            click.echo(f"[video: {len(result.frame_times)} frames, at {times} s]", err=True)


@contextlib.contextmanager
def _interrupt_ends_the_process() -> Iterator[None]:
    """Let Ctrl-C end ``run`` at once, also inside onnxruntime-genai's prompt pass.

    onnxruntime-genai 0.18 runs the whole prompt pass (vision, embedding, decoder prefill) inside one call that holds
    the GIL, so Python's KeyboardInterrupt (and any other thread) waits until it returns: 20 s and more for many
    images. A one-shot command has nothing to save, so during generation SIGINT gets its default action.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _looks_like_model(arg: str) -> bool:
    """A lone argument that is a model folder or a Hub repo id, not a prompt."""
    from phi_onnx.hub import is_repo_id

    path = Path(arg).expanduser()
    return (path.is_dir() and (path / "genai_config.json").is_file()) or (" " not in arg and is_repo_id(arg))


def _echo(chunks):
    for chunk in chunks:
        click.echo(chunk.text, nl=False)
        sys.stdout.flush()
        yield chunk


CHAT_HELP = (
    "commands: /image PATH (attach to the next message), /reset (forget the conversation), /exit; "
    "start a message with // to send a leading /"
)


@main.command()
@click.argument("model", required=False)
@click.option("-s", "--system", default=None, help="A system prompt.")
@click.option("-i", "--image", "images", multiple=True, help="Attach an image to the first message (repeatable).")
@click.option("--max-frames", type=click.IntRange(min=1), default=16, show_default=True, help="Most frames per video.")
@option_flags
@model_flags
def chat(model: str | None, system: str | None, images: tuple[str, ...], **kw: Any) -> None:
    """Talk with the model; images stay in the conversation across turns.

    \b
    Inside the chat:
      /image PATH   attach an image (or GIF, or folder of frames) to your next message
      /reset        start over
      /exit         leave (or Ctrl-D); Ctrl-C stops the answer being written
    \b
    Examples:
      phi-onnx chat
      phi-onnx chat ./my-model -i receipt.jpg --max-new-tokens 512
    """
    lm = _load(model, kw)
    conversation = lm.chat(system=system, **_options(kw))
    for image in images:
        conversation.add_image(image)
    interactive = sys.stdin.isatty()
    click.echo(f"phi-onnx chat on {lm.folder} ({lm.device}); {CHAT_HELP}", err=True)
    while True:
        try:
            line = (
                click.prompt("", prompt_suffix="> ", default="", show_default=False, err=True)
                if interactive
                else sys.stdin.readline()
            )
        except (EOFError, click.Abort):
            if interactive:
                click.echo(err=True)  # leave the shell prompt on a fresh line
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if line.startswith("//"):
            line = line[1:]  # an escaped leading slash: send the message as written, minus one slash
        elif command in ("/exit", "/quit") and not rest.strip():
            break
        elif command == "/reset" and not rest.strip():
            conversation.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        elif command == "/image":
            path = rest.strip()
            if not path:
                click.echo("usage: /image PATH", err=True)
                continue
            try:
                n = conversation.add_image(path)
            except PhiOnnxError as err:
                click.echo(f"error: {one_line(str(err))}", err=True)
                continue
            total = conversation.image_count
            click.echo(
                f"(attached {path}{f', {n} frames' if n > 1 else ''}; "
                f"{total} image{'s' if total != 1 else ''} in the conversation)",
                err=True,
            )
            continue
        elif line.startswith("/"):
            click.echo(f"unknown command {command}; {CHAT_HELP}", err=True)
            continue
        from phi_onnx.generation import collect

        try:
            result = collect(_echo(conversation.stream(line)))
        except PhiOnnxError as err:
            click.echo(f"\nerror: {one_line(str(err))}", err=True)
            continue
        except KeyboardInterrupt:  # stops this answer; the turn is not kept, the chat goes on
            click.echo("\n(stopped; this turn is not kept)", err=True)
            continue
        click.echo()
        click.echo(_stats(result), err=True)


@main.command()
@click.argument("repo", required=False)
@click.option("--variant", default="auto", show_default=True, help="auto, cpu-int4, gpu-int4, or a folder in the repo.")
@click.option("--revision", default=None, help="Branch, tag or commit to fetch.")
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Download into this folder instead of the Hugging Face cache.",
)
@click.option("--force", is_flag=True, help="Download again even if the files are present.")
@click.option("-d", "--device", default="auto", show_default=True, help="Which device 'auto' picks the variant for.")
def fetch(
    repo: str | None, variant: str, revision: str | None, local_dir: Path | None, force: bool, device: str
) -> None:
    """Download Microsoft's published ONNX model, verify it, and print its folder.

    \b
    Examples:
      phi-onnx fetch                                    # microsoft/Phi-3.5-vision-instruct-onnx for this machine
      phi-onnx fetch microsoft/Phi-3-vision-128k-instruct-onnx --variant cpu-int4
      HF_HUB_OFFLINE=1 phi-onnx fetch                   # from the cache only
    """
    from phi_onnx import _og
    from phi_onnx.hub import fetch as do_fetch

    cuda = _og.resolve_provider(device) == "cuda"
    folder = do_fetch(repo, variant=variant, cuda=cuda, revision=revision, local_dir=local_dir, force=force)
    click.echo(str(folder))


@main.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model: str | None, as_json: bool) -> None:
    """Describe a model folder: type, graphs and their dtypes, providers, package versions.

    \b
    Examples:
      phi-onnx info ./tiny
      phi-onnx info --json ./tiny
      phi-onnx info                 # just this machine: providers and versions
    """
    from phi_onnx.cli.info import describe, render

    data = describe(model)
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


def _register_optional() -> None:
    from phi_onnx.cli.batch import batch
    from phi_onnx.cli.bench import bench
    from phi_onnx.cli.export import export
    from phi_onnx.cli.serve import serve

    main.add_command(export)
    main.add_command(bench)
    main.add_command(serve)
    main.add_command(batch)


_register_optional()
