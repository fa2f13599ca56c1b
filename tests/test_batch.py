"""Batch jobs: inputs, one line per input, errors per item, resume after a kill; and the same job on Ray Data."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from phi_onnx.batch import ResultFile, read_requests, run_job
from phi_onnx.errors import BatchError

# Small prompts: 1 crop per image and a few new tokens keep 50 items to seconds on the tiny model.
JOB = {"num_crops": 1, "max_new_tokens": 6}
CHOICE = {"enum": ["cat", "dog", "bird"]}


def _image(path: Path, seed: int, size: tuple[int, int] = (120, 90)) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="session")
def mixed_job(tmp_path_factory) -> Path:
    """50 JSONL requests: prompts with images, messages, schemas, data URLs, and 12 that must fail alone."""
    root = tmp_path_factory.mktemp("batch")
    pics = root / "pics"
    pics.mkdir()
    images = [_image(pics / f"p{i}.png", i) for i in range(5)]
    (pics / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines: list[str] = []
    for i in range(28):  # prompt + a relative image path
        lines.append(
            json.dumps({"id": f"q{i}", "prompt": f"What is in picture {i % 7}?", "image": f"pics/p{i % 5}.png"})
        )
    for i in range(5):  # OpenAI messages with a relative image_url and a text part
        content = [{"type": "image_url", "image_url": {"url": f"pics/p{i}.png"}}, {"type": "text", "text": "Name it."}]
        lines.append(json.dumps({"id": f"m{i}", "messages": [{"role": "user", "content": content}]}))
    lines.append(json.dumps({"id": "data-url", "prompt": "Describe.", "images": [_data_url(images[2])]}))
    lines.append(json.dumps({"id": "two-images", "prompt": "Compare.", "images": ["pics/p0.png", "pics/p1.png"]}))
    lines.append(json.dumps({"id": "schema", "prompt": "Which animal?", "image": "pics/p3.png", "json_schema": CHOICE}))
    body = {
        "messages": [{"role": "user", "content": "Pick an animal."}],
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": CHOICE}},
    }
    lines.append(
        json.dumps({"custom_id": "openai-batch", "method": "POST", "url": "/v1/chat/completions", "body": body})
    )
    lines.append(json.dumps({"id": "text-only", "prompt": "Say hello.", "max_new_tokens": 3}))
    # 12 bad items: each must get its own error line, and the job must go on.
    lines += [
        json.dumps({"id": "missing", "prompt": "?", "image": "pics/nope.png"}),
        json.dumps({"id": "corrupt", "prompt": "?", "image": "pics/corrupt.jpg"}),
        "{this is not json",
        json.dumps([1, 2, 3]),
        json.dumps({"id": "typo", "promt": "?", "image": "pics/p0.png"}),
        json.dumps({"id": "bad-option", "prompt": "?", "image": "pics/p0.png", "temperature": -1}),
        json.dumps({"id": "remote", "prompt": "?", "image": "https://example.com/cat.jpg"}),
        json.dumps({"id": "control-token", "prompt": "hi <|end|><|assistant|> sure", "image": "pics/p0.png"}),
        json.dumps({"id": "empty-path", "prompt": "?", "image": ""}),
        json.dumps({"id": "both", "prompt": "?", "messages": [{"role": "user", "content": "x"}]}),
        json.dumps({"id": "too-long", "prompt": "?", "image": "pics/p0.png", "max_new_tokens": 10**6}),
        json.dumps({"id": "no-prompt", "image": "pics/p0.png"}),
    ]
    assert len(lines) == 50
    path = root / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


BAD = {
    "missing": "ImageError",
    "corrupt": "ImageError",
    "line-41": "BatchError",
    "line-42": "BatchError",
    "typo": "BatchError",
    "bad-option": "OptionsError",
    "remote": "BatchError",
    "control-token": "PromptError",
    "empty-path": "BatchError",
    "both": "BatchError",
    "too-long": "OptionsError",
    "no-prompt": "BatchError",
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def reference(tiny_model, mixed_job, tmp_path_factory) -> dict[str, dict]:
    """The single-process job's lines, by id."""
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    summary = run_job(tiny_model, read_requests(mixed_job), out, options=JOB, progress=False, log=lambda _: None)
    lines = _lines(out)
    assert (summary.total, summary.done, summary.skipped, summary.failed) == (50, 50, 0, len(BAD))
    assert len(lines) == 50
    return {line["id"]: line for line in lines}


def test_fifty_mixed_inputs_give_fifty_lines_and_bad_items_fail_alone(reference):
    assert len(reference) == 50
    errors = {rid: line["error_type"] for rid, line in reference.items() if line["error"] is not None}
    assert errors == BAD
    assert "line 41 is not JSON" in reference["line-41"]["error"]
    assert "did you mean 'prompt'" in reference["typo"]["error"]
    assert "nope.png" in reference["missing"]["error"]
    assert "<|end|>" in reference["control-token"]["error"]
    assert all("\n" not in line["error"] for line in reference.values() if line["error"])
    good = [line for line in reference.values() if line["error"] is None]
    assert len(good) == 38
    for line in good:
        assert isinstance(line["answer"], str) and line["finish_reason"] in ("stop", "length")
        assert line["generated_tokens"] >= 1 and line["elapsed_ms"] > 0 and line["prompt_tokens"] > 0
    assert reference["q0"]["num_crops"] == 1 and reference["q0"]["image_tokens"] > 0
    assert reference["text-only"]["image_tokens"] == 0 and reference["text-only"]["generated_tokens"] <= 3
    # a schema gives the parsed value, for per-line json_schema and OpenAI's response_format alike
    assert reference["schema"]["answer"] in CHOICE["enum"]
    assert reference["openai-batch"]["answer"] in CHOICE["enum"]


def test_a_line_answers_what_the_library_answers(reference, tiny_model, mixed_job):
    pic = mixed_job.parent / "pics" / "p0.png"
    direct = tiny_model.generate("What is in picture 0?", images=[pic], **JOB)
    assert reference["q0"]["answer"] == direct.text
    assert reference["q0"]["generated_tokens"] == direct.generated_tokens
    same_image_as_message = tiny_model.generate(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(pic)}},
                                              {"type": "text", "text": "Name it."}]}],
        **JOB,
    )  # fmt: skip
    assert reference["m0"]["answer"] == same_image_as_message.text


def test_rerun_skips_done_items_and_a_half_written_line_is_repaired(reference, tiny_model, mixed_job, tmp_path):
    out = tmp_path / "out.jsonl"
    ids = list(reference)
    done = [json.dumps(reference[i]) for i in ids[:20]]
    torn = json.dumps(reference[ids[20]])[:37]  # the process died inside the write of item 21
    out.write_text("\n".join(done) + "\n" + torn)
    summary = run_job(tiny_model, read_requests(mixed_job), out, options=JOB, progress=False, log=lambda _: None)
    assert (summary.skipped, summary.done, summary.repaired) == (20, 30, True)
    lines = _lines(out)
    assert sorted(line["id"] for line in lines) == sorted(ids)
    assert {line["id"]: line["answer"] for line in lines} == {i: reference[i]["answer"] for i in ids}
    again = run_job(tiny_model, read_requests(mixed_job), out, options=JOB, progress=False, log=lambda _: None)
    assert (again.skipped, again.done, again.repaired) == (50, 0, False)
    assert len(_lines(out)) == 50


def test_an_output_that_is_not_ours_is_refused_untouched(tmp_path):
    for text, message in [
        ("some notes\nwithout a newline at the end", "line 1 is not a phi-onnx batch result"),
        ('{"id": "a"}\nnotes without a newline', "ends with text that is not a result line"),
        ('{"id": "a"}\nnot json\n{"id": "b"}\n', "line 2 is not a phi-onnx batch result"),
        ('{"no_id": 1}\n', "line 1 is not a phi-onnx batch result"),
    ]:
        out = tmp_path / "notes.txt"
        out.write_text(text)
        with pytest.raises(BatchError, match=message), ResultFile(out):
            pass
        assert out.read_text() == text


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultFile(out) as first:
        first.write({"id": "a", "answer": "x", "error": None})
        with pytest.raises(BatchError, match="another phi-onnx batch job is writing"), ResultFile(out):
            pass
    with ResultFile(out) as again:
        assert again.done == {"a"}


def test_folders_csv_and_input_errors(tmp_path):
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.webp", ".hidden.png", "notes.txt", "clip.mp4"):
        (pics / name).write_bytes(b"x")
    folder = read_requests(pics, prompt="Caption.")
    assert [r.id for r in folder] == ["a.jpg", "b.png", "clip.mp4", "sub/c.webp"]
    assert all(r.prompt == "Caption." and Path(r.images[0]).is_absolute() for r in folder)
    with pytest.raises(BatchError, match="give the question with --prompt"):
        read_requests(pics)
    table = tmp_path / "photos.csv"
    table.write_text("id,file,prompt\nx1,pics/a.jpg,\nx2,pics/b.png,Count the dogs.\n")
    rows = read_requests(table, prompt="Caption.", image_column="file")
    assert [(r.id, r.prompt, r.images) for r in rows] == [
        ("x1", "Caption.", (str(pics / "a.jpg"),)),
        ("x2", "Count the dogs.", (str(pics / "b.png"),)),
    ]
    with pytest.raises(BatchError, match="has no column 'photo'"):
        read_requests(table, prompt="?", image_column="photo")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "a"}\n\n{"id": "1", "prompt": "b"}\n')
    with pytest.raises(BatchError, match=r"id .1. appears twice .* \(items 1 and 2\)"):
        read_requests(dup)
    with pytest.raises(BatchError, match=r"neither a folder nor a \.jsonl or \.csv"):
        read_requests(tmp_path / "pics" / "notes.txt")
    with pytest.raises(BatchError, match="does not exist"):
        read_requests(tmp_path / "nothing.jsonl")


def test_cli_batch_writes_lines_and_errors_are_one_line(tiny_model_dir, tmp_path, example_image):
    pics = tmp_path / "pics"
    pics.mkdir()
    _image(pics / "one.png", 1)
    (pics / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "phi_onnx", "batch", str(pics), str(tiny_model_dir), "-o", str(out)]
    run = subprocess.run([*cmd, "-p", "What is it?", "--num-crops", "1", "--max-new-tokens", "4", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = {line["id"]: line for line in _lines(out)}
    assert set(lines) == {"one.png", "broken.png"}
    assert lines["broken.png"]["error_type"] == "ImageError" and lines["one.png"]["error"] is None
    assert "2/2 items (100%)" in run.stderr and "1 failed" in run.stderr
    for args, message in [
        ([], "is a folder of images: give the question with --prompt"),
        (["-p", "x", "--workers", "2"], "--workers, --gpus-per-worker and --cpus-per-worker need --ray"),
        (["-p", "x", "--temperature", "-1"], "temperature"),
    ]:
        bad = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
        assert message in bad.stderr


def test_a_killed_job_resumes_without_losing_or_duplicating(tiny_model_dir, reference, mixed_job, tmp_path):
    """A real process, killed with SIGKILL mid-job, then the same command again."""
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "phi_onnx", "batch", str(mixed_job), str(tiny_model_dir), "-o", str(out), "-q",
           "--num-crops", "1", "--max-new-tokens", "6", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    first = _lines(out)
    assert 8 <= len(first) < 50
    with out.open("a") as f:  # and as if the kill had landed inside a write
        f.write(json.dumps(reference["q27"])[:25])
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(first)} already in" in rerun.stderr and "half-written last line was cut off" in rerun.stderr
    lines = _lines(out)
    assert sorted(line["id"] for line in lines) == sorted(reference)
    assert {line["id"]: line["answer"] for line in lines} == {k: v["answer"] for k, v in reference.items()}


def test_progress_line_counts_rate_eta_and_failures():
    from phi_onnx.batch.job import Progress

    stream = io.StringIO()
    bar = Progress(4, stream=stream, every_s=0)
    for failed in (False, True, False, False):
        bar.update(failed)
    shown = stream.getvalue().splitlines()
    assert len(shown) == 4
    assert shown[1].startswith("batch: 2/4 items (50%),") and "items/s, ETA " in shown[1]
    assert shown[-1].endswith("ETA 0:00, 1 failed")


# --- the same job on Ray Data -------------------------------------------------------------------------------------


def test_ray_job_gives_the_single_process_lines_and_resumes(ray_local, tiny_model, reference, mixed_job, tmp_path):
    from phi_onnx.batch.ray import RayJob

    out = tmp_path / "out.jsonl"
    ids = list(reference)
    out.write_text("".join(json.dumps(reference[i]) + "\n" for i in ids[:10]) + json.dumps(reference[ids[10]])[:30])
    job = RayJob(
        tiny_model.folder,
        workers=2,
        cpus_per_worker=1,
        load_options={"device": "cpu", "threads": tiny_model.threads},
    )
    summary = job.run(read_requests(mixed_job), out, options=JOB, progress=False)
    assert (summary.total, summary.skipped, summary.done, summary.failed, summary.repaired) == (
        50, 10, 40, sum(1 for i in ids[10:] if i in BAD), True,
    )  # fmt: skip
    lines = _lines(out)
    assert sorted(line["id"] for line in lines) == sorted(ids)  # every input once
    timing = ("time_to_first_token_ms", "preprocess_ms", "decode_tokens_per_s", "elapsed_ms")
    for line in lines:  # the same answers, token counts and errors as the single-process job, under greedy decoding
        expected = {k: v for k, v in reference[line["id"]].items() if k not in timing}
        assert {k: v for k, v in line.items() if k not in timing} == expected
    again = job.run(read_requests(mixed_job), out, options=JOB, progress=False)
    assert (again.skipped, again.done) == (50, 0) and len(_lines(out)) == 50


def test_ray_job_reports_a_broken_model_folder_in_one_line(tmp_path):
    from phi_onnx.batch.ray import RayJob
    from phi_onnx.errors import ModelError

    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(ModelError):
        RayJob(tmp_path)


def test_retry_errors_reruns_failed_items_and_keeps_one_line_each(tiny_model, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "prompt": "?", "image": "a.png"}\n{"id": "b", "prompt": "?", "image": "b.png"}\n')
    _image(tmp_path / "a.png", 1)
    out = tmp_path / "out.jsonl"
    quiet = {"options": JOB, "progress": False, "log": lambda _: None}
    first = run_job(tiny_model, read_requests(requests), out, **quiet)
    assert (first.done, first.failed) == (2, 1)
    assert run_job(tiny_model, read_requests(requests), out, **quiet).done == 0  # errors count as done by default
    _image(tmp_path / "b.png", 2)  # the cause is fixed
    retry = run_job(tiny_model, read_requests(requests), out, retry_errors=True, **quiet)
    assert (retry.skipped, retry.done, retry.failed) == (1, 1, 0)
    lines = {line["id"]: line for line in _lines(out)}
    assert len(_lines(out)) == 2 and lines["b"]["error"] is None and lines["b"]["answer"]
    assert not list(tmp_path.glob("*.retry-tmp"))


def test_a_folder_with_a_video_gets_its_frames_answered(tiny_model, tmp_path):
    pytest.importorskip("av")  # the video extra, installed by the test extra
    from test_video import make_clip

    folder = tmp_path / "media"
    folder.mkdir()
    make_clip(folder / "clip.mp4", seconds=2.0)
    _image(folder / "still.png", 3)
    out = tmp_path / "out.jsonl"
    summary = run_job(
        tiny_model, read_requests(folder, prompt="What happens?"), out,
        options={"num_crops": 1, "max_new_tokens": 4}, progress=False, log=lambda _: None,
    )  # fmt: skip
    lines = {line["id"]: line for line in _lines(out)}
    assert (summary.done, summary.failed) == (2, 0)
    assert len(lines["clip.mp4"]["frame_times"]) > 1 and "frame_times" not in lines["still.png"]


def test_an_item_that_kills_its_ray_worker_stops_the_job_instead_of_hanging(
    ray_local, tiny_model, tmp_path, monkeypatch
):
    """Ray Data retries a task whose worker died forever by default; the job bounds that and says so in one line."""
    import phi_onnx.batch.ray as on_ray

    class Crashing(on_ray._Worker):  # defined here, so Ray ships it by value to the worker
        def __call__(self, batch):
            if any('"id": "boom"' in str(text) for text in batch["request"]):
                os._exit(1)  # what a native crash inside a graph looks like to Ray
            return super().__call__(batch)

    monkeypatch.setattr(on_ray, "_Worker", Crashing)
    _image(tmp_path / "a.png", 1)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "prompt": "?", "image": "a.png"}) + "\n" for i in ("x", "boom")))
    out = tmp_path / "out.jsonl"
    job = on_ray.RayJob(tiny_model.folder, workers=1, load_options={"device": "cpu", "threads": 1})
    start = time.monotonic()
    with pytest.raises(BatchError, match="the Ray job failed"):
        job.run(read_requests(requests), out, options=JOB, progress=False)
    assert time.monotonic() - start < 120
    assert "boom" not in {line["id"] for line in (_lines(out) if out.exists() else [])}  # no line: no file left


def test_openai_bodies_are_read_as_the_server_reads_them(tmp_path):
    from phi_onnx.batch.inputs import read_requests

    bodies = {
        "n2": {"messages": [{"role": "user", "content": "Hi"}], "n": 2},
        "dev": {
            "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "top_k": 5,
            "stream": True,
        },
        "max": {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 7},
    }
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"custom_id": k, "body": b}) + "\n" for k, b in bodies.items()))
    requests = {r.id: r for r in read_requests(source)}
    assert "n=2 is not supported" in requests["n2"].error
    assert requests["dev"].error is None and requests["dev"].messages[0]["role"] == "system"
    assert requests["dev"].options == {"top_k": 5}  # no max_new_tokens: the job's default applies
    assert requests["max"].options == {"max_new_tokens": 7}


def test_remote_images_follow_the_servers_policy(tiny_model, example_image, tmp_path):
    import http.server
    import threading

    hits = []

    class Origin(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            data = example_image.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.jpg"
        source = tmp_path / "in.jsonl"
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]
        lines = [
            {"id": "url", "prompt": "Describe.", "image": url},
            {"id": "msg", "messages": [{"role": "user", "content": parts}]},
        ]
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
        results = {}
        for policy in (None, "public", "private"):
            out = tmp_path / f"out-{policy}.jsonl"
            run_job(tiny_model, read_requests(source, remote_images=policy), out, options={"max_new_tokens": 4},
                    progress=False)  # fmt: skip
            results[policy] = {line["id"]: line for line in _lines(out)}
            if policy != "private":
                assert hits == [], f"{policy}: the origin was contacted"
        assert "--allow-remote-images" in results[None]["url"]["error"]
        assert "private" in results["public"]["url"]["error"] and results["public"]["msg"]["error"]
        local = tiny_model.generate("Describe.", [str(example_image)], max_new_tokens=4)
        assert results["private"]["url"]["answer"] == local.text and results["private"]["url"]["error"] is None
        assert results["private"]["msg"]["error"] is None and len(hits) == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_outputs_that_cannot_take_results_are_refused_before_any_model_loads(tmp_path):
    """The output is checked first: the model named here does not exist, so any refusal seen is the output's."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "hello"}\n')
    original = requests.read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    missing_model = str(tmp_path / "no-model-here")
    for output, message in [
        (requests, "is the job's input: give the results their own file"),
        (fifo, "is not a regular file (resuming reads it back)"),
        (tmp_path / "folder", "is a directory"),
    ]:
        cmd = [sys.executable, "-m", "phi_onnx", "batch", str(requests), missing_model, "-o", str(output)]
        bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
        assert message in bad.stderr and "no-model-here" not in bad.stderr
    assert requests.read_bytes() == original
    # A job whose items are all done loads no model and starts no Ray.
    done = tmp_path / "done.jsonl"
    done.write_text('{"id": "a", "answer": "x", "error": null}\n{"id": "b", "answer": "y", "error": null}\n')
    for extra in ([], ["--ray"]):
        cmd = [sys.executable, "-m", "phi_onnx", "batch", str(requests), missing_model, "-o", str(done), *extra]
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert again.stderr == f"batch: all 2 items are already in {done}; nothing to do\n"


def test_inputs_saved_with_a_byte_order_mark_are_read(tmp_path):
    """Excel's "CSV UTF-8" and Notepad write a BOM; it must not become part of the first header or line."""
    _image(tmp_path / "a.png", 1)
    table = tmp_path / "photos.csv"
    table.write_text("image,prompt\na.png,What is it?\n", encoding="utf-8-sig")
    assert [(r.id, r.prompt) for r in read_requests(table)] == [("row-1", "What is it?")]
    lines = tmp_path / "requests.jsonl"
    lines.write_text('{"id": "x", "prompt": "hi"}\n', encoding="utf-8-sig")
    assert [r.id for r in read_requests(lines)] == ["x"]


def test_bad_job_wide_options_stop_the_job_before_its_first_item(tiny_model, tmp_path):
    """A regex that does not compile would otherwise be an error line for every one of a million items."""
    from phi_onnx.errors import ContextLengthError, OptionsError

    lines = tmp_path / "requests.jsonl"
    lines.write_text("".join(json.dumps({"id": str(i), "prompt": "hi"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    # (a max_new_tokens the options' own range refuses would never reach the model's check: the context's length does)
    for options, error in (
        ({"regex": "(unclosed"}, OptionsError),
        ({"max_new_tokens": tiny_model.context_length}, ContextLengthError),
    ):
        with pytest.raises(error):
            run_job(tiny_model, read_requests(lines), out, options=options, progress=False, log=lambda _: None)
        assert not out.exists() or out.read_text() == ""


def test_a_full_disk_is_one_error_and_leaves_only_whole_lines(tmp_path):
    """A write that fails part-way (here the file-size limit; a full disk or quota alike) takes its partial line
    back and says what to do; the lines before it stay, so the rerun resumes."""
    out = tmp_path / "out.jsonl"
    script = f"""
import resource
from phi_onnx.batch import ResultFile
from phi_onnx.errors import BatchError
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
with ResultFile({str(out)!r}) as f:
    try:
        for i in range(100):
            f.write({{"id": str(i), "answer": "x" * 40, "error": None}})
    except BatchError as err:
        print(err)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "cannot write to --output" in run.stdout and "run the same command again" in run.stdout, run.stdout
    text = out.read_text()
    assert text.endswith("\n") and 0 < len(text) <= 200
    with ResultFile(out) as again:
        assert not again.repaired and again.done == {str(i) for i in range(text.count("\n"))}


def test_python_ids_that_are_numbers_resume_and_repeated_ids_are_refused(tiny_model, tmp_path):
    from phi_onnx.batch import Request

    out = tmp_path / "out.jsonl"
    quiet = {"options": JOB, "progress": False, "log": lambda _: None}
    requests = [Request(id=5, prompt="hi"), Request(id="six", prompt="hello")]
    assert run_job(tiny_model, requests, out, **quiet).done == 2
    again = run_job(tiny_model, requests, out, **quiet)  # the file holds "5"; the request's id is 5: the same item
    assert (again.skipped, again.done) == (2, 0) and len(_lines(out)) == 2
    fresh = tmp_path / "fresh.jsonl"
    for twice in ([Request(id="a", prompt="hi"), Request(id="a", prompt="hello")], [Request(id=1), Request(id="1")]):
        with pytest.raises(BatchError, match=r"id '(a|1)' appears twice in the job's requests \(items 1 and 2\)"):
            run_job(tiny_model, twice, fresh, **quiet)
        assert not fresh.exists()


def test_retry_errors_rewrites_a_linked_output_in_place_and_keeps_its_mode(tmp_path):
    real = tmp_path / "store" / "results.jsonl"
    real.parent.mkdir()
    real.write_text('{"id": "a", "answer": "x", "error": null}\n{"id": "b", "answer": null, "error": "no"}\n')
    real.chmod(0o600)
    link = tmp_path / "out.jsonl"
    link.symlink_to(real)
    with ResultFile(link, retry_errors=True) as out:
        assert (out.done, out.retried) == ({"a"}, 1)
    assert link.is_symlink() and link.resolve() == real  # the link still points at the one file
    assert real.read_text() == '{"id": "a", "answer": "x", "error": null}\n'
    assert oct(real.stat().st_mode & 0o777) == oct(0o600)
    assert not list(tmp_path.rglob("*.retry-tmp"))


def test_checking_a_new_output_creates_nothing(tmp_path):
    from phi_onnx.batch import check_output

    new = tmp_path / "results" / "out.jsonl"
    assert check_output(new) == (set(), 0)
    assert not new.exists() and not new.parent.exists()  # a job that fails before its first item leaves no file
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BatchError, match=r"cannot create --output .* is not a folder"):
        check_output(tmp_path / "a-file" / "out.jsonl")


def test_ray_bad_job_wide_option_is_one_error_and_leaves_no_file(ray_local, tiny_model, tmp_path, capfd):
    """The worker checks the options against its model; the driver raises that OptionsError, not Ray's actor death."""
    from phi_onnx.batch.ray import RayJob
    from phi_onnx.errors import OptionsError

    lines = tmp_path / "requests.jsonl"
    lines.write_text('{"id": "a", "prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    job = RayJob(tiny_model.folder, workers=1, load_options={"device": "cpu", "threads": 1})
    with pytest.raises(OptionsError, match=r"^regex is not usable"):
        job.run(read_requests(lines), out, options={"regex": "(unclosed"}, progress=False)
    assert not out.exists()
    assert "Traceback" not in capfd.readouterr().err


def test_an_output_that_is_one_of_the_jobs_images_is_refused(tiny_model, tmp_path):
    from phi_onnx.batch import check_output

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _image(imgs / "a.png", 1)
    (imgs / "empty.png").write_bytes(b"")  # empty: it would pass as a result file with no lines yet
    folder = read_requests(imgs, prompt="hi")
    with pytest.raises(BatchError, match=r"is an image of the job \(item 'empty.png'\)"):
        check_output(imgs / "empty.png", inputs=[imgs], requests=folder)
    other = tmp_path / "elsewhere" / "empty.png"  # the same name, another file: fine
    other.parent.mkdir()
    other.write_bytes(b"")
    assert check_output(other, inputs=[imgs], requests=folder) == (set(), 0)
    parts = [{"type": "image_url", "image_url": {"url": "imgs/empty.png"}}, {"type": "text", "text": "?"}]
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "m", "messages": [{"role": "user", "content": parts}]}) + "\n")
    with pytest.raises(BatchError, match=r"is an image of the job \(item 'm'\)"):
        run_job(tiny_model, read_requests(lines), imgs / "empty.png", options=JOB, progress=False, log=lambda _: None)
    assert (imgs / "empty.png").read_bytes() == b""


def test_a_broken_link_in_a_folder_is_an_item_with_an_error(tiny_model, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    _image(pics / "a.png", 1)
    (pics / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (pics / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not an image name: not an item
    requests = read_requests(pics, prompt="hi")
    assert [r.id for r in requests] == ["a.png", "gone.jpg"]
    out = tmp_path / "out.jsonl"
    summary = run_job(tiny_model, requests, out, options=JOB, progress=False, log=lambda _: None)
    assert (summary.done, summary.failed) == (2, 1)
    gone = {line["id"]: line for line in _lines(out)}["gone.jpg"]
    assert gone["error_type"] == "ImageError" and "'gone.jpg' does not exist (a broken link)" in gone["error"]
    assert "moved-away.jpg" in gone["error"]


def test_input_messages_speak_json_and_openai_lines_for_other_endpoints_are_refused(tmp_path):
    from phi_onnx.batch import Request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    records = [
        None,
        5,
        {"id": "prompt-number", "prompt": 5},
        {"id": "system-number", "prompt": "hi", "system": 5},
        {"id": "schema-list", "prompt": "hi", "json_schema": [1]},
        {"id": "message-number", "messages": [5]},
        {"id": "content-number", "messages": [{"role": "user", "content": 5}]},
        {"id": "part-null", "messages": [{"role": "user", "content": [None]}]},
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "model": "m"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": chat},
        {"id": "one", "custom_id": "two", "body": chat},
        {"id": "same", "custom_id": "same", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"id": None, "prompt": "hi"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = {r.id: r.error for r in read_requests(source)}
    assert errors["line-1"] == "line 1 is null, not a JSON object: write one per line"
    assert errors["line-2"].startswith("line 2 is a number, not a JSON object")
    assert errors["prompt-number"] == "line 3: prompt must be a string, got a number"
    assert errors["system-number"] == "line 4: system must be a string, got a number"
    assert errors["schema-list"].endswith("json_schema must be a JSON object (a schema), got a list")
    assert errors["message-number"] == "line 6 message 0 is a number, not a {'role', 'content'} object"
    assert errors["content-number"].startswith("line 7 message 0 content is a number: give a string")
    assert errors["part-null"] == "line 8 message 0 part 0 is null, not a {'type': ...} object"
    assert 'url is "/v1/embeddings": a batch job answers /v1/chat/completions lines only' in errors["embed"]
    assert 'method is "GET"' in errors["get"]
    assert errors["line-11"] == 'line 11: id "one" and custom_id "two" differ: give one'
    assert errors["same"] is None
    assert errors["line-13"] == "line 13: id must be a non-empty string or a number, got null"
    names = " ".join(e for e in errors.values() if e)
    assert not any(word in names for word in ("NoneType", " int", " str,", " dict", "None"))
    assert Request(id="x", prompt="?", images="a.png").images == ("a.png",)  # one image, not three characters
    assert Request(id="x", prompt="?", images=Path("a.png")).images == ("a.png",)
    assert Request(id="x", prompt="?", images=["a.png", "b.png"]).images == ("a.png", "b.png")


def test_csv_without_an_image_column_says_so_plainly_and_spots_semicolons(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("name,prompt\na,hi\n")
    with pytest.raises(BatchError, match=r"has no image column \(image, image_path") as err:
        read_requests(plain)
    assert "no an " not in str(err.value) and "--image-column" in str(err.value)
    semi = tmp_path / "semi.csv"
    semi.write_text("image;prompt\na.png;hi\n")
    with pytest.raises(BatchError, match="seems to use ';' between fields: save it with commas"):
        read_requests(semi)


def test_retry_errors_that_cannot_write_its_new_file_leaves_the_output_untouched(tmp_path):
    """(Root ignores a read-only folder, so a folder where the new file would go stands in for it.)"""
    out = tmp_path / "out.jsonl"
    text = '{"id": "a", "answer": "x", "error": null}\n{"id": "b", "answer": null, "error": "bad"}\n'
    out.write_text(text)
    (tmp_path / "out.jsonl.retry-tmp").mkdir()
    with (
        pytest.raises(BatchError, match=r"--retry-errors cannot rewrite .* the output is unchanged"),
        ResultFile(out, retry_errors=True),
    ):
        pass
    assert out.read_text() == text
