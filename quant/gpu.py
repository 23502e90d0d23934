"""GPU packer: the same jobs and bytes as quant.cpu.pack_cpu, computed by the fused Triton kernel.

A batch of jobs is laid out as one device input buffer (a window of a pinned host block whose sources are
read in place, row strides kept; then the sources that are not there, staged with dense rows; then the int64
job and task tables) and one device output buffer (each job's tiled bytes and fp32 scales, at their offsets
in the targets' pinned arena when they have one, else dense; then the non-finite counts). `plan_batch`
computes that layout, `fill_staging` copies what is staged, `launch` enqueues the kernels on the current
stream, `scatter_outputs` copies dense results into the jobs' PackTargets. `pack_gpu` does it synchronously
(everything staged, or in place in a given host block); convert.packers streams batches through pinned
memory. triton is imported only by `launch`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np

from kt_convert.kt_runtime.format.files import system_glob
from kt_convert.kt_runtime.format.methods import FP32_RECIPROCAL, K_BLOCK, QuantMethod

from .cpu import PackTarget, SourceMatrix
from .source_formats import SOURCE_FORMATS

ALIGN = 64
META = 13  # int64 fields per job, see triton_kernels.META_FIELDS
ROWS = 32  # rows per kernel program


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


# What a GPU driver creates: NVIDIA (/dev/nvidia0, /dev/nvidiactl, /proc/driver/nvidia/gpus/BUS), AMD ROCm
# (/dev/kfd), WSL (/dev/dxg). None of them: torch cannot see a GPU.
GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/proc/driver/nvidia/gpus/*", "/dev/kfd", "/dev/dxg")
NO_GPU_DEVICE = "there is no CUDA device here"


def no_gpu_device_reason(nodes: tuple[str, ...] = GPU_DEVICE_NODES) -> str | None:
    """Why torch cannot see a GPU, found without importing torch (a CUDA build takes seconds and
    hundreds of MB to import only to find none), or None when one may be there."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if not any(system_glob(pattern) for pattern in nodes):
        return f"{NO_GPU_DEVICE} (none of {', '.join(nodes)})"
    return None


def gpu_unavailable_reason() -> str | None:
    """None when the GPU packer can run here, else why not (without importing triton; torch is
    imported only when triton and a GPU device are there, which keeps CPU-only runs from paying
    its import)."""
    why = no_gpu_device_reason()  # first: without a GPU, installing triton would not help
    if why:
        return why
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def _as_rows(a: np.ndarray) -> np.ndarray:
    """A 2-D array with contiguous rows as uint8 [rows, row_bytes] (a view, strides kept)."""
    if a.ndim != 2 or a.strides[1] != a.itemsize:
        raise ValueError("source arrays must be 2-D with contiguous rows")
    return a.view(np.uint8)


@dataclass
class BatchPlan:
    """Where a batch's bytes sit on the device. Input: an optional window of a pinned host block whose
    sources are read in place (uploaded to device offset 0, row strides kept), then the staged region (sources
    copied in with dense rows, then the int64 job and task tables), uploaded from a host staging buffer.
    Output: every job's tiled bytes and fp32 scales (at their offsets in the targets' arena when those lie in a
    pinned block: downloaded in place; else laid out densely and scattered), then the non-finite counts."""

    in_bytes: int  # device input size
    out_bytes: int  # device output size (multiple of 64)
    copies: list[tuple[np.ndarray, int]]  # (uint8 [rows, row_bytes] source, device offset) staged densely, tables last
    meta_offset: int  # device offset of the int64 job table [J, META] then task table [T, 2]
    num_jobs: int
    num_tasks: int
    launches: list[tuple[int, int, int]]  # (kernel kind code, first task, task count)
    outputs: list[tuple[int, int, int, int]]  # per job on the device: (weight offset, weight bytes, scales offset, rows)
    counts_offset: int  # int32 [J] non-finite counts
    input_bytes: int = 0  # source bytes the kernel reads (the read volume)
    tables: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    window: tuple[int, int] | None = None  # (host block offset, bytes) read in place -> device [0, bytes)
    stage_offset: int = 0  # device offset of the staged region (host staging index 0)
    out_window: tuple[int, int] | None = None  # (host block offset, bytes) <- device [0, bytes), in place

    @property
    def stage_bytes(self) -> int:
        return self.in_bytes - self.stage_offset


def _key(a: np.ndarray) -> tuple:
    return a.__array_interface__["data"][0], a.shape, a.strides


def _window(arrays: list[np.ndarray], host) -> tuple[int, int, dict[int, int]] | None:
    """(first, end, {id(array): block offset}) of the arrays with contiguous rows that lie in the host block,
    or None when none do or their span holds more than twice their bytes plus 1 MiB (arrays of unrelated
    leases: uploading what lies between them would cost more than staging them)."""
    if host is None:
        return None
    inside, used = {}, {}
    for a in arrays:
        extent = host.extent_of(a)
        if extent is not None and a.ndim == 2 and a.strides[1] == a.itemsize and a.strides[0] % a.itemsize == 0:
            inside[id(a)] = extent
            used[_key(a)] = a.itemsize * a.shape[0] * a.shape[1]
    if not inside:
        return None
    first = min(off for off, _ in inside.values()) // ALIGN * ALIGN
    end = max(off + span for off, span in inside.values())
    if end - first > 2 * sum(used.values()) + (1 << 20):
        return None
    return first, end, {i: off for i, (off, _) in inside.items()}


def _check_job(method: QuantMethod, i: int, src: SourceMatrix, col0: int, k: int, dst: PackTarget) -> tuple[int, int]:
    where = f"pack job {i}: "
    if src.kind not in SOURCE_FORMATS:
        raise ValueError(where + f"unknown source kind {src.kind!r}")
    n, ktot = src.shape
    if n <= 0 or k <= 0 or col0 < 0:
        raise ValueError(where + "empty matrix or bad column range")
    if n % ROWS:
        raise ValueError(where + f"rows ({n}) must be a multiple of 32")
    if k % method.k_align:
        raise ValueError(where + f"columns ({k}) must be a multiple of {method.k_align}")
    if col0 + k > ktot:
        raise ValueError(where + "column range exceeds the source row")
    if src.kind in ("mxfp4", "mxfp8", "nvfp4"):
        group = 16 if src.kind == "nvfp4" else 32
        if src.scales is None or src.scales.itemsize != 1 or col0 % group:
            raise ValueError(where + f"{src.kind} needs one-byte scales and a first column aligned to {group}")
        if src.scales.shape[0] != n or src.scales.shape[1] * group < col0 + k:
            raise ValueError(where + f"{src.kind} scales do not cover the matrix")
    if src.kind == "nvfp4" and not (np.isfinite(src.global_scale) and src.global_scale > 0):
        raise ValueError(where + "nvfp4 global_scale must be a positive finite number")
    if src.kind in ("fp8_block", "int4_group"):
        if src.scales is None or src.block is None:
            raise ValueError(where + "fp8_block/int4_group need scales and a block")
        bn, bk = src.block
        if src.kind == "fp8_block":
            if src.scales.itemsize != 4 or src.scales.shape[0] * bn < src.row0 + n:
                raise ValueError(where + "fp8_block scales must be float32 and cover the rows")
        elif src.scales.itemsize not in (2, 4) or src.scales.shape[0] != n:
            raise ValueError(where + "int4_group scales must be bf16 or float32, one row per weight row")
        if src.scales.shape[1] * bk < col0 + k:
            raise ValueError(where + "scales do not cover the column range")
    if dst.weight.dtype != np.uint8 or dst.weight.size != method.weight_bytes(n, k) or not dst.weight.flags.c_contiguous:
        raise ValueError(where + "out_weight has the wrong size or layout")
    if dst.scales.dtype != np.float32 or dst.scales.size != n or not dst.scales.flags.c_contiguous:
        raise ValueError(where + "out_scale has the wrong size or layout")
    variant = (src.kind == "int4_group" and src.scales.itemsize == 4) or (src.kind == "nvfp4" and src.global_divides)
    code = SOURCE_FORMATS[src.kind].gpu_code + (1 if variant else 0)
    return n, code


def plan_batch(method: QuantMethod, jobs: list[tuple[SourceMatrix, int, int, PackTarget]], host=None) -> BatchPlan:
    """The batch's device layout. host: the pinned block (convert.host_memory.HostBlock: extent_of, offset_of) whose
    sources are read in place and whose targets are downloaded in place; None: every source is staged (each
    array once: NUMA shards of down share one source, fp8 shards one scale grid) and outputs are dense."""
    checked = [_check_job(method, i, src, col0, k, dst) for i, (src, col0, k, dst) in enumerate(jobs)]
    sources = [a for src, _, _, _ in jobs for a in (src.weight, src.scales) if a is not None]
    window = _window(sources, host)
    first, end, inside = window if window is not None else (0, 0, {})
    staged: dict[tuple[int, tuple, tuple], tuple[int, int]] = {}
    copies: list[tuple[np.ndarray, int]] = []
    pos = stage_offset = _align(end - first) if window is not None else 0

    def place(a: np.ndarray) -> tuple[int, int]:
        """(device offset, row stride in bytes) of a source array."""
        nonlocal pos
        rows = _as_rows(a)
        if id(a) in inside:
            return inside[id(a)] - first, rows.strides[0]
        key = _key(rows)
        if key not in staged:
            staged[key] = (pos, rows.shape[1])
            copies.append((rows, pos))
            pos = _align(pos + rows.shape[0] * rows.shape[1])
        return staged[key]

    table = np.zeros((len(jobs), META), dtype=np.int64)
    tasks_by_kind: dict[int, list[tuple[int, int]]] = {}
    for i, ((src, col0, k, dst), (n, code)) in enumerate(zip(jobs, checked)):
        w_off, w_row = place(src.weight)
        s_off, s_row = place(src.scales) if src.scales is not None else (0, 0)
        block_n, block_k = src.block if src.block is not None else (1, 32)
        table[i, :10] = (w_off, w_row, s_off, s_row, src.row0, block_n, block_k, n, k, col0)
        table[i, 12] = int(np.float32(src.global_scale).view(np.uint32))  # nvfp4's per-tensor scale, as fp32 bits
        tasks_by_kind.setdefault(code, []).extend((i, r) for r in range(0, n, ROWS))
    input_bytes = sum(a.itemsize * a.shape[0] * a.shape[1] for a in {_key(a): a for a in sources}.values())

    outputs, out_window, out = _place_outputs(method, jobs, host)
    for i, (w_off, _, s_off, _) in enumerate(outputs):
        table[i, 10], table[i, 11] = w_off, s_off // 4
    counts_offset = out
    out = _align(out + 4 * len(jobs))

    launches, task_rows = [], []
    for code in sorted(tasks_by_kind):
        launches.append((code, len(task_rows), len(tasks_by_kind[code])))
        task_rows.extend(tasks_by_kind[code])
    tasks = np.array(task_rows, dtype=np.int64).reshape(-1, 2)
    tables = np.concatenate([table.reshape(-1), tasks.reshape(-1)])
    meta_offset = pos
    copies.append((tables.view(np.uint8).reshape(1, -1), meta_offset))
    in_bytes = _align(meta_offset + tables.nbytes)
    return BatchPlan(in_bytes, out, copies, meta_offset, len(jobs), len(tasks), launches, outputs, counts_offset,
                     input_bytes, tables, (first, end - first) if window is not None else None, stage_offset,
                     out_window)


def _place_outputs(method: QuantMethod, jobs, host) -> tuple[list[tuple[int, int, int, int]], tuple | None, int]:
    """(per job (weight offset, weight bytes, scales offset, rows) on the device, the host window they are
    downloaded into or None, the end of the outputs). In place when every target lies in the host block and
    they follow each other with less than 64 bytes between them (one batch's arena, convert.host_memory.
    target_layout): the download then overwrites nothing but them and their padding. Else dense: weights
    first (64-byte aligned), then scales, scattered into the targets after the download."""
    targets = [a for _, _, _, dst in jobs for a in (dst.weight, dst.scales)]
    offsets = [host.offset_of(a) for a in targets] if host is not None else [None]
    if None not in offsets:
        spans = sorted((off, off + a.nbytes) for off, a in zip(offsets, targets))
        first, end = spans[0][0], spans[-1][1]
        tight = all(0 <= b[0] - a[1] < ALIGN for a, b in zip(spans, spans[1:]))
        if tight and all((off - first) % 4 == 0 for off in offsets[1::2]):
            outputs = [(offsets[2 * i] - first, method.weight_bytes(src.shape[0], k), offsets[2 * i + 1] - first,
                        src.shape[0]) for i, (src, _, k, _) in enumerate(jobs)]
            return outputs, (first, end - first), _align(end - first)
    outputs, out = [], 0
    for src, _, k, _ in jobs:
        wbytes = method.weight_bytes(src.shape[0], k)
        outputs.append([out, wbytes, 0, src.shape[0]])
        out = _align(out + wbytes)
    for o in outputs:  # scales after all weights, so weights stay 64-byte aligned and dense
        o[2] = out
        out = _align(out + 4 * o[3])
    return [tuple(o) for o in outputs], None, out


def fill_staging(plan: BatchPlan, staging: np.ndarray) -> None:
    """Copies the staged sources and the tables into `staging`, the host image of the device's staged region
    (index 0 = device offset plan.stage_offset)."""
    for rows, off in plan.copies:
        start = off - plan.stage_offset
        np.copyto(staging[start : start + rows.size].reshape(rows.shape), rows)


def launch(method: QuantMethod, plan: BatchPlan, dev_in, dev_out) -> None:
    """Enqueues the batch's kernels on the current stream (dev_in holds the staging bytes)."""
    import torch

    from .triton_kernels import pack_kernel

    tables = dev_in[plan.meta_offset : plan.meta_offset + plan.tables.nbytes].view(torch.int64)
    job_table = tables[: plan.num_jobs * META]
    task_table = tables[plan.num_jobs * META :]
    counts = dev_out[plan.counts_offset : plan.counts_offset + 4 * plan.num_jobs].view(torch.int32)
    counts.zero_()
    scales = dev_out[: plan.out_bytes].view(torch.float32)
    for code, first, count in plan.launches:
        pack_kernel[(count,)](dev_in, dev_out, scales, counts, job_table, task_table, first, KIND=code,
                              **kernel_constants(method), num_warps=4)


def kernel_constants(method: QuantMethod) -> dict:
    """The method's row as the Triton kernel's compile-time constants (see pack_kernel)."""
    recip_bits = 0
    if method.scale_arithmetic == FP32_RECIPROCAL:
        recip_bits = int(np.float64(np.float32(1) / np.float32(method.levels)).view(np.int64))
    return dict(IS_INT4=method.bits == 4, N_BLOCK=method.n_block, EPB=method.elems_per_byte,
                STEP=64 * method.elems_per_byte, K_BLOCK=K_BLOCK, LEVELS=float(method.levels),
                RECIP_F64_BITS=recip_bits)


def scatter_outputs(plan: BatchPlan, host_out: np.ndarray, jobs) -> None:
    """Copies each job's bytes and scales from a dense host output buffer into its PackTarget."""
    for (w_off, wbytes, s_off, n), (_, _, _, dst) in zip(plan.outputs, jobs):
        np.copyto(dst.weight, host_out[w_off : w_off + wbytes])
        np.copyto(dst.scales, host_out[s_off : s_off + 4 * n].view(np.float32))


def read_counts(plan: BatchPlan, counts: np.ndarray) -> list[int]:
    """The jobs' non-finite counts from the host copy of device [counts_offset, +4 J)."""
    return [int(c) for c in counts[: 4 * plan.num_jobs].view(np.int32)]


def pack_gpu(method: QuantMethod, jobs: list[tuple[SourceMatrix, int, int, PackTarget]],
             device: str = "cuda", host=None) -> list[int]:
    """Synchronous GPU pack (same contract as quant.cpu.pack_cpu): fills every job's PackTarget
    and returns the non-finite counts. device "cpu" runs under TRITON_INTERPRET=1 (tests). host: a block
    (convert.host_memory.HostBlock) whose sources are read and whose targets are written in place, as the
    streaming packer does."""
    import torch

    if not jobs:
        return []
    plan = plan_batch(method, jobs, host)
    staging = torch.empty(plan.stage_bytes, dtype=torch.uint8, pin_memory=device != "cpu")
    fill_staging(plan, staging.numpy())
    dev_in = torch.empty(plan.in_bytes, dtype=torch.uint8, device=device)
    if plan.window is not None:
        first, nbytes = plan.window
        dev_in[:nbytes].copy_(torch.from_numpy(host.array[first : first + nbytes]))
    dev_in[plan.stage_offset :].copy_(staging)
    dev_out = torch.empty(plan.out_bytes, dtype=torch.uint8, device=device)
    launch(method, plan, dev_in, dev_out)
    host_out = dev_out.cpu().numpy()
    if plan.out_window is not None:
        first, nbytes = plan.out_window
        np.copyto(host.array[first : first + nbytes], host_out[:nbytes])
    else:
        scatter_outputs(plan, host_out, jobs)
    return read_counts(plan, host_out[plan.counts_offset :])
