"""Host memory for the batches: where the source stream reads into and where packed bytes land.

The CPU path reads into plain buffers and packs into fresh arrays (PageableMemory). The GPU path reads and
unpacks through one pinned block (HostBlock) of a fixed budget, carved into leases: the source stream's read
buffers (kept and refilled by the stream) and each batch's output arena (its PackTargets, which the writer
writes and the layer digest hashes straight from pinned memory). A lease goes back to the block when nothing
references any byte of it any more: the stream dropped the buffer, or the writer and the digest are done with
the batch. Reuse can therefore never overwrite bytes still being written or hashed, and no explicit release
can be forgotten. When the block has no room (a backlog of hashing holds many arenas), a lease is refused and
the caller falls back to pageable memory: slower (a staging copy), never wrong.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np

from kt_convert.kt_runtime.format.methods import QuantMethod
from kt_convert.quant.cpu import PackTarget

ALIGN = 4096  # leases start on page boundaries


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class RangeAllocator:
    """First-fit allocation of aligned byte ranges in [0, size); freed ranges merge with their neighbours."""

    def __init__(self, size: int, align: int = ALIGN):
        self.size, self.align = size, align
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []  # (start, length), sorted

    def take(self, nbytes: int) -> int | None:
        """The start of a free range of at least nbytes (rounded up to the alignment), or None."""
        need = _round_up(max(1, nbytes), self.align)
        for i, (start, length) in enumerate(self._free):
            if length >= need:
                self._free[i:i + 1] = [(start + need, length - need)] if length > need else []
                return start
        return None

    def give(self, start: int, nbytes: int) -> None:
        length = _round_up(max(1, nbytes), self.align)
        ranges = sorted(self._free + [(start, length)])
        merged: list[tuple[int, int]] = []
        for s, n in ranges:
            if merged and merged[-1][0] + merged[-1][1] > s:
                raise RuntimeError(f"range [{s}, {s + n}) given back twice or overlapping")
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)


def array_extent(a: np.ndarray) -> tuple[int, int]:
    """(first byte address, bytes spanned) of an array whose strides are non-negative."""
    if a.size == 0:
        return a.__array_interface__["data"][0], 0
    span = a.itemsize + sum((dim - 1) * stride for dim, stride in zip(a.shape, a.strides))
    return a.__array_interface__["data"][0], span


class PageableMemory:
    """The CPU path's memory: plain buffers for reads, fresh arrays for packed bytes."""

    pinned = False

    def empty(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def suits(self, buffer: np.ndarray) -> bool:
        """Whether a read buffer made earlier is still the right kind of memory (a pinned block that came
        up since wants its own)."""
        return True

    def targets(self, method: QuantMethod, shapes: list[tuple[int, int]]) -> list[PackTarget]:
        return [PackTarget.empty(method, n, k) for n, k in shapes]


class HostBlock:
    """One host allocation (pinned by the GPU packer; any uint8 array in tests) carved into leases.

    `array` is the block's bytes (1-D uint8); `owner` keeps the memory alive (a pinned torch tensor). Leases
    are numpy arrays of their own (np.frombuffer over a memoryview of the block), so every view of a lease
    keeps it alive, and a finalizer gives its range back once the last view is gone."""

    pinned = True

    def __init__(self, array: np.ndarray, owner=None):
        if array.dtype != np.uint8 or array.ndim != 1 or not array.flags.c_contiguous:
            raise ValueError("a host block is a contiguous 1-D uint8 array")
        self.array, self.owner = array, owner
        self.base = array.__array_interface__["data"][0]
        self.nbytes = array.nbytes
        self._ranges = RangeAllocator(self.nbytes)
        self._lock = threading.Lock()
        # Finalizers run wherever the last view dies (a hashing thread, a garbage collection inside any
        # allocation, even one under the lock): they only queue the range; the next lease takes them back.
        self._returned: deque[tuple[int, int]] = deque()
        self.refused = 0  # leases asked for that did not fit

    def lease(self, nbytes: int) -> np.ndarray | None:
        """nbytes of the block (a new uint8 array), or None when they do not fit now."""
        with self._lock:
            self._take_back()
            start = self._ranges.take(nbytes)
            if start is None:
                self.refused += 1
                return None
        lease = np.frombuffer(memoryview(self.array)[start:start + nbytes], np.uint8)
        weakref.finalize(lease, self._returned.append, (start, nbytes))
        return lease

    def _take_back(self) -> None:
        while self._returned:
            self._ranges.give(*self._returned.popleft())

    def free_bytes(self) -> int:
        with self._lock:
            self._take_back()
            return self._ranges.free_bytes()

    def extent_of(self, a: np.ndarray) -> tuple[int, int] | None:
        """(byte offset in the block, bytes spanned) of `a` when all of it lies inside, else None."""
        addr, span = array_extent(a)
        if self.base <= addr and addr + span <= self.base + self.nbytes and all(s >= 0 for s in a.strides):
            return addr - self.base, span
        return None

    def offset_of(self, a: np.ndarray) -> int | None:
        extent = self.extent_of(a)
        return None if extent is None else extent[0]

    # the source stream's and convert_layer's view of it (as PageableMemory's)

    def empty(self, nbytes: int) -> np.ndarray:
        lease = self.lease(nbytes)
        return lease if lease is not None else np.empty(nbytes, np.uint8)

    def suits(self, buffer: np.ndarray) -> bool:
        return self.offset_of(buffer) is not None

    def targets(self, method: QuantMethod, shapes: list[tuple[int, int]]) -> list[PackTarget]:
        """PackTargets of one batch carved from one lease (weights and scales 64-byte aligned, in job order),
        or fresh pageable arrays when the block has no room."""
        if method.scale_dtype != "F32":  # the GPU packs fp32-scaled methods only
            return PageableMemory().targets(method, shapes)
        layout = target_layout(method, shapes)
        arena = self.lease(layout.nbytes) if layout.nbytes else None
        if arena is None:
            return PageableMemory().targets(method, shapes)
        return [PackTarget(arena[w:w + wn], arena[s:s + 4 * sn].view(np.float32)) for w, wn, s, sn in layout.offsets]


@dataclass(frozen=True)
class TargetLayout:
    offsets: list[tuple[int, int, int, int]]  # per job: (weight offset, weight bytes, scales offset, scales)
    nbytes: int


def target_layout(method: QuantMethod, shapes: list[tuple[int, int]]) -> TargetLayout:
    """Where each job's packed bytes and fp32 scales go in an arena: weight then scales, job after job, each
    64-byte aligned (the methods the GPU packs have one fp32 scale per row)."""
    pos, offsets = 0, []
    for n, k in shapes:
        w, wn, sn = pos, method.weight_bytes(n, k), method.scale_count(n, k)
        s = _round_up(w + wn, 64)
        pos = _round_up(s + 4 * sn, 64)
        offsets.append((w, wn, s, sn))
    return TargetLayout(offsets, pos)


@dataclass(frozen=True)
class PinnedRing:
    """How the pinned block is shared: the stream's read buffers first, then output arenas in what is left."""

    budget: int
    read_buffer_bytes: int
    read_buffers: int
    arena_bytes: int
    arenas: int  # output arenas that fit beside the read buffers

    def describe(self) -> str:
        mib = 1 << 20
        return (f"pinned host memory {self.budget / mib:.0f} MiB: {self.read_buffers} read buffers of "
                f"{self.read_buffer_bytes / mib:.1f} MiB, room for {self.arenas} output batches of "
                f"{self.arena_bytes / mib:.1f} MiB")


def plan_ring(budget: int, source_batch_bytes: int, packed_batch_bytes: int, read_buffers: int) -> PinnedRing:
    """The budget split for batches of these sizes (a read buffer has 1/8 headroom, as the stream makes them)."""
    read = _round_up(source_batch_bytes + source_batch_bytes // 8, ALIGN)
    arena = _round_up(max(1, packed_batch_bytes), ALIGN)
    left = budget - read_buffers * read
    return PinnedRing(budget, read, read_buffers, arena, max(0, left // arena))
