"""Layer digests: sha256 over the sha256 of every 64 MiB block of each file, in order.

Unlike one plain sha256 (one core), block digests are computed on several cores while a shard is
written, and again in parallel when an output is verified. Blocks restart at each file's beginning,
so the digest depends only on the files' bytes and their order (docs/FORMAT.md §5).
"""
from __future__ import annotations

import hashlib
import json
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

    first_piece_later: the first update() holds a placeholder (a file header completed after its data
    is written); the first block is kept, not hashed, until hexdigest() is given the final bytes.
    """

    def __init__(self, threads: int | None = None, max_pending: int | None = None, on_hashed=None,
                 first_piece_later: bool = False):
        self._pool = ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="kt-hash")
        self._on_hashed = on_hashed
        self._max_pending = max_pending or 2 * (threads or default_threads())
        self._digests: list[Future | None] = []
        self._file_starts: list[int] = []  # index of each file's first block in _digests
        self._pieces: list[memoryview] = []
        self._filled = 0
        self._first_later = first_piece_later
        self._first: list[memoryview] = []  # the held first block (first_piece_later)

    def start_file(self) -> None:
        """Ends the previous file's last (partial) block: blocks never span two files."""
        self._flush_block()
        self._file_starts.append(len(self._digests))

    def end_file(self) -> None:
        """Hands the file's last (partial) block to the hashing threads now (the file ends here)."""
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
        if self._first_later and not self._digests:
            # hashed in hexdigest(), with the final first piece; the rest is copied, so that the buffers
            # given to update() are free once their blocks are hashed, not held until the file is complete
            held = bytearray(sum(len(p) for p in pieces[1:]))
            at = 0
            for p in pieces[1:]:
                held[at:at + len(p)] = p
                at += len(p)
            self._first = [pieces[0], memoryview(held)]
            self._digests.append(None)
            return
        pending = [f for f in self._digests if f is not None and not f.done()]
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

    def hexdigest(self, first_piece=None) -> str:
        """first_piece: with first_piece_later, the final bytes of the first update() (the same length)."""
        self._flush_block()
        if self._first_later:
            final = memoryview(first_piece).cast("B")
            if not self._first or len(final) != len(self._first[0]):
                raise ValueError("the final first piece must have the placeholder's length")
            self._digests[0] = self._pool.submit(self._hash, [final, *self._first[1:]])
            self._first = []
        top = hashlib.sha256()
        for f in self._digests:
            top.update(f.result())
        self._pool.shutdown()
        return top.hexdigest()

    def file_digests(self) -> list[str | None]:
        """After hexdigest(): the plain sha256 of each file started, for free where the file was one block (its
        block's digest) or empty; None for a file of several blocks (hash it whole: file_sha256)."""
        ends = self._file_starts[1:] + [len(self._digests)]
        return [self._digests[a].result().hex() if b - a == 1 else hashlib.sha256().hexdigest() if a == b else None
                for a, b in zip(self._file_starts, ends)]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def source_digest(slabs) -> str:
    """The identity of the source bytes a layer was converted from (docs/FORMAT.md §5): the sha256 of the
    compact JSON list of [key, expert, dtype, shape, sha256 of the bytes] of every slab read (expert null for
    a whole tensor, else the index along dim 0 of a fused tensor; dtype and shape as the source header
    gives them, shape without that dim), sorted by key then expert."""
    rows = sorted(([key, expert, dtype, list(shape), sha] for key, expert, dtype, shape, sha in slabs),
                  key=lambda r: (r[0], -1 if r[1] is None else r[1]))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def tree_sha256_of_files(file_sha256: list[str]) -> str:
    """The tree digest of non-empty files of at most one block each, from their plain sha256s (no read)."""
    top = hashlib.sha256()
    for h in file_sha256:
        top.update(bytes.fromhex(h))
    return top.hexdigest()


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
