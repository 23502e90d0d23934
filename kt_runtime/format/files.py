"""The one way the program touches files: every open, creation, listing and removal goes through this
layer (this module, fsio.py, input_files.py, hub_cache.py), each under a declared role whose rules it
applies. Code outside the layer never calls open / os.remove / json.loads & co. on such paths
(tests/test_trust_boundary.py scans for it).

    role               where                              rules
    input checkpoint   a checkpoint folder (and a packed  names plain and relative; resolved inside the root
                       output the runtime loads)          (a Hugging Face cache blob excepted); regular files;
                                                          never blocks; capped JSON (input_files)
    output             the output folder                  entries lstat'ed: links and special files refused,
                                                          never followed; new files O_EXCL | O_NOFOLLOW;
                                                          temporary + fsync + rename; removal of our own
                                                          entries only (fsio)
    HF cache           one repository's cache folder      identifiers of their form (sha256, commit, file
                                                          name); every path resolved inside the repository
                                                          folder before it is opened, globbed or removed;
                                                          removal of recorded downloads only (hub_cache)
    shared output      OUT/.kt_shards at every level      real directories; regular files with one name;
                                                          never followed, never blocking (fsio)
    report             --json / --html paths              not a file the run reads or writes (RunFiles);
                                                          a new file renamed into place
    record             state the program keeps (the       capped, no link followed; anything unreadable or
                       download record, .kt_verified)     malformed reads as absent and is rewritten
    user file          a file the user names (job file,   capped, regular, never blocking; a bad one is an
                       routing statistics)                InputFileError (a ValueError) naming it
    system             /proc, /sys, libraries             capped text, best effort (None when unreadable)

JSON is read only through `read_json` (capped size, strict syntax, depth; input_files.decode_json),
its fields through json_fields.
"""
from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import InputFileError, UnsafePathError
from .input_files import parse_json, read_capped


@dataclass(frozen=True)
class Role:
    name: str
    follow: bool  # reads follow a link (whose target the caller has checked for containment)
    one_link: bool  # a file read must have a single name
    keeps_bad: bool  # False: a record, whose unreadable or malformed content reads as absent
    fix: str  # what to do about a bad file (the end of the message)


INPUT = Role("input checkpoint", follow=True, one_link=False, keeps_bad=True, fix="re-download it")
OUTPUT = Role("output", follow=False, one_link=False, keeps_bad=True,
              fix="re-run the conversion with --overwrite")
SHARED = Role("shared output", follow=False, one_link=True, keeps_bad=True,
              fix="remove it (its layer is converted again)")
RECORD = Role("record", follow=False, one_link=True, keeps_bad=False, fix="")
USER = Role("user file", follow=True, one_link=False, keeps_bad=True, fix="fix the file or pass another one")


def read_file(path: Path, role: Role, *, what: str, max_bytes: int) -> bytes | None:
    """The bytes of a regular file under `role`'s rules (None: a record that cannot be read)."""
    try:
        return read_capped(Path(path), max_bytes, what=what, follow=role.follow, one_link=role.one_link, fix=role.fix)
    except (InputFileError, OSError):
        if role.keeps_bad:
            raise
        return None


def read_json(path: Path, role: Role, *, what: str, max_bytes: int) -> Any:
    """The one JSON reader: a regular file of at most max_bytes under `role`'s rules, strict JSON
    (input_files.decode_json). InputFileError naming the file, or None for a record that is absent,
    unreadable or malformed. FileNotFoundError passes for the other roles (the caller's message)."""
    data = read_file(path, role, what=what, max_bytes=max_bytes)
    if data is None:
        return None
    try:
        return parse_json(data, Path(path), what, role.fix)
    except InputFileError:
        if role.keeps_bad:
            raise
        return None


def read_system_text(path: str, max_bytes: int = 1 << 20) -> str | None:
    """A file of the system (/proc, /sys): its text, or None when it cannot be read. /proc files say
    size 0, so this reads in chunks up to the cap instead of trusting the size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)[:max_bytes].decode("utf-8", errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def system_glob(pattern: str) -> list[str]:
    """Paths of the system (/sys nodes, libraries) matching a pattern, sorted."""
    return sorted(glob.glob(pattern))


def temporary_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A fresh private folder of ours, removed with the returned object (cleanup())."""
    return tempfile.TemporaryDirectory(prefix=prefix)


# -- reports ---------------------------------------------------------------------------------------


def resolved(path: str | os.PathLike) -> Path:
    """An absolute path with every link on it resolved (it need not exist)."""
    return Path(os.path.realpath(Path(path)))


class RunFiles:
    """What one command reads and writes, so that a report path naming any of it is refused before the
    run starts: a report written there would destroy an input or an output (or be destroyed by it)."""

    def __init__(self):
        self._rules: list[tuple[str, Path, Callable[[str], bool] | None]] = []

    def folder(self, what: str, root: str | os.PathLike, is_used: Callable[[str], bool] | None = None) -> None:
        """Everything below `root` (is_used(first component) None), or the entries whose first path
        component below it is_used says are the run's."""
        self._rules.append((what, resolved(root), is_used))

    def file(self, what: str, path: str | os.PathLike) -> None:
        self._rules.append((what, resolved(path), lambda rel: rel == ""))

    def problem(self, path: str | os.PathLike) -> str | None:
        """Why a report may not be written at `path` (None: it may)."""
        real = resolved(path)
        for what, root, is_used in self._rules:
            if real != root and root not in real.parents:
                continue
            rel = "" if real == root else real.relative_to(root).parts[0]
            if is_used is None or is_used(rel):
                return f"{real} is {'' if real == root else 'inside '}{what}"
        return None


def check_reports(files: RunFiles, reports: dict[str, str | os.PathLike | None]) -> None:
    """UnsafePathError naming the option whose path is a file of the run, or the path of another
    report ({option: path or None})."""
    seen: dict[Path, str] = {}
    for option, path in reports.items():
        if path is None or str(path) == "-":
            continue
        real = resolved(path)
        if real in seen:
            raise UnsafePathError(f"{option} {path}: the same file as {seen[real]}; give each report its own path")
        seen[real] = option
        why = files.problem(path)
        if why is not None:
            raise UnsafePathError(f"{option} {path}: {why}, which this command reads or writes; write the report "
                                  "somewhere else")
