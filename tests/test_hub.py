"""Tests for phi_onnx.hub against a local server that speaks the Hub's download protocol (tests/hubserver.py).

Each fetch runs in a fresh Python process configured the way a user configures huggingface_hub: HF_ENDPOINT, HF_HOME
and HF_HUB_OFFLINE in the environment (huggingface_hub reads them at import, so they cannot change inside one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hubserver import CPU_FOLDER, FAKE_COMMIT, GPU_FOLDER, HubServer, build_fake_model, genai_config, make_hub_repo

from phi_onnx.errors import ModelError
from phi_onnx.hub import DEFAULT_REPO, MARKER, is_repo_id, resolve_model

DATA = f"{CPU_FOLDER}/phi-3.5-v-instruct-text.onnx.data"
TEXT_REPO = "someone/phi3-mini-onnx"

_RUNNER = """
import json, sys, time
from phi_onnx.errors import PhiOnnxError
from phi_onnx import hub
for func, args, kwargs in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        out = {"path": str(getattr(hub, func)(*args, **kwargs))}
    except PhiOnnxError as err:
        out = {"error": type(err).__name__, "message": str(err)}
    print(json.dumps(out | {"seconds": time.monotonic() - start}), flush=True)
"""


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    official = make_hub_repo(root / "official")
    text = root / "text" / "cpu" / "phi3-mini-int4"
    build_fake_model(text)
    (text / "genai_config.json").write_text(json.dumps(genai_config("phi-3.5-v-instruct", 16, model_type="phi3")))
    return {DEFAULT_REPO: official, TEXT_REPO: root / "text"}


@pytest.fixture
def hub(repos: dict[str, Path]):
    with HubServer(repos) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path, hub: HubServer) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return clean | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass
class Run:
    result: dict
    stderr: str
    seconds: float

    @property
    def path(self) -> Path:
        assert "path" in self.result, (self.result, self.stderr)
        return Path(self.result["path"])

    def error(self, kind: str = "FetchError") -> str:
        assert self.result.get("error") == kind, (self.result, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
        return self.result["message"]


def calls(env: dict[str, str], *specs: tuple[str, tuple, dict]) -> list[Run]:
    """Run ``phi_onnx.hub.<func>(*args, **kwargs)`` for each spec, in order, in one fresh process with ``env``."""
    specs = tuple((f, a, {"progress": False} | k if f == "fetch" else k) for f, a, k in specs)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(specs)], env=env, capture_output=True, text=True, timeout=60
    )
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(specs), (proc.returncode, proc.stdout, proc.stderr)
    return [Run(r, proc.stderr, r["seconds"]) for r in results]


def call(env: dict[str, str], *args: object, func: str = "fetch", **kwargs: object) -> Run:
    """Run one ``phi_onnx.hub.<func>(*args, **kwargs)`` in a fresh process with ``env``."""
    return calls(env, (func, args, kwargs))[0]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def files_of(root: Path, folder: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------------------------


def test_first_fetch_downloads_only_the_chosen_folder(env, hub, repos, tmp_path) -> None:
    path = call(env).path
    assert path.as_posix().endswith(CPU_FOLDER) and path.is_relative_to(tmp_path / "hf" / "hub")
    assert set(hub.downloads()) == files_of(repos[DEFAULT_REPO], CPU_FOLDER)
    assert (path / "phi-3.5-v-instruct-text.onnx.data").read_bytes() == (repos[DEFAULT_REPO] / DATA).read_bytes()
    assert (path / MARKER).is_file()
    assert (tmp_path / "hf" / "hub" / "models--microsoft--Phi-3.5-vision-instruct-onnx" / "refs" / "main").is_file()


def test_auto_picks_the_gpu_folder_with_cuda_and_a_folder_can_be_named(env, hub, repos) -> None:
    gpu, cpu = calls(
        env, ("fetch", (), {"cuda": True}), ("fetch", (), {"variant": "cpu-int4-rtn-block-32-acc-level-4"})
    )
    assert gpu.path.as_posix().endswith(GPU_FOLDER) and cpu.path.as_posix().endswith(CPU_FOLDER)
    got = hub.downloads()
    assert files_of(repos[DEFAULT_REPO], GPU_FOLDER) <= set(got)  # the first call: the whole GPU folder
    # The second only what differs: files identical to GPU ones (same etag) are already in the cache's blobs.
    assert len(got) == len(set(got)) and f"{CPU_FOLDER}/genai_config.json" not in got
    assert DATA in got


def test_second_fetch_downloads_nothing(env, hub) -> None:
    first = call(env).path
    hub.log.clear()
    assert call(env).path == first
    assert hub.downloads() == []
    assert not any(r.method == "HEAD" for r in hub.log)


def test_unchanged_files_are_not_rehashed_and_changed_ones_are(env, hub) -> None:
    path = call(env).path
    blob = (path / "phi-3.5-v-instruct-text.onnx.data").resolve()
    stat = blob.stat()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))  # same size; put the mtime back so only a re-hash could notice
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert call(env).path == path  # verified from the marker: no re-hash
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    message = call(env).error()
    assert "phi-3.5-v-instruct-text.onnx.data has sha256" in message and "phi-onnx fetch --force" in message


def test_offline_mode_uses_the_cache_without_any_request(env, hub) -> None:
    path = call(env).path
    hub.log.clear()
    assert call(env | {"HF_HUB_OFFLINE": "1"}).path == path
    assert hub.log == []


def test_offline_mode_with_an_empty_cache_says_what_to_do(env, hub) -> None:
    message = call(env | {"HF_HUB_OFFLINE": "1"}).error()
    assert message == (
        f"HF_HUB_OFFLINE is set and {DEFAULT_REPO} ({CPU_FOLDER}) is not in the cache: connect to the network and "
        "try again, or pass a local model folder (a random-weight test model: pip install 'phi-onnx[export]', then "
        "phi-onnx export tiny --output DIR)"
    )
    assert hub.log == []


def test_unreachable_hub_fails_fast_with_one_line(env) -> None:
    start = time.monotonic()
    message = call(env | {"HF_ENDPOINT": closed_port_url()}).error()
    assert message.startswith("cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert f"and {DEFAULT_REPO} ({CPU_FOLDER}) is not in the cache: connect to the network and try again" in message
    assert "\n" not in message
    assert time.monotonic() - start < 10  # the whole process, imports included


def test_unreachable_hub_falls_back_to_a_complete_cache(env) -> None:
    path = call(env).path
    fetched, resolved, strict = calls(
        env | {"HF_ENDPOINT": closed_port_url()},
        ("fetch", (), {}),
        ("resolve_model", (None,), {"cuda": False}),
        ("resolve_model", (None,), {"cuda": False, "offline_ok": False}),
    )
    assert fetched.path == path and resolved.path == path
    assert strict.error().startswith("cannot reach the Hugging Face Hub")


def test_a_cut_transfer_resumes_with_a_range_request(env, hub, repos) -> None:
    hub.cut_after[DATA] = 11 << 20  # of 12 MiB
    path = call(env).path
    gets = [r for r in hub.log if r.method == "GET" and r.path.endswith(DATA)]
    # huggingface_hub writes 10 MiB chunks and asks for the rest after the last whole one.
    assert [g.range for g in gets] == [None, f"bytes={10 << 20}-"]
    assert (path / "phi-3.5-v-instruct-text.onnx.data").read_bytes() == (repos[DEFAULT_REPO] / DATA).read_bytes()


def test_a_corrupted_file_is_detected_and_force_repairs_it(env, hub, repos) -> None:
    hub.corrupt.add(DATA)
    first, again = calls(env, ("fetch", (), {}), ("fetch", (), {}))
    message = first.error()
    expected = hub.entries(DEFAULT_REPO)[DATA].sha256
    assert "phi-3.5-v-instruct-text.onnx.data has sha256 " in message and f"the Hub says {expected}" in message
    assert "`phi-onnx fetch --force`" in message
    assert again.error() == message  # a plain re-run does not hide it
    offline = call(env | {"HF_HUB_OFFLINE": "1"}).error()  # nor does going offline
    assert "phi-3.5-v-instruct-text.onnx.data has sha256" in offline
    hub.corrupt.clear()
    path = call(env, force=True).path
    assert (path / "phi-3.5-v-instruct-text.onnx.data").read_bytes() == (repos[DEFAULT_REPO] / DATA).read_bytes()


def test_local_dir_gets_real_files_and_is_reused(env, hub, tmp_path) -> None:
    target = tmp_path / "models"
    path = call(env, local_dir=str(target)).path
    assert path == target / CPU_FOLDER
    assert not (path / "genai_config.json").is_symlink()
    assert not (tmp_path / "hf" / "hub" / "models--microsoft--Phi-3.5-vision-instruct-onnx" / "blobs").exists()
    hub.log.clear()
    assert call(env, local_dir=str(target)).path == path and hub.downloads() == []
    assert call(env | {"HF_HUB_OFFLINE": "1"}, local_dir=str(target)).path == path


def test_an_unknown_variant_lists_the_available_ones(env, hub) -> None:
    message = call(env, variant="npu-int4").error()
    assert message == (
        f"variant 'npu-int4' is not in {DEFAULT_REPO}: available: cpu-int4 ({CPU_FOLDER}), gpu-int4 ({GPU_FOLDER})"
    )
    assert hub.downloads() == []


def test_a_folder_that_is_not_phi3v_is_refused_before_the_big_files(env, hub) -> None:
    message = call(env, TEXT_REPO).error("ModelError")
    assert message == (
        f"{TEXT_REPO}/cpu/phi3-mini-int4/genai_config.json says type 'phi3', not 'phi3v': "
        "this is not a Phi-3-vision model folder"
    )
    assert hub.downloads() == ["cpu/phi3-mini-int4/genai_config.json"]


def test_legacy_repos_are_refused_without_a_network_call(env, hub) -> None:
    legacy = [f"microsoft/Phi-3-vision-128k-instruct-onnx-{suffix}" for suffix in ("cuda", "cpu", "directml")]
    runs = calls(env, *(("fetch", (repo,), {}) for repo in legacy))
    for repo, run, variant in zip(legacy, runs, ("gpu-int4", "cpu-int4", "gpu-int4"), strict=True):
        assert run.error() == (
            f"{repo} holds the 2024 ONNX format that onnxruntime-genai >= 0.5 rejects: fetch "
            f"microsoft/Phi-3-vision-128k-instruct-onnx (--variant {variant}) or {DEFAULT_REPO} instead"
        )
    assert hub.log == []


def test_hub_errors_are_one_line_with_the_fix(env, hub) -> None:
    missing, revision = calls(env, ("fetch", ("nobody/missing-onnx",), {}), ("fetch", (), {"revision": "v9"}))
    assert "nobody/missing-onnx was not found on the Hub" in missing.error()
    assert revision.error() == f"revision 'v9' does not exist in {DEFAULT_REPO}: check --revision"
    hub.gated.add(DEFAULT_REPO)
    message = call(env).error()
    assert message.startswith(f"{DEFAULT_REPO} is gated") and "HF_TOKEN" in message


def test_the_server_answers_the_hub_api_calls(hub, repos) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    repo = repos[DEFAULT_REPO]
    everything = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert set(api.list_repo_files(DEFAULT_REPO)) == everything
    top = {(e.path, type(e).__name__) for e in api.list_repo_tree(DEFAULT_REPO, "gpu")}
    assert top == {(GPU_FOLDER, "RepoFolder")}
    (info,) = api.get_paths_info(DEFAULT_REPO, [DATA])
    assert info.lfs.sha256 == hub.entries(DEFAULT_REPO)[DATA].sha256 and info.size == 12 << 20
    model = api.model_info(DEFAULT_REPO, files_metadata=True)
    assert model.sha == FAKE_COMMIT and {s.rfilename for s in model.siblings} == everything


# --------------------------------------------------------------------------------------------------------------------
# resolve_model without the network


def test_resolve_model_local_paths(tmp_path: Path) -> None:
    folder = build_fake_model(tmp_path / "m")
    assert resolve_model(folder, cuda=False) == folder
    assert resolve_model(str(folder), cuda=True) == folder
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        resolve_model(folder / "tokenizer.json", cuda=False)
    with pytest.raises(ModelError, match="does not exist and is not a Hub repo id"):
        resolve_model(str(tmp_path / "missing"), cuda=False)
    with pytest.raises(ModelError, match="does not exist and is not a Hub repo id"):
        resolve_model(Path("owner/name"), cuda=False)  # a Path is never a repo id


def test_resolve_model_fetches_repo_ids(env) -> None:
    assert call(env, DEFAULT_REPO, func="resolve_model", cuda=True).path.as_posix().endswith(GPU_FOLDER)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(DEFAULT_REPO, True), ("a/b", True), ("a/b/c", False), ("./a/b", False), ("/abs", False), ("a/..", False)],
)
def test_is_repo_id(text: str, expected: bool) -> None:
    assert is_repo_id(text) is expected


def test_cli_fetch_then_run_the_default_model_served_by_the_hub(
    tmp_path, tiny_portable_model_dir, example_image
) -> None:
    """The main job as a user meets it, against a local Hub serving the real tiny model in the official layout
    (onnxruntime's kernels only, as Microsoft's folders): `phi-onnx fetch` prints the folder; `phi-onnx run` without
    MODEL finds the default repo and answers; with the Hub gone the cached copy still answers; with nothing cached and
    no Hub, one line says what to do."""
    repo = make_hub_repo(tmp_path / "repo", tiny_portable_model_dir)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with HubServer({DEFAULT_REPO: repo}) as server:
        env = clean | {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}

        def cli(*args: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "phi_onnx", *args], env=environ, capture_output=True, text=True, timeout=120
            )

        fetched = cli("fetch", "--device", "cpu")
        assert fetched.returncode == 0, fetched.stderr
        folder = Path(fetched.stdout.strip().splitlines()[-1])
        assert folder.as_posix().endswith(CPU_FOLDER)
        assert (folder / "phi-3-v-instruct-vision.onnx").is_file()
        answered = cli("run", "-i", str(example_image), "Describe this image.", "--max-new-tokens", "4", "-d", "cpu")
        assert answered.returncode == 0, answered.stderr
        assert answered.stdout.strip()
        assert "(1921 image, 0 cached), 4 generated" in answered.stderr
    offline = cli(
        "run",
        "-i",
        str(example_image),
        "Hi",
        "--max-new-tokens",
        "2",
        "-d",
        "cpu",
        environ=env | {"HF_ENDPOINT": closed_port_url()},
    )
    assert offline.returncode == 0, offline.stderr
    empty = cli(
        "run", "Hi", "-d", "cpu", environ=env | {"HF_ENDPOINT": closed_port_url(), "HF_HOME": str(tmp_path / "e")}
    )
    assert empty.returncode == 2
    assert len(empty.stderr.strip().splitlines()) == 1, empty.stderr
    assert "phi-onnx export tiny" in empty.stderr


def test_a_hub_folder_that_loads_native_code_is_refused_before_its_weights(tmp_path, tiny_model_dir) -> None:
    """A folder whose genai_config.json names a custom_ops_library (phi-onnx's own CPU builds do) would make
    onnxruntime-genai load that library: fetched from the Hub, it is refused in one line, before the big files."""
    from phi_onnx_export.ops import LIBRARY, unsupported

    if unsupported():
        pytest.skip(f"the tiny model carries no native library here: {unsupported()}")
    assert (tiny_model_dir / LIBRARY).is_file()
    repo = make_hub_repo(tmp_path / "repo", tiny_model_dir)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with HubServer({DEFAULT_REPO: repo}) as server:
        env = clean | {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = subprocess.run([sys.executable, "-m", "phi_onnx", "fetch", "--device", "cpu"], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        downloaded = server.downloads()
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"loads a native library ({LIBRARY}" in done.stderr and "--portable" in done.stderr
    assert not any(path.endswith((".onnx", ".data", ".so")) for path in downloaded), downloaded
