"""Creating, replacing and removing output files without ever writing through a link.

Contract (every writer of the converter and of kt_runtime goes through here):
- a new file is created with O_CREAT | O_EXCL | O_NOFOLLOW, so it is always a fresh inode of ours;
  a stale regular file of that name (an interrupted run's temporary) is unlinked first;
- an existing entry is looked at with lstat, never stat: a symbolic link, FIFO, socket or device
  where an output file or folder belongs is refused with `UnsafePathError`, which names it and says
  what to do; nothing is opened, truncated, renamed over or removed through it;
- removal unlinks a regular file or removes a real directory tree (shutil.rmtree's fd-based walk
  unlinks links inside without following them); a link is never recursed into;
- crash safety: data goes to a temporary name, is fsynced, renamed into place, and the directory is
  fsynced, so an interruption never leaves a file that looks complete.
torch-free; kt_runtime and convert both use it (kt_runtime never imports convert).
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .errors import UnsafePathError
from .input_files import REOPEN_TRIES

FILE, DIR = "file", "directory"
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def kind_of(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISREG, FILE), (stat.S_ISDIR, DIR), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _refuse(path: Path, st: os.stat_result, expect: str) -> UnsafePathError:
    found = kind_of(st)
    if found == "symbolic link":
        try:
            found += f" to {os.readlink(path)}"
        except OSError:
            pass
        return UnsafePathError(f"{path} is a {found}; files are never written through links: remove the "
                               f"link (or put a real {expect} there) and re-run")
    if found in (FILE, DIR):
        return UnsafePathError(f"{path} is a {found} where a {expect} belongs: remove or rename it and re-run")
    return UnsafePathError(f"{path} is a {found} where a {expect} belongs: remove it and re-run")


def entry(path: Path, expect: str = FILE) -> os.stat_result | None:
    """lstat of an output entry: None when absent; UnsafePathError unless it is a `expect` (FILE or DIR)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if kind_of(st) != expect:
        raise _refuse(path, st, expect)
    return st


def check_tree(path: Path) -> None:
    """Every entry at and below `path` is a real directory or a regular file (no link is followed)."""
    path = Path(path)
    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise _refuse(path, st, "file or directory")
    folders = [path] if stat.S_ISDIR(st.st_mode) else []
    while folders:  # iterative: no recursion limit however deep a planted tree is
        with os.scandir(folders.pop()) as it:
            for child in it:
                st = child.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    folders.append(Path(child.path))
                elif not stat.S_ISREG(st.st_mode):
                    raise _refuse(Path(child.path), st, "file")


def regular_size_below(root: Path, rel: str) -> int | None:
    """Size of root/rel when every component below root is a real directory and the last a regular
    file (lstat only); None otherwise."""
    path = Path(root)
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not (stat.S_ISREG(st.st_mode) if i == len(parts) - 1 else stat.S_ISDIR(st.st_mode)):
            return None
    return st.st_size if parts else None


def remove(path: Path) -> None:
    """Removes one of our entries (a regular file, or a real directory with everything below it);
    absent is fine; a link or special file is refused."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.unlink(path)
    elif stat.S_ISDIR(st.st_mode):
        check_tree(path)
        shutil.rmtree(path)
    else:
        raise _refuse(path, st, "file or directory")


def create_new(path: Path, mode: int = 0o644) -> int:
    """A new file at `path` opened for writing (fd): O_EXCL | O_NOFOLLOW, after removing a stale
    regular file of that name. A link, special file or directory there is refused."""
    path = Path(path)
    if entry(path, FILE) is not None:
        os.unlink(path)
    try:
        return os.open(path, _NEW_FLAGS, mode)
    except FileExistsError:  # created between the unlink and the open: not by us
        st = os.lstat(path)
        raise _refuse(path, st, FILE) if not stat.S_ISREG(st.st_mode) else UnsafePathError(
            f"{path} appeared while it was being created: is another program writing this directory?") from None


def make_dir_new(path: Path, mode: int = 0o755) -> None:
    """A new, empty directory at `path` (a stale real directory of that name is removed first)."""
    remove(path)
    os.mkdir(path, mode)


def replace(src: Path, dst: Path, expect: str = FILE) -> None:
    """Renames our finished `src` over `dst`: dst must be absent or a `expect` (rename never follows a
    link, but a link or special file there is someone else's: refused). A directory replaces only an
    absent or empty one; callers move an old tree aside first."""
    entry(dst, expect)
    os.replace(src, dst)


def write_all(fd: int, data, path: Path, write=os.write) -> None:
    """Writes every byte of data; an OSError (ENOSPC, EIO, ...) carries the file name for the message.
    write: os.write, or a stand-in (tests simulate a full or failing disk)."""
    view = memoryview(data).cast("B")
    try:
        while view:
            view = view[write(fd, view):]
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def fsync_fd(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    _fsync_path(path, os.O_NOFOLLOW)


def fsync_dir(path: Path) -> None:
    _fsync_path(path, os.O_DIRECTORY)


def atomic_write(path: Path, write) -> None:
    """The one crash-safe way to write a whole file: path.tmp (new, exclusive) -> write(fd, tmp) -> fsync
    -> rename over path -> fsync the directory. A full disk or an interrupt removes the temporary; a
    link or special file at `path` is refused before anything is written."""
    path = Path(path)
    entry(path, FILE)
    tmp = path.with_name(path.name + ".tmp")
    fd = create_new(tmp)
    try:
        try:
            write(fd, tmp)
            fsync_fd(fd, tmp)
        finally:
            os.close(fd)
        replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data) -> None:
    atomic_write(path, lambda fd, tmp: write_all(fd, data, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def discard(path: Path) -> None:
    """Best-effort removal of our own temporary while unwinding (a regular file or a real directory);
    never raises, never follows a link. What it cannot remove, the next run's clean-up removes."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            os.unlink(path)
        elif stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def open_single_link(path: Path, create: bool = True) -> int:
    """Opens (creating if needed and asked) a file for reading and writing without following a link and
    without blocking; it must be a regular file with a single name, so that writing or truncating it
    touches nothing else (the lock file; claims and records of a shared output). A file whose name was
    removed between the open and the look (no name left) is not refused: the name is opened again. A
    refusal names the entry and says to remove it. FileNotFoundError passes when not create."""
    path = Path(path)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(REOPEN_TRIES):
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            raise
        except OSError:
            st = _lstat(path)
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise _refuse(path, st, FILE) from None
            raise
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, st, FILE)
        if st.st_nlink > 1:
            raise UnsafePathError(f"{path} has {st.st_nlink} names (hard links): writing it would change another "
                                  "file; remove it and re-run")
    raise UnsafePathError(f"{path} was removed each of the {REOPEN_TRIES} times it was opened: is another program "
                          "deleting it? Stop that program and re-run")


def real_dir(path: Path, create: bool = True) -> bool:
    """A real directory at `path` (created when absent and asked; False when absent and not): a link,
    file or special file there is refused, never followed."""
    path = Path(path)
    if entry(path, DIR) is not None:
        return True
    if not create:
        return False
    try:
        os.mkdir(path)
    except FileExistsError:  # made meanwhile: by another process of a shared output, or planted
        pass
    entry(path, DIR)
    return True


def make_dir(path: Path) -> None:
    """A new directory inside a folder of ours (an existing entry there is refused by mkdir)."""
    os.mkdir(path)


def make_dirs(path: Path) -> None:
    """The output directory and its missing parents (an existing directory is fine)."""
    Path(path).mkdir(parents=True, exist_ok=True)


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Removes folders this run created, deepest first, while they are empty (rmdir never follows a
    link and never removes anything else); stops at the first that holds something."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def link_new(src: Path, dst: Path) -> None:
    """Publishes our finished `src` under the new name `dst` (FileExistsError when dst exists)."""
    os.link(src, dst, follow_symlinks=False)


def list_dir(path: Path) -> list[str]:
    """The names in a directory, sorted (an entry is looked at by whoever uses it, under its role)."""
    return sorted(os.listdir(path))


def names_ending(path: Path, suffix: str) -> list[str]:
    """The names in a directory that end in suffix, hidden ones left out (what a shell's *suffix gives)."""
    return [n for n in list_dir(path) if n.endswith(suffix) and not n.startswith(".")]


def tree_files(path: Path) -> list[str]:
    """The regular files below a real directory tree, as relative names (refused: links, special files)."""
    check_tree(path)
    found = []
    for folder, _, names in os.walk(path):
        rel = os.path.relpath(folder, path)
        found += [name if rel == "." else f"{rel}/{name}" for name in names]
    return sorted(found)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None
