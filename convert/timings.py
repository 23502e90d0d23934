"""Where a conversion's time goes: seconds per stage, summed over the threads that run it.

Stages overlap (reads run ahead of packing, writes and commits behind it), so the stages' sums
exceed the wall time; `*_wait_s` stages are the main thread blocked on another one (the critical
path). The report (ConversionReport.timings, --json, --timings) lists them in STAGES order.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

# stage -> what it measures (printed by --timings)
STAGES = {
    "device_choice_s": "--device auto: probing the packer and sha256 on one core to choose the device",
    "device_init_s": "device start-up (background thread: torch/triton import, CUDA context, buffers, "
                     "kernel compile), from the start of the run",
    "device_init_wait_s": "main thread waiting for the device start-up",
    "plan_s": "open the checkpoint, plan, prepare the output, pre-flight",
    "read_s": "source reads (pread into the batch buffer, reader threads)",
    "source_digest_s": "sha256 of the source slabs for the layers' source identity (reader threads)",
    "read_wait_s": "main thread waiting for a batch to be read",
    "pack_s": "decode + quantize + tile (CPU: the C++ packer, fused; CUDA: submitting batches and taking their "
              "results, main thread)",
    "gpu_plan_s": "CUDA: laying out each batch on the device: in-place windows, job tables (main thread, Python)",
    "gpu_issue_s": "CUDA: enqueueing each batch's copies and kernels on the three streams (main thread)",
    "gpu_wait_s": "CUDA: main thread waiting for a batch's download",
    "gpu_stage_in_s": "CUDA: copying sources that were not read into the pinned block (main thread)",
    "gpu_h2d_s": "CUDA: host -> device copies (CUDA events)",
    "gpu_kernel_s": "CUDA: the fused Triton kernel (CUDA events)",
    "gpu_d2h_s": "CUDA: device -> host copies (CUDA events)",
    "gpu_stage_out_s": "CUDA: copying packed bytes into targets outside the pinned block (main thread)",
    "gpu_pinned_mib": "CUDA: pinned host memory, MiB (read buffers and output arenas; count)",
    "gpu_batches_staged": "CUDA: batches with sources outside the pinned block, copied in (count)",
    "gpu_batches_scattered": "CUDA: batches whose targets were outside the pinned block, copied out (count)",
    "gpu_pageable_buffers": "CUDA: buffers the pinned block had no room for: read, packed or staged in plain "
                            "memory instead (count)",
    "cpu_batches_while_device_starts": "batches packed on the CPU while the device was starting (count)",
    "write_s": "writing packed bytes to the output files (writer thread: page cache, waits for the digest)",
    "digest_s": "sha256 of the output blocks for the layer digests (hashing threads)",
    "write_wait_s": "main thread waiting for the writer",
    "commit_s": "fsync + rename + the layer digest's last blocks + manifest (commit thread)",
    "commit_wait_s": "main thread waiting for a layer's commit",
    "finish_s": "model files, index and the final manifest",
}


class Timings:
    """Thread-safe per-stage second (or count) sums."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sums: dict[str, float] = {}

    def add(self, stage: str, value: float) -> None:
        if stage not in STAGES:
            raise KeyError(f"unknown timing stage {stage!r}")
        with self._lock:
            self._sums[stage] = self._sums.get(stage, 0.0) + value

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def get(self, stage: str) -> float:
        with self._lock:
            return self._sums.get(stage, 0.0)

    def to_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(self._sums[k], 4) for k in STAGES if k in self._sums}


def describe(timings: dict[str, float], wall_s: float) -> str:
    """The --timings table: one line per stage with its share of the wall time."""
    lines = [f"where the time went ({wall_s:.2f} s wall; stages overlap, so shares add up to more than 100%):"]
    for stage, value in timings.items():
        if stage.endswith("_s"):
            share = f"{100 * value / wall_s:5.1f}%" if wall_s > 0 else "    -"
            lines.append(f"  {stage[:-2]:<32} {value:8.2f} s {share}  {STAGES[stage]}")
        else:
            lines.append(f"  {stage:<32} {value:8.0f}    {'':6} {STAGES[stage]}")
    return "\n".join(lines)
