"""Packers chosen by --device: each takes (method, jobs) like quant.cpu.pack_cpu, fills the jobs'
PackTargets and returns the non-finite counts.

The CUDA packer streams a batch through the GPU in chunks of experts, each stage on its own
resources so that they overlap: reader threads copy the sources (read from the checkpoint into a
buffer by convert.source_reader, one batch ahead) into pinned staging, the copy stream moves them
to the GPU, the compute stream runs the fused Triton kernel, the download stream brings the packed
bytes back into pinned memory, and the reader threads copy them into the PackTargets (the writer
thread of convert_layer then writes them). A fixed ring of slots bounds memory: GPU and pinned memory are a few chunks whatever the
model size; the slots are allocated once and reused by every call. A slot waits for its GPU copies
once per chunk (one event per stage), never per tensor. torch and triton are imported only when the
CUDA packer is made.

start_packer makes the packer for --device: the CUDA one on a background thread from the start of the
run (torch and triton imports, CUDA context, streams, pinned buffers, and the kernel compiled on a
32-row slice of the first batch's sources), so that start-up overlaps planning and the first reads;
until it is ready, batches are packed by the CPU packer (the same bytes).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor


from quant.cpu import pack_cpu
from kt_runtime.format.methods import QuantMethod

from .errors import UserError
from .timings import Timings

CHUNK_BYTES = 8 << 20  # source bytes per GPU chunk: small, so a batch's last chunk (not overlapped) is short
SLOTS = 4  # chunks in flight: being read (several), on the GPU, being copied out
PIECE_BYTES = 2 << 20  # one reader task
# --device cuda: the CPU packs batches while the GPU starts (tests of the GPU path turn it off)
PACK_ON_CPU_WHILE_DEVICE_STARTS = True


PACK_ISA_VARIABLE = "KT_PACK_ISA"


def pack_isa(env: Mapping[str, str] = os.environ) -> str:
    """The ISA level the C++ packer runs at: KT_PACK_ISA (portable, avx2, avx512, amx; any case) or, unset or
    auto, the best this CPU has. Every level writes the same bytes; forcing a lower one is for benchmarks and
    tests. UserError for another value or a level this CPU lacks."""
    import kt_kernels

    # any value reaches the message printable and short: a level name is a few ASCII letters
    value = ascii(env.get(PACK_ISA_VARIABLE, "").strip().lower())[1:-1][:32] or "auto"
    try:
        return kt_kernels.resolve_isa(value)
    except ValueError as e:
        raise UserError(f"{PACK_ISA_VARIABLE}={value}: {e}; unset it to use the best level this CPU has") from None


class CpuPacker:
    device = "cpu"

    def __init__(self, num_threads: int = 0):
        import kt_kernels

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


class _Slot:
    """Buffers of one chunk in flight and the events that say when each is free again."""

    def __init__(self, torch, device, in_bytes: int, out_bytes: int):
        self.in_cap, self.out_cap = in_bytes, out_bytes
        self.pin_in = torch.empty(in_bytes, dtype=torch.uint8, pin_memory=True)
        self.pin_out = torch.empty(out_bytes, dtype=torch.uint8, pin_memory=True)
        self.pin_in_np, self.pin_out_np = self.pin_in.numpy(), self.pin_out.numpy()
        self.dev_in = torch.empty(in_bytes, dtype=torch.uint8, device=device)
        self.dev_out = torch.empty(out_bytes, dtype=torch.uint8, device=device)
        self.uploaded = torch.cuda.Event(blocking=True)  # pin_in may be refilled
        self.computed = torch.cuda.Event(blocking=True)  # dev_in may be overwritten
        self.downloaded = torch.cuda.Event(blocking=True)  # dev_out may be overwritten, pin_out holds the results


class CudaPacker:
    device = "cuda"

    def __init__(self, device: str = "cuda", chunk_bytes: int = CHUNK_BYTES, slots: int = SLOTS,
                 threads: int | None = None, timings: Timings | None = None):
        import torch

        import quant.triton_kernels  # noqa: F401  (fail here, not mid-layer, if triton is broken)

        self.torch = torch
        self.device = torch.device(device)
        torch.cuda.init()  # the CUDA context now (on the start-up thread), not in the first copy
        self.chunk_bytes, self.num_slots = chunk_bytes, max(2, slots)
        self.slots: list[_Slot] = []
        self.h2d = torch.cuda.Stream(self.device)
        self.compute = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)
        self.pool = ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 4),
                                       thread_name_prefix="kt-gpu-io")
        self.timings = timings or Timings()
        self.stats = {"chunks": 0, "input_bytes": 0, "output_bytes": 0}
        self._ensure_slots(0, 0)  # pinned and device buffers once, before the first batch

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.slots = []

    def _chunks(self, jobs) -> list[list[int]]:
        """Job indices cut into chunks of about chunk_bytes of source; jobs that share a source
        (the NUMA shards of down) stay in one chunk so it is read once."""
        chunks, current, size, last_key = [], [], 0, None
        for i, (src, _, _, _) in enumerate(jobs):
            key = src.weight.__array_interface__["data"][0]
            nbytes = src.weight.nbytes + (src.scales.nbytes if src.scales is not None else 0)
            if current and size + nbytes > self.chunk_bytes and key != last_key:
                chunks.append(current)
                current, size = [], 0
            current.append(i)
            if key != last_key:
                size += nbytes
            last_key = key
        if current:
            chunks.append(current)
        return chunks

    def _ensure_slots(self, in_bytes: int, out_bytes: int) -> None:
        if len(self.slots) == self.num_slots and all(s.in_cap >= in_bytes and s.out_cap >= out_bytes
                                                     for s in self.slots):
            return
        torch = self.torch
        torch.cuda.synchronize(self.device)  # nothing is in flight between calls; be sure
        mib = 1 << 20  # headroom, so that chunks of other sizes reuse the slots
        in_cap = max([in_bytes + in_bytes // 2, 2 * self.chunk_bytes] + [s.in_cap for s in self.slots])
        out_cap = max([out_bytes + out_bytes // 2, 4 * self.chunk_bytes] + [s.out_cap for s in self.slots])
        in_cap, out_cap = -(-in_cap // mib) * mib, -(-out_cap // mib) * mib
        self.stats["slot_allocations"] = self.stats.get("slot_allocations", 0) + 1
        self.slots = []
        self.slots = [_Slot(torch, self.device, in_cap, out_cap) for _ in range(self.num_slots)]

    def _gpu_times(self, marks) -> None:
        """Adds a chunk's GPU stage times (its six events, recorded around h2d, kernel, d2h: complete)."""
        for stage, a, b in (("gpu_h2d_s", 0, 1), ("gpu_kernel_s", 2, 3), ("gpu_d2h_s", 4, 5)):
            self.timings.add(stage, marks[a].elapsed_time(marks[b]) / 1e3)

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        from quant.gpu import copy_piece, copy_pieces, launch, plan_batch, scatter_job

        if not jobs:
            return []
        torch = self.torch
        t_plan = time.perf_counter()
        chunks = self._chunks(jobs)
        plans = [plan_batch(method, [jobs[i] for i in chunk]) for chunk in chunks]
        self.timings.add("gpu_plan_s", time.perf_counter() - t_plan)
        self._ensure_slots(max(p.in_bytes for p in plans), max(p.out_bytes for p in plans))
        S = self.num_slots
        counts = [0] * len(jobs)
        reads: dict[int, list[Future]] = {}
        copyouts: dict[int, list[Future]] = {}
        marks: list[list] = []  # per chunk: events around its h2d, kernel and d2h (read when all is done)

        def wait(futures) -> None:
            t0 = time.perf_counter()
            for f in futures:
                f.result()
            self.timings.add("gpu_wait_s", time.perf_counter() - t0)

        def timed(stage, fn, *args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.timings.add(stage, time.perf_counter() - t0)

        def read_piece(gate: Future, slot: _Slot, piece) -> None:
            gate.result()  # the slot's previous chunk has left pin_in
            timed("gpu_stage_in_s", copy_piece, slot.pin_in_np, piece)

        def copy_out(gate: Future, slot: _Slot, c: int, j: int) -> None:
            gate.result()  # pin_out holds this chunk's results
            i = chunks[c][j]
            counts[i] = timed("gpu_stage_out_s", scatter_job, plans[c], slot.pin_out_np, j, jobs[i][3])

        # One synchronisation per chunk and stage: a gate task waits for the slot's event, the
        # chunk's copy tasks (queued behind it, the pool is FIFO) wait for the gate.
        def submit_reads(c: int) -> None:
            slot = self.slots[c % S]
            gate = self.pool.submit(slot.uploaded.synchronize)
            reads[c] = [gate] + [self.pool.submit(read_piece, gate, slot, piece)
                                 for piece in copy_pieces(plans[c], PIECE_BYTES)]

        try:
            for c in range(min(S, len(plans))):
                submit_reads(c)
            for c, plan in enumerate(plans):
                slot = self.slots[c % S]
                m = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
                marks.append(m)
                wait(reads.pop(c))
                t_issue = time.perf_counter()
                with torch.cuda.stream(self.h2d):
                    self.h2d.wait_event(slot.computed)  # the previous kernel on this slot is done with dev_in
                    m[0].record(self.h2d)
                    slot.dev_in[: plan.in_bytes].copy_(slot.pin_in[: plan.in_bytes], non_blocking=True)
                    m[1].record(self.h2d)
                    slot.uploaded.record(self.h2d)
                with torch.cuda.stream(self.compute):
                    self.compute.wait_event(slot.uploaded)
                    self.compute.wait_event(slot.downloaded)  # dev_out of the previous chunk is downloaded
                    m[2].record(self.compute)
                    launch(method, plan, slot.dev_in, slot.dev_out)
                    m[3].record(self.compute)
                    slot.computed.record(self.compute)
                self.timings.add("gpu_issue_s", time.perf_counter() - t_issue)
                wait(copyouts.pop(c - S, []))  # pin_out of the previous chunk is copied out
                t_issue = time.perf_counter()
                with torch.cuda.stream(self.d2h):
                    self.d2h.wait_event(slot.computed)
                    m[4].record(self.d2h)
                    slot.pin_out[: plan.out_bytes].copy_(slot.dev_out[: plan.out_bytes], non_blocking=True)
                    m[5].record(self.d2h)
                    slot.downloaded.record(self.d2h)
                if c + S < len(plans):
                    submit_reads(c + S)  # after this slot's upload was recorded: its readers wait for it
                gate = self.pool.submit(slot.downloaded.synchronize)
                copyouts[c] = [gate] + [self.pool.submit(copy_out, gate, slot, c, j) for j in range(len(chunks[c]))]
                self.timings.add("gpu_issue_s", time.perf_counter() - t_issue)
                self.stats["chunks"] += 1
                self.stats["input_bytes"] += plan.input_bytes
                self.stats["output_bytes"] += sum(o[1] + 4 * o[3] for o in plan.outputs)
            for c in sorted(copyouts):
                wait(copyouts[c])
            for m in marks:  # every download is complete: so is every event
                self._gpu_times(m)
        except BaseException:
            for fs in list(reads.values()) + list(copyouts.values()):
                for f in fs:
                    f.cancel()
            torch.cuda.synchronize(self.device)
            for fs in list(reads.values()) + list(copyouts.values()):
                for f in fs:
                    if not f.cancelled():
                        f.exception()  # wait; the first error is already propagating
            raise
        return counts

    def warm_up(self, method: QuantMethod, sources) -> None:
        """Compiles the kernel for these sources ((SourceMatrix of 32 rows, col0, k), one per kind) by
        packing them into throwaway targets."""
        from quant.cpu import PackTarget

        self(method, [(src, col0, k, PackTarget.empty(method, src.shape[0], k)) for src, col0, k in sources])


def _warm_up_sources(jobs) -> list:
    """A copy of the first 32 rows of the first job of each source kind (and scale width) of a batch:
    what the kernel is compiled on, as owned arrays that outlive the batch's read buffer."""
    import numpy as np

    from quant.cpu import SourceMatrix
    from quant.gpu import ROWS

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
    packer, which gives the same bytes; from then on every batch goes to the GPU."""

    def __init__(self, num_threads: int, timings: Timings, start: float | None = None):
        self.timings = timings
        self._start = time.perf_counter() if start is None else start
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-gpu-start")
        self._made: Future = self._thread.submit(self._make)
        self._warm: Future | None = None
        self._cpu: CpuPacker | None = None
        self._num_threads = num_threads
        self.device = "cuda"

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

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        if self._warm is not None and self._warm.done() or not PACK_ON_CPU_WHILE_DEVICE_STARTS:
            return self._gpu()(method, jobs)
        if self._warm is None:  # the first batch: compile the kernel on a copy of a slice of its sources
            self._warm = self._thread.submit(self._warm_up, method, _warm_up_sources(jobs))
        if self._made.done() and self._made.exception() is not None:
            self._made.result()  # the GPU cannot start: say why now
        if self._cpu is None:
            self._cpu = CpuPacker(self._num_threads)
        self.timings.add("cpu_batches_while_device_starts", 1)
        return self._cpu(method, jobs)

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
