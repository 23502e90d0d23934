"""A local stand-in for the Hugging Face hub: a real HTTP server (http.server, one thread per
connection, 127.0.0.1) serving one folder as a model repository through the endpoints
huggingface_hub calls, so that the real huggingface_hub code runs against it (select it with
HF_ENDPOINT). No Xet headers are ever sent: downloads take the plain HTTP path.

    GET  /api/models/{repo}[/revision/{rev}]     model_info, siblings with size / blobId / lfs.sha256
    GET  /api/models/{repo}/tree/{rev}           list_repo_tree (snapshot_download, `hf download`)
    HEAD|GET /{repo}/resolve/{rev}/{file}        small files: 200 with ETag (git blob id) and
                                                 X-Repo-Commit; LFS files (*.safetensors): 302 to
                                                 /_lfs/{sha256} with X-Linked-Etag / X-Linked-Size
    HEAD|GET /_lfs/{sha256}                      the bytes, with Range (206 + Content-Range), on a
                                                 second port named localhost (a CDN: another host, as on the hub,
                                                 so huggingface_hub reads the metadata off the 302)

Test hooks: `corrupt[name] = n` serves wrong bytes (same length) for the next n downloads of that
LFS file; `bytes_per_s` throttles LFS bodies (one link: the total over all connections);
`requests` logs (method, path, Range header); `sent` counts LFS body bytes per file.

Hostile modes (a hub that lies; tests/test_hostile_hub.py):
- `model_info_answer(info)`: what model_info answers instead of `info` (a dict made into JSON, or bytes
  sent as they are; None: the honest answer);
- `file_headers[name] = {header: value}`: header values put on the answers for that file's
  /resolve/ requests (ETag, X-Linked-Etag, X-Repo-Commit, ...);
- `overflow[name] = n`: a download of the file (not a bounded range) gets its bytes followed by n more
  (None: zeros without end, up to OVERFLOW_CAP), without a Content-Length (the body ends when the
  connection closes); `lying_length[name] = n`: a Content-Length n bytes larger than the file, and as
  many bytes more.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from kt_convert.kt_runtime.format.digest import file_sha256

CHUNK = 1 << 20
OVERFLOW_CAP = 256 << 20  # an "endless" body stops here, so that a client without a bound cannot fill a disk


@dataclass(frozen=True)
class RepoFile:
    name: str
    path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


def _git_blob_sha1(data_path: Path, size: int) -> str:
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def describe_folder(folder: Path) -> dict[str, RepoFile]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            files[p.name] = RepoFile(p.name, p, size, file_sha256(p), _git_blob_sha1(p, size),
                                     lfs=p.suffix == ".safetensors")
    return files


class LocalHub:
    """Serves `folder` as model `repo_id` at one commit (also reachable as revision "main")."""

    def __init__(self, repo_id: str, folder: str | Path, bytes_per_s: float | None = None):
        self.repo_id = repo_id
        self.files = describe_folder(Path(folder))
        listing = json.dumps({n: f.sha256 for n, f in self.files.items()}, sort_keys=True).encode()
        self.commit = hashlib.sha1(listing).hexdigest()
        self.bytes_per_s = bytes_per_s
        self.corrupt: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.sent: dict[str, int] = {}  # LFS body bytes sent, by file name
        self.model_info_answer = None  # hostile: info dict -> dict / list / bytes to answer instead
        self.file_headers: dict[str, dict[str, str]] = {}  # hostile: headers of a file's /resolve/ answers
        self.overflow: dict[str, int | None] = {}  # hostile: bytes past the file's end (None: without end)
        self.lying_length: dict[str, int] = {}  # hostile: Content-Length this much too large, body to match
        self._link_free = 0.0  # when the throttled link is free again (time.monotonic)
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._connections: set = set()  # open client sockets, cut by stop()
        self.port = 0
        self.cdn_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        for p in (port, 0):
            server = ThreadingHTTPServer(("127.0.0.1", p), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True, name="local-hub").start()
            self._servers.append(server)
        self.port = self._servers[0].server_address[1]
        self.cdn_port = self._servers[1].server_address[1]
        return self.endpoint

    def stop(self) -> None:
        """Closes both ports: later requests are refused (the hub 'goes away')."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:  # keep-alive connections and bodies in flight end too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def lfs_downloads(self, name: str) -> list[str | None]:
        """The Range headers of every download of an LFS file's bytes: None (the whole file) or an
        open range "bytes=N-" (a resume); bounded ranges (header reads) are not downloads."""
        sha = self.files[name].sha256
        return [rng for method, path, rng in self.requests
                if method == "GET" and path == f"/_lfs/{sha}" and (rng is None or rng.endswith("-"))]

    def tree(self) -> list[dict]:
        entries = []
        for f in self.files.values():
            entry = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": f.name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        return entries

    def model_info(self) -> dict:
        siblings = []
        for f in self.files.values():
            entry = {"rfilename": f.name, "size": f.size, "blobId": f.git_sha1}
            if f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(entry)
        return {"_id": "local", "id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z"}


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client went away mid-answer (a bounded reader stops early): not the server's error
            pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _send(self, code: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(code, {"Content-Type": "application/json", "X-Error-Code": error_code, "X-Error-Message": message},
                   body, head)

    def _serve(self, head: bool) -> None:
        hub = self.hub
        path = unquote(urlparse(self.path).path)
        with hub._lock:
            hub.requests.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
        repo = hub.repo_id
        revs = (hub.commit, "main")
        if path.startswith(f"/api/models/{repo}/tree/"):  # list_repo_tree (snapshot_download)
            rev = path[len(f"/api/models/{repo}/tree/"):].split("/")[0]
            if rev not in revs:
                return self._error(404, "RevisionNotFound", "Invalid rev id", head)
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(hub.tree()).encode(), head)
        if path.startswith(f"/api/models/{repo}"):
            rest = path[len(f"/api/models/{repo}"):]
            if rest not in ("", "/") and not (rest.startswith("/revision/") and rest[len("/revision/"):] in revs):
                return self._error(404, "RevisionNotFound", "Invalid rev id", head)
            info = hub.model_info()
            answer = info if hub.model_info_answer is None else hub.model_info_answer(info)
            body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head)
        if path.startswith("/api/"):
            return self._error(404, "RepoNotFound", "Repository not found", head)
        prefix = f"/{repo}/resolve/"
        if path.startswith(prefix):
            rev, _, name = path[len(prefix):].partition("/")
            if rev not in revs:
                return self._error(404, "RevisionNotFound", "Invalid rev id", head)
            f = hub.files.get(name)
            if f is None:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            common = {"X-Repo-Commit": hub.commit, "Accept-Ranges": "bytes"}
            lies = hub.file_headers.get(name, {})
            if f.lfs:
                # another host name, not only another port: huggingface_hub 1.x compares host names when
                # it decides whether to follow a redirect (the hub's CDN is another host)
                location = f"http://localhost:{hub.cdn_port}/_lfs/{f.sha256}"
                return self._send(302, {**common, "Location": location, "ETag": f'"{f.git_sha1}"',
                                        "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size), **lies},
                                  b"", head)
            return self._bytes(f, {**common, "ETag": f'"{f.git_sha1}"', **lies}, head, corrupt=False)
        if path.startswith("/_lfs/"):
            sha = path[len("/_lfs/"):]
            f = next((f for f in hub.files.values() if f.sha256 == sha), None)
            if f is None:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            corrupt = False
            if not head and (self.headers.get("Range") is None or _starts_at_zero(self.headers)):
                with hub._lock:
                    if hub.corrupt.get(f.name, 0) > 0:
                        hub.corrupt[f.name] -= 1
                        corrupt = True
            return self._bytes(f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"}, head, corrupt)
        return self._error(404, "EntryNotFound", "Not found", head)

    def _bytes(self, f: RepoFile, headers: dict[str, str], head: bool, corrupt: bool) -> None:
        whole = self.headers.get("Range") is None or _starts_at_zero(self.headers)
        if not head and whole and (f.name in self.hub.overflow or f.name in self.hub.lying_length):
            return self._too_many_bytes(f, headers)  # a download, not a header read (a bounded range)
        start, end = 0, f.size - 1
        code = 200
        m = _RANGE.match(self.headers.get("Range", "") or "")
        if m:
            start = int(m[1])
            end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            if start >= f.size:
                return self._send(416, {"Content-Range": f"bytes */{f.size}"}, b"", head)
            code = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{f.size}"}
        n = end - start + 1
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if head:
            return
        throttle = self.hub.bytes_per_s
        try:
            with open(f.path, "rb") as src:
                src.seek(start)
                left = n
                while left:
                    block = src.read(min(CHUNK if throttle is None else max(4096, int(throttle / 20)), left))
                    if not block:
                        break
                    if corrupt:
                        block = bytes(b ^ 0x5A for b in block)
                    self.wfile.write(block)
                    left -= len(block)
                    with self.hub._lock:
                        self.hub.sent[f.name] = self.hub.sent.get(f.name, 0) + len(block)
                    if throttle:  # one link shared by every connection: a slot of its time per block
                        with self.hub._lock:
                            start = max(time.monotonic(), self.hub._link_free)
                            self.hub._link_free = done = start + len(block) / throttle
                        time.sleep(max(0.0, done - time.monotonic()))
        except OSError:  # the client went away, or stop() cut the connection
            pass


    def _too_many_bytes(self, f: RepoFile, headers: dict[str, str]) -> None:
        """The file, then more bytes than its size: framed by closing the connection (overflow) or by a
        Content-Length that says so (lying_length)."""
        extra = self.hub.lying_length.get(f.name)
        if extra is None:
            extra = self.hub.overflow[f.name]
            extra = OVERFLOW_CAP if extra is None else extra
            framing = {"Connection": "close"}
            self.close_connection = True
        else:
            framing = {"Content-Length": str(f.size + extra)}
        self.send_response(200)
        for k, v in {**headers, **framing, "Content-Type": "application/octet-stream"}.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            with open(f.path, "rb") as src:
                self.wfile.write(src.read())
            block = bytes(CHUNK)
            while extra > 0:
                self.wfile.write(block[:min(CHUNK, extra)])
                with self.hub._lock:
                    self.hub.sent[f.name] = self.hub.sent.get(f.name, 0) + min(CHUNK, extra)
                extra -= CHUNK
        except OSError:  # the client stopped reading and went away: what a bound does
            pass


def _starts_at_zero(headers) -> bool:
    m = _RANGE.match(headers.get("Range", "") or "")
    return bool(m) and int(m[1]) == 0 and not m[2]
