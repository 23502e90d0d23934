"""GPU packer: the same jobs and bytes as quant.cpu.pack_cpu, computed by the fused Triton kernel.

A batch of jobs is laid out as one staging buffer (every source array once, rows made dense, then
the int64 job and task tables) and one output buffer (each job's tiled bytes and fp32 scales,
64-byte aligned, then the non-finite counts). `plan_batch` computes that layout, `fill_staging`
copies the sources in (the only read of the source maps), `launch` enqueues the kernels on the
current stream, `scatter_outputs` copies the results into the jobs' PackTargets. `pack_gpu` does
all four synchronously; convert.packers streams them. triton is imported only by `launch`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np

from kt_runtime.format.files import system_glob
from kt_runtime.format.methods import FP32_RECIPROCAL, K_BLOCK, QuantMethod

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


def no_gpu_device_reason(nodes: tuple[str, ...] = GPU_DEVICE_NODES) -> str | None:
    """Why torch cannot see a GPU, found without importing torch (a CUDA build takes seconds and
    hundreds of MB to import only to find none), or None when one may be there."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if not any(system_glob(pattern) for pattern in nodes):
        return f"there is no CUDA device here (none of {', '.join(nodes)})"
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
    in_bytes: int  # staging size
    out_bytes: int  # output size (multiple of 64)
    copies: list[tuple[np.ndarray, int]]  # (uint8 [rows, row_bytes] source, staging offset)
    meta_offset: int  # staging offset of the int64 job table [J, META] then task table [T, 2]
    num_jobs: int
    num_tasks: int
    launches: list[tuple[int, int, int]]  # (kernel kind code, first task, task count)
    outputs: list[tuple[int, int, int, int]]  # per job: (weight offset, weight bytes, scales offset, rows)
    counts_offset: int  # int32 [J] non-finite counts
    input_bytes: int = 0  # source bytes staged (the read volume)
    tables: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


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


def plan_batch(method: QuantMethod, jobs: list[tuple[SourceMatrix, int, int, PackTarget]]) -> BatchPlan:
    """Staging and output layout of a batch; each source array is staged once (NUMA shards of
    down share one source, fp8 shards one scale grid)."""
    staged: dict[tuple[int, int, tuple], int] = {}
    copies: list[tuple[np.ndarray, int]] = []
    pos = 0

    def stage(a: np.ndarray) -> tuple[int, int]:
        nonlocal pos
        rows = _as_rows(a)
        key = (rows.__array_interface__["data"][0], rows.shape, rows.strides)
        if key not in staged:
            staged[key] = pos
            copies.append((rows, pos))
            pos = _align(pos + rows.shape[0] * rows.shape[1])
        return staged[key], rows.shape[1]

    table = np.zeros((len(jobs), META), dtype=np.int64)
    tasks_by_kind: dict[int, list[tuple[int, int]]] = {}
    outputs = []
    out = 0
    scale_regions = []
    for i, (src, col0, k, dst) in enumerate(jobs):
        n, code = _check_job(method, i, src, col0, k, dst)
        w_off, w_row = stage(src.weight)
        s_off, s_row = stage(src.scales) if src.scales is not None else (0, 0)
        block_n, block_k = src.block if src.block is not None else (1, 32)
        table[i, :10] = (w_off, w_row, s_off, s_row, src.row0, block_n, block_k, n, k, col0)
        table[i, 12] = int(np.float32(src.global_scale).view(np.uint32))  # nvfp4's per-tensor scale, as fp32 bits
        wbytes = method.weight_bytes(n, k)
        outputs.append([out, wbytes, 0, n])
        table[i, 10] = out
        out = _align(out + wbytes)
        scale_regions.append(i)
        tasks_by_kind.setdefault(code, []).extend((i, r) for r in range(0, n, ROWS))
    for i in scale_regions:  # scales after all weights, so weights stay 64-byte aligned and dense
        outputs[i][2] = out
        table[i, 11] = out // 4
        out = _align(out + 4 * outputs[i][3])
    counts_offset = out
    out = _align(out + 4 * len(jobs))

    launches, task_rows = [], []
    for code in sorted(tasks_by_kind):
        launches.append((code, len(task_rows), len(tasks_by_kind[code])))
        task_rows.extend(tasks_by_kind[code])
    tasks = np.array(task_rows, dtype=np.int64).reshape(-1, 2)
    tables = np.concatenate([table.reshape(-1), tasks.reshape(-1)])
    meta_offset = pos
    input_bytes = sum(r.shape[0] * r.shape[1] for r, _ in copies)
    copies.append((tables.view(np.uint8).reshape(1, -1), meta_offset))
    in_bytes = _align(meta_offset + tables.nbytes)
    return BatchPlan(in_bytes, out, copies, meta_offset, len(jobs), len(tasks), launches,
                     [tuple(o) for o in outputs], counts_offset, input_bytes, tables)


def copy_pieces(plan: BatchPlan, piece_bytes: int = 8 << 20) -> list[tuple[np.ndarray, int, int, int]]:
    """(source rows, first row, end row, staging offset) pieces of at most ~piece_bytes, for
    copying in parallel."""
    pieces = []
    for rows, off in plan.copies:
        row_bytes = rows.shape[1]
        step = max(1, piece_bytes // max(1, row_bytes))
        for r0 in range(0, rows.shape[0], step):
            pieces.append((rows, r0, min(rows.shape[0], r0 + step), off))
    return pieces


def copy_piece(staging: np.ndarray, piece: tuple[np.ndarray, int, int, int]) -> None:
    rows, r0, r1, off = piece
    row_bytes = rows.shape[1]
    start = off + r0 * row_bytes
    np.copyto(staging[start : start + (r1 - r0) * row_bytes].reshape(r1 - r0, row_bytes), rows[r0:r1])


def fill_staging(plan: BatchPlan, staging: np.ndarray) -> None:
    for piece in copy_pieces(plan):
        copy_piece(staging, piece)


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


def scatter_job(plan: BatchPlan, host_out: np.ndarray, i: int, dst: PackTarget) -> int:
    """Copies job i's bytes and scales out of the host output buffer; returns its non-finite count."""
    w_off, wbytes, s_off, n = plan.outputs[i]
    np.copyto(dst.weight, host_out[w_off : w_off + wbytes])
    np.copyto(dst.scales, host_out[s_off : s_off + 4 * n].view(np.float32))
    return int(host_out[plan.counts_offset + 4 * i : plan.counts_offset + 4 * i + 4].view(np.int32)[0])


def scatter_outputs(plan: BatchPlan, host_out: np.ndarray, jobs) -> list[int]:
    return [scatter_job(plan, host_out, i, job[3]) for i, job in enumerate(jobs)]


def pack_gpu(method: QuantMethod, jobs: list[tuple[SourceMatrix, int, int, PackTarget]],
             device: str = "cuda") -> list[int]:
    """Synchronous GPU pack (same contract as quant.cpu.pack_cpu): fills every job's PackTarget
    and returns the non-finite counts. device "cpu" runs under TRITON_INTERPRET=1 (tests)."""
    import torch

    if not jobs:
        return []
    plan = plan_batch(method, jobs)
    pin = device != "cpu"
    staging = torch.empty(plan.in_bytes, dtype=torch.uint8, pin_memory=pin)
    fill_staging(plan, staging.numpy())
    dev_in = staging.to(device)
    dev_out = torch.empty(plan.out_bytes, dtype=torch.uint8, device=device)
    launch(method, plan, dev_in, dev_out)
    host_out = dev_out.cpu().numpy()
    return scatter_outputs(plan, host_out, jobs)
