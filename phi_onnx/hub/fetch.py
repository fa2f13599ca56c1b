"""Fetch Microsoft's published phi3v ONNX models from the Hugging Face Hub, verified and offline-ready.

Downloads go through ``huggingface_hub.snapshot_download`` restricted to one variant folder, so the HF cache,
``HF_HOME``, ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` behave as everywhere else. After a download every file
is checked against the Hub's metadata (size, LFS sha256, git blob id for small files); what passed is recorded in
``.phi-onnx-verified.json`` in the folder with its size and mtime, so later runs re-hash nothing that did not change.
"""

from __future__ import annotations

import contextlib
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi_onnx.errors import FetchError, ModelError
from phi_onnx.hub.modelinfo import OFFICIAL_REPOS, check_genai_config, inspect_model, native_libraries
from phi_onnx.hub.verify import MARKER, RemoteFile, load_marker, verify_folder

DEFAULT_REPO = OFFICIAL_REPOS[0]
VARIANTS = {
    "cpu-int4": "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
    "gpu-int4": "gpu/gpu-int4-rtn-block-32",
}
# The 2024 repos whose format onnxruntime-genai >= 0.5 rejects, with the variant to use instead.
LEGACY_REPOS = {
    "microsoft/phi-3-vision-128k-instruct-onnx-cuda": "gpu-int4",
    "microsoft/phi-3-vision-128k-instruct-onnx-cpu": "cpu-int4",
    "microsoft/phi-3-vision-128k-instruct-onnx-directml": "gpu-int4",
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_METADATA_TIMEOUT_S = 10.0
_NEXT_STEPS = (
    "connect to the network and try again, or pass a local model folder (a random-weight test model: "
    "pip install 'phi-onnx[export]', then phi-onnx export tiny --output DIR)"
)


class _HubUnreachable(Exception):
    """The Hub could not be asked (network down, offline mode, server error): the cache may still serve."""


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub repo id (``owner/name``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def fetch(
    repo: str | None = None,
    *,
    variant: str = "auto",
    cuda: bool = False,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    offline_ok: bool = True,
) -> Path:
    """Download one variant folder of a phi3v ONNX repo, verify it, and return its local path.

    Args:
        repo: A Hub repo id; defaults to :data:`DEFAULT_REPO`.
        variant: ``"auto"`` (``gpu-int4`` when ``cuda`` else ``cpu-int4``), ``"cpu-int4"``, ``"gpu-int4"``, or the
            path of a folder in the repo that holds a genai_config.json.
        cuda: Whether a CUDA device is usable here; only used by ``variant="auto"``.
        revision: A branch, tag or commit; defaults to the repo's main branch.
        local_dir: Download into this folder instead of the Hugging Face cache.
        progress: Show progress bars on stderr.
        force: Download every file again, even when cached.
        offline_ok: When the Hub cannot be reached (or HF_HUB_OFFLINE is set), use a complete cached copy instead of
            failing. Files that changed since they were verified are checked again against the recorded hashes.

    Returns:
        The local folder holding genai_config.json, checked with :func:`~phi_onnx.hub.modelinfo.inspect_model`.

    Raises:
        FetchError: The repo is a legacy one, the variant is unknown, the Hub cannot be reached and nothing is cached,
            access is denied, or a file does not match the Hub's metadata.
        ModelError: The folder is not a usable phi3v model.
    """
    from huggingface_hub import HfApi, is_offline_mode

    repo = repo or DEFAULT_REPO
    _check_repo(repo)
    try:
        if is_offline_mode():
            raise _HubUnreachable("HF_HUB_OFFLINE is set")
        api = HfApi()
        commit, remote = _remote_files(api, repo, revision)
    except _HubUnreachable as err:
        if not offline_ok:
            raise FetchError(f"{err}: connect to the network, or pass a local model folder") from err
        return _from_cache(repo, variant, cuda, revision, local_dir, reason=str(err))

    folder = _pick_folder(repo, variant, cuda, list(remote))
    _check_remote_config(repo, folder, commit, local_dir, progress=progress)
    patterns = _patterns(folder, list(remote))
    root = _download(repo, patterns, revision or "main", commit, local_dir, progress=progress, force=force)
    if local_dir is None and root.name != commit:  # the branch moved between our two calls
        commit, remote = _remote_files(api, repo, root.name)
    path = root / folder if folder else root
    prefix = f"{folder}/" if folder else ""
    expected = {p[len(prefix) :]: f for p, f in remote.items() if p.startswith(prefix) and (folder or "/" not in p)}
    if force:
        (path / MARKER).unlink(missing_ok=True)
    verify_folder(path, expected, repo=repo, commit=commit, progress=progress)
    refuse_native_code(inspect_model(path).config, f"{repo}/{folder}")
    return path


def resolve_model(model: str | Path | None, *, cuda: bool, offline_ok: bool = True) -> Path:
    """Turn what a user passed as the model into a local folder, fetching from the Hub when needed.

    Args:
        model: A local folder, a Hub repo id (``owner/name``), or None for :data:`DEFAULT_REPO`.
        cuda: Whether a CUDA device is usable; picks the variant of a fetched repo.
        offline_ok: When the Hub cannot be reached, use a complete cached copy instead of failing.

    Returns:
        The model folder. A local folder is returned as given; the caller inspects it.

    Raises:
        ModelError: ``model`` is a file, or neither an existing folder nor a repo id.
        FetchError: Fetching the repo failed.
    """
    if model is None:
        return fetch(cuda=cuda, offline_ok=offline_ok)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{path} is a file, not a model folder: pass the folder that holds genai_config.json")
    if isinstance(model, str) and is_repo_id(model):
        return fetch(model, cuda=cuda, offline_ok=offline_ok)
    raise ModelError(
        f"model folder {model} does not exist and is not a Hub repo id (owner/name): pass a folder that holds "
        f"genai_config.json, or a repo such as {DEFAULT_REPO}"
    )


def _check_repo(repo: str) -> None:
    if not is_repo_id(repo):
        raise FetchError(f"'{repo}' is not a Hub repo id: use owner/name, e.g. {DEFAULT_REPO}")
    if (instead := LEGACY_REPOS.get(repo.lower())) is not None:
        target = OFFICIAL_REPOS[1]
        raise FetchError(
            f"{repo} holds the 2024 ONNX format that onnxruntime-genai >= 0.5 rejects: fetch {target} "
            f"(--variant {instead}) or {DEFAULT_REPO} instead"
        )


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_error(err: BaseException, repo: str, revision: str | None) -> BaseException:
    """Map a huggingface_hub / httpx2 exception to a FetchError, or to _HubUnreachable when the cache may help."""
    import httpx2
    from huggingface_hub import errors

    if isinstance(err, (httpx2.TransportError, errors.OfflineModeIsEnabled)):
        return _HubUnreachable(f"cannot reach the Hugging Face Hub at {_endpoint()} ({_one_line(err, 120)})")
    if isinstance(err, errors.GatedRepoError):
        return FetchError(
            f"{repo} is gated: accept its conditions at {_endpoint()}/{repo} while logged in, then set HF_TOKEN or "
            "run `hf auth login`"
        )
    if isinstance(err, errors.RepositoryNotFoundError):
        return FetchError(
            f"{repo} was not found on the Hub (or it is private and no valid token was sent): check the name or the "
            "local path, or set HF_TOKEN / run `hf auth login`"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return FetchError(f"revision '{revision}' does not exist in {repo}: check --revision")
    if isinstance(err, errors.RemoteEntryNotFoundError):
        return FetchError(f"{repo}: {_one_line(err)}: the repo changed while fetching, run `phi-onnx fetch` again")
    if isinstance(err, json.JSONDecodeError):
        return FetchError(
            f"{_endpoint()} answered with something that is not the Hub's JSON API ({_one_line(err, 80)}): check "
            "HF_ENDPOINT, or a proxy or captive portal between you and the Hub"
        )
    if isinstance(err, errors.HfHubHTTPError):
        status = err.response.status_code
        if status in (401, 403):
            return FetchError(f"the Hub refused access to {repo} ({status}): set HF_TOKEN to a token that can read it")
        return _HubUnreachable(f"the Hugging Face Hub answered HTTP {status} for {repo}")
    return err


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, *, downloading: bool) -> Iterator[None]:
    """Turn the Hub's expected failures into one-line errors; unexpected ones keep their traceback.

    Before the download, an unreachable Hub raises _HubUnreachable (the cache may serve); during it, a FetchError.
    """
    try:
        yield
    except Exception as err:
        # huggingface_hub raises ValueError("Force download failed ...") from the real cause when force_download fails.
        cause = err.__cause__ if isinstance(err, ValueError) and err.__cause__ is not None else err
        if downloading and isinstance(cause, OSError) and cause.errno and not isinstance(cause, ConnectionError):
            raise FetchError(
                f"cannot write the download of {repo} ({_one_line(cause)}): free space or use --local-dir"
            ) from err
        mapped = _hub_error(cause, repo, revision)
        if isinstance(mapped, FetchError) or (isinstance(mapped, _HubUnreachable) and not downloading):
            raise mapped from err
        if not downloading or not isinstance(mapped, (_HubUnreachable, OSError)):
            raise
        raise FetchError(
            f"downloading {repo} was interrupted ({_one_line(cause, 160)}): run `phi-onnx fetch` again; complete "
            "files are kept"
        ) from err


def _remote_files(api: Any, repo: str, revision: str | None) -> tuple[str, dict[str, RemoteFile]]:
    """Resolve ``revision`` to a commit and list every file of the repo with its size and hashes (one request)."""
    with _hub_errors(repo, revision, downloading=False):
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=_METADATA_TIMEOUT_S)
    if not info.sha:
        raise FetchError(f"the Hub gave no commit for {repo}@{revision or 'main'}: check HF_ENDPOINT")
    files = {
        s.rfilename: RemoteFile(s.size, s.lfs.sha256 if s.lfs is not None else None, s.blob_id)
        for s in info.siblings or []
    }
    return info.sha, files


def _config_folders(paths: list[str]) -> list[str]:
    return sorted({p.rpartition("/")[0] for p in paths if p.rpartition("/")[2] == "genai_config.json"})


def _describe(folders: list[str]) -> str:
    names = {v: k for k, v in VARIANTS.items()}
    return ", ".join(f"{names[f]} ({f})" if f in names else (f or "(repo root)") for f in folders) or "none"


def _pick_folder(repo: str, variant: str, cuda: bool, paths: list[str]) -> str:
    """Choose the folder (relative to the repo root, "" for the root) that the variant names."""
    folders = _config_folders(paths)
    if not folders:
        raise FetchError(f"{repo} has no folder with a genai_config.json: it is not an onnxruntime-genai model repo")
    wanted = variant.strip().strip("/")
    if wanted == "auto":
        preferred = VARIANTS["gpu-int4" if cuda else "cpu-int4"]
        if preferred in folders:
            return preferred
        if len(folders) == 1:
            return folders[0]
        device = "CUDA" if cuda else "CPU"
        raise FetchError(f"{repo} has no standard {device} folder: pass --variant with one of {_describe(folders)}")
    wanted = VARIANTS.get(wanted, wanted)
    if wanted in folders:
        return wanted
    by_name = [f for f in folders if f.rpartition("/")[2] == wanted]
    if len(by_name) == 1:
        return by_name[0]
    raise FetchError(f"variant '{variant}' is not in {repo}: available: {_describe(folders)}")


def _check_remote_config(repo: str, folder: str, commit: str, local_dir: str | Path | None, *, progress: bool) -> None:
    """Download the folder's genai_config.json alone and refuse non-phi3v or legacy folders before the big files."""
    from huggingface_hub import hf_hub_download

    filename = f"{folder}/genai_config.json" if folder else "genai_config.json"
    with _hub_errors(repo, commit, downloading=True):
        path = hf_hub_download(repo, filename, revision=commit, local_dir=local_dir, tqdm_class=_progress(progress))
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{repo}/{filename} is not valid JSON ({err}): this folder is not a usable model") from err
    check_genai_config(config, f"{repo}/{filename}")
    refuse_native_code(config, f"{repo}/{filename}")


def refuse_native_code(config: Any, where: str) -> None:
    """Refuse a downloaded folder whose genai_config.json loads a native operator library (``custom_ops_library``):
    onnxruntime-genai would run that code. Microsoft's folders have none; phi-onnx's own CPU builds carry one, built on
    the machine that exported them, and are meant to be used from there."""
    found = native_libraries(config)
    if found:
        graph, library = next(iter(found.items()))
        raise ModelError(
            f"{where} loads a native library ({library}, for its {graph} graph) and phi-onnx does not run native code "
            "downloaded from the Hub: export the model on this machine with `phi-onnx export build`, or ask its "
            "publisher for a build made with --portable"
        )


def _progress(show: bool) -> type | None:
    """The tqdm class for huggingface_hub: None keeps its own bars (stderr), else a class whose bars are disabled."""
    if show:
        return None
    from tqdm.auto import tqdm

    class _NoProgress(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    return _NoProgress


def _patterns(folder: str, paths: list[str] | None) -> list[str]:
    """allow_patterns for one folder; for the repo root, its top-level files (all files when they are unknown)."""
    if folder:
        return [f"{glob.escape(folder)}/*"]
    return [glob.escape(p) for p in paths if "/" not in p] if paths else ["*"]


def _download(
    repo: str,
    patterns: list[str],
    revision: str,
    commit: str,
    local_dir: str | Path | None,
    *,
    progress: bool,
    force: bool,
) -> Path:
    from huggingface_hub import snapshot_download

    with _hub_errors(repo, revision, downloading=True):
        root = snapshot_download(
            repo,
            # Into the cache, pass the branch so its ref is recorded for offline use; into a local_dir, pin the commit.
            revision=revision if local_dir is None else commit,
            allow_patterns=patterns,
            local_dir=local_dir,
            force_download=force,
            tqdm_class=_progress(progress),
        )
    return Path(root)


def _from_cache(
    repo: str, variant: str, cuda: bool, revision: str | None, local_dir: str | Path | None, *, reason: str
) -> Path:
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, IncompleteSnapshotError, LocalEntryNotFoundError

    cached: list[str] = []
    with contextlib.suppress(CachedRepoTreeNotFoundError):
        cached = [f.path for f in get_cached_repo_tree(repo, revision=revision, local_dir=local_dir)]
    if cached:
        try:
            folder = _pick_folder(repo, variant, cuda, cached)
        except FetchError as err:
            raise FetchError(f"{reason} and {err}: {_NEXT_STEPS}") from err
    else:
        wanted = ("gpu-int4" if cuda else "cpu-int4") if variant == "auto" else variant
        folder = VARIANTS.get(wanted, wanted.strip().strip("/"))
    where = f"{repo} ({folder})" if folder else repo
    try:
        root = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=_patterns(folder, cached),
                local_dir=local_dir,
                local_files_only=True,
            )
        )
    except IncompleteSnapshotError as err:
        partly = folder and (Path(err.snapshot_path) / folder).is_dir()
        state = "only partly in the cache" if partly else "not in the cache"
        raise FetchError(f"{reason} and {where} is {state}: {_NEXT_STEPS}") from err
    except LocalEntryNotFoundError as err:
        raise FetchError(f"{reason} and {where} is not in the cache: {_NEXT_STEPS}") from err
    path = root / folder if folder else root
    if not (path / "genai_config.json").is_file():
        raise FetchError(f"{reason} and {where} is not in the cache: {_NEXT_STEPS}")
    marker = load_marker(path)  # what the last online fetch recorded; files changed or failed since are re-checked
    if recorded := marker.get("files"):
        expected = {
            rel: RemoteFile(r.get("size"), r.get("sha256"), r.get("blob_id"))
            for rel, r in recorded.items()
            if isinstance(r, dict)
        }
        verify_folder(path, expected, repo=repo, commit=str(marker.get("commit")), progress=False)
    refuse_native_code(inspect_model(path).config, f"{repo} ({folder})")
    return path
