"""Packers chosen by --device: each takes (method, jobs) like quant.cpu.pack_cpu, fills the jobs'
PackTargets and returns the non-finite counts.

The CUDA packer streams a batch through the GPU in chunks of experts, each stage on its own
resources so that they overlap: reader threads copy the sources (read from the checkpoint into a
buffer by convert.source_reader, one batch ahead) into pinned staging, the copy stream moves them
to the GPU, the compute stream runs the fused Triton kernel, the download stream brings the packed
bytes back into pinned memory, and the reader threads copy them into the PackTargets (the writer
thread of convert_layer then writes them). A fixed ring of slots bounds memory: GPU and pinned memory are a few chunks whatever the
model size. torch and triton are imported only when the CUDA packer is made.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor


from quant.cpu import pack_cpu
from kt_runtime.format.methods import QuantMethod

from .errors import UserError

CHUNK_BYTES = 8 << 20  # source bytes per GPU chunk: small, so a batch's last chunk (not overlapped) is short
SLOTS = 4  # chunks in flight: being read (several), on the GPU, being copied out
PIECE_BYTES = 2 << 20  # one reader task


class CpuPacker:
    device = "cpu"

    def __init__(self, num_threads: int = 0):
        import kt_kernels

        self.num_threads = num_threads
        try:  # every packing thread is started here, so that a refusal comes before any layer
            kt_kernels.start_pack_pool(num_threads)
        except (ValueError, TypeError, OverflowError):
            raise UserError(f"--cpuinfer-threads {num_threads}: must be between 0 (every core) and "
                            f"{kt_kernels.MAX_THREADS}") from None
        except kt_kernels.ThreadStartError as e:
            raise UserError(f"{e}: the system limits threads per user (ulimit -u) or address space (ulimit -v); "
                            "pass a smaller --cpuinfer-threads or raise the limit, then re-run") from None

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        return pack_cpu(method, jobs, num_threads=self.num_threads)

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
                 threads: int | None = None):
        import torch

        import quant.triton_kernels  # noqa: F401  (fail here, not mid-layer, if triton is broken)

        self.torch = torch
        self.device = torch.device(device)
        self.chunk_bytes, self.num_slots = chunk_bytes, max(2, slots)
        self.slots: list[_Slot] = []
        self.h2d = torch.cuda.Stream(self.device)
        self.compute = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)
        self.pool = ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 4),
                                       thread_name_prefix="kt-gpu-io")
        self.stats = {"chunks": 0, "input_bytes": 0, "output_bytes": 0}

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

    def __call__(self, method: QuantMethod, jobs) -> list[int]:
        from quant.gpu import copy_piece, copy_pieces, launch, plan_batch, scatter_job

        if not jobs:
            return []
        torch = self.torch
        chunks = self._chunks(jobs)
        plans = [plan_batch(method, [jobs[i] for i in chunk]) for chunk in chunks]
        self._ensure_slots(max(p.in_bytes for p in plans), max(p.out_bytes for p in plans))
        S = self.num_slots
        counts = [0] * len(jobs)
        reads: dict[int, list[Future]] = {}
        copyouts: dict[int, list[Future]] = {}

        def read_piece(slot: _Slot, piece) -> None:
            slot.uploaded.synchronize()  # the slot's previous chunk has left pin_in
            copy_piece(slot.pin_in_np, piece)

        def copy_out(slot: _Slot, c: int, j: int) -> None:
            slot.downloaded.synchronize()
            i = chunks[c][j]
            counts[i] = scatter_job(plans[c], slot.pin_out_np, j, jobs[i][3])

        def submit_reads(c: int) -> None:
            slot = self.slots[c % S]
            reads[c] = [self.pool.submit(read_piece, slot, piece) for piece in copy_pieces(plans[c], PIECE_BYTES)]

        try:
            for c in range(min(S, len(plans))):
                submit_reads(c)
            for c, plan in enumerate(plans):
                slot = self.slots[c % S]
                for f in reads.pop(c):
                    f.result()
                with torch.cuda.stream(self.h2d):
                    self.h2d.wait_event(slot.computed)  # the previous kernel on this slot is done with dev_in
                    slot.dev_in[: plan.in_bytes].copy_(slot.pin_in[: plan.in_bytes], non_blocking=True)
                    slot.uploaded.record(self.h2d)
                with torch.cuda.stream(self.compute):
                    self.compute.wait_event(slot.uploaded)
                    self.compute.wait_event(slot.downloaded)  # dev_out of the previous chunk is downloaded
                    launch(method, plan, slot.dev_in, slot.dev_out)
                    slot.computed.record(self.compute)
                for f in copyouts.pop(c - S, []):  # pin_out of the previous chunk is copied out
                    f.result()
                with torch.cuda.stream(self.d2h):
                    self.d2h.wait_event(slot.computed)
                    slot.pin_out[: plan.out_bytes].copy_(slot.dev_out[: plan.out_bytes], non_blocking=True)
                    slot.downloaded.record(self.d2h)
                if c + S < len(plans):
                    submit_reads(c + S)  # after this slot's upload was recorded: its readers wait for it
                copyouts[c] = [self.pool.submit(copy_out, slot, c, j) for j in range(len(chunks[c]))]
                self.stats["chunks"] += 1
                self.stats["input_bytes"] += plan.input_bytes
                self.stats["output_bytes"] += sum(o[1] + 4 * o[3] for o in plan.outputs)
            for c in sorted(copyouts):
                for f in copyouts[c]:
                    f.result()
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


def make_packer(device: str, num_threads: int = 0):
    """device: "cpu" or "cuda" (as resolved by convert.pipeline.resolve_device)."""
    if device == "cuda":
        return CudaPacker()
    return CpuPacker(num_threads)
