"""Reading the routed-expert source bytes: pread into two reusable buffers, one batch ahead.

Not through a mapping: a source file that is truncated or rewritten while mapped makes its pages
vanish and the next touch kills the process with SIGBUS. pread of a file that shrank returns
short instead (SafetensorsChangedError), and after each batch every file read is checked with
fstat against the size and mtime it had when opened: either way the run stops with exit 2 naming
the file. Speed: the reads run on a small thread pool (pread releases the GIL) for the batch after
the one being packed, so a cold read overlaps packing; a warm one costs one memcpy from the page
cache, which the mapping paid in page faults inside the packer.

A slab is what one batch needs of one tensor: the whole tensor (per-expert arrangement), or one
expert's part of a fused [E, ...] tensor (contiguous in the file). Each slab's sha256 is taken from the
buffer once it is read, on the reader threads while the batch is packed (the buffer goes back for reuse
when both are done): the layer's source identity (kt_runtime.format.digest.source_digest) costs no second
read of the data and does not hold back the batch.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kt_convert.kt_runtime.format.errors import SafetensorsFormatError
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile

from .host_memory import PageableMemory
from .source import Checkpoint, source_changed
from .timings import Timings

READ_THREADS = 8  # at most: enough preads in flight for an NVMe drive when the pages are not cached
PIECE_BYTES = 4 << 20  # one pread task
ALIGN = 64  # slabs start on cache-line boundaries in the buffer


@dataclass(frozen=True)
class Slab:
    key: str
    expert: int | None = None  # None: the whole tensor; else index along dim 0 of a fused tensor


@dataclass(frozen=True)
class _Extent:
    file: SafetensorsFile
    offset: int  # in the file
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


def slab_extent(ckpt: Checkpoint, slab: Slab) -> _Extent:
    f = ckpt.file_of(slab.key)
    info = f.tensors[slab.key]
    shape, dtype = f.view_of(slab.key)
    if slab.expert is None:
        return _Extent(f, info.offset, info.nbytes, shape, dtype)
    per = info.nbytes // info.shape[0]
    return _Extent(f, info.offset + slab.expert * per, per, shape[1:], dtype)


class ReadBatch:
    """The slabs of one batch as typed read-only arrays over a buffer, and the sha256 of each slab's bytes
    being taken (sha256()); release() hands the buffer back once those are taken too, and once the packer
    is done reading it (`after`: a GPU upload still in flight)."""

    def __init__(self, arrays: dict[Slab, np.ndarray], buffer: np.ndarray, free: queue.Queue,
                 sums: dict[Slab, Future] | None = None):
        self.arrays = arrays
        self._sums = sums or {}
        self._buffer, self._free = buffer, free

    def __getitem__(self, slab: Slab) -> np.ndarray:
        return self.arrays[slab]

    def sha256(self) -> dict[Slab, str]:
        """The sha256 (hex) of each slab's bytes (waits for those still being taken)."""
        return {slab: f.result() for slab, f in self._sums.items()}

    def release(self, after: list[Future] = ()) -> None:
        if self._buffer is None:
            return
        self.arrays = {}
        buffer, self._buffer = self._buffer, None
        waits = [*self._sums.values(), *after]
        left = [len(waits)]
        lock = threading.Lock()

        def done(_future) -> None:  # the last slab hashed (or the last upload) hands the buffer back
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._free.put(buffer)

        if not waits:
            self._free.put(buffer)
        for f in waits:
            f.add_done_callback(done)


class SourceStream:
    """Reads a fixed schedule of batches (each a list of slabs) in order, `ahead` batches in advance.

    next() returns the next batch; the caller releases it when packed (at most ahead + 1 buffers
    exist). Errors (a file that shrank or changed, a read error) are raised by next() as UserError.
    memory: where buffers come from (convert.host_memory: empty(nbytes), suits(buffer)); a buffer that no
    longer suits (the GPU's pinned block came up) is replaced when next used.
    """

    def __init__(self, ckpt: Checkpoint, schedule: list[list[Slab]], ahead: int = 1, threads: int = READ_THREADS,
                 timings: Timings | None = None, memory=None):
        self.ckpt = ckpt
        self.timings = timings or Timings()
        self._schedule = schedule
        self._next = 0
        self._pending: list[Future] = []
        self._free: queue.Queue = queue.Queue()
        for _ in range(ahead + 1):
            self._free.put(np.empty(0, np.uint8))
        self._ahead = ahead
        self._memory = memory if memory is not None else PageableMemory()
        self._io = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kt-read")
        self._coordinator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-read-batch")
        self._closed = False

    def _fill(self) -> None:
        while len(self._pending) <= self._ahead and self._next + len(self._pending) < len(self._schedule):
            slabs = self._schedule[self._next + len(self._pending)]
            self._pending.append(self._coordinator.submit(self._read, slabs))

    def start(self) -> None:
        """Starts the reads of the first batches (next() does it otherwise)."""
        if not self._closed:
            self._fill()

    def next(self) -> ReadBatch:
        if self._closed:
            raise RuntimeError("source stream is closed")
        self._fill()
        if not self._pending:
            raise RuntimeError("source stream: every scheduled batch was read")
        future = self._pending.pop(0)
        self._next += 1
        try:
            batch = future.result()
        except SafetensorsFormatError as e:
            raise source_changed(e) from None
        self._fill()
        return batch

    def _read(self, slabs: list[Slab]) -> ReadBatch:
        extents = {slab: slab_extent(self.ckpt, slab) for slab in slabs}
        offsets, total = {}, 0
        for slab, ext in extents.items():
            offsets[slab] = total
            total += -(-ext.nbytes // ALIGN) * ALIGN
        buffer = self._free.get()  # a buffer the packer is done with (None: the stream was closed)
        if buffer is None or self._closed:
            raise RuntimeError("source stream is closed")
        t0 = time.perf_counter()
        if buffer.nbytes < total or not self._memory.suits(buffer):
            keep = buffer if buffer.nbytes >= total else None  # plain and big enough: kept if nothing better comes
            buffer = None  # a lease too small goes back to its block before its replacement is made
            buffer = self._memory.empty(total + total // 8)  # headroom: batches differ a little
            if keep is not None and not self._memory.suits(buffer):
                buffer = keep
        tasks = []
        for slab, ext in extents.items():
            for start in range(0, ext.nbytes, PIECE_BYTES):
                n = min(PIECE_BYTES, ext.nbytes - start)
                dst = buffer[offsets[slab] + start: offsets[slab] + start + n]
                tasks.append(self._io.submit(ext.file.read_into, ext.offset + start, dst))
        errors = []
        for t in tasks:  # every read finishes before the buffer can be reused
            try:
                t.result()
            except BaseException as e:  # noqa: PERF203
                errors.append(e)
        self.timings.add("read_s", time.perf_counter() - t0)
        try:
            if errors:
                raise errors[0]
            for f in {id(ext.file): ext.file for ext in extents.values()}.values():
                f.check_unchanged()
        except BaseException:
            self._free.put(buffer)
            raise
        arrays, sums = {}, {}
        for slab, ext in extents.items():
            raw = buffer[offsets[slab]: offsets[slab] + ext.nbytes]
            sums[slab] = self._io.submit(self._sha256, raw)
            a = raw.view(ext.dtype).reshape(ext.shape)
            a.flags.writeable = False
            arrays[slab] = a
        return ReadBatch(arrays, buffer, self._free, sums)

    def _sha256(self, raw: np.ndarray) -> str:
        t0 = time.perf_counter()
        digest = hashlib.sha256(raw).hexdigest()  # hashlib releases the GIL
        self.timings.add("source_digest_s", time.perf_counter() - t0)
        return digest

    def close(self) -> None:
        """Stops reading ahead and waits for the reads in flight."""
        if self._closed:
            return
        self._closed = True
        for f in self._pending:
            f.cancel()
        for _ in range(len(self._pending) + 1):
            self._free.put(None)  # wakes a read waiting for a buffer the caller still holds
        self._coordinator.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._pending = []


def default_read_threads() -> int:
    return max(2, min(READ_THREADS, os.cpu_count() or 1))
