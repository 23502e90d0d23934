"""Reading files that an input names, defensively: one set of rules for the converter (checkpoints)
and the reader (packed outputs). Torch-free; convert imports it, it imports nothing of convert.

* Containment. A name taken from an input (an index's ``weight_map`` value, a manifest's file list)
  must be a plain relative path: not empty, not absolute, no ``..`` or ``.`` component, no
  backslash or NUL, written in normal form. The file it reaches, symlinks followed, must lie inside
  the containment root: the folder itself, or for a Hugging Face cache snapshot
  (``.../models--ORG--NAME/snapshots/REV``) the repo folder ``models--ORG--NAME``, whose snapshot
  files are symlinks into ``../../blobs/``. One exception, the other folder structure huggingface_hub makes:
  a symlink to a blob of a Hugging Face cache (``.../models--*/blobs/<hex digest>``), which is what
  ``huggingface-cli download --local-dir`` left before huggingface_hub 0.23. Any other symlink
  leading out of the folder is refused, so a checkpoint cannot make the converter read
  ``/etc/shadow`` or another user's files.
* Only regular files are read. The type is checked with stat before opening (a device is never
  opened), the file is opened with O_NONBLOCK (a FIFO swapped in meanwhile cannot block) and
  checked again with fstat.
* JSON files have a size cap, named in the message; parse errors (syntax, nesting too deep,
  integers too long) are reported, never raised as a bare RecursionError or ValueError.

Every problem raises :class:`InputFileError` (a ValueError) whose message starts with the path.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import InputFileError

MiB = 1 << 20
# Caps for the JSON files read whole; generous for real models (the biggest seen: an index of
# ~200k tensor names is ~25 MB, a kt-folders manifest of 1M files ~70 MB; configs are < 1 MB).
CONFIG_MAX_BYTES = 16 * MiB  # config.json, generation/tokenizer configs
INDEX_MAX_BYTES = 256 * MiB  # model.safetensors.index.json
MANIFEST_MAX_BYTES = 256 * MiB  # kt_manifest.json

_HUB_REPO = re.compile(r"^models--[^/]+$")
_BLOB_NAME = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n and n % MiB == 0 else f"{n} bytes"


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def relative_name_problem(name: Any) -> str | None:
    """Why `name` is not a plain relative path inside a folder, or None."""
    if not isinstance(name, str):
        return f"is {type(name).__name__}, not a file name"
    if not name:
        return "is empty"
    if "\0" in name or "\\" in name:
        return "contains a NUL or backslash"
    p = PurePosixPath(name)
    if p.is_absolute():
        return "is an absolute path"
    if ".." in p.parts:
        return "climbs out of the folder with '..'"
    if not p.parts or p.parts[0] == "." or str(p) != name:
        return "is not a plain relative path (write it as dir/file, without '.', '//' or a trailing '/')"
    return None


def is_hub_snapshot(folder: Path) -> bool:
    """folder (resolved) is .../models--ORG--NAME/snapshots/REV of a Hugging Face cache."""
    return folder.parent.name == "snapshots" and bool(_HUB_REPO.match(folder.parent.parent.name))


def containment_root(folder: str | os.PathLike) -> Path:
    """The folder inside which everything a checkpoint or output names must lie (resolved)."""
    real = Path(os.path.realpath(folder))
    return real.parent.parent if is_hub_snapshot(real) else real


def _is_hub_blob(real: Path) -> bool:
    return real.parent.name == "blobs" and bool(_HUB_REPO.match(real.parent.parent.name)) \
        and bool(_BLOB_NAME.match(real.name))


def _inside(real: Path, root: Path) -> bool:
    return real == root or root in real.parents


def resolve_inside(folder: str | os.PathLike, name: str, *, named_by: str | None = None,
                   root: Path | None = None) -> Path:
    """The real path of folder/name, after checking that `name` is a plain relative path and that
    the file, symlinks followed, lies inside `root` (default: containment_root(folder)) or is a
    Hugging Face cache blob. named_by: the file that named it (for the message); None for names
    the caller chose (config.json, a globbed shard). Does not check that the file exists."""
    folder = Path(folder)
    root = containment_root(folder) if root is None else root
    who = f"{named_by} names {name!r}, which" if named_by else f"{folder / str(name)}"
    problem = relative_name_problem(name)
    if problem is not None:
        raise InputFileError(f"{who} {problem}; only files inside {root} are read")
    path = folder / name
    real = Path(os.path.realpath(path))
    if _inside(real, root) or _is_hub_blob(real):
        return real
    how = f"is a symlink to {real}" if named_by is None else f"leads to {real}"
    raise InputFileError(f"{who} {how}, outside {root}; only files inside it are read (a Hugging Face cache "
                         "blob excepted): copy the file into the folder instead of linking it")


def check_regular(path: Path, *, what: str = "", follow: bool = True, fix: str = "") -> os.stat_result:
    """stat (lstat when not follow); InputFileError unless a regular file (fix: what to do, for the
    message). FileNotFoundError passes."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise InputFileError(f"{path}: cannot read{' ' + what if what else ''} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        role = f" where {what} should be" if what else ""
        raise InputFileError(f"{path} is {file_kind(st.st_mode)}{role}; only regular files are read"
                             + (f": {fix}" if fix else ""))
    return st


# A file found with no name after it was opened was removed meanwhile (a lock released by its holder, a
# record replaced by a rename): where a single name is required, its name is opened again, this many times
# at most.
REOPEN_TRIES = 100


def open_regular(path: Path, *, what: str = "", follow: bool = True, one_link: bool = False, fix: str = ""
                 ) -> tuple[int, os.stat_result]:
    """A read-only descriptor of a regular file, never blocking: stat before (a device or FIFO is
    never opened), O_NONBLOCK, fstat after (it may have been swapped). follow: False opens with
    O_NOFOLLOW (a link there is refused); one_link: a file with several names (hard links) is refused,
    so that a name planted in a folder cannot make the program read another file, and one whose name was
    removed between the open and the look is opened again by its name. FileNotFoundError passes."""
    for _ in range(REOPEN_TRIES):
        fd, st = _open_regular(path, what, follow, one_link, fix)
        if not (one_link and st.st_nlink == 0):
            return fd, st
        os.close(fd)
    raise InputFileError(f"{path} was removed each of the {REOPEN_TRIES} times it was opened: is another program "
                         "deleting it? Stop that program and re-run")


def _open_regular(path: Path, what: str, follow: bool, one_link: bool, fix: str) -> tuple[int, os.stat_result]:
    st = check_regular(path, what=what, follow=follow, fix=fix)
    if one_link:  # refused before it is opened, too
        _one_name(path, st)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise InputFileError(f"{path}: cannot open{' ' + what if what else ''} ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputFileError(f"{path} is {file_kind(st.st_mode)}; only regular files are read")
    if one_link and st.st_nlink > 1:
        os.close(fd)
        _one_name(path, st)
    return fd, st


def _one_name(path: Path, st: os.stat_result) -> None:
    if st.st_nlink != 1:
        raise InputFileError(f"{path} has {st.st_nlink} names (hard links), so it may be another file's: it is not "
                             "read; remove it (the program writes a fresh one)")


def map_regular(path: Path, *, what: str = "") -> mmap.mmap:
    """A read-only mapping of a whole regular file (opened as open_regular does; the descriptor is closed,
    the mapping stays valid)."""
    fd, _ = open_regular(path, what=what)
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


READ_CHUNK = 16 << 20


REDOWNLOAD = "re-download it"


def read_capped(path: Path, max_bytes: int, *, what: str, follow: bool = True, one_link: bool = False,
                fix: str = REDOWNLOAD) -> bytes:
    """The whole content of a regular file of at most max_bytes (named in the message, with `fix`)."""
    fd, st = open_regular(path, what=what, follow=follow, one_link=one_link, fix=fix)
    try:
        if st.st_size > max_bytes:
            raise InputFileError(f"{path}: {what} is {size_text(st.st_size)}, more than the {size_text(max_bytes)} "
                                 f"allowed for it; this is not a real {what}: {fix}")
        chunks, total = [], 0
        while True:
            try:
                # the size fstat gave (+1 to see growth), never the whole cap: the cap can be far
                # larger than the file, and a buffer that large may not be allocatable
                chunk = os.read(fd, min(max_bytes + 1 - total, max(st.st_size - total, 0) + 1, READ_CHUNK))
            except OSError as e:
                raise InputFileError(f"{path}: cannot read {what} ({e.strerror or e})") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InputFileError(f"{path}: {what} grew past the {size_text(max_bytes)} allowed for it while "
                                     f"it was read; {fix}")
        return b"".join(chunks)
    finally:
        os.close(fd)


MAX_JSON_DEPTH = 64  # real configs, indexes and manifests nest at most 6 deep


class JsonSyntaxError(ValueError):
    """Why a text is not the strict JSON the program reads (the reason only: callers name the file)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JsonSyntaxError(f"duplicate key {key!r}")
    return out


def _no_constant(name: str) -> Any:
    raise JsonSyntaxError(f"non-standard JSON constant {name}")


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:  # iterative: only containers are pushed
        v, depth = stack.pop()
        if depth > limit:
            return True
        items = v.values() if isinstance(v, dict) else v
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list)))
    return False


def decode_json(text: str, max_depth: int = MAX_JSON_DEPTH, constants: bool = True) -> Any:
    """The one strict JSON decoder: duplicate keys, integers of more than 4300 digits and nesting deeper
    than max_depth are refused (JsonSyntaxError, a reason); NaN and Infinity too unless `constants`
    (Python's json writes them: a config may hold one in a field nobody reads; the typed reads of
    json_fields refuse a non-finite number where one is used)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys,
                           **({} if constants else {"parse_constant": _no_constant}))
    except JsonSyntaxError:
        raise
    except RecursionError:
        raise JsonSyntaxError("nested too deeply") from None
    except json.JSONDecodeError as e:
        raise JsonSyntaxError(str(e)) from None
    except ValueError as e:  # int() limits: "Exceeds the limit (4300 digits) for integer string conversion"
        raise JsonSyntaxError("a number with too many digits" if "digits" in str(e) else str(e)[:200]) from None
    if isinstance(value, (dict, list)) and _too_deep(value, max_depth):
        raise JsonSyntaxError(f"nested too deeply (more than {max_depth} levels)")
    return value


def parse_json(data: bytes, path: Path, what: str, fix: str = REDOWNLOAD) -> Any:
    """JSON text -> value; InputFileError for bad UTF-8 and whatever decode_json refuses (message: `fix`)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: {what} is not UTF-8 text (byte {e.start}); {fix}") from None
    try:
        return decode_json(text)
    except JsonSyntaxError as e:
        raise InputFileError(f"{path}: {what} is not valid JSON ({e}); {fix}") from None


def read_json(path: Path, *, what: str, max_bytes: int) -> Any:
    """A capped, regular-file JSON read (FileNotFoundError passes for the caller's message)."""
    return parse_json(read_capped(path, max_bytes, what=what), path, what)
