"""A layer's mapped packed bytes page-locked for CUDA (cudaHostRegister, read-only), so that the GPU prefill
copies them to the device straight from the mapping, without gathering them into pinned buffers first.

What it costs: registration pins the pages of the span it is given (the layer's packed experts, file-backed pages
of the loader's read-only mappings): they are read in (from the page cache, or the disk if they are not cached
there) when the span is registered, and stay resident until it is released. The CPU experts keep those pages
resident anyway, so on a host that holds the model in memory the cost is the time to register (about 0.16 s per
GiB of cached pages on the accelerator host) and pages that can no longer be reclaimed; on a host that streams
the model from disk through the page cache, registration is the wrong choice (gpu_prefill_staging="gather").

Pure parts: `page_span` (a region's bytes rounded out to whole pages, within the region), `layer_spans` (one
span per mapped region a layer's experts occupy), `uncovered` (what registered spans leave of a span) and
`region_cuts` / `split_range` (a copy cut where one registration ends and the next begins). `HostRegistry` keeps
the registered spans disjoint and counts their users, so that layers sharing a mapping (one packed layer used
twice, or two layers' bytes meeting inside a page) register each page once and the last user unregisters it;
`CudaRuntime` calls the CUDA runtime that torch loaded, through ctypes: cudaHostRegister, cudaHostUnregister, and
cudaGetLastError after a failure, whose error would otherwise stay pending and be raised by the next unrelated
kernel launch.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

HOST_REGISTER_PORTABLE = 0x1  # pinned for every CUDA context, not only the current device's
HOST_REGISTER_READ_ONLY = 0x8  # the device only reads it: what a read-only file mapping allows
FLAG_SETS = (HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY, HOST_REGISTER_READ_ONLY)  # tried in this order
PAGE = mmap.PAGESIZE


class RegistrationError(RuntimeError):
    """The layer's bytes cannot be registered with CUDA here (the message says why)."""


@dataclass(frozen=True, order=True)
class HostSpan:
    """Host addresses [start, start + nbytes) registered as one piece."""

    start: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    def contains(self, other: HostSpan) -> bool:
        return self.start <= other.start and other.end <= self.end

    def overlaps(self, other: HostSpan) -> bool:
        return self.start < other.end and other.start < self.end


def page_span(base: int, size: int, lo: int, hi: int, page: int = PAGE) -> HostSpan:
    """Bytes [lo, hi) of a region of `size` bytes at address `base`, rounded out to page boundaries and kept
    within the region: a mapping (base on a page boundary) owns whole pages, its last one included; any other
    region (an array of the heap) owns exactly its bytes."""
    if not 0 <= lo < hi <= size:
        raise ValueError(f"bytes [{lo}, {hi}) are not inside a region of {size} bytes")
    last = -(-(base + size) // page) * page if base % page == 0 else base + size
    start = max(base, (base + lo) // page * page)
    end = min(last, -(-(base + hi) // page) * page)
    return HostSpan(start, end - start)


def layer_spans(regions: Sequence[tuple[int, int]], pieces, page: int = PAGE) -> list[HostSpan]:
    """One span per region that the pieces use (regions[i]: (address, size) of region i; pieces: every
    expert's expert_staging.Piece rows): from the first byte of the region's first piece to the last byte of its
    last piece, rounded out to pages."""
    bounds: dict[int, list[int]] = {}
    for row in pieces:
        for p in row:
            b = bounds.setdefault(p.region, [p.offset, p.offset + p.nbytes])
            b[0] = min(b[0], p.offset)
            b[1] = max(b[1], p.offset + p.nbytes)
    return [page_span(regions[r][0], regions[r][1], lo, hi, page) for r, (lo, hi) in sorted(bounds.items())
            if hi > lo]


def region_cuts(regions: Sequence[tuple[int, int]], spans: Sequence[HostSpan]) -> list[list[int]]:
    """Per region (address, size), the offsets inside it where one of `spans` begins: where a copy from the
    region must be cut so that each piece reads one registration."""
    return [sorted({s.start - base for s in spans if base < s.start < base + size}) for base, size in regions]


def split_range(lo: int, hi: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """[lo, hi) cut at the offsets of `cuts` (ascending) that fall inside it."""
    i = bisect.bisect_right(cuts, lo)
    out = []
    while i < len(cuts) and cuts[i] < hi:
        out.append((lo, cuts[i]))
        lo = cuts[i]
        i += 1
    out.append((lo, hi))
    return out


def _load_cudart():
    """The CUDA runtime library this process has loaded (torch's): from the global symbols (torch loads its CUDA
    dependencies with RTLD_GLOBAL), else by the soname of torch's CUDA version (an already loaded library)."""
    import torch

    names: list = [None]
    if torch.version.cuda:
        names.append(f"libcudart.so.{torch.version.cuda.split('.')[0]}")
    tried = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            lib.cudaHostRegister  # noqa: B018 - the lookup is the check
            return lib
        except (OSError, AttributeError) as e:
            tried.append(f"{name or 'the global symbols'}: {e}")
    raise RegistrationError("the CUDA runtime's cudaHostRegister is not loaded in this process (" + "; ".join(tried)
                            + ")")


class CudaRuntime:
    """cudaHostRegister / cudaHostUnregister of the CUDA runtime torch uses; every failure's pending error is
    consumed (cudaGetLastError) so that it is not raised later by an unrelated torch kernel launch."""

    def __init__(self, lib=None):
        lib = lib if lib is not None else _load_cudart()
        self._register, self._unregister = lib.cudaHostRegister, lib.cudaHostUnregister
        self._register.argtypes, self._register.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint], ctypes.c_int
        self._unregister.argtypes, self._unregister.restype = [ctypes.c_void_p], ctypes.c_int
        self._last_error = lib.cudaGetLastError
        self._last_error.argtypes, self._last_error.restype = [], ctypes.c_int
        self._name = lib.cudaGetErrorName
        self._name.argtypes, self._name.restype = [ctypes.c_int], ctypes.c_char_p

    def _failed(self, rc: int) -> str:
        self._last_error()
        name = self._name(rc)
        return f"{name.decode() if name else 'error'} ({rc})"

    def register(self, span: HostSpan) -> None:
        errors = []
        for flags in FLAG_SETS:
            rc = self._register(span.start, span.nbytes, flags)
            if rc == 0:
                return
            errors.append(f"flags {flags:#x}: {self._failed(rc)}")
        raise RegistrationError(f"cudaHostRegister of {span.nbytes} bytes at {span.start:#x} failed ("
                                + "; ".join(errors) + ")")

    def unregister(self, span: HostSpan) -> None:
        rc = self._unregister(span.start)
        if rc:
            warnings.warn(f"cudaHostUnregister of {span.nbytes} bytes at {span.start:#x} failed: {self._failed(rc)}",
                          RuntimeWarning, stacklevel=3)


def uncovered(span: HostSpan, held: Sequence[HostSpan]) -> list[HostSpan]:
    """The parts of `span` that no span of `held` (disjoint, in address order) covers, in address order."""
    gaps, at = [], span.start
    for s in held:
        if s.start > at:
            gaps.append(HostSpan(at, s.start - at))
        at = max(at, s.end)
    if at < span.end:
        gaps.append(HostSpan(at, span.end - at))
    return gaps


class HostRegistry:
    """The registered spans of this process (disjoint), each with its count of users. acquire(spans) counts a
    user on every registered span that a requested span overlaps and registers the parts no registered span
    covers (two layers sharing a mapping, or a page where one layer's bytes end and the next one's begin, are
    registered once); it returns the spans counted. release(counted) unregisters a span when its last user lets
    it go. runtime: a CudaRuntime (made on first use), or a stand-in with register(span) / unregister(span).

    release may be called from a finalizer, in whichever thread the collection runs, even one inside acquire:
    it queues the spans and they are let go by whoever holds the lock next (never a wait on the lock there)."""

    def __init__(self, runtime=None):
        self._runtime = runtime
        self._lock = threading.Lock()
        self._pending: list[HostSpan] = []  # spans released, not yet uncounted (list.extend: atomic)
        self.users: dict[HostSpan, int] = {}
        self._order: list[HostSpan] = []  # the keys of users in address order (a layer may have thousands)

    def _overlapping(self, span: HostSpan) -> list[HostSpan]:
        i = max(0, bisect.bisect_right(self._order, HostSpan(span.start, 0)) - 1)
        out = []
        while i < len(self._order) and self._order[i].start < span.end:
            if self._order[i].overlaps(span):
                out.append(self._order[i])
            i += 1
        return out

    def runtime(self):
        if self._runtime is None:
            self._runtime = CudaRuntime()
        return self._runtime

    def acquire(self, spans: Sequence[HostSpan]) -> list[HostSpan]:
        counted: list[HostSpan] = []
        with self._lock:
            self._let_go()
            try:
                for span in spans:
                    for gap in uncovered(span, self._overlapping(span)):
                        self.runtime().register(gap)
                        self.users[gap] = 0
                        bisect.insort(self._order, gap)
                    for held in self._overlapping(span):
                        self.users[held] += 1
                        counted.append(held)
            except BaseException:
                self._pending.extend(counted)
                self._let_go()
                raise
            finally:
                for gap in [s for s, n in self.users.items() if n == 0]:  # registered, then a later one failed
                    self._forget(gap)
        self._drain()
        return counted

    def release(self, counted: Sequence[HostSpan]) -> None:
        self._pending.extend(counted)
        self._drain()

    def _drain(self) -> None:
        """Let go of the pending spans unless another caller holds the lock: that one does it (it drains once
        more after unlocking, so that nothing queued while it held the lock is left behind)."""
        while self._pending and self._lock.acquire(blocking=False):
            try:
                self._let_go()
            finally:
                self._lock.release()

    def _let_go(self) -> None:
        while self._pending:
            span = self._pending.pop()
            left = self.users[span] - 1
            if left:
                self.users[span] = left
            else:
                self._forget(span)

    def _forget(self, span: HostSpan) -> None:
        del self.users[span]
        self._order.pop(bisect.bisect_left(self._order, span))
        self.runtime().unregister(span)


_REGISTRY: HostRegistry | None = None


def registry() -> HostRegistry:
    """The process's registry (the CUDA runtime loaded on its first registration)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = HostRegistry()
    return _REGISTRY
