"""A stand-in for torch's CUDA side, for testing convert.packers.CudaPacker's host logic on a CPU.

Device and pinned memory are numpy arrays; copies and kernels are queued on their stream and run only when
the host waits (an event's synchronize, torch.cuda.synchronize). When the host waits, the streams run in an
adversarial order, each as far ahead as its waits allow (uploads before kernels before downloads): a missing
wait between streams overwrites a buffer before it is read and shows as wrong bytes, a missing host wait as
results read before they exist (device memory starts as 0xA5 garbage), a wait that can never be met as a
deadlock (AssertionError).
"""
from __future__ import annotations

import contextlib
import threading
import types
from collections import deque

import numpy as np

from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.gpu import META
from kt_convert.quant.source_formats import SOURCE_FORMATS

PRIORITY = ("h2d", "compute", "d2h")  # who runs first when several streams can


class FakeTensor:
    def __init__(self, array: np.ndarray, cuda: "FakeCuda"):
        self.array, self.cuda = array, cuda

    def __getitem__(self, index) -> "FakeTensor":
        return FakeTensor(self.array[index], self.cuda)

    def numel(self) -> int:
        return self.array.size

    def numpy(self) -> np.ndarray:
        return self.array

    def copy_(self, src: "FakeTensor", non_blocking: bool = False) -> "FakeTensor":
        dst, data = self.array, src.array
        if dst.shape != data.shape:
            raise ValueError(f"copy of {data.shape} into {dst.shape}")
        self.cuda.enqueue(lambda: np.copyto(dst, data), f"copy {data.nbytes} B")
        return self


class FakeEvent:
    def __init__(self, cuda: "FakeCuda"):
        self.cuda = cuda
        self.recorded = 0  # records enqueued
        self.reached = 0  # records run

    def record(self, stream=None) -> None:
        stream = stream or self.cuda.current
        with self.cuda.lock:
            self.recorded += 1
            generation = self.recorded
            stream.ops.append(("record", self, generation))

    def synchronize(self) -> None:
        self.cuda.synchronizations += 1
        generation = self.recorded
        self.cuda.run_until(lambda: self.reached >= generation)

    def elapsed_time(self, other) -> float:
        return 0.25  # ms


class FakeStream:
    def __init__(self, name: str):
        self.name = name
        self.ops: deque = deque()

    def wait_event(self, event: FakeEvent) -> None:
        with event.cuda.lock:
            self.ops.append(("wait", event, event.recorded))  # as CUDA: the record enqueued last, if any


class FakeCuda:
    def __init__(self):
        self.lock = threading.RLock()
        self.streams: list[FakeStream] = []
        self.default = FakeStream("default")
        self.current = self.default
        self.synchronizations = 0
        self.ran: list[tuple[str, str]] = []  # (stream, what) in the order run

    def init(self) -> None:
        pass

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 - torch's name
        stream = FakeStream(PRIORITY[len(self.streams) % len(PRIORITY)])
        self.streams.append(stream)
        return stream

    def Event(self, blocking=False, enable_timing=False) -> FakeEvent:  # noqa: N802
        return FakeEvent(self)

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before

    def enqueue(self, fn, what: str) -> None:
        with self.lock:
            self.current.ops.append(("run", fn, what))

    def synchronize(self, device=None) -> None:
        self.run_until(lambda: not any(s.ops for s in [self.default, *self.streams]))

    def run_until(self, done) -> None:
        with self.lock:
            while not done():
                streams = sorted([self.default, *self.streams], key=lambda s: (PRIORITY + ("default",)).index(s.name))
                for s in streams:
                    if s.ops and self._step(s):
                        break
                else:
                    raise AssertionError("the fake device cannot progress: a wait that is never met")

    def _step(self, s: FakeStream) -> bool:
        op = s.ops[0]
        if op[0] == "wait":
            if op[1].reached < op[2]:
                return False
        elif op[0] == "record":
            op[1].reached = max(op[1].reached, op[2])
        else:
            op[1]()
            self.ran.append((s.name, op[2]))
        s.ops.popleft()
        return True


def fake_torch() -> types.SimpleNamespace:
    import torch

    cuda = FakeCuda()

    def empty(n, dtype=None, pin_memory=False, device=None):
        return FakeTensor(np.full(n, 0xA5, np.uint8), cuda)  # garbage, as fresh memory may hold

    return types.SimpleNamespace(cuda=cuda, uint8=torch.uint8, device=lambda d: d, empty=empty)


def fake_launch(method, plan, dev_in: FakeTensor, dev_out: FakeTensor) -> None:
    """The kernel's contract, queued on the current stream and run by the C++ packer: every job is read from
    the device input through the job table (offsets, row strides) and packed into the output layout
    (weights, scales, counts)."""
    staging, out = dev_in.array, dev_out.array
    kinds = {f.gpu_code: f.kind for f in SOURCE_FORMATS.values()}
    table = plan.tables[: plan.num_jobs * META].reshape(plan.num_jobs, META).copy()
    tasks = plan.tables[plan.num_jobs * META:].reshape(-1, 2).copy()

    def rows(off: int, stride: int, n: int, nbytes: int) -> np.ndarray:
        return np.lib.stride_tricks.as_strided(staging[off:], shape=(n, nbytes), strides=(stride, 1))

    def kernel():
        for code, first, count in plan.launches:
            # code + 1: a format's variant (nvfp4 whose per-tensor scale divides, int4_group's f32 scales)
            kind, variant = (kinds[code], False) if code in kinds else (kinds[code - 1], True)
            for i in sorted({int(j) for j in tasks[first:first + count, 0]}):
                w_off, w_row, s_off, s_row, row0, bn, bk, n, k, col0, o_off, s_out, g_bits = (int(x) for x in table[i])
                cols = col0 + k
                if kind == "bf16":
                    src = SourceMatrix("bf16", rows(w_off, w_row, n, 2 * cols).view(np.uint16))
                elif kind in ("mxfp4", "mxfp8"):
                    w_bytes = cols // 2 if kind == "mxfp4" else cols
                    src = SourceMatrix(kind, rows(w_off, w_row, n, w_bytes), rows(s_off, s_row, n, cols // 32))
                elif kind == "nvfp4":  # the per-tensor scale from the job table (fp32 bits), as the kernel reads it
                    g = float(np.uint32(g_bits).view(np.float32))
                    src = SourceMatrix("nvfp4", rows(w_off, w_row, n, cols // 2), rows(s_off, s_row, n, cols // 16),
                                       global_scale=g, global_divides=variant)
                else:
                    raise AssertionError(f"the fake kernel packs bf16, mxfp4, mxfp8 and nvfp4 only, not {kind}")
                dst = PackTarget(out[o_off:o_off + method.weight_bytes(n, k)],
                                 out[4 * s_out:4 * s_out + 4 * n].view(np.float32))
                bad = pack_cpu(method, [(src, col0, k, dst)])[0]
                out[plan.counts_offset + 4 * i:plan.counts_offset + 4 * i + 4].view(np.int32)[0] = bad

    dev_in.cuda.enqueue(kernel, "kernel")


def install(monkeypatch) -> types.SimpleNamespace:
    """torch's CUDA side, the Triton kernels module and quant.gpu.launch replaced by the stand-in, for one test;
    returns the stand-in torch."""
    import sys

    from kt_convert.quant import gpu as quant_gpu

    fake = fake_torch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setitem(sys.modules, "kt_convert.quant.triton_kernels",
                        types.ModuleType("kt_convert.quant.triton_kernels"))
    monkeypatch.setattr(quant_gpu, "launch", fake_launch)
    return fake


def install_for_conversion(monkeypatch, cpu_while_starting: bool = False) -> None:
    """install(), and a --device cuda conversion that runs on it: the device found, a 16 MiB pinned block,
    one expert per batch, the C++ packer packing while the device starts only if cpu_while_starting."""
    from kt_convert.convert import layer_pack, packers, pipeline

    install(monkeypatch)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(packers, "PACK_ON_CPU_WHILE_DEVICE_STARTS", cpu_while_starting)
    monkeypatch.setattr(packers, "PINNED_BYTES", 16 << 20)
    monkeypatch.setattr(layer_pack, "GPU_BATCH_BYTES", 1)  # one expert per batch
