"""Per-layer claims: which process converts a layer of a shared output directory (--shard).

A claim is a file `layer_L.claim` holding its owner (host name, pid, boot id, process start time) and
kept under an flock for as long as the owner works on the layer. The flock is what says "alive": the
kernel drops it when the process dies, however it dies, and NFSv4 / Lustre (-o flock) / GPFS / BeeGFS
carry it across hosts. A claim is made visible only once locked (written under a private name, flocked,
then hard-linked into place, which fails when another process got there first), so no one can find it
unlocked while its owner lives. A claim found unlocked belongs to a dead process and is taken over
(rewritten in place by whoever gets its lock). Releasing empties the file, so a free claim reads empty.

Where the filesystem has no flock (ENOLCK, EOPNOTSUPP: e.g. NFSv3 without lockd, some FUSE mounts) the
owner record decides: same host and boot, pid alive with the same start time (not a recycled pid) ->
alive; same host otherwise -> dead and taken over; another host -> presumed alive (it cannot be checked
from here): the message names the file to delete once that host's process is known to be gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.errors import UnsafePathError
from kt_convert.kt_runtime.format.files import read_system_text
from kt_convert.kt_runtime.format.input_files import JsonSyntaxError, decode_json

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


CLAIM = re.compile(r"^layer_(\d+)\.claim$")
OWNER_MAX_BYTES = 4096
PUBLISH_WAIT_S = 1.0  # a claim being published has two names for a moment (its private one, then its own)


def boot_id() -> str:
    return (read_system_text("/proc/sys/kernel/random/boot_id") or "").strip()


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (clock ticks since boot): tells a live pid from a recycled one."""
    text = read_system_text(f"/proc/{pid}/stat") or ""
    try:
        return text[text.rindex(")") + 2:].split()[19]
    except (ValueError, IndexError):
        return ""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    boot_id: str
    start_time: str

    @classmethod
    def me(cls) -> "Owner":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, boot_id(), process_start_time(pid))

    def to_bytes(self) -> bytes:
        return (json.dumps({"host": self.host, "pid": self.pid, "boot_id": self.boot_id,
                            "start_time": self.start_time}) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> "Owner | None":
        try:
            d = decode_json(data.decode())
        except (JsonSyntaxError, UnicodeDecodeError):
            return None
        if not isinstance(d, dict):
            return None
        host, pid, boot, start = (d.get(k) for k in ("host", "pid", "boot_id", "start_time"))
        if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 31
                and all(isinstance(x, str) for x in (host, boot, start))):
            return None
        return cls(host, pid, boot, start)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def owner_alive(owner: Owner, here: Owner) -> bool | None:
    """Whether the owner process still runs: None when it cannot be told (another host)."""
    if owner.host != here.host:
        return None
    if owner.boot_id and here.boot_id and owner.boot_id != here.boot_id:
        return False  # this host rebooted since
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return not owner.start_time or process_start_time(owner.pid) == owner.start_time


def _try_flock(fd: int) -> bool | None:
    """True: locked by us; False: someone holds it; None: this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_FLOCK:
            return None
        raise


class Claim:
    """A held claim; release() when the layer is committed (or abandoned)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)  # free: a later claimer without flock reads it as such
            finally:
                os.close(self._fd)
                self._fd = -1


@dataclass
class Held:
    """A claim another process holds (why a layer is skipped)."""

    path: Path
    owner: Owner | None
    checked: bool  # False: another host on a filesystem without flock, presumed alive

    def describe(self) -> str:
        who = str(self.owner) if self.owner else "another process"
        if self.checked:
            return f"{who} is converting it"
        return (f"{who} claimed it and this filesystem has no flock to tell whether it still runs; "
                f"delete {self.path} once that process is known to be gone")


def open_claim(path: Path) -> int | None:
    """The claim file at `path` opened for reading and writing (None when there is none), under the lock
    file's rules (fsio.open_single_link: never a link, never blocking, one name). A claim with two names
    is being published (linked from its private name, which goes next): looked at again for a moment."""
    deadline = time.monotonic() + PUBLISH_WAIT_S
    while True:
        try:
            return fsio.open_single_link(path, create=False)
        except FileNotFoundError:
            return None
        except UnsafePathError:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None
            if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 2) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class ClaimDir:
    """The claims of one shared output directory: `root/layer_L.claim`."""

    def __init__(self, root: Path, create: bool = True):
        self.root = root
        self.here = Owner.me()
        fsio.real_dir(root, create)

    def path(self, layer: int) -> Path:
        return self.root / f"layer_{layer}.claim"

    def acquire(self, layer: int) -> Claim | Held:
        path = self.path(layer)
        for _ in range(8):  # only a release racing with our look can send us round again
            fd = open_claim(path)
            if fd is None:
                claim = self._create(path)
                if claim is not None:
                    return claim
                continue
            result = self._take_over(path, fd)
            if result is not None:
                return result
        return Held(path, None, True)

    def _create(self, path: Path) -> Claim | None:
        tmp = path.with_name(f".{path.name}.{self.here.host}.{self.here.pid}")
        fd = fsio.create_new(tmp)
        try:
            _try_flock(fd)  # locked before anyone can see it (or no flock here: the record decides)
            fsio.write_all(fd, self.here.to_bytes(), tmp)
            try:
                fsio.link_new(tmp, path)
            except FileExistsError:
                os.close(fd)
                fd = -1
                return None
            return Claim(path, fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            fsio.discard(tmp)

    def _take_over(self, path: Path, fd: int) -> Claim | Held | None:
        """fd: the claim file found at path. A Claim when ours now, Held when someone else's, None to
        look again (the file was replaced meanwhile)."""
        try:
            locked = _try_flock(fd)
            owner = Owner.parse(os.pread(fd, OWNER_MAX_BYTES, 0))
            if locked is False:
                os.close(fd)
                return Held(path, owner, True)
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return None
            if locked is None and owner is not None:
                alive = owner_alive(owner, self.here)
                if alive is not False:
                    os.close(fd)
                    return Held(path, owner, alive is not None)
            os.ftruncate(fd, 0)
            fsio.write_all(fd, self.here.to_bytes(), path)
            return Claim(path, fd)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise

    def live_holders(self) -> list[Held]:
        """Claims held now (a single-process run refuses to write beside them)."""
        held = []
        for name in fsio.list_dir(self.root):
            if CLAIM.match(name) is None:
                continue
            path = self.root / name
            fd = open_claim(path)
            if fd is None:
                continue
            try:
                locked = _try_flock(fd)
                owner = Owner.parse(os.pread(fd, OWNER_MAX_BYTES, 0))
                if locked is False:
                    held.append(Held(path, owner, True))
                elif locked is None and owner is not None and owner_alive(owner, self.here) is not False:
                    held.append(Held(path, owner, owner_alive(owner, self.here) is not None))
            finally:
                os.close(fd)  # also drops a lock we just took
        return held
