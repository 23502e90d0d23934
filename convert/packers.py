"""Packers chosen by --device: each takes (method, jobs) like quant.cpu.pack_cpu, fills the jobs'
PackTargets and returns the non-finite counts; submit() starts a batch and returns a handle (result():
the counts), so the CUDA packer works on one batch while the caller prepares the next.

Each packer also says where a batch's bytes live (host_memory: the source stream's read buffers and the
batch's PackTargets, convert.host_memory). The CPU packer packs into fresh arrays. The CUDA packer owns one
pinned host block of PINNED_BYTES: the stream reads the sources into it, each batch is uploaded from there
in place (no staging copy), the fused Triton kernel packs it, and the packed bytes are downloaded into the
batch's arena in the same block, which the writer writes and the layer digest hashes from. Batches run on
three streams (upload, kernel, download; convert.gpu_schedule) over a few device slots, so one batch's
upload overlaps the previous one's kernel and download while the host reads ahead and writes behind.

start_packer makes the packer for --device cuda: the CUDA one on a background thread from the start of the
run (torch and triton imports, CUDA context, streams, the pinned block, and the kernel compiled on a 32-row
slice of the first batch's sources), so that start-up overlaps planning and the first reads; until it is
ready, batches are read into plain buffers and packed by the CPU packer (the same bytes).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from kt_convert.quant.cpu import pack_cpu
from kt_convert.kt_runtime.format.methods import QuantMethod

from .errors import UserError
from .gpu_schedule import batch_steps
from .host_memory import HostBlock, PageableMemory
from .timings import Timings

SLOTS = 3  # batches on the device at once: uploading, in the kernel, downloading
PINNED_BYTES = 512 << 20  # the CUDA packer's pinned host memory: read buffers and output arenas
READ_AHEAD = 2  # --device cuda: batches read ahead (each in a pinned read buffer)
MIB = 1 << 20
# --device cuda: the CPU packs batches while the GPU starts (tests of the GPU path turn it off)
PACK_ON_CPU_WHILE_DEVICE_STARTS = True


PACK_ISA_VARIABLE = "KT_PACK_ISA"


def pack_isa(env: Mapping[str, str] = os.environ) -> str:
    """The ISA level the C++ packer runs at: KT_PACK_ISA (portable, avx2, avx512, amx; any case) or, unset or
    auto, the best this CPU has. Every level writes the same bytes; forcing a lower one is for benchmarks and
    tests. UserError for another value or a level this CPU lacks."""
    from kt_convert import kt_kernels

    # any value reaches the message printable and short: a level name is a few ASCII letters
    value = ascii(env.get(PACK_ISA_VARIABLE, "").strip().lower())[1:-1][:32] or "auto"
    try:
        return kt_kernels.resolve_isa(value)
    except ValueError as e:
        raise UserError(f"{PACK_ISA_VARIABLE}={value}: {e}; unset it to use the best level this CPU has") from None


class CpuPacker:
    device = "cpu"

    def __init__(self, num_threads: int = 0):
        from kt_convert import kt_kernels

        self.num_threads = num_threads
        self.isa = pack_isa()
        try:  # every packing thread is started here, so that a refusal comes before any layer
            kt_kernels.start_pack_pool(num_threads)
        except (ValueError, TypeError, OverflowError):
            raise UserError(f"--cpuinfer-threads {num_threads}: must be between 0 (every core) and "
                            f"{kt_kernels.MAX_THREADS}") from None
        except kt_kernels.ThreadStartError as e:
            raise UserError(f"{e}: the system limits threads per user (ulimit -u) or address space (ulimit -v); "
                            "pass a smaller --cpuinfer-threads or raise the limit, then re-run") from None

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        return pack_cpu(method, jobs, isa=self.isa, num_threads=self.num_threads)

    def close(self) -> None:
        pass

    host_memory = PageableMemory()
    read_ahead = 1

    def submit(self, method: QuantMethod, jobs) -> Packed:
        return Packed(self(method, jobs))


def pinned_bytes(device: str) -> int:
    """The host memory a packer for `device` pins (pre-flight counts it)."""
    return PINNED_BYTES if device == "cuda" else 0


class Packed:
    """A batch packed synchronously: its counts, its sources already free."""

    def __init__(self, counts: list[int]):
        self._counts = counts
        self.sources_free: Future = Future()
        self.sources_free.set_result(None)

    def result(self) -> list[int]:
        return self._counts

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class _Slot:
    """Device buffers of one batch in flight, the events of the batch that used them last and its handle
    (its host buffers are its own leases: nothing on the host waits for a slot's previous batch)."""

    def __init__(self):
        self.dev_in = self.dev_out = None
        self.events: dict = {}
        self.handle: _GpuBatch | None = None


class _GpuBatch:
    """A batch on the device. sources_free: done once its upload is (the read buffer may be refilled);
    result(): waits for its download, scatters dense outputs, gives the non-finite counts."""

    def __init__(self, packer: "CudaPacker", plan, jobs, events: dict, marks: list, held: list):
        self.packer, self.plan, self.jobs = packer, plan, jobs
        self.events, self.marks = events, marks
        self.held = held  # host buffers the copies read or write: kept until the batch is done
        self.sources_free: Future = Future()
        self._counts: list[int] | None = None

    def _wait_upload(self) -> None:  # on the packer's waiter thread
        try:
            self.events["uploaded"].synchronize()
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the sources
            self.sources_free.set_exception(e)
        else:
            self.sources_free.set_result(None)

    def result(self) -> list[int]:
        if self._counts is None:
            from kt_convert.quant.gpu import read_counts, scatter_outputs

            timings = self.packer.timings
            with timings.timed("gpu_wait_s"):
                self.events["downloaded"].synchronize()
            bounce, counts = self.held[-2], self.held[-1]
            if self.plan.out_window is None:
                with timings.timed("gpu_stage_out_s"):
                    scatter_outputs(self.plan, bounce, self.jobs)
            self._counts = read_counts(self.plan, counts)
            for stage, a, b in (("gpu_h2d_s", 0, 1), ("gpu_kernel_s", 2, 3), ("gpu_d2h_s", 4, 5)):
                timings.add(stage, self.marks[a].elapsed_time(self.marks[b]) / 1e3)
            self.jobs, self.held = None, []
        return self._counts

    def done(self) -> bool:
        """Whether its results were taken (result())."""
        return self._counts is not None

    def wait(self) -> None:
        """Waits for the device to be done with the batch's host buffers, whatever happened."""
        try:
            self.events["downloaded"].synchronize()
        except BaseException:  # noqa: BLE001, S110 - the first error is already propagating
            pass


class CudaPacker:
    device = "cuda"
    read_ahead = READ_AHEAD

    def __init__(self, device: str = "cuda", slots: int = SLOTS, pinned_bytes: int | None = None,
                 timings: Timings | None = None):
        import torch

        import kt_convert.quant.triton_kernels  # noqa: F401  (fail here, not mid-layer, if triton is broken)

        self.torch = torch
        self.device = torch.device(device)
        torch.cuda.init()  # the CUDA context now (on the start-up thread), not in the first copy
        self.timings = timings or Timings()
        self.streams = {name: torch.cuda.Stream(self.device) for name in ("h2d", "compute", "d2h")}
        pinned_bytes = pinned_bytes or PINNED_BYTES
        self.block = torch.empty(pinned_bytes, dtype=torch.uint8, pin_memory=True)
        self.host_memory = HostBlock(self.block.numpy(), owner=self.block)
        self.timings.add("gpu_pinned_mib", pinned_bytes / MIB)
        self.slots = [_Slot() for _ in range(max(2, slots))]
        self.waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-gpu-wait")
        self.stats = {"batches": 0, "input_bytes": 0, "output_bytes": 0, "device_allocations": 0}

    def close(self) -> None:
        if self.waiter is None:
            return
        for slot in self.slots:
            if slot.handle is not None:
                slot.handle.wait()
        self.torch.cuda.synchronize(self.device)
        self.waiter.shutdown(wait=True)
        self.waiter, self.slots = None, []
        if self.host_memory.refused:  # read buffers, arenas or staging the block had no room for
            self.timings.add("gpu_pageable_buffers", self.host_memory.refused)

    def _host(self, nbytes: int):
        """(host tensor, its numpy view) of nbytes for one batch: a lease of the pinned block, or pageable
        memory when the block has no room (its copy is then synchronous)."""
        torch = self.torch
        lease = self.host_memory.lease(max(64, nbytes))
        if lease is None:
            t = torch.empty(max(64, nbytes), dtype=torch.uint8)
            return t, t.numpy()
        off = self.host_memory.offset_of(lease)
        return self.block[off:off + lease.nbytes], lease

    def _device_buffers(self, slot: _Slot, in_bytes: int, out_bytes: int) -> None:
        """Grows the slot's device buffers, once the batch that used them last is done with them."""
        torch = self.torch
        for name, need in (("dev_in", in_bytes), ("dev_out", out_bytes)):
            have = getattr(slot, name)
            if have is None or have.numel() < need:
                if slot.handle is not None:
                    slot.handle.wait()
                size = -(-(need + need // 4) // MIB) * MIB
                setattr(slot, name, None)
                setattr(slot, name, torch.empty(size, dtype=torch.uint8, device=self.device))
                self.stats["device_allocations"] += 1

    def submit(self, method: QuantMethod, jobs):
        from kt_convert.quant.gpu import fill_staging, launch, plan_batch

        if not jobs:
            return Packed([])
        torch, timings = self.torch, self.timings
        t0 = time.perf_counter()
        plan = plan_batch(method, jobs, self.host_memory)
        timings.add("gpu_plan_s", time.perf_counter() - t0)
        batch = self.stats["batches"]
        slot = self.slots[batch % len(self.slots)]  # its last batch may still run: the streams wait for it
        t0 = time.perf_counter()
        self._device_buffers(slot, plan.in_bytes, plan.out_bytes)
        stage_t, stage = self._host(plan.stage_bytes)
        if len(plan.copies) > 1:  # sources that are not in the pinned block (the tables are always staged)
            timings.add("gpu_batches_staged", 1)
            with timings.timed("gpu_stage_in_s"):
                fill_staging(plan, stage)
        else:
            fill_staging(plan, stage)
        if plan.out_window is None:
            timings.add("gpu_batches_scattered", 1)
            bounce_t, bounce = self._host(plan.counts_offset)
        else:
            bounce_t = bounce = None
        counts_t, counts = self._host(4 * plan.num_jobs)
        block = self.block
        events = {name: torch.cuda.Event(blocking=True) for name in ("uploaded", "computed", "downloaded")}
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(6)]

        def upload(stream):
            if plan.window is not None:
                first, nbytes = plan.window
                slot.dev_in[:nbytes].copy_(block[first:first + nbytes], non_blocking=True)
            slot.dev_in[plan.stage_offset:plan.in_bytes].copy_(stage_t[:plan.stage_bytes], non_blocking=True)

        def kernel(stream):
            launch(method, plan, slot.dev_in, slot.dev_out)

        def download(stream):
            if plan.out_window is not None:
                first, nbytes = plan.out_window
                block[first:first + nbytes].copy_(slot.dev_out[:nbytes], non_blocking=True)
            else:
                bounce_t[:plan.counts_offset].copy_(slot.dev_out[:plan.counts_offset], non_blocking=True)
            c = plan.counts_offset
            counts_t[:4 * plan.num_jobs].copy_(slot.dev_out[c:c + 4 * plan.num_jobs], non_blocking=True)

        actions = {"upload": (upload, 0), "kernel": (kernel, 2), "download": (download, 4)}
        for step in batch_steps(batch, len(self.slots)):
            stream = self.streams[step.stream]
            for name, of in step.waits:
                stream.wait_event((events if of == batch else slot.events)[name])
            act, mark = actions[step.action]
            with torch.cuda.stream(stream):
                marks[mark].record(stream)
                act(stream)
                marks[mark + 1].record(stream)
                events[step.records].record(stream)
        slot.events = events
        handle = _GpuBatch(self, plan, jobs, events, marks, [stage_t, stage, bounce_t, bounce, counts])
        slot.handle = handle
        self.waiter.submit(handle._wait_upload)
        timings.add("gpu_issue_s", time.perf_counter() - t0)
        self.stats["batches"] += 1
        self.stats["input_bytes"] += plan.input_bytes
        self.stats["output_bytes"] += sum(o[1] + 4 * o[3] for o in plan.outputs)
        return handle

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        return self.submit(method, jobs).result()

    def warm_up(self, method: QuantMethod, sources) -> None:
        """Compiles the kernel for these sources ((SourceMatrix of 32 rows, col0, k), one per kind) by
        packing them into throwaway targets."""
        from kt_convert.quant.cpu import PackTarget

        self(method, [(src, col0, k, PackTarget.empty(method, src.shape[0], k)) for src, col0, k in sources])


def _warm_up_sources(jobs) -> list:
    """A copy of the first 32 rows of the first job of each source kind (and scale width) of a batch:
    what the kernel is compiled on, as owned arrays that outlive the batch's read buffer."""
    import numpy as np

    from kt_convert.quant.cpu import SourceMatrix
    from kt_convert.quant.gpu import ROWS

    seen, out = set(), []
    for src, col0, k, _ in jobs:
        key = (src.kind, src.scales.itemsize if src.scales is not None else 0)
        if key in seen:
            continue
        seen.add(key)
        part = src.rows(0, ROWS)
        scales = None if part.scales is None else np.array(part.scales)
        out.append((SourceMatrix(part.kind, np.array(part.weight), scales, part.block, part.row0), col0, k))
    return out


class StartingPacker:
    """--device cuda: the CUDA packer made on a background thread, started with the run. Until it is
    ready (made, and its kernel compiled on the first batch's source kinds), batches go to the CPU
    packer, which gives the same bytes; from then on every batch goes to the GPU. Read buffers and
    PackTargets are plain memory until the CUDA packer is made, then its pinned block's (host_memory is
    this object: it asks the CUDA packer once there is one)."""

    read_ahead = READ_AHEAD

    def __init__(self, num_threads: int, timings: Timings, start: float | None = None):
        self.timings = timings
        self._start = time.perf_counter() if start is None else start
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-gpu-start")
        self._made: Future = self._thread.submit(self._make)
        self._warm: Future | None = None
        self._cpu: CpuPacker | None = None
        self._num_threads = num_threads
        self.device = "cuda"
        self.host_memory = self

    def _make(self) -> CudaPacker:
        packer = CudaPacker(timings=self.timings)
        self.timings.add("device_init_s", time.perf_counter() - self._start)
        return packer

    def _warm_up(self, method: QuantMethod, sample) -> CudaPacker:
        packer = self._made.result()
        t0 = time.perf_counter()
        packer.warm_up(method, sample)
        self.timings.add("device_init_s", time.perf_counter() - t0)
        return packer

    def _gpu(self) -> CudaPacker:
        """The CUDA packer, waiting for its start-up (an error in it is raised here)."""
        ready = self._warm or self._made
        if ready.done():
            return ready.result()
        with self.timings.timed("device_init_wait_s"):
            return ready.result()

    def _on_gpu(self) -> bool:
        return self._warm is not None and self._warm.done() or not PACK_ON_CPU_WHILE_DEVICE_STARTS

    def _memory(self):
        """The CUDA packer's pinned block once it is made, plain memory before."""
        if self._made.done() and self._made.exception() is None:
            return self._made.result().host_memory
        return CpuPacker.host_memory

    def empty(self, nbytes: int):
        return self._memory().empty(nbytes)

    def suits(self, buffer) -> bool:
        return self._memory().suits(buffer)

    def targets(self, method: QuantMethod, shapes):
        return (self._gpu().host_memory if self._on_gpu() else CpuPacker.host_memory).targets(method, shapes)

    def submit(self, method: QuantMethod, jobs):
        if self._on_gpu():
            return self._gpu().submit(method, jobs)
        if self._warm is None:  # the first batch: compile the kernel on a copy of a slice of its sources
            self._warm = self._thread.submit(self._warm_up, method, _warm_up_sources(jobs))
        if self._made.done() and self._made.exception() is not None:
            self._made.result()  # the GPU cannot start: say why now
        if self._cpu is None:
            self._cpu = CpuPacker(self._num_threads)
        self.timings.add("cpu_batches_while_device_starts", 1)
        return self._cpu.submit(method, jobs)

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        return self.submit(method, jobs).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # a start-up in flight cannot be cut short
        for f in (self._made, self._warm):
            if f is not None and f.done() and f.exception() is None:
                f.result().close()
                break


def make_packer(device: str, num_threads: int = 0, timings: Timings | None = None, start: float | None = None):
    """device: "cpu" or "cuda" (as resolved by convert.pipeline.resolve_device). CUDA: the packer starts
    on a background thread (StartingPacker); `start` is the run's start time (perf_counter), from which
    its start-up is timed."""
    if device == "cuda":
        return StartingPacker(num_threads, timings or Timings(), start)
    return CpuPacker(num_threads)
