"""The output directory: exclusive lock, resume decisions, and the files written at the end."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from kt_runtime.format import INDEX_FILE, LOCK_FILE, MANIFEST_FILE
from kt_runtime.manifest import Manifest, ManifestError, atomic_write_text, read_manifest

from .errors import UserError
from .source import COPIED_FILES


class OutputLock:
    """flock on OUT/.kt_convert.lock: released by the kernel even when the process is killed."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise UserError(f"{out_dir} is being written by another converter (pid {holder}); wait for it to "
                            "finish or stop it, then re-run") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_LAYER_TEMP = re.compile(r"^_layer_\d+\.(tmp|old)$")


def _stale_temporary(path: Path) -> bool:
    """Only the temporary names this converter writes (what an interrupted run leaves behind)."""
    name = path.name
    return (name in (MANIFEST_FILE + ".tmp", INDEX_FILE + ".tmp") or name.endswith(".safetensors.tmp")
            or bool(_LAYER_TEMP.match(name)) or (name.endswith(".tmp") and name[:-4] in COPIED_FILES))


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _ours(path: Path) -> bool:
    """What a conversion writes; --overwrite replaces these and leaves any other file alone."""
    name = path.name
    return (name.endswith((".safetensors", ".tmp")) or name.startswith("_layer_")
            or name in (INDEX_FILE, MANIFEST_FILE, LOCK_FILE) or name in COPIED_FILES)


def check_output_location(out_dir: Path, input_root: Path) -> None:
    """Refuses an output inside the input (or equal to it) or one that is a file: before anything is created."""
    out_dir = Path(out_dir).expanduser().resolve()
    src = Path(input_root).resolve()
    if out_dir == src or src in out_dir.parents:
        raise UserError(f"output directory {out_dir} is inside the input {src}: choose a directory outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory: choose a directory")


def prepare_output(out_dir: Path, input_root: Path, planned: Manifest, overwrite: bool) -> Manifest:
    """Returns the manifest to continue from (a fresh one, or the existing one when resuming)."""
    check_output_location(out_dir, input_root)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        existing = read_manifest(out_dir)
    except ManifestError as e:
        if not overwrite:
            raise UserError(f"{e}; pass --overwrite to replace the output") from None
        existing = None
    # under our lock: temporaries here are an interrupted run's, never a running converter's
    stale = [p for p in out_dir.iterdir() if _stale_temporary(p)]
    others = [p for p in out_dir.iterdir() if p.name != LOCK_FILE and p not in stale]
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
        raise UserError(f"{out_dir} is not empty and holds no kt_manifest.json; choose an empty directory "
                        "or pass --overwrite")
    _remove(stale + [p for p in others if _ours(p)])
    return planned


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def copy_model_files(input_root: Path, out_dir: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        src = input_root / name
        if src.is_file():
            tmp = out_dir / (name + ".tmp")
            shutil.copyfile(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out_dir / name)
            copied.append(name)
    return copied
