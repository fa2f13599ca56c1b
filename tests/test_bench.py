"""`phi-onnx bench` on the tiny model: a smoke test of the harness (both paths, JSON, table, errors), not a timing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_onnx.cli.bench import bench
from phi_onnx_bench.spec import FIGURES, summarize

FAST = ("--new-tokens", "3", "--warmup", "0", "--repeat", "2", "--num-crops", "4")


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory, tiny_checkpoint, tiny_model_dir):
    """One run of both paths (onnxruntime-genai and PyTorch) with JSON and chart."""
    out = tmp_path_factory.mktemp("bench")
    args = ["--checkpoint", str(tiny_checkpoint), "--model", str(tiny_model_dir), *FAST,
            "--json", str(out / "result.json"), "--plot", str(out / "chart.png")]  # fmt: skip
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result, json.loads((out / "result.json").read_text()), out


def test_both_paths_report_every_figure(both_paths):
    _, data, _ = both_paths
    assert {"machine", "packages", "workload", "paths", "ratios", "token_agreement", "targets"} <= data.keys()
    assert data["machine"]["logical_cores"] >= 1 and data["machine"]["cpu"]
    assert {"onnxruntime-genai", "onnxruntime", "torch"} <= data["packages"].keys()
    assert data["workload"]["new_tokens"] == 3 and data["workload"]["num_crops"] == [4]
    kinds = {p["kind"]: p for p in data["paths"]}
    assert set(kinds) == {"onnxruntime-genai", "pytorch"}
    assert [p["label"] for p in data["paths"]] == ["ort-fp32", "pytorch", "pytorch-bf16"]
    bf16 = data["paths"][2]
    assert bf16["precision"] == "bf16" and set(bf16["kernels"]) >= {"cpu_capability", "avx512_bf16", "amx_tile"}
    if bf16.get("skipped"):  # a CPU without native bf16: the reason names what is missing
        assert "avx512_bf16" in bf16["skipped"] and bf16["runs"] == {}
    else:
        assert bf16["dtype"] == "bfloat16" and bf16["autocast"]
    for path in (p for p in data["paths"] if not p.get("skipped")):
        assert path["load_ms"] > 0 and path["peak_rss_mb"] > 0
        # private memory (anonymous pages) is part of RSS; the files are the folder or the checkpoint's safetensors
        assert 0 < path["peak_private_mb"] <= path["peak_rss_mb"] and path["model_files_mb"] > 1
        assert "peak_gpu_mb" in path and path["vision_method"]
        run = path["runs"]["4"]
        assert run["prompt_tokens"] > run["image_tokens"] == 757  # 600x400 at 4 crops
        assert run["generated_tokens"] == 3 and len(run["tokens"]) == 3
        assert set(run["figures"]) == set(FIGURES)
        for name in ("preprocess_ms", "vision_ms", "time_to_first_token_ms", "decode_tokens_per_s", "end_to_end_ms"):
            fig = run["figures"][name]
            assert fig["n"] == 2 and fig["median"] > 0 and fig["p90"] >= fig["median"] >= fig["p10"], (name, fig)
        f = run["figures"]
        assert f["time_to_first_token_ms"]["median"] >= f["preprocess_ms"]["median"]
        assert f["end_to_end_ms"]["median"] >= f["time_to_first_token_ms"]["median"]


def test_ratios_and_greedy_agreement(both_paths):
    _, data, _ = both_paths
    ratio = data["ratios"][0]
    assert ratio["onnxruntime_genai"] == "ort-fp32" and ratio["pytorch"] == "pytorch" and ratio["num_crops"] == 4
    ort, ref = (next(p for p in data["paths"] if p["kind"] == k) for k in ("onnxruntime-genai", "pytorch"))
    want = ort["runs"]["4"]["figures"]["time_to_first_token_ms"]["median"] / ref["runs"]["4"]["figures"][
        "time_to_first_token_ms"]["median"]  # fmt: skip
    assert ratio["time_to_first_token"] == pytest.approx(want, rel=1e-2)
    assert ratio["decode_tokens_per_s"] > 0
    # The fp32 folder and the checkpoint hold the same weights: same prompt, same greedy tokens.
    agree = data["token_agreement"][0]
    assert agree["pytorch"] == "pytorch" and agree["prompt_tokens_equal"] and agree["agreement"] == 1.0
    (fastest,) = data["fastest_pytorch_ratios"]
    refs = [p for p in data["paths"] if p["kind"] == "pytorch" and p["runs"]]
    best = min(refs, key=lambda p: p["runs"]["4"]["figures"]["time_to_first_token_ms"]["median"])
    assert fastest["first_token_vs"] == best["label"]
    want = ort["runs"]["4"]["figures"]["time_to_first_token_ms"]["median"] / best["runs"]["4"]["figures"][
        "time_to_first_token_ms"]["median"]  # fmt: skip
    assert fastest["time_to_first_token"] == pytest.approx(want, rel=1e-2)
    assert any(t["target"].startswith("time to first token ort-fp32 / pytorch,") for t in data["targets"])


def test_markdown_table_and_chart(both_paths):
    result, _, out = both_paths
    table = result.stdout
    assert "| path | precision | num_crops |" in table
    assert "| ort-fp32 | fp32 | 4 |" in table and "| pytorch | fp32 | 4 |" in table
    assert "| ort-fp32 / pytorch | 4 |" in table and "| onnxruntime-genai / fastest PyTorch |" in table
    assert "CPU kernels (PyTorch's view): level" in table
    assert "| peak RSS MB | private MB |" in table and "Memory against the model's files" in table
    assert re.search(r"- ort-fp32: files [\d,]+ MB; peak RSS [\d.]+x \([\d.]+x once loaded\), private [\d.]+x", table)
    assert "[bench]" not in table  # progress goes to stderr
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnxruntime_genai_only_mode(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(bench, ["--model", str(tiny_model_dir), *FAST, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert [p["label"] for p in data["paths"]] == ["ort-fp32"]
    assert data["ratios"] == [] and data["token_agreement"] == []
    assert "| ort-fp32 | fp32 | 4 |" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--new-tokens", "0"], "--new-tokens is 0, outside 1..4096"),
        (["--repeat", "abc"], "'abc' is not a valid integer"),
        (["--model", "/no/such/folder"], "/no/such/folder"),
        (["--checkpoint", "{ckpt}"], "--checkpoint needs the folders built from it"),
        (["--size", "tiny", "--model", "{model}"], "give either --size or --model/--checkpoint"),
        (["--model", "{model}", "--against", "pytorch"], "--against pytorch needs the checkpoint"),
        (["--model", "{model}", "--image", "/no/such.png"], "image /no/such.png does not exist"),
        (["--size", "huge"], "'huge' is not one of"),
        (["--model", "{model}", "--against", "none", "--torch-precision", "bf16"], "--torch-precision is for the"),
    ],
)
def test_bad_arguments_give_one_line(args, message, tiny_checkpoint, tiny_model_dir):
    args = [a.format(ckpt=tiny_checkpoint, model=tiny_model_dir) for a in args]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_help_ends_with_examples():
    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "phi-onnx bench --model" in result.output


def test_summarize_median_and_tails():
    assert summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "p10": 1.0, "p90": 5.0, "min": 1.0, "max": 5.0,
                                                    "n": 5}  # fmt: skip
    assert summarize([2.0, 4.0])["median"] == 3.0
    assert summarize([])["median"] is None


def test_bench_models_live_in_the_user_cache(monkeypatch, tmp_path):
    from phi_onnx_bench.models import cache_dir

    for name in ("PHI_ONNX_BENCH_CACHE", "PHI_ONNX_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "phi-onnx" / "bench-models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "phi-onnx" / "bench-models"
    monkeypatch.setenv("PHI_ONNX_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "bench-models"


def test_targets_are_not_judged_on_a_busy_machine():
    from phi_onnx_bench.runner import targets

    def row(kind: str, label: str, busy: float) -> dict:
        names = ("time_to_first_token_ms", "decode_tokens_per_s", "end_to_end_ms", "vision_ms")
        figures = {name: {"median": 100.0} for name in names}
        return {"kind": kind, "label": label, "precision": "int4", "background_cpu": busy,
                "runs": {"16": {"figures": figures}}}  # fmt: skip

    quiet = [row("onnxruntime-genai", "ort", 0.02), row("pytorch", "pt", 0.03)]
    busy = [row("onnxruntime-genai", "ort", 0.58), row("pytorch", "pt", 0.03)]
    assert all(t["met"] in (True, False) for t in targets(quiet))
    judged = targets(busy)
    assert judged and all(t["met"] is None for t in judged)


def _path(kind: str, label: str, ttft: float, decode: float, precision: str = "fp32", busy: float = 0.0) -> dict:
    figures = {"time_to_first_token_ms": {"median": ttft}, "decode_tokens_per_s": {"median": decode},
               "end_to_end_ms": {"median": ttft * 2}, "vision_ms": {"median": ttft / 4}}  # fmt: skip
    return {"kind": kind, "label": label, "precision": precision, "background_cpu": busy,
            "runs": {"16": {"figures": figures}}}  # fmt: skip


def test_ratios_against_the_fastest_pytorch_path_of_the_run():
    from phi_onnx_bench.runner import fastest_ratios, targets

    results = [
        _path("onnxruntime-genai", "ort-int4", 600.0, 60.0, "int4"),
        _path("onnxruntime-genai", "ort-fp32", 1000.0, 30.0),
        _path("pytorch", "pytorch", 1100.0, 20.0),
        _path("pytorch", "pytorch-bf16", 800.0, 15.0, "bf16"),  # fastest first token, slower decode
        {"kind": "pytorch", "label": "pytorch-bf16-compile", "precision": "bf16", "skipped": "no bf16", "runs": {}},
    ]
    int4, fp32 = fastest_ratios(results)
    assert int4 == {"onnxruntime_genai": "ort-int4", "num_crops": 16, "first_token_vs": "pytorch-bf16",
                    "time_to_first_token": 0.75, "decode_vs": "pytorch", "decode_tokens_per_s": 3.0}  # fmt: skip
    assert fp32["time_to_first_token"] == 1.25 and fp32["decode_tokens_per_s"] == 1.5
    judged = {t["target"]: t["met"] for t in targets(results)}
    assert judged == {
        "time to first token ort-int4 / fastest PyTorch (pytorch-bf16), num_crops 16 <= 0.7": False,
        "decode tokens/s ort-int4 / fastest PyTorch (pytorch), num_crops 16 >= 3.0": True,
        "time to first token ort-fp32 / pytorch, num_crops 16 <= 1.0": True,  # against fp32 eager only
        "decode tokens/s ort-fp32 / pytorch, num_crops 16 >= 1.2": True,
    }


def test_bf16_runs_only_with_native_bf16_arithmetic():
    from phi_onnx_bench.torch_path import bf16_skip_reason, cpu_kernels

    kernels = cpu_kernels()
    assert kernels["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "NO AVX")
    assert set(kernels["cpuinfo_flags"]) <= {f for f in kernels["cpuinfo_flags"] if f.startswith(("amx", "avx512"))}
    assert bf16_skip_reason({"avx512_bf16": True, "amx_tile": False}) is None
    assert bf16_skip_reason({"avx512_bf16": False, "amx_tile": True}) is None
    reason = bf16_skip_reason({"avx512_bf16": False, "amx_tile": False, "cpu_capability": "AVX2"})
    assert reason and "no native bf16" in reason and "AVX2" in reason


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="private memory is read from /proc (Linux)")
def test_private_memory_sampler_catches_a_peak_that_is_gone_when_read():
    import time

    import numpy as np

    from phi_onnx_bench.spec import PrivateMemory, status_mb

    sampler = PrivateMemory(interval=0.01).start()
    before = status_mb("RssAnon")
    block = np.ones(200 * 2**20 // 8)  # 200 MiB of private pages, touched
    time.sleep(0.2)
    del block
    time.sleep(0.1)
    assert status_mb("RssAnon") < before + 100, "the block was returned to the system"
    assert sampler.peak_mb() >= before + 150, "the sampler saw it while it was there"


def test_the_peak_restarts_after_loading():
    """reset_peak_rss gives the peak so far (the paths call it after loading) and restarts the count, so the peak the
    paths report once loaded leaves out what loading alone touched."""
    import numpy as np

    from phi_onnx_bench.spec import peak_rss_mb, reset_peak_rss

    block = np.ones(200 * 2**20 // 8)  # 200 MiB touched, then returned: a loading peak
    del block
    loaded = reset_peak_rss()
    if loaded is None:
        pytest.skip("no VmHWM or clear_refs here")
    assert peak_rss_mb() < loaded - 150
