"""What a hub answers is input like any file: every identifier, name, size and JSON shape it sends is
checked before anything uses it, and no answer is read past the size announced for it.

- `remote_files(info, ...)`: huggingface_hub's model_info as the repository's files, each name a plain
  relative path, each size an integer, each sha256 / blob id of its form (HubAnswerError otherwise).
- `expecting(what, endpoint, body_max)`: for the calls made inside it on this thread, every response that
  huggingface_hub receives is checked as it arrives (a response hook on huggingface_hub's own HTTP
  session, so HF_ENDPOINT, tokens and proxies apply unchanged): the commit and ETag headers of a file's
  metadata must be hashes (huggingface_hub makes cache paths of them), and a body may not run past
  body_max bytes (the size the model info announced; a resumed range, what is left of it). A hub that
  sends more is stopped at once, naming the file and the endpoint.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from kt_convert.kt_runtime.format.hub_cache import blob_id_problem, commit_problem, etag_problem, sha256_problem
from kt_convert.kt_runtime.format.input_files import relative_name_problem
from kt_convert.kt_runtime.format.json_fields import describe, is_int

from .errors import UserError

MODEL_INFO_MAX_BYTES = 64 << 20  # model_info with every file's metadata: ~1 MB for 2,000 files
MAX_FILE_BYTES = 1 << 50


class HubAnswerError(UserError):
    """The hub (or whatever answers at HF_ENDPOINT) sent something that is not a valid answer."""


def bad_answer(endpoint: str, what: str, why: str) -> HubAnswerError:
    return HubAnswerError(f"{what}: the hub at {endpoint} gave an answer that is not valid ({why}); nothing of it is "
                          "used: check HF_ENDPOINT (a mirror or proxy that alters answers?) and re-run")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files: the content hash the hub records (also their ETag and blob name)
    blob_id: str | None  # the git blob id (the ETag of a small file)

    @property
    def etag(self) -> str | None:
        return self.sha256 or self.blob_id


def remote_files(info, endpoint: str, what: str) -> tuple[str, dict[str, RemoteFile]]:
    """(commit, files by name) of a model_info answer, every field checked."""
    commit = getattr(info, "sha", None)
    if not commit:
        raise bad_answer(endpoint, what, "it does not say which commit this is")
    problem = commit_problem(commit)
    if problem is not None:
        raise bad_answer(endpoint, what, f"commit {problem}")
    siblings = getattr(info, "siblings", None)
    if siblings is None:
        siblings = []
    if not isinstance(siblings, list):
        raise bad_answer(endpoint, what, f"siblings is {describe(siblings)}, not a list")
    files: dict[str, RemoteFile] = {}
    for i, s in enumerate(siblings):
        where = f"siblings[{i}]"
        name = getattr(s, "rfilename", None)
        problem = relative_name_problem(name)
        if problem is not None:
            raise bad_answer(endpoint, what, f"{where}: file name {describe(name)} {problem}")
        if name in files:
            raise bad_answer(endpoint, what, f"{where}: {name} is listed twice")
        size = getattr(s, "size", None)
        if size is None:
            size = 0
        if not is_int(size) or not 0 <= size <= MAX_FILE_BYTES:
            raise bad_answer(endpoint, what, f"{where}: the size of {name} is {describe(size)}")
        lfs = getattr(s, "lfs", None)
        sha = None
        if lfs is not None:
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            problem = sha256_problem(sha)
            if problem is not None:
                raise bad_answer(endpoint, what, f"{where}: the LFS hash of {name}: {problem}")
        blob_id = getattr(s, "blob_id", None)
        if blob_id is not None and blob_id_problem(blob_id) is not None:
            raise bad_answer(endpoint, what, f"{where}: the blob id of {name}: {blob_id_problem(blob_id)}")
        files[name] = RemoteFile(name, size, sha, blob_id)
    return commit, files


# -- checks on every response, while our calls run ---------------------------------------------------


@dataclass(frozen=True)
class _Expected:
    what: str
    endpoint: str
    body_max: int
    announced: bool  # body_max is the size the hub announced (else a cap of ours)


_local = threading.local()
_RANGE = re.compile(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$")


@contextmanager
def expecting(what: str, endpoint: str, body_max: int, announced: bool = True):
    """Calls of huggingface_hub on this thread inside this block have their answers checked (module doc).
    announced: body_max is the size the hub announced for the file (False: a cap for an API answer)."""
    _install()
    previous = getattr(_local, "expected", None)
    _local.expected = _Expected(what, endpoint, body_max, announced)
    try:
        yield
    finally:
        _local.expected = previous


def _install() -> None:
    """Adds the response hook to huggingface_hub's current HTTP session (once per session)."""
    from huggingface_hub.utils import get_session

    session = get_session()
    hooks = getattr(session, "event_hooks", None)
    if hooks is not None:  # httpx (huggingface_hub >= 1.0)
        if _on_response not in hooks.get("response", []):
            session.event_hooks = {**hooks, "response": [*hooks.get("response", []), _on_response]}
    else:  # requests (huggingface_hub 0.x)
        if _on_response not in session.hooks.setdefault("response", []):
            session.hooks["response"].append(_on_response)


def _normal_etag(value: str) -> str:
    return value.removeprefix("W/").strip('"')


def _on_response(response, *args, **kwargs):
    expected = getattr(_local, "expected", None)
    if expected is None:  # not one of our calls
        return response
    headers = response.headers
    path = str(getattr(response.request, "url", "")) if response.request is not None else ""
    if "/resolve/" in path:  # a file's metadata: huggingface_hub makes cache paths of these
        commit = headers.get("X-Repo-Commit")
        if commit is not None and commit_problem(commit) is not None:
            raise bad_answer(expected.endpoint, expected.what, f"header X-Repo-Commit: {commit_problem(commit)}")
        etag = headers.get("X-Linked-Etag") or headers.get("ETag")
        if etag is not None and etag_problem(_normal_etag(etag)) is not None:
            raise bad_answer(expected.endpoint, expected.what, f"header ETag: {etag_problem(_normal_etag(etag))}")
    allowed = expected.body_max
    m = _RANGE.match(headers.get("Content-Range", "") or "")
    if m:
        allowed -= int(m[1])
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max(allowed, 0):
        raise _too_long(expected)
    _bound_body(response, max(allowed, 0), expected)
    return response


def _too_long(expected: _Expected) -> HubAnswerError:
    limit = "it announced" if expected.announced else "allowed for this answer"
    return HubAnswerError(f"{expected.what}: the hub at {expected.endpoint} sent more than the {expected.body_max} "
                          f"bytes {limit}; the download was stopped and nothing of it is kept: check HF_ENDPOINT "
                          "(a mirror or proxy that alters answers?) and re-run")


def _bound_body(response, allowed: int, expected: _Expected) -> None:
    """Makes reading the (decoded) body raise as soon as more than `allowed` bytes arrive: every read of
    it goes through this iterator (httpx: iter_bytes, which read() uses too; requests: iter_content)."""
    name = "iter_bytes" if hasattr(response, "iter_bytes") else "iter_content"
    original = getattr(response, name)

    def bounded(*args, **kwargs):
        seen = 0
        for chunk in original(*args, **kwargs):
            seen += len(chunk)
            if seen > allowed:
                raise _too_long(expected)
            yield chunk

    setattr(response, name, bounded)
