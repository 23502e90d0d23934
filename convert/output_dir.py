"""The output directory: exclusive lock, resume decisions, and the model files copied at the end."""
from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.errors import InputFileError, ManifestError, UnsafePathError
from kt_convert.kt_runtime.format.input_files import open_regular
from kt_convert.kt_runtime.format.names import (INDEX_FILE, KT_SFT_MANIFEST_FILE, LAYER_DIR_TEMPORARY, LOCK_FILE,
                                                MANIFEST_FILE, VERIFIED_FILE, layer_dir_name, state_dir)
from kt_convert.kt_runtime.format.manifest import Manifest, read_manifest

from .errors import UserError
from .source import COPIED_FILES

COPY_CHUNK = 1 << 20
SHARD_DIR = ".kt_shards"  # --shard runs: per-layer claims and completion records (convert/shared_output.py)


class OutputLock:
    """flock on OUT/.kt_convert.lock: released by the kernel even when the process is killed.
    wait_s: how long to wait for a holder (--shard processes hold it for moments: setup, finalize).

    The file is removed when the lock is released, so a finished output holds only its own files.
    Removing a lock file races with a converter that opened it just before: that one then holds a
    lock on a file no longer in the folder, so after flock the name must still lead to the locked
    file, else it tries again on the new one."""

    def __init__(self, out_dir: Path, wait_s: float = 0.0):
        self.path = out_dir / LOCK_FILE
        deadline = time.monotonic() + wait_s
        while True:
            self._fd = fsio.open_single_link(self.path)  # never through a link: a planted one would be truncated
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    os.close(self._fd)
                    time.sleep(0.05)
                    continue
                holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(self._fd)
                raise UserError(f"{out_dir} is being written by another converter (pid {holder}); wait for it to "
                                "finish or stop it, then re-run") from None
            if self._still_named():
                break
            os.close(self._fd)  # the previous holder removed it as we locked it: take the new one
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _still_named(self) -> bool:
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Removes the lock file (still holding the lock, so no one waits on a removed file), then unlocks."""
        if self._fd >= 0:
            try:
                if self._still_named():
                    fsio.remove(self.path)
            except (OSError, UnsafePathError):
                pass  # a read-only or vanished folder: the next run takes the lock over
            os.close(self._fd)
            self._fd = -1


def created_dirs(path: Path) -> list[Path]:
    """The folders that mkdir(parents=True) will create for `path`, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def remove_if_empty(dirs: list[Path]) -> None:
    """Undoes the mkdir of a run refused before it wrote anything (deepest first; a folder that now
    holds anything, or cannot be removed, is kept)."""
    fsio.remove_empty_dirs(dirs)


def _stale_temporary(path: Path) -> bool:
    """Only the temporary names this converter writes (what an interrupted run leaves behind)."""
    name = path.name
    return (name in (MANIFEST_FILE + ".tmp", INDEX_FILE + ".tmp") or name.endswith(".safetensors.tmp")
            or bool(LAYER_DIR_TEMPORARY.match(name)) or (name.endswith(".tmp") and name[:-4] in COPIED_FILES))


def _remove(paths: list[Path]) -> None:
    for p in paths:
        fsio.remove(p)


def entries(folder: Path) -> list[Path]:
    return [folder / name for name in fsio.list_dir(folder)]


def is_output_entry(name: str) -> bool:
    """A name a conversion writes at the top of its output folder (a file, or a folder of its own);
    --overwrite replaces these and leaves any other file alone."""
    return (name.endswith((".safetensors", ".tmp")) or name.startswith("_layer_")
            or name in (INDEX_FILE, MANIFEST_FILE, LOCK_FILE, VERIFIED_FILE, SHARD_DIR, KT_SFT_MANIFEST_FILE)
            or name in COPIED_FILES)


def _ours(path: Path) -> bool:
    return is_output_entry(path.name)


def resolve_output_dir(out_dir: Path, input_root: Path) -> Path:
    """The output directory as an absolute path without links (which may not exist yet). Refuses,
    before anything is created: a link loop or a link to nothing, an output that is a file, and an
    output inside the input (or equal to it)."""
    try:
        given = Path(out_dir).expanduser()
    except RuntimeError:  # ~user of a user this machine does not know
        raise UserError(f"output {out_dir}: there is no such user's home directory here") from None
    try:
        resolved = given.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # Python < 3.13: RuntimeError on a loop; later: OSError ELOOP
        raise UserError(f"output {given} cannot be resolved ({e}); a symbolic link on that path points back "
                        "to itself: remove the loop or choose another directory") from None
    for part in (given, *given.parents):
        if part.is_symlink() and not part.exists():  # never create directories at the far end of a link
            raise UserError(f"output {given}: {part} is a symbolic link to {os.readlink(part)}, which does not "
                            "exist: create that directory first, or pass a directory path that exists or can be "
                            "created")
    src = Path(input_root).resolve()
    if resolved == src or src in resolved.parents:
        raise UserError(f"output directory {resolved} is inside the input {src}: choose a directory outside it")
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"output {resolved} exists and is not a directory: choose a directory")
    return resolved


def records_dir(out_dir: Path, input_root: Path) -> Path:
    """--kt-sft-manifest: the folder beside the resolved output, OUT.kt-convert, for this converter's own files.
    Its name is derived, not given, so a link or anything but a real folder planted there is refused."""
    if not out_dir.name:
        raise UserError(f"--kt-sft-manifest: the output {out_dir} has no folder beside it for this converter's "
                        "records; choose a directory below it")
    state = state_dir(out_dir)
    fsio.entry(state, fsio.DIR)
    return resolve_output_dir(state, input_root)


def check_output_location(out_dir: Path, input_root: Path) -> None:
    resolve_output_dir(out_dir, input_root)


def _check_entries(out_dir: Path, shared: bool = False) -> None:
    """Every entry a conversion writes, replaces or removes is a real file or folder: a link or a
    special file planted under one of our names is refused before anything is read or written.
    shared: --shard processes are writing beside us: their folders are checked at the top only (their
    contents change while we look)."""
    for p in entries(out_dir):
        if _ours(p) or _stale_temporary(p):
            dir_like = p.name.startswith("_layer_") or p.name == SHARD_DIR
            if dir_like and not shared:
                fsio.check_tree(p)
            elif dir_like:
                try:
                    st = os.lstat(p)
                except FileNotFoundError:  # renamed into place by a shard meanwhile
                    continue
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    fsio.check_tree(p)  # refuses it with the usual message
            else:
                fsio.entry(p, fsio.FILE)


def _kt_root_problem(out_dir: Path, planned: Manifest, overwrite: bool) -> str | None:
    """--kt-sft-manifest: what in out_dir would stay beside kt's tree (kt's SFT loader refuses any other entry
    at the root): anything but the planned _layer_L folders, kt's manifest and our temporaries, unless
    --overwrite removes it as ours."""
    allowed = {KT_SFT_MANIFEST_FILE, *(layer_dir_name(layer) for layer in planned.layers)}
    foreign = sorted(p.name for p in entries(out_dir)
                     if p.name not in allowed and not _stale_temporary(p) and not (overwrite and _ours(p)))
    if not foreign:
        return None
    return (f"{out_dir} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which kt-kernel's SFT "
            f"loader refuses beside its weights (only {KT_SFT_MANIFEST_FILE} and the _layer_L folders may be "
            "there): move them away or choose an empty directory"
            + ("" if overwrite else "; --overwrite removes what an earlier conversion wrote there"))


def prepare_output(out_dir: Path, input_root: Path, planned: Manifest, overwrite: bool,
                   shared: bool = False, state: Path | None = None) -> Manifest:
    """Returns the manifest to continue from (a fresh one, or the existing one when resuming).
    out_dir: from resolve_output_dir, existing, locked by us. shared: --shard processes write layers
    beside us (their temporaries are alive: only the manifest's and index's, written under the lock,
    are stale here). state: where the manifest is (out_dir, or OUT.kt-convert with --kt-sft-manifest, whose
    out_dir then holds kt's tree and nothing else)."""
    out_dir = resolve_output_dir(out_dir, input_root)
    state = out_dir if state is None else resolve_output_dir(state, input_root)
    dirs = [out_dir] if state == out_dir else [out_dir, state]
    for d in dirs:
        _check_entries(d, shared)
    if state != out_dir:
        problem = _kt_root_problem(out_dir, planned, overwrite)
        if problem:
            raise UserError(problem)
        if os.path.lexists(out_dir / LOCK_FILE):  # an earlier conversion's without the flag: unless it still runs
            OutputLock(out_dir).release()
    try:
        existing = read_manifest(state)
    except ManifestError as e:
        if not overwrite:
            raise UserError(f"{e}; pass --overwrite to replace the output") from None
        existing = None
    # under our lock: temporaries here are an interrupted run's, never a running converter's
    found = [p for d in dirs for p in entries(d)]
    stale = [p for p in found if _stale_temporary(p)
             and (not shared or p.name in (MANIFEST_FILE + ".tmp", INDEX_FILE + ".tmp"))]
    others = [p for p in found if p.name != LOCK_FILE and p not in stale and not _stale_temporary(p)]
    if existing is not None and not overwrite:
        ours, theirs = existing.identity(), planned.identity()
        diff = [k for k in theirs if ours.get(k) != theirs.get(k)]
        if diff:
            details = "; ".join(f"{k}: {ours.get(k)!r} there, {theirs.get(k)!r} now" for k in diff if k != "layers")
            if "layers" in diff:
                details += "; layers differ"
            raise UserError(f"{out_dir} holds a conversion made with other settings ({details}). Use another "
                            "output directory, repeat the original arguments, or pass --overwrite")
        existing.converter_version = planned.converter_version
        _remove(stale)
        return existing
    if others and not overwrite:
        elsewhere = state == out_dir and os.path.lexists(state_dir(out_dir) / MANIFEST_FILE)
        raise UserError(f"{out_dir} is not empty and holds no kt_manifest.json; choose an empty directory "
                        "or pass --overwrite" + (f" (its records are in {state_dir(out_dir)}: a conversion made "
                                                  "with --kt-sft-manifest, which resumes with that flag)"
                                                  if elsewhere else ""))
    _remove(stale + [p for p in others if _ours(p)])
    return planned


def copy_model_files(input_root: Path, out_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Copies the regular files among `names` (links into a hub cache are followed on the input side;
    a FIFO or device there is skipped, never read)."""
    copied = []
    for name in names:
        src = input_root / name
        if not src.is_file():
            continue
        try:
            src_fd, _ = open_regular(src, what=name)
        except InputFileError:  # swapped for something else since is_file()
            continue
        with os.fdopen(src_fd, "rb") as fsrc:
            def copy(fd: int, tmp: Path) -> None:
                while chunk := fsrc.read(COPY_CHUNK):
                    fsio.write_all(fd, chunk, tmp)

            fsio.atomic_write(out_dir / name, copy)
        copied.append(name)
    return copied
