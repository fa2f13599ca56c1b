"""A local HTTP server that speaks the part of the Hugging Face Hub protocol huggingface_hub 2.4 uses to download.

Endpoints (as called by ``HfApi.model_info``, ``list_repo_tree``, ``get_paths_info``, ``snapshot_download`` and
``hf_hub_download``; read from huggingface_hub 2.4.0):

- ``GET /api/models/{repo}[/revision/{rev}]``: repo info with ``sha`` and ``siblings`` (size, blobId, lfs).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=``: one page of file and directory entries.
- ``POST /api/models/{repo}/paths-info/{rev}``: entries for the form field ``paths``.
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (sha256 for LFS files, git
  blob id otherwise), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length`` and ``Range`` support.

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the Hub does, so
huggingface_hub raises its usual exceptions. Test switches: ``cut_after`` (drop the connection after N bytes of one
transfer of a file), ``corrupt`` (serve one file with a flipped byte), ``gated`` repos, and a request ``log``. The
server listens on 127.0.0.1 only, on a free port, and stops when its ``with`` block ends.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
CPU_FOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
GPU_FOLDER = "gpu/gpu-int4-rtn-block-32"
_LFS_SUFFIXES = (".onnx", ".data")


@dataclass(frozen=True)
class Logged:
    """One request the server answered."""

    method: str
    path: str  # unquoted URL path, without the query
    query: str
    range: str | None


@dataclass(frozen=True)
class _Entry:
    path: str
    size: int
    sha256: str
    blob_id: str
    lfs: bool

    def tree_json(self) -> dict:
        out: dict = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return out


def _describe_file(root: Path, file: Path) -> _Entry:
    data = file.read_bytes()
    rel = file.relative_to(root).as_posix()
    sha256 = hashlib.sha256(data).hexdigest()
    lfs = file.name.endswith(_LFS_SUFFIXES) or len(data) > 10_000_000
    # The git blob of an LFS file is its pointer file, as on the Hub.
    blob = (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode() if lfs else data
    )
    blob_id = hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()
    return _Entry(rel, len(data), sha256, blob_id, lfs)


class HubServer:
    """Serve repos from local folders over the Hub's download protocol.

    Args:
        repos: repo id -> local folder with the repo's files.
        commit: The commit sha every repo reports for "main".
    """

    def __init__(self, repos: dict[str, Path] | None = None, *, commit: str = FAKE_COMMIT) -> None:
        self.commit = commit
        self.repos: dict[str, Path] = dict(repos or {})
        self.gated: set[str] = set()
        self.cut_after: dict[str, int] = {}  # path in repo -> bytes to send before dropping the connection (once)
        self.corrupt: set[str] = set()  # paths in repo served with one byte flipped
        self.log: list[Logged] = []
        self._entries: dict[str, dict[str, _Entry]] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub (HF_ENDPOINT)."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def entries(self, repo: str) -> dict[str, _Entry]:
        """The files of a repo with their sizes and hashes (computed once)."""
        with self._lock:
            if repo not in self._entries:
                root = self.repos[repo]
                files = sorted(p for p in root.rglob("*") if p.is_file())
                self._entries[repo] = {e.path: e for e in (_describe_file(root, p) for p in files)}
            return self._entries[repo]

    def downloads(self) -> list[str]:
        """Paths in repo of every GET on /resolve so far (file transfers)."""
        return [
            r.path.split("/resolve/", 1)[1].split("/", 1)[1]
            for r in self.log
            if r.method == "GET" and "/resolve/" in r.path
        ]

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections are dropped, so no handler thread outlives a test for long

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle + delayed ACK add ~40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # silence stderr
        pass

    # -- routing ------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        body = b""
        if self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.hub._lock:
            self.hub.log.append(Logged(self.command, unquote(split.path), split.query, self.headers.get("Range")))
        query = parse_qs(split.query)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not self._repo_ok(repo):
                return
            if not rest:
                return self._model_info(repo, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo, rest[1])
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._tree(repo, rest[1], "/".join(rest[2:]), recursive)
            if rest[0] == "paths-info" and len(rest) == 2:
                return self._paths_info(repo, rest[1], parse_qs(body.decode()).get("paths", []))
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = f"{parts[0]}/{parts[1]}"
            if self._repo_ok(repo):
                self._resolve(repo, parts[3], "/".join(parts[4:]))
            return
        self._error(404, "NotFound", f"no route for {split.path}")

    # -- helpers ------------------------------------------------------------------------------------------------

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload: object) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(status, {**headers, **(extra or {})}, json.dumps({"error": message}).encode())

    def _repo_ok(self, repo: str) -> bool:
        if repo not in self.hub.repos:
            # The Hub answers 401 for repos that do not exist (or are private) when the caller is anonymous.
            self._error(401, "RepoNotFound", "Repository not found")
            return False
        return True

    def _commit(self, revision: str) -> str | None:
        if revision in ("main", self.hub.commit):
            return self.hub.commit
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    # -- endpoints ----------------------------------------------------------------------------------------------

    def _model_info(self, repo: str, revision: str) -> None:
        if (commit := self._commit(revision)) is None:
            return
        siblings = []
        for e in self.hub.entries(repo).values():
            sibling: dict = {"rfilename": e.path, "size": e.size, "blobId": e.blob_id}
            if e.lfs:
                sibling["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": 134}
            siblings.append(sibling)
        gated = "manual" if repo in self.hub.gated else False
        self._json({"_id": repo, "id": repo, "sha": commit, "private": False, "gated": gated, "siblings": siblings})

    def _tree(self, repo: str, revision: str, path: str, recursive: bool) -> None:
        if self._commit(revision) is None:
            return
        prefix = f"{path}/" if path else ""
        entries = self.hub.entries(repo)
        below = [e for p, e in entries.items() if p.startswith(prefix)]
        if path and not below:
            return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": self.hub.commit})
        out, dirs = [], set()
        for e in below:
            rest = e.path[len(prefix) :]
            if recursive or "/" not in rest:
                out.append(e.tree_json())
            parts = rest.split("/")[:-1]
            for i in range(1, len(parts) + 1 if recursive else min(1, len(parts)) + 1):
                dirs.add(prefix + "/".join(parts[:i]))
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self._json(out)

    def _paths_info(self, repo: str, revision: str, paths: list[str]) -> None:
        if self._commit(revision) is None:
            return
        entries = self.hub.entries(repo)
        out = []
        for p in paths:
            if p in entries:
                out.append(entries[p].tree_json())
            elif any(q.startswith(f"{p}/") for q in entries):
                out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
        self._json(out)

    def _resolve(self, repo: str, revision: str, path: str) -> None:
        if (commit := self._commit(revision)) is None:
            return
        if repo in self.hub.gated:
            return self._error(403, "GatedRepo", "Access to this model is restricted", {"X-Repo-Commit": commit})
        entry = self.hub.entries(repo).get(path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
        etag = entry.sha256 if entry.lfs else entry.blob_id
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        if self.command == "HEAD":
            return self._send(200, {**headers, "Content-Length": str(entry.size)})
        data = (self.hub.repos[repo] / path).read_bytes()
        if path in self.hub.corrupt:
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
        start, status = 0, 200
        if (wanted := self.headers.get("Range")) is not None:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            if start >= len(data) or end <= start:
                return self._error(416, "RangeNotSatisfiable", wanted, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        headers["Content-Length"] = str(len(data))
        with self.hub._lock:
            cut = self.hub.cut_after.pop(path, None)
        if cut is None:
            return self._send(status, headers, data)
        # Promise the whole body, send part of it, and drop the connection: the client sees a truncated transfer.
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------------------------------------------------
# Fake phi3v model folders and the official repo layout


def _elem(dtype: str) -> int:
    import onnx

    names = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "int64": "INT64", "int32": "INT32"}
    return getattr(onnx.TensorProto, names[dtype])


IO = list[tuple[str, str, list[int | str | None] | None]]


def write_onnx(path: Path, inputs: IO, outputs: IO, *, external_bytes: int = 0, seed: int = 0) -> Path:
    """Write a small valid ONNX graph with the given declared inputs and outputs (name, dtype, shape or None).

    Each output is a constant; the values are meaningless, only the interface matters. With ``external_bytes`` the graph
    also holds a random float32 initializer of that size stored as external data in ``{path.name}.data``.
    """
    import numpy as np
    import onnx
    from onnx import helper

    nodes, initializers = [], []
    for name, dtype, shape in outputs:
        dims = [d if isinstance(d, int) else 1 for d in (shape or [1])]
        value = helper.make_tensor(f"{name}_value", _elem(dtype), dims, [0] * int(np.prod(dims)))
        nodes.append(helper.make_node("Constant", [], [name], value=value))
    if external_bytes:
        weights = np.random.default_rng(seed).standard_normal(external_bytes // 4, dtype=np.float32)
        initializers.append(onnx.numpy_helper.from_array(weights, "weight"))
        nodes.append(helper.make_node("Identity", ["weight"], ["weight_copy"]))
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(n, _elem(d), s) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, _elem(d), s) for n, d, s in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="phi-onnx-tests")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=bool(external_bytes),
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )
    return path


def genai_config(prefix: str, hidden: int, *, model_type: str = "phi3v") -> dict:
    """A genai_config.json shaped like the published Phi-3.5-vision ones, for graphs named ``{prefix}-*.onnx``."""
    return {
        "model": {
            "bos_token_id": 1,
            "context_length": 131072,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": f"{prefix}-text.onnx",
                "head_size": hidden // 2,
                "hidden_size": hidden,
                "inputs": {
                    "inputs_embeds": "inputs_embeds",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": 2,
                "num_hidden_layers": 1,
                "num_key_value_heads": 2,
            },
            "embedding": {
                "filename": f"{prefix}-embedding.onnx",
                "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "vision": {
                "filename": f"{prefix}-vision.onnx",
                "config_filename": "processor_config.json",
                "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
                "outputs": {"image_features": "image_features"},
            },
            "eos_token_id": [32007, 32001, 32000],
            "pad_token_id": 32000,
            "type": model_type,
            "vocab_size": 32064,
        },
        "search": {"do_sample": False, "max_length": 131072, "num_beams": 1, "top_k": 1},
    }


def build_fake_model(
    folder: Path,
    *,
    dtype: str = "float32",
    hidden: int = 16,
    crops: int | str = "max_num_crops",
    data_bytes: int = 0,
    prefix: str = "phi-3.5-v-instruct",
    seed: int = 0,
) -> Path:
    """Write a phi3v model folder whose graphs have the right interface (spec §3.6) and no real computation.

    Args:
        folder: Where to write it (created).
        dtype: The float dtype of pixel_values, image_features and inputs_embeds (the CPU build uses float32, the GPU
            build float16).
        hidden: decoder.hidden_size and the last dimension of the feature tensors.
        crops: The crop dimension of pixel_values (an int fixes it).
        data_bytes: Size of the decoder's external ``.onnx.data`` file (0: none).
        prefix: The graph file name prefix.
        seed: Seed of the random external data.
    """
    folder.mkdir(parents=True, exist_ok=True)
    batch, seq, tokens = "batch_size", "sequence_length", "num_image_tokens"
    write_onnx(
        folder / f"{prefix}-vision.onnx",
        [("pixel_values", dtype, ["num_images", crops, 3, 336, 336]), ("image_sizes", "int64", ["num_images", 2])],
        [("image_features", dtype, [tokens, hidden])],
    )
    write_onnx(
        folder / f"{prefix}-embedding.onnx",
        [("input_ids", "int64", [batch, seq]), ("image_features", dtype, [tokens, hidden])],
        [("inputs_embeds", dtype, [batch, seq, hidden])],
    )
    kv = [batch, 2, "past_sequence_length", hidden // 2]
    write_onnx(
        folder / f"{prefix}-text.onnx",
        [
            ("inputs_embeds", dtype, [batch, seq, hidden]),
            ("attention_mask", "int64", [batch, "total_sequence_length"]),
            ("past_key_values.0.key", dtype, kv),
            ("past_key_values.0.value", dtype, kv),
        ],
        [
            ("logits", dtype, [batch, seq, 32064]),
            ("present.0.key", dtype, [batch, 2, "total_sequence_length", hidden // 2]),
            ("present.0.value", dtype, [batch, 2, "total_sequence_length", hidden // 2]),
        ],
        external_bytes=data_bytes,
        seed=seed,
    )
    (folder / "genai_config.json").write_text(json.dumps(genai_config(prefix, hidden), indent=4))
    processor = {
        "processor": {"name": "phi_3_image_processor", "transforms": [{"operation": {"name": "decode_image"}}]}
    }
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=4))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def make_hub_repo(root: Path, model_folder: Path | None = None, *, data_bytes: int = 12 << 20) -> Path:
    """Lay out a repo like microsoft/Phi-3.5-vision-instruct-onnx: README plus the CPU and GPU variant folders.

    Args:
        root: The repo folder to create.
        model_folder: A built phi3v folder to copy into both variants; None builds fake ones (float32 for CPU,
            float16 for GPU, each with a random ``.onnx.data`` of ``data_bytes``).
        data_bytes: Size of the fake decoder's external data. huggingface_hub 2.4 writes downloads in 10 MiB chunks and
            resumes a dropped transfer from the last whole chunk, so a resume test needs more than 10 MiB.

    Returns:
        ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# Test repo in the Phi-3.5-vision ONNX layout\n")
    (root / ".gitattributes").write_text(
        "*.onnx filter=lfs diff=lfs merge=lfs -text\n*.data filter=lfs diff=lfs merge=lfs -text\n"
    )
    for folder, dtype, seed in ((CPU_FOLDER, "float32", 0), (GPU_FOLDER, "float16", 1)):
        target = root / folder
        if model_folder is not None:
            shutil.copytree(model_folder, target, dirs_exist_ok=True)
        else:
            build_fake_model(target, dtype=dtype, data_bytes=data_bytes, seed=seed)
    return root
