"""The phi-onnx command line on the tiny model: output streams, JSON, chat, errors as one line with exit code 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main


def commands(group=main, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *commands()], ids=lambda p: " ".join(p) or "phi-onnx")
def test_every_command_has_help_with_examples(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output or "Inside the chat:" in result.output


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, so stdout and stderr are separate as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "phi_onnx", *args], capture_output=True, text=True, input=input, timeout=300
    )


def test_run_streams_text_to_stdout_and_stats_to_stderr(tiny_model_dir, example_image):
    done = run_cli(
        "run", str(tiny_model_dir), "-i", str(example_image), "Describe this image.", "--max-new-tokens", "6"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the answer goes to stdout"
    assert re.search(r"\[\d{4} prompt tokens \(1921 image, 0 cached\), 6 generated", done.stderr), done.stderr
    assert "tokens/s" not in done.stdout


def test_run_json(tiny_model_dir, example_image):
    done = run_cli(
        "run",
        "-m",
        str(tiny_model_dir),
        "--json",
        "-i",
        str(example_image),
        "--num-crops",
        "4",
        "--max-new-tokens",
        "3",
        "Hi",
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for key in (
        "text",
        "finish_reason",
        "prompt_tokens",
        "image_tokens",
        "generated_tokens",
        "time_to_first_token_ms",
        "decode_tokens_per_s",
    ):
        assert key in data, key
    assert data["image_tokens"] == 757
    assert data["num_crops"] == 4
    assert data["generated_tokens"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "nope.jpg", "x"], "nope.jpg"),
        (["--temperature", "-1", "x"], "temperature is -1.0, outside its range"),
        (["--num-crops", "0", "x"], "num_crops is 0"),
        (["--device", "tpu", "x"], "unknown device 'tpu'"),
    ],
    ids=["missing-image", "bad-temperature", "bad-crops", "bad-device"],
)
def test_run_errors_are_one_line_with_exit_2(tiny_model_dir, args, message):
    done = run_cli("run", "-m", str(tiny_model_dir), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_run_on_a_folder_that_is_not_a_model(tmp_path):
    done = run_cli("run", str(tmp_path), "hello")
    assert done.returncode == 2
    assert "genai_config.json" in done.stderr and "Traceback" not in done.stderr


def test_chat_keeps_history_and_commands(tiny_model_dir, example_image):
    script = "\n".join(
        [
            f"/image {example_image}",
            "What is this?",
            "And now?",
            "/image /no/such/file.png",
            "/bogus",
            "/reset",
            "Hello again",
            "/exit",
        ]
    )
    done = run_cli("chat", str(tiny_model_dir), "--max-new-tokens", "3", input=script + "\n")
    assert done.returncode == 0, done.stderr
    stats = [line for line in done.stderr.splitlines() if "prompt tokens" in line]
    assert len(stats) == 3
    assert "(1921 image," in stats[0] and "(1921 image," in stats[1], "turn 2 keeps turn 1's image"
    assert "(0 image," in stats[2], "/reset forgets the image"
    assert "file.png" in done.stderr and "unknown command /bogus" in done.stderr
    assert "Traceback" not in done.stderr


def test_info(tiny_model_dir):
    done = run_cli("info", "--json", str(tiny_model_dir))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["model"]["type"] == "phi3v"
    assert data["model"]["graphs"]["vision"]["outputs"]["image_features"].startswith("float32 [num_image_tokens, 64]")
    assert data["providers"]["cpu"] == "available"
    assert "onnxruntime-genai" in data["packages"]
    text = run_cli("info", str(tiny_model_dir))
    assert "phi3v" in text.stdout and "providers" in text.stdout
    if (tiny_model_dir / "phi_onnx_ops.so").is_file():  # CPU builds carry phi-onnx's kernels where g++ exists
        assert data["model"]["custom_ops"] == {"vision": "phi_onnx_ops.so", "decoder": "phi_onnx_ops.so"}
        assert "kernels    phi_onnx_ops.so (decoder), phi_onnx_ops.so (vision)" in text.stdout


def test_export_tiny_then_verify(tmp_path):
    out = tmp_path / "m"
    done = run_cli("export", "tiny", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert "[export]" in done.stderr, "progress goes to stderr"
    assert (tmp_path / "m.checkpoint" / "config.json").is_file()
    again = run_cli("export", "tiny", "--output", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
    ver = run_cli("export", "verify", str(out), "--checkpoint", str(tmp_path / "m.checkpoint"), "--new-tokens", "4")
    assert ver.returncode == 0, ver.stdout + ver.stderr
    assert "all checks passed" in ver.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 does not run on the CPU"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_export_build_bad_arguments(tmp_path, tiny_checkpoint, args, message):
    done = run_cli("export", "build", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "o"), *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_export_build_missing_checkpoint_files(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "config.json").unlink()
    done = run_cli("export", "build", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "missing config.json" in done.stderr
    assert not (tmp_path / "o").exists()


def test_run_reads_the_prompt_from_stdin(tiny_model_dir):
    done = run_cli("run", str(tiny_model_dir), "-", "--max-new-tokens", "2", input="What is two plus two?\n")
    assert done.returncode == 0, done.stderr
    assert "2 generated" in done.stderr
    empty = run_cli("run", str(tiny_model_dir), "-", input="\n")
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_run_json_reports_the_crops_actually_used_for_frames(tiny_model_dir, tmp_path):
    """An animated GIF becomes several frames, so 4 crops apply even though one -i was given."""
    from phi_onnx_export.verify import test_image

    frames = [test_image(320, 240, i) for i in range(3)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    done = run_cli("run", str(tiny_model_dir), "--json", "-i", str(gif), "What happens?", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["image_tokens"] == 3 * 757
    assert data["num_crops"] == 4
