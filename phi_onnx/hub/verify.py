"""Verify downloaded files against the Hub's metadata, re-hashing only what changed since it last passed.

What passed is recorded in ``.phi-onnx-verified.json`` in the folder (size, hashes, mtime), so a multi-GB model is
hashed once, and an offline run can still re-check a file that failed or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi_onnx.errors import FetchError

MARKER = ".phi-onnx-verified.json"
_CHUNK = 8 << 20
_HASH_BAR_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A file's metadata as the Hub reports it."""

    size: int | None
    sha256: str | None
    blob_id: str | None


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _sha256(path: Path, bar: Any) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def load_marker(folder: Path) -> dict[str, Any]:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else {}


def _save_marker(folder: Path, marker: dict[str, Any]) -> None:
    tmp = folder / f"{MARKER}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(marker, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(folder / MARKER)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only folder only costs a re-hash next time


def _check_file(path: Path, rel: str, want: RemoteFile, bar: Any) -> str | None:
    """Check one file against the Hub's metadata; return the problem, or None when it matches."""
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if want.size is not None and size != want.size:
        return f"{rel} has {size} bytes, the Hub says {want.size}"
    if want.sha256 and (got := _sha256(path, bar)) != want.sha256.lower():
        return f"{rel} has sha256 {got}, the Hub says {want.sha256}"
    if not want.sha256 and want.blob_id and (got := _git_blob_sha1(path)) != want.blob_id.lower():
        return f"{rel} has git blob id {got}, the Hub says {want.blob_id}"
    return None


def _passed_before(seen: Any, record: dict[str, Any], path: Path) -> bool:
    """Whether the marker shows this file passed, against the same Hub metadata, and has not changed since."""
    if not isinstance(seen, dict) or seen.get("mtime_ns") is None or not path.is_file():
        return False
    stat = path.stat()
    return seen == {**record, "mtime_ns": stat.st_mtime_ns} and stat.st_size == record["size"]


def verify_folder(folder: Path, expected: dict[str, RemoteFile], *, repo: str, commit: str, progress: bool) -> None:
    """Check every expected file against the Hub's metadata, re-hashing only what changed since it last passed.

    The marker keeps every expected file with the Hub's size and hashes, plus the mtime of the copy that passed
    (None when it failed), so an offline run can re-check a file that failed or changed without asking the Hub.
    """
    old = load_marker(folder).get("files", {})
    records = {
        rel: {"size": w.size, "sha256": w.sha256, "blob_id": w.blob_id, "mtime_ns": None} for rel, w in expected.items()
    }
    todo = [rel for rel, record in records.items() if not _passed_before(old.get(rel), record, folder / rel)]
    for rel in set(records) - set(todo):
        records[rel]["mtime_ns"] = old[rel]["mtime_ns"]
    total = sum((folder / rel).stat().st_size for rel in todo if expected[rel].sha256 and (folder / rel).is_file())
    bar = None
    if progress and total >= _HASH_BAR_MIN_BYTES:
        from huggingface_hub.utils import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="Verifying")
    problems = []
    try:
        for rel in sorted(todo):
            if problem := _check_file(folder / rel, rel, expected[rel], bar):
                problems.append(problem)
            else:
                records[rel]["mtime_ns"] = (folder / rel).stat().st_mtime_ns
    finally:
        if bar is not None:
            bar.close()
    _save_marker(folder, {"format": 1, "repo": repo, "commit": commit, "files": records})
    if problems:
        raise FetchError(
            f"{repo} in {folder} does not match the Hub: {'; '.join(problems)}: delete the bad file(s) or run "
            "`phi-onnx fetch --force` to download them again"
        )
