"""One repository's folder of a Hugging Face cache (`models--ORG--NAME`): the HF-cache role of the file
layer (files.py). Identifiers that a hub answer or the cache supplies (commits, sha256 and git blob ids,
file names, revisions) are checked for their form before they become part of a path, and every path made
from one is resolved inside the repository folder before anything is opened, listed or removed; only
files recorded as downloaded by kt-convert are ever removed.

    repo = RepoCache(cache, "org/name")
    repo.ref_commit("main")            # refs/main, which must hold a commit hash
    repo.snapshot(commit)              # snapshots/<commit>, inside the repository folder
    repo.remove_download(commit, name, etag)
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from . import fsio
from .errors import UnsafePathError
from .input_files import read_capped, relative_name_problem

COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a git commit (and a git blob id): 40 hex digits
SHA256 = re.compile(r"^[0-9a-f]{64}$")  # an LFS file's content hash, the name of its blob
REF_MAX_BYTES = 4096


def commit_problem(value: Any) -> str | None:
    if isinstance(value, str) and COMMIT.match(value):
        return None
    return f"{_show(value)} is not a commit hash (40 hex digits)"


def sha256_problem(value: Any) -> str | None:
    if isinstance(value, str) and SHA256.match(value):
        return None
    return f"{_show(value)} is not a sha256 (64 hex digits)"


def blob_id_problem(value: Any) -> str | None:
    if isinstance(value, str) and COMMIT.match(value):
        return None
    return f"{_show(value)} is not a git blob id (40 hex digits)"


def etag_problem(value: Any) -> str | None:
    """A blob's name in the cache: an LFS sha256 or a git blob id."""
    if isinstance(value, str) and (SHA256.match(value) or COMMIT.match(value)):
        return None
    return f"{_show(value)} is neither a sha256 (64 hex digits) nor a git blob id (40)"


def revision_problem(value: Any) -> str | None:
    """A branch, tag or commit as a cache path component (refs/<rev>, snapshots/<rev>)."""
    problem = relative_name_problem(value)
    return None if problem is None else f"revision {_show(value)} {problem}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


class RepoCache:
    """The cache folder of one model repository."""

    def __init__(self, cache: str | os.PathLike, repo_id: str):
        self.cache = Path(cache)
        self.repo_id = repo_id
        self.path = self.cache / repo_folder_name(repo_id)

    def root(self) -> Path:
        return Path(os.path.realpath(self.path))

    def _refuse(self, path: Path, real: Path) -> UnsafePathError:
        return UnsafePathError(f"{path} leads to {real}, outside the cache folder {self.root()} of {self.repo_id}; "
                               "nothing there is read or removed: remove the link (or the cache folder) and re-run")

    def entry_inside(self, path: Path) -> Path:
        """`path` with its folders resolved (the entry itself not followed), which must lie inside the
        repository folder: what may be removed or replaced."""
        path = Path(path)
        real = Path(os.path.realpath(path.parent)) / path.name
        root = self.root()
        if root not in real.parents:
            raise self._refuse(path, real)
        return real

    def inside(self, path: Path) -> Path:
        """`path` with every link resolved, which must lie inside the repository folder: what may be read."""
        path = Path(path)
        real = Path(os.path.realpath(path))
        root = self.root()
        if real != root and root not in real.parents:
            raise self._refuse(path, real)
        return real

    def ref_commit(self, revision: str) -> str | None:
        """The commit refs/<revision> names (None when there is no such ref). The ref must be a regular
        file holding a commit hash; anything else is refused (UnsafePathError naming it)."""
        problem = revision_problem(revision)
        if problem is not None:
            raise UnsafePathError(f"{self.repo_id}: {problem}; pass a branch, tag or commit")
        ref = self.path / "refs" / revision
        if not os.path.lexists(ref):
            return None
        self.inside(ref)
        try:
            text = read_capped(ref, REF_MAX_BYTES, what="a revision reference").decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        commit = text.strip()
        problem = commit_problem(commit)
        if problem is not None:
            raise UnsafePathError(f"{ref}: {problem}, so it names no snapshot; remove it (the next download "
                                  "writes it again)")
        return commit

    def check_before_download(self, commit: str | None, etag: str | None, revision: str | None) -> None:
        """What huggingface_hub writes through when it downloads into this repository (its folders, the
        blob, the reference, the lock) must be absent or of its own kind, never a link: a link planted there
        would make it write outside the cache. UnsafePathError naming the entry."""
        if revision is not None and revision_problem(revision) is not None:
            raise UnsafePathError(f"{self.repo_id}: {revision_problem(revision)}; pass a branch, tag or commit")
        folders = [self.path / "blobs", self.path / "snapshots", self.path / "refs",
                   self.cache / ".locks", self.cache / ".locks" / self.path.name]
        files = []
        if commit is not None and commit_problem(commit) is None:
            folders.append(self.path / "snapshots" / commit)
        if etag is not None and etag_problem(etag) is None:
            files += [self.path / "blobs" / etag, self.cache / ".locks" / self.path.name / f"{etag}.lock"]
        if revision is not None:
            files.append(self.path / "refs" / revision)
        for folder in folders:
            fsio.entry(folder, fsio.DIR)
        for path in files:
            fsio.entry(path, fsio.FILE)

    def snapshot(self, commit: str) -> Path:
        """snapshots/<commit>, resolved inside the repository folder (it need not exist)."""
        problem = commit_problem(commit)
        if problem is not None:
            raise UnsafePathError(f"{self.repo_id}: {problem}; it cannot name a snapshot of the cache")
        path = self.path / "snapshots" / commit
        if os.path.lexists(path):
            self.inside(path)
        return path

    def check_snapshot(self, folder: str | os.PathLike) -> Path:
        """A snapshot folder that huggingface_hub (or anything else) resolved for this repository: it must
        be snapshots/<commit> inside the repository folder."""
        real = Path(os.path.realpath(folder))
        expected = self.root() / "snapshots"
        if real.parent != expected or commit_problem(real.name) is not None:
            raise UnsafePathError(f"{self.repo_id} resolves to {real}, which is not a snapshot inside its cache folder "
                                  f"{self.root()}: the cache's refs or snapshots were tampered with; remove "
                                  f"{self.path} and download the model again")
        return real

    def check_download(self, path: str | os.PathLike, name: str) -> Path:
        """The path huggingface_hub returned for file `name`: snapshots/<commit>/<name> inside the
        repository folder (its folders resolved), returned as given."""
        real = self.entry_inside(Path(path))
        parts = real.relative_to(self.root()).parts
        if len(parts) < 3 or parts[0] != "snapshots" or commit_problem(parts[1]) is not None \
                or "/".join(parts[2:]) != name:
            raise UnsafePathError(f"{path}: where {name} of {self.repo_id} was downloaded to, which is not "
                                  f"snapshots/<commit>/{name} of its cache folder {self.root()}; remove {self.path} "
                                  "and download again")
        return Path(path)

    def snapshot_file(self, commit: str, name: str) -> Path:
        """snapshots/<commit>/<name> for a file name the hub listed (a plain relative path)."""
        problem = relative_name_problem(name)
        if problem is not None:
            raise UnsafePathError(f"{self.repo_id}: file name {_show(name)} {problem}")
        path = self.snapshot(commit) / name
        self.entry_inside(path)
        return path

    def blob(self, etag: str) -> Path:
        problem = etag_problem(etag)
        if problem is not None:
            raise UnsafePathError(f"{self.repo_id}: blob name {problem}")
        path = self.path / "blobs" / etag
        self.entry_inside(path)
        return path

    def partial_downloads(self, etag: str) -> list[Path]:
        """blobs/<etag>.incomplete and blobs/<etag>.<id>.incomplete: partial downloads of one file."""
        blobs = self.blob(etag).parent
        try:
            names = fsio.list_dir(blobs)
        except OSError:
            return []
        return [blobs / n for n in names if n.endswith(".incomplete")
                and (n == f"{etag}.incomplete" or (n.startswith(etag + ".") and n.count(".") == 2))]

    def remove_entry(self, path: Path) -> None:
        """Removes a link or regular file of the repository folder, never following it."""
        real = self.entry_inside(path)
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode):
            os.unlink(real)

    def remove_download(self, commit: str, name: str, etag: str) -> None:
        """Removes a file kt-convert downloaded: its snapshot entry (a link, or the file itself where the
        cache has no symlinks) and its blob."""
        self.remove_entry(self.snapshot_file(commit, name))
        self.remove_entry(self.blob(etag))

    def record_path(self, name: str) -> Path:
        return self.entry_inside(self.path / name)
