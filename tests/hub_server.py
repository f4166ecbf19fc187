"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1 for offline round-trip tests.

Implements what huggingface_hub 2.x / transformers / datasets need (the routes and headers below):
repos with history, regular + git-LFS uploads, resolve downloads, private repos. Run it alone with
`python tests/hub_server.py [--port N]`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
# Same patterns the Hub's default .gitattributes sends to LFS; binary or > 10 MB files go there too.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".parquet", ".arrow",
                ".npy", ".npz", ".pkl", ".pickle", ".zip", ".gz", ".tar", ".msgpack", ".tflite", ".zst")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
MAX_REGULAR_SIZE = 10 * 1024 * 1024


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, X-Error-Code, X-Error-Message)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass(frozen=True)
class Entry:
    """One file in a commit's tree; content lives in the object store under its sha256."""

    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob id (of the pointer file for LFS files), also the ETag of regular files
    commit: str  # last commit that changed this path

    def tree_json(self, path: str) -> dict:
        info = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            info["lfs"] = {"oid": self.sha256, "size": self.size,
                           "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return info


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    type: str
    id: str
    owner: str
    private: bool
    created: str = field(default_factory=now_iso)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


class LocalHub:
    """Hub server on a free loopback port. `tokens` maps token -> user; None accepts any token as `username`."""

    def __init__(self, username: str = "user", tokens: dict[str, str] | None = None,
                 storage: str | os.PathLike | None = None):
        self.username, self.tokens = username, tokens
        self._own_storage = storage is None
        self.storage = Path(storage or tempfile.mkdtemp(prefix="local-hub-"))
        (self.storage / "objects").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[dict] = []  # method, path, status, chunked: what tests may assert on
        self._pending_uploads: dict[str, tuple[str, int]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, port: int = 0) -> "LocalHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_storage:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str | os.PathLike, token: str | None = None) -> dict[str, str]:
        """Environment for a client process (must be set before huggingface_hub is imported)."""
        if not ipaddress.ip_address(urlparse(self.url).hostname or "0.0.0.0").is_loopback:
            raise RuntimeError(f"refusing a non-loopback Hub endpoint: {self.url}")
        # Drop the caller's Hub settings (a real token, offline switches) so nothing else is used.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
        env.update(HF_ENDPOINT=self.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HOME=str(hf_home), HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="0")
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # ---- storage ---------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.storage / "objects" / sha256

    def _store_regular(self, content: bytes, commit_id: str) -> Entry:
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.object_path(sha256)
        if not target.exists():
            target.write_bytes(content)
        return Entry(sha256, len(content), False, git_blob_oid(content), commit_id)

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, author: str,
                    files: dict[str, Entry]) -> Commit:
        seed = f"{repo.type}/{repo.id}/{parent}/{title}/{time.time_ns()}/{secrets.token_hex(8)}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, author, now_iso(), files)
        repo.commits[commit.id] = commit
        return commit

    # ---- access control ----------------------------------------------------------------------
    def user_of(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer "):].strip()
        if self.tokens is None:
            return self.username
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def readable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            # Like the Hub: 401 when anonymous, 404 when the caller is known; never reveal existence.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.readable_repo(repo_type, repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo", "RepoNotFound")
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def resolve(repo: Repo, revision: str) -> Commit:
        branch = revision.removeprefix("refs/heads/")
        if branch in repo.branches:
            return repo.commits[repo.branches[branch]]
        if COMMIT_ID.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}"

    # ---- API routes --------------------------------------------------------------------------
    def whoami(self, user: str | None) -> dict:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                "fullname": user, "orgs": [], "isPro": False,
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}}}

    def create_repo(self, user: str | None, body: dict) -> tuple[int, dict]:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace, name = body.get("organization") or user, body.get("name", "")
        repo_type = body.get("type") or "model"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        if repo_type not in URL_PREFIX or not REPO_NAME.match(name) or name.endswith((".git", ".")):
            raise HubError(400, f"Invalid repo name or type: {namespace}/{name} ({repo_type})")
        repo_id = f"{namespace}/{name}"
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:
            return 409, {"error": f"You already created this {repo_type} repo", "url": self.repo_url(existing)}
        private = bool(body.get("private")) or body.get("visibility") == "private"
        repo = Repo(repo_type, repo_id, user, private)
        # A new Hub repo already has one commit on main holding .gitattributes.
        first = self._new_commit(repo, None, "initial commit", "", user, {})
        first.files[".gitattributes"] = self._store_regular(GITATTRIBUTES.encode(), first.id)
        repo.branches["main"] = first.id
        self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": self.repo_url(repo), "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def delete_repo(self, user: str | None, body: dict) -> dict:
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        self.writable_repo(repo_type, repo_id, user)
        del self.repos[(repo_type, repo_id)]
        return {}

    @staticmethod
    def card_data(text: str) -> dict | None:
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
        return yaml.safe_load(match.group(1)) if match else None

    def validate_yaml(self, body: dict) -> tuple[int, dict]:
        try:
            data = self.card_data(body.get("content", ""))
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}
        if not data:
            return 200, {"errors": [], "warnings": [{"message": "Empty or missing YAML metadata in repo card"}]}
        errors = metadata_errors(data) if isinstance(data, dict) else ["metadata must be a YAML mapping"]
        return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": []}

    def repo_info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        card = {}
        if "README.md" in commit.files:
            try:
                card = self.card_data(self.object_path(commit.files["README.md"].sha256).read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                card = {}
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256,
                                      "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
            siblings.append(sibling)
        info = {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.id.split("/")[0],
                "sha": commit.id, "lastModified": commit.date, "createdAt": repo.created, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": card.get("tags") or [],
                "cardData": card, "siblings": siblings}
        if repo.type == "model":
            info.update(modelId=repo.id, pipeline_tag=card.get("pipeline_tag"), library_name=card.get("library_name"))
            if card.get("model-index"):
                info["model-index"] = card["model-index"]
        return info

    def tree(self, commit: Commit, path: str, recursive: bool, expand: bool, repo: Repo) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and prefix[:-1] in commit.files:
            raise HubError(404, f"{path} is a file, not a folder", "EntryNotFound")
        below = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if prefix and not below:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        files, folders = [], set()
        for file_path in below:
            rest = file_path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                files.append(file_path)
        entries = [self.folder_json(commit, f) for f in sorted(folders)]
        entries += [commit.files[f].tree_json(f) for f in sorted(files)]
        if expand:
            for entry in entries:
                entry["lastCommit"] = self.last_commit_json(repo, commit, entry["path"])
        return entries

    @staticmethod
    def folder_json(commit: Commit, folder: str) -> dict:
        listing = "".join(f"{p}:{e.oid}\n" for p, e in sorted(commit.files.items()) if p.startswith(folder + "/"))
        return {"type": "directory", "path": folder, "size": 0, "oid": git_blob_oid(listing.encode())}

    @staticmethod
    def last_commit_json(repo: Repo, commit: Commit, path: str) -> dict:
        entry = commit.files.get(path)
        last = repo.commits[entry.commit] if entry else commit
        return {"id": last.id, "title": last.title, "date": last.date}

    def paths_info(self, repo: Repo, commit: Commit, paths: list[str], expand: bool) -> list[dict]:
        infos = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                infos.append(commit.files[path].tree_json(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                infos.append(self.folder_json(commit, path))
            else:
                continue
            if expand:
                infos[-1]["lastCommit"] = self.last_commit_json(repo, commit, path)
        return infos

    def preupload(self, commit: Commit, body: dict) -> dict:
        answers = []
        for file in body.get("files", []):
            sample = base64.b64decode(file.get("sample", ""))
            lfs = file["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or file["size"] > MAX_REGULAR_SIZE
            existing = commit.files.get(file["path"])
            remote_oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": remote_oid})
        return {"files": answers, "commitOid": commit.id}

    def commit(self, repo: Repo, branch: str, user: str, body: bytes) -> dict:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header, head = lines[0]["value"], repo.branches[branch]
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self._new_commit(repo, head, header.get("summary") or "Update", header.get("description") or "",
                                  user, dict(repo.commits[head].files))
        try:
            for line in lines[1:]:
                self._apply_operation(commit, line["key"], line["value"])
        except HubError:
            del repo.commits[commit.id]
            raise
        repo.branches[branch] = commit.id
        return {"success": True, "commitOid": commit.id, "commitMessage": commit.title, "hookOutput": "",
                "commitUrl": f"{self.repo_url(repo)}/commit/{commit.id}", "pullRequestUrl": None}

    def _apply_operation(self, commit: Commit, key: str, value: dict) -> None:
        path = value["path"].strip("/")
        if not path or ".." in path.split("/"):
            raise HubError(400, f"Invalid path in repo: {value['path']!r}")
        if key == "file":
            raw = value["content"]
            content = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            commit.files[path] = self._store_regular(content, commit.id)
        elif key == "lfsFile":
            sha256, stored = value["oid"], self.object_path(value["oid"])
            if not stored.exists():
                raise HubError(422, f"LFS object {sha256} for {path} was never uploaded")
            size = stored.stat().st_size
            commit.files[path] = Entry(sha256, size, True, git_blob_oid(lfs_pointer(sha256, size)), commit.id)
        elif key == "deletedFile":
            if commit.files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in commit.files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del commit.files[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key}")

    def commits(self, repo: Repo, commit: Commit) -> list[dict]:
        history, current = [], commit
        while current is not None:
            history.append({"id": current.id, "title": current.title, "message": current.message,
                            "date": current.date, "authors": [{"user": current.author}]})
            current = repo.commits.get(current.parent) if current.parent else None
        return history

    def refs(self, repo: Repo) -> dict:
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.branches.items())]
        return {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    def create_branch(self, repo: Repo, branch: str, body: dict) -> dict:
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", branch) or COMMIT_ID.match(branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        repo.branches[branch] = self.resolve(repo, body.get("startingPoint") or "main").id
        return {}

    def lfs_batch(self, repo: Repo, body: dict) -> dict:
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported by this server's batch API")
        answers = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            stored = self.object_path(oid)
            if not (stored.exists() and stored.stat().st_size == size):
                nonce = secrets.token_hex(16)  # the upload href is pre-signed, like an S3 URL
                self._pending_uploads[nonce] = (oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}/{nonce}"},
                    "verify": {"href": f"{self.repo_url(repo)}.git/info/lfs/objects/verify"},
                }
            answers.append(answer)
        return {"transfer": "basic", "objects": answers, "hash_algo": "sha256"}

    def lfs_receive(self, oid: str, nonce: str, chunks) -> None:
        with self._lock:
            expected = self._pending_uploads.pop(nonce, None)
        if expected is None or expected[0] != oid:
            raise HubError(403, "Unknown or already used LFS upload URL")
        digest, size = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=self.storage, delete=False) as tmp:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                tmp.write(chunk)
        if digest.hexdigest() != oid or size != expected[1]:
            os.unlink(tmp.name)
            raise HubError(400, f"LFS upload does not match its oid/size ({oid}, {expected[1]} bytes)")
        os.replace(tmp.name, self.object_path(oid))

    def lfs_verify(self, body: dict) -> dict:
        stored = self.object_path(body.get("oid", "missing"))
        if not stored.exists() or stored.stat().st_size != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} not found")
        return {}


def metadata_errors(data: dict) -> list[str]:
    """The model-card checks of the Hub's validator that matter here."""
    errors = []
    for key in ("tags", "datasets", "metrics", "language"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and
                                                                 all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "license" in data and not isinstance(data["license"], str):
        errors.append('"license" must be a string')
    if data.get("pipeline_tag") is not None and not re.fullmatch(r"[a-z0-9-]+", str(data["pipeline_tag"])):
        errors.append(f'"pipeline_tag" must be a task id such as image-classification, got {data["pipeline_tag"]!r}')
    model_index = data.get("model-index")
    if model_index is None:
        return errors
    if not isinstance(model_index, list):
        return errors + ['"model-index" must be a list']
    for model in model_index:
        if not isinstance(model, dict) or not model.get("name") or not isinstance(model.get("results"), list):
            errors.append('"model-index[]" needs a "name" and a "results" list')
            continue
        for result in model["results"]:
            task, dataset = result.get("task"), result.get("dataset")
            if not isinstance(task, dict) or not task.get("type"):
                errors.append('"model-index[].results[].task.type" is required')
            if not isinstance(dataset, dict) or not dataset.get("name") or not dataset.get("type"):
                errors.append('"model-index[].results[].dataset" needs "name" and "type"')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append('"model-index[].results[].metrics" must be a non-empty list')
                continue
            for metric in metrics:
                if not isinstance(metric, dict) or not metric.get("type") or "value" not in metric:
                    errors.append('each metric needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub
    _log_entry: dict | None = None  # the hub.requests entry of the request being answered

    def log_message(self, format, *args) -> None:  # quiet: tests read hub.requests instead
        pass


    # ---- plumbing --------------------------------------------------------------------------
    def _chunks(self):
        """The request body in pieces, from Content-Length or chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_response(self, code: int, message: str | None = None) -> None:
        if self._log_entry is not None:  # logged before the client can see the answer
            self._log_entry["status"] = code
        super().send_response(code, message)

    def _dispatch(self) -> None:
        method, parsed = self.command, urlparse(self.path)
        self._log_entry = {"method": method, "path": parsed.path, "status": 0,
                           "chunked": "chunked" in self.headers.get("Transfer-Encoding", "").lower()}
        with self.hub._lock:
            self.hub.requests.append(self._log_entry)
        try:
            self._route(method, parsed.path, parse_qs(parsed.query))
        except HubError as err:
            headers = {**err.headers, "X-Error-Message": err.message.encode("ascii", "replace").decode()}
            if method == "PUT":  # an LFS body may be left unread: the connection cannot be reused
                headers["Connection"] = "close"
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, err.body or {"error": err.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._log_entry = None

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _route(self, method: str, path: str, query: dict) -> None:
        hub = self.hub
        parts = path.strip("/").split("/")  # split before decoding: revisions may hold %2F
        if method == "PUT" and parts[0] == "lfs-upload" and len(parts) == 3:
            hub.lfs_receive(parts[1], parts[2], self._chunks())
            return self._send(200, {})
        body = b"".join(self._chunks()) if method in ("POST", "PUT", "DELETE") else b""
        user = hub.user_of(self.headers.get("Authorization"))
        if parts[0] == "api":
            return self._route_api(method, [unquote(p) for p in parts[1:3]] + parts[3:], query, body, user)
        repo_type = REPO_TYPES.get(parts[0]) if parts[0] in ("datasets", "spaces") else "model"
        if repo_type != "model":
            parts = parts[1:]
        if len(parts) >= 4 and parts[1].endswith(".git") and parts[2:4] == ["info", "lfs"]:
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])[:-4]}"
            with hub._lock:
                repo = hub.writable_repo(repo_type, repo_id, user)
                if parts[4:] == ["objects", "batch"] and method == "POST":
                    return self._send(200, hub.lfs_batch(repo, json.loads(body)),
                                      content_type="application/vnd.git-lfs+json")
                if parts[4:] == ["objects", "verify"] and method == "POST":
                    return self._send(200, hub.lfs_verify(json.loads(body)))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{unquote(parts[0])}/{unquote(parts[1])}", unquote(parts[3]),
                                 unquote("/".join(parts[4:])), user)
        raise HubError(404, f"No route for {method} {path}")

    def _route_api(self, method: str, parts: list[str], query: dict, body: bytes, user: str | None) -> None:
        hub = self.hub
        with hub._lock:
            if parts[:1] == ["whoami-v2"]:
                return self._send(200, hub.whoami(user))
            if parts[:1] == ["validate-yaml"] and method == "POST":
                return self._send(*hub.validate_yaml(json.loads(body)))
            if parts[:2] == ["repos", "create"] and method == "POST":
                return self._send(*hub.create_repo(user, json.loads(body)))
            if parts[:2] == ["repos", "delete"] and method == "DELETE":
                return self._send(200, hub.delete_repo(user, json.loads(body)))
            if len(parts) < 3 or parts[0] not in REPO_TYPES:
                raise HubError(404, f"No API route for {method} /api/{'/'.join(parts)}")
            repo_type, repo_id = REPO_TYPES[parts[0]], f"{parts[1]}/{unquote(parts[2])}"
            action, args = (parts[3] if len(parts) > 3 else None), [unquote(p) for p in parts[4:]]
            writes = method != "GET" and action in ("preupload", "commit", "branch")
            repo = (hub.writable_repo if writes else hub.readable_repo)(repo_type, repo_id, user)
            flag = lambda name: query.get(name, ["false"])[0].lower() in ("1", "true")  # noqa: E731
            if action is None or action == "revision":
                commit = hub.resolve(repo, args[0] if args else "main")
                return self._send(200, hub.repo_info(repo, commit, flag("blobs")))
            if action == "tree" and args:
                commit = hub.resolve(repo, args[0])
                return self._send(200, hub.tree(commit, "/".join(args[1:]), flag("recursive"), flag("expand"), repo))
            if action == "paths-info" and args and method == "POST":
                form = parse_qs(body.decode())
                expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
                return self._send(200, hub.paths_info(repo, hub.resolve(repo, args[0]), form.get("paths", []), expand))
            if action == "preupload" and args:
                return self._send(200, hub.preupload(hub.resolve(repo, args[0]), json.loads(body)))
            if action == "commit" and args:
                if flag("create_pr"):
                    raise HubError(400, "Pull requests are not supported by this local Hub")
                return self._send(200, hub.commit(repo, args[0], user, body))
            if action == "commits" and args:
                return self._send(200, hub.commits(repo, hub.resolve(repo, args[0])))
            if action == "refs":
                return self._send(200, hub.refs(repo))
            if action == "branch" and args and method == "POST":
                return self._send(200, hub.create_branch(repo, "/".join(args), json.loads(body or b"{}")))
            if action == "branch" and args and method == "DELETE":
                if args[0] == "main" or repo.branches.pop("/".join(args), None) is None:
                    raise HubError(404 if args[0] != "main" else 403, f"Cannot delete branch {args[0]}")
                return self._send(200, {})
        raise HubError(404, f"No API route for {method} /api/{'/'.join(parts)}")

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, user: str | None) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub.readable_repo(repo_type, repo_id, user)
            commit = hub.resolve(repo, revision)
            entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry.sha256 if entry.lfs else entry.oid}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        match = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))
        if match and entry.size > 0 and (match.group(1) or match.group(2)):
            if match.group(1):
                start, end = int(match.group(1)), int(match.group(2) or end)
            else:
                start = max(0, entry.size - int(match.group(2)))
            end = min(end, entry.size - 1)
            if start > end:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(hub.object_path(entry.sha256), "rb") as source:
            source.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = source.read(min(remaining, 1 << 20))
                self.wfile.write(chunk)
                remaining -= len(chunk)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    hub = LocalHub().start(parser.parse_args().port)
    print(f"Local Hub on {hub.url}  (export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()
