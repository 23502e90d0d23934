"""The record of the layers whose files are known equal to the manifest's sha256, each file keyed by
(size, mtime_ns, inode, device): a later load (or converter run) whose files have the same keys skips
hashing them again. Two writers: the reader, for the layers it hashed, and the converter, for each
layer it commits (hashed as it was written) and each it hashed when resuming. Any write through the file system changes mtime (a replaced file, its
inode too), so a changed file is hashed again. The record lives in the output folder
(VERIFIED_FILE), is replaced atomically (fsio), and is only a cache: unreadable, foreign or stale
entries are ignored, and a folder that cannot be written just goes without it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import files as file_roles
from . import fsio
from .errors import UnsafePathError
from .names import VERIFIED_FILE

VERSION = 1
MAX_BYTES = 64 << 20


def file_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def read_verified(out: Path) -> dict[str, dict]:
    """layer (as a string) -> {"sha256": ..., "files": {name: key}}; {} when absent or not ours."""
    data = file_roles.read_json(Path(out) / VERIFIED_FILE, file_roles.RECORD, what=VERIFIED_FILE, max_bytes=MAX_BYTES)
    layers = data.get("layers") if isinstance(data, dict) and data.get("version") == VERSION else None
    return layers if isinstance(layers, dict) else {}


def is_verified(entries: dict, layer: int, sha256: str, files: list[str], paths: list[Path]) -> bool:
    entry = entries.get(str(layer))
    if not isinstance(entry, dict) or entry.get("sha256") != sha256:
        return False
    keys = entry.get("files")
    if not isinstance(keys, dict) or list(keys) != list(files):
        return False
    try:
        return all(keys[name] == file_key(p) for name, p in zip(files, paths))
    except OSError:
        return False


def record_verified(out: Path, entries: dict, layers: dict[int, tuple[str, list[str], list[Path]]]) -> None:
    """Adds the layers just hashed ({layer: (sha256, files, paths)}) to `entries` and writes them;
    a read-only folder (or any write error) leaves the record as it was."""
    try:
        for layer, (sha256, files, paths) in layers.items():
            entries[str(layer)] = {"sha256": sha256, "files": {n: file_key(p) for n, p in zip(files, paths)}}
        fsio.atomic_write_text(Path(out) / VERIFIED_FILE, json.dumps({"version": VERSION, "layers": entries}) + "\n")
    except (OSError, UnsafePathError):
        pass


def add_verified(out: Path, layers: dict[int, tuple[str, list[str], list[Path]]]) -> None:
    """record_verified on the record as it is now on disk: for a writer that holds no entries read
    before (a --shard process, under the output's lock, so that concurrent writers never lose each
    other's layers)."""
    record_verified(out, read_verified(out), layers)
