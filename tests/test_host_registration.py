"""The registration of a layer's mapped bytes with CUDA (kt_runtime/hybrid/host_registration.py), on the CPU:
the spans (pages rounded out within a region), the registry's counting, containment, refusals and roll-back,
and the runtime wrapper's handling of CUDA's errors (each failure's pending error consumed), through stand-ins
for the CUDA runtime. On a GPU: tests/test_gpu_prefill_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_convert.kt_runtime.hybrid.expert_staging import Piece
from kt_convert.kt_runtime.hybrid.host_registration import (FLAG_SETS, CudaRuntime, HostRegistry, HostSpan,
                                                            RegistrationError, _load_cudart, layer_spans, page_span,
                                                            region_cuts, split_range, uncovered)

P = 4096


def test_page_span_by_hand():
    base = 0x10000  # a mapping: starts on a page; 10000 bytes, its last page ends at base + 12288
    assert page_span(base, 10000, 100, 5000, P) == HostSpan(base, 8192)
    assert page_span(base, 10000, 5000, 10000, P) == HostSpan(base + 4096, 8192)  # the mapping's last page, whole
    assert page_span(base, 10000, 4096, 4097, P) == HostSpan(base + 4096, 4096)
    assert page_span(base, 8192, 0, 8192, P) == HostSpan(base, 8192)
    heap = 0x10010  # an array of the heap: exactly its bytes, never a neighbour's
    assert page_span(heap, 10000, 0, 10000, P) == HostSpan(heap, 10000)
    assert page_span(heap, 10000, 5000, 6000, P) == HostSpan(0x11000, P)  # 0x11398 .. 0x11780: one page
    assert page_span(heap, 10000, 5000, 9000, P) == HostSpan(0x11000, heap + 10000 - 0x11000)  # clipped at its end
    assert page_span(heap, 10000, 9000, 10000, P) == HostSpan(0x12000, heap + 10000 - 0x12000)  # the array's end
    for lo, hi in ((0, 0), (5, 4), (-1, 10), (0, 10001)):
        with pytest.raises(ValueError, match="not inside a region of 10000 bytes"):
            page_span(base, 10000, lo, hi, P)


def test_page_spans_cover_their_bytes_within_their_region():
    rng = np.random.default_rng(7)
    for _ in range(2000):
        aligned = bool(rng.integers(0, 2))
        base = int(rng.integers(1, 1 << 20)) * P + (0 if aligned else int(rng.integers(1, P)))
        size = int(rng.integers(1, 5 * P))
        lo = int(rng.integers(0, size))
        hi = int(rng.integers(lo + 1, size + 1))
        s = page_span(base, size, lo, hi, P)
        extent_end = -(-(base + size) // P) * P if aligned else base + size
        assert s.start <= base + lo and base + hi <= s.end  # every byte asked for
        assert base <= s.start and s.end <= extent_end  # nothing outside the region
        if aligned:
            assert s.start % P == 0 and s.end % P == 0  # whole pages of the mapping
        else:
            assert s.start % P == 0 or s.start == base
            assert s.end % P == 0 or s.end == base + size


def test_layer_spans_one_per_region_used():
    rows = [(Piece("gate", 0, "weight", 0, 8192, 1000), Piece("gate", 0, "scale", 2, 0, 64)),
            (Piece("gate", 0, "weight", 0, 100, 50), Piece("gate", 0, "scale", 0, 20000, 100))]
    regions = [(0x100000, 30000), (0x200000, 4096), (0x300010, 64)]
    spans = layer_spans(regions, rows, P)
    # region 0: bytes 100 .. 20100 -> pages 0 .. 5; region 1 unused; region 2 (the heap): its 64 bytes
    assert spans == [HostSpan(0x100000, 5 * P), HostSpan(0x300010, 64)]
    assert layer_spans(regions, [], P) == []


class Runtime:
    """A stand-in for CudaRuntime: records calls, refuses the spans in `refuse`."""

    def __init__(self, refuse=()):
        self.refuse, self.calls = set(refuse), []

    def register(self, span):
        self.calls.append(("register", span))
        if span in self.refuse:
            raise RegistrationError(f"refused {span.start:#x}")

    def unregister(self, span):
        self.calls.append(("unregister", span))


def test_registry_counts_users_and_the_last_one_unregisters():
    rt = Runtime()
    reg = HostRegistry(rt)
    a, b = HostSpan(0x10000, 8 * P), HostSpan(0x40000, P)
    first = reg.acquire([a, b])
    second = reg.acquire([a])  # another layer over the same mapping: counted, not registered again
    inner = reg.acquire([HostSpan(0x11000, P)])  # inside a: counted on a
    assert first == [a, b] and second == [a] and inner == [a]
    assert rt.calls == [("register", a), ("register", b)] and reg.users == {a: 3, b: 1}
    reg.release(first)
    assert rt.calls[-1] == ("unregister", b) and reg.users == {a: 2}
    reg.release(second)
    reg.release(inner)
    assert rt.calls[-1] == ("unregister", a) and reg.users == {}
    assert [c for c, _ in rt.calls] == ["register", "register", "unregister", "unregister"]


def test_registry_registers_only_what_no_span_covers_and_rolls_back_a_failed_layer():
    c = HostSpan(0x90000, 2 * P)
    rt = Runtime(refuse={c})
    reg = HostRegistry(rt)
    a = HostSpan(0x10000, 4 * P)  # pages 0x10000 .. 0x14000
    held = reg.acquire([a])
    # a span straddling a's end (two layers' bytes meeting inside a page): counted on a, its rest registered
    straddle = reg.acquire([HostSpan(0x12000, 4 * P)])
    rest = HostSpan(0x14000, 2 * P)
    assert straddle == [a, rest] and rt.calls[-1] == ("register", rest) and reg.users == {a: 2, rest: 1}
    # one over both and beyond on either side: the gaps before, between (none) and after are registered
    wide = reg.acquire([HostSpan(0x8000, 0x10000)])
    before, after = HostSpan(0x8000, 0x8000), HostSpan(0x16000, 0x2000)
    assert wide == [before, a, rest, after] and reg.users == {before: 1, a: 3, rest: 2, after: 1}
    reg.release(wide)
    assert reg.users == {a: 2, rest: 1} and ("unregister", before) in rt.calls and ("unregister", after) in rt.calls
    calls = len(rt.calls)
    with pytest.raises(RegistrationError, match="refused 0x90000"):  # the third span fails: all of it undone
        reg.acquire([a, HostSpan(0x60000, P), c])
    assert reg.users == {a: 2, rest: 1}
    assert rt.calls[calls:] == [("register", HostSpan(0x60000, P)), ("register", c),
                                ("unregister", HostSpan(0x60000, P))]
    reg.release(held)
    reg.release(straddle)
    assert reg.users == {} and sorted(rt.calls[-2:]) == [("unregister", a), ("unregister", rest)]


def test_uncovered_and_cuts_by_hand():
    held = [HostSpan(0x2000, 0x1000), HostSpan(0x4000, 0x2000)]
    assert uncovered(HostSpan(0x1000, 0x6000), held) == [HostSpan(0x1000, 0x1000), HostSpan(0x3000, 0x1000),
                                                         HostSpan(0x6000, 0x1000)]
    assert uncovered(HostSpan(0x4000, 0x1000), held[1:]) == []
    assert uncovered(HostSpan(0x1000, 0x1000), []) == [HostSpan(0x1000, 0x1000)]
    # region 0 at 0x10000 (0x5000 bytes) held as two spans, region 1 as one starting before it
    cuts = region_cuts([(0x10000, 0x5000), (0x20010, 100)],
                       [HostSpan(0x10000, 0x3000), HostSpan(0x13000, 0x2000), HostSpan(0x20000, P)])
    assert cuts == [[0x3000], []]
    assert split_range(0x1000, 0x4000, [0x3000]) == [(0x1000, 0x3000), (0x3000, 0x4000)]
    assert split_range(0x3000, 0x4000, [0x3000]) == [(0x3000, 0x4000)]  # a cut at its start: no empty piece
    assert split_range(0x1000, 0x3000, [0x3000]) == [(0x1000, 0x3000)]
    assert split_range(0, 10, [2, 5, 9, 20]) == [(0, 2), (2, 5), (5, 9), (9, 10)]


def test_registry_release_from_a_finalizer_inside_acquire_is_not_a_deadlock():
    """A layer collected while the registry's lock is held (a finalizer run by the collector inside acquire,
    or on another thread): its spans are queued and let go once the lock is free, in the same call."""
    a, b = HostSpan(0x10000, P), HostSpan(0x20000, P)

    class Collecting(Runtime):
        def register(self, span):
            super().register(span)
            if span == b:
                reg.release(first)  # what a finalizer does; the lock is held by acquire here

    rt = Collecting()
    reg = HostRegistry(rt)
    first = reg.acquire([a])
    assert reg.acquire([b]) == [b]
    assert reg.users == {b: 1} and rt.calls == [("register", a), ("register", b), ("unregister", a)]


def test_registry_stays_consistent_under_threads():
    import threading

    rt = Runtime()
    reg = HostRegistry(rt)
    spans = [HostSpan(0x100000 + i * 2 * P, 3 * P) for i in range(16)]  # neighbours overlap by a page

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            pick = [spans[int(i)] for i in rng.choice(len(spans), 3, replace=False)]
            reg.release(reg.acquire(pick))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.users == {} and reg._order == [] and reg._pending == []
    live: set = set()
    for op, span in rt.calls:  # never a page registered twice, every registration undone
        if op == "register":
            assert not any(s.overlaps(span) for s in live)
            live.add(span)
        else:
            live.remove(span)
    assert not live


class _Fn:
    """A ctypes function stand-in: argtypes / restype settable, answers from a list."""

    def __init__(self, answers, log, name):
        self.answers, self.log, self.name = list(answers), log, name

    def __call__(self, *args):
        self.log.append((self.name, args))
        return self.answers.pop(0) if self.answers else 0


class _Lib:
    def __init__(self, register, unregister=()):
        self.log = []
        self.cudaHostRegister = _Fn(register, self.log, "register")
        self.cudaHostUnregister = _Fn(unregister, self.log, "unregister")
        self.cudaGetLastError = _Fn([], self.log, "last_error")
        self.cudaGetErrorName = _Fn([b"cudaErrorHostMemoryAlreadyRegistered", b"cudaErrorNotSupported"], self.log,
                                    "name")


def test_cuda_runtime_consumes_every_error_it_gets():
    span = HostSpan(0x10000, 3 * P)
    lib = _Lib(register=[0])
    CudaRuntime(lib).register(span)
    assert lib.log == [("register", (0x10000, 3 * P, FLAG_SETS[0]))]
    assert FLAG_SETS[0] == 0x9 and FLAG_SETS[-1] == 0x8  # portable + read-only, then read-only alone
    lib = _Lib(register=[801, 0])  # the driver refuses the first flags, takes the second
    CudaRuntime(lib).register(span)
    assert [n for n, _ in lib.log] == ["register", "last_error", "name", "register"]
    assert lib.log[-1] == ("register", (0x10000, 3 * P, FLAG_SETS[1]))
    lib = _Lib(register=[712, 801])
    with pytest.raises(RegistrationError) as e:
        CudaRuntime(lib).register(span)
    assert str(e.value) == (f"cudaHostRegister of {3 * P} bytes at 0x10000 failed (flags 0x9: "
                            "cudaErrorHostMemoryAlreadyRegistered (712); flags 0x8: cudaErrorNotSupported (801))")
    assert [n for n, _ in lib.log].count("last_error") == 2  # no error left pending for torch's next launch
    lib = _Lib(register=[], unregister=[1])
    with pytest.warns(RuntimeWarning, match=r"cudaHostUnregister of 12288 bytes at 0x10000 failed"):
        CudaRuntime(lib).unregister(span)
    assert [n for n, _ in lib.log] == ["unregister", "last_error", "name"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is built with CUDA")
def test_without_a_cuda_runtime_registration_is_refused_with_the_reason():
    with pytest.raises(RegistrationError, match="cudaHostRegister is not loaded in this process"):
        _load_cudart()
    with pytest.raises(RegistrationError):
        HostRegistry().acquire([HostSpan(0x10000, P)])
