"""Layer digests: sha256 over the sha256 of every 64 MiB block of each file, in order.

Unlike one plain sha256 (one core), block digests are computed on several cores while a shard is
written, and again in parallel when an output is verified. Blocks restart at each file's beginning,
so the digest depends only on the files' bytes and their order (docs/FORMAT.md §5).
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .input_files import open_regular

BLOCK = 64 << 20
DIGEST_NAME = "sha256-tree-64MiB"


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """The plain sha256 of one regular file's bytes (hex): what the Hugging Face hub records as an LFS
    file's oid."""
    h = hashlib.sha256()
    fd, _ = open_regular(path)
    try:
        while block := os.read(fd, chunk):
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _hash_pieces(pieces: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)  # hashlib releases the GIL on large buffers
    return h.digest()


class TreeHasher:
    """Streaming digest of files written front to back; full blocks are hashed on a thread pool.

    The buffers given to update() must stay unchanged until their block is hashed (they are kept
    referenced until then); at most `max_pending` blocks are in flight. `on_hashed(seconds)`, when
    given, is called from the hashing threads with the time each block took.
    """

    def __init__(self, threads: int | None = None, max_pending: int | None = None, on_hashed=None):
        self._pool = ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="kt-hash")
        self._on_hashed = on_hashed
        self._max_pending = max_pending or 2 * (threads or default_threads())
        self._digests: list[Future] = []
        self._pieces: list[memoryview] = []
        self._filled = 0

    def start_file(self) -> None:
        """Ends the previous file's last (partial) block: blocks never span two files."""
        self._flush_block()

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            take = min(BLOCK - self._filled, len(view))
            self._pieces.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK:
                self._flush_block()

    def _flush_block(self) -> None:
        if not self._pieces:
            return
        pieces, self._pieces, self._filled = self._pieces, [], 0
        pending = [f for f in self._digests if not f.done()]
        if len(pending) >= self._max_pending:
            pending[0].result()
        self._digests.append(self._pool.submit(self._hash, pieces))

    def _hash(self, pieces: list[memoryview]) -> bytes:
        if self._on_hashed is None:
            return _hash_pieces(pieces)
        t0 = time.perf_counter()
        try:
            return _hash_pieces(pieces)
        finally:
            self._on_hashed(time.perf_counter() - t0)

    def hexdigest(self) -> str:
        self._flush_block()
        top = hashlib.sha256()
        for f in self._digests:
            top.update(f.result())
        self._pool.shutdown()
        return top.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _read_block(path: Path, offset: int, size: int) -> bytes:
    fd, _ = open_regular(path)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: file changed while it was verified")
    return hashlib.sha256(data).digest()


def tree_sha256_files(paths: list[Path], threads: int | None = None) -> str:
    """The same digest as TreeHasher over these files, read back in parallel."""
    blocks = []
    for p in paths:
        size = os.path.getsize(p)
        blocks.extend((p, off, min(BLOCK, size - off)) for off in range(0, size, BLOCK))
    top = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="kt-verify") as pool:
        for digest in pool.map(lambda b: _read_block(*b), blocks):
            top.update(digest)
    return top.hexdigest()
