"""Watched outside files for the security cases: a folder outside every root of a run, holding a
regular file (a secret), a copy of a real shard, a config and a FIFO. `assert_untouched()` checks that
nothing in it changed, nothing was added or removed, and (where the file system keeps access times)
that no file was read; the FIFO would make any blocking open hang, which the tests' timeouts catch."""
from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

FIXED_MTIME = 1_600_000_000


def atime_works(folder: Path) -> bool:
    probe = folder / ".atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (0, time.time()))
    probe.read_bytes()
    works = os.stat(probe).st_atime > 1
    probe.unlink()
    return works


class Watched:
    def __init__(self, folder: Path, shard: Path | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self.reads_seen = atime_works(self.folder)
        contents = {"secret.txt": b"not for the converter\n", "config.json": b'{"model_type": "none"}\n'}
        if shard is not None:
            contents["model.safetensors"] = Path(shard).read_bytes()
        for name, data in contents.items():
            (self.folder / name).write_bytes(data)
        os.mkfifo(self.folder / "pipe")
        self.digests = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
        for name in contents:
            os.utime(self.folder / name, (0, FIXED_MTIME))
        self.before = self._entries()

    def path(self, name: str) -> Path:
        return self.folder / name

    def climbing(self, name: str = "secret.txt") -> str:
        """A relative name that climbs from any folder of the run to this one's `name`."""
        return "../" * 24 + str(self.folder / name).lstrip("/")

    def _entries(self) -> dict[str, tuple]:
        found = {}
        for p in sorted(self.folder.iterdir()):
            st = os.lstat(p)
            found[p.name] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino, st.st_nlink)
        return found

    def assert_untouched(self) -> None:
        assert self._entries() == self.before, f"{self.folder} changed"
        if self.reads_seen:
            read = [n for n in self.digests if os.stat(self.folder / n).st_atime != 0]
            assert not read, f"{read} outside the run's roots were read"
        for name, digest in self.digests.items():
            assert hashlib.sha256((self.folder / name).read_bytes()).hexdigest() == digest

    def add(self, name: str, data: bytes) -> Path:
        """One more watched file (it must stay untouched too)."""
        dst = self.folder / name
        dst.write_bytes(data)
        self.digests[name] = hashlib.sha256(data).hexdigest()
        os.utime(dst, (0, FIXED_MTIME))
        self.before = self._entries()
        return dst

    def add_folder(self, name: str) -> Path:
        """One more folder (call settle() once it holds what it should)."""
        (self.folder / name).mkdir()
        return self.folder / name

    def settle(self) -> None:
        """What is here now is what must stay."""
        self.before = self._entries()
