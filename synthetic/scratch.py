"""Where a script puts its synthetic checkpoints and outputs, and how it cleans up: only what it made.

    with Scratch(args.workdir, "bench_x_", keep=args.keep) as scratch:
        ckpt = scratch.new("ckpt")           # refused if the name exists: never written into, never removed
        ...
    # removed at the end (also after an error or Ctrl-C), unless keep: then the folder is named

Without a folder, a new temporary one (removed with all in it: the script made all of it). With a
folder (--workdir), it is created if missing and removed again only if it was created and is empty; an
entry another run kept there is reused only through `reused`, and never removed.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


class Scratch:
    def __init__(self, folder: Path | str | None, prefix: str, keep: bool = False):
        self.keep = keep
        self.temporary = folder is None  # then everything in it is this run's
        if folder is None:
            self.root = Path(tempfile.mkdtemp(prefix=prefix))
            self.made_root = True
        else:
            self.root = Path(folder)
            self.made_root = not os.path.lexists(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
        self.made: list[Path] = []

    def new(self, name: str) -> Path:
        """A path this run creates (and removes at the end): refused when something is there already."""
        path = self.root / name
        if os.path.lexists(path):
            raise SystemExit(f"{path} exists and this run did not make it: remove it yourself or choose another "
                             "--workdir (nothing a run did not make is written into or removed)")
        self.made.append(path)
        return path

    def reused(self, name: str) -> Path | None:
        """An entry that an earlier run kept here (--keep), to be used as it is and never removed; None if absent."""
        path = self.root / name
        return path if os.path.lexists(path) else None

    def discard(self, path: Path) -> None:
        """Removes something this run made, before the end."""
        if path not in self.made:
            raise ValueError(f"{path} was not made by this run")
        _remove(path)
        self.made.remove(path)

    def close(self) -> None:
        if self.keep:
            kept = [self.root] if self.temporary else [p for p in self.made if os.path.lexists(p)]
            print(f"kept (--keep): {', '.join(map(str, kept)) or 'nothing'}; remove it when done", file=sys.stderr)
            return
        if self.temporary:
            self.made = [self.root]
        for path in reversed(self.made):
            _remove(path)
        self.made.clear()
        if self.made_root and not self.temporary:
            try:
                self.root.rmdir()  # only when empty: a kept entry of an earlier run stays
            except OSError:
                pass

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
