"""Dequantize packed experts staged in one byte buffer into [gate | up] and down matrices (the GPU prefill).

The staging buffer holds each expert's packed tensors as the file holds them (docs/FORMAT.md §3 tiles or §9
row-major nibbles), at offsets the caller chose; a job table says where. One job is one NUMA shard of one
projection: (w_off, s_off) its weight bytes and scales in the buffer, (n, k) the shard, and where its [n, k]
values go in the flat output: element (r, c) at dst_off + r * dst_stride + c. The output is one flat tensor
holding, for `capacity` experts, every expert's [gate | up] [2I, H] and then every expert's down [H, I]
(`scratch_views`), so one launch dequantizes a whole group.

Two implementations of one contract: `dequantize_staged_reference` (torch on the CPU, through
quant.reference.dequantize_packed: the readable one) and `dequantize_staged_triton` (quant/triton_dequant.py
kernels reading the packed byte order directly; each byte order's kernel in STAGED). Both write fl(q * step)
rounded once to the output dtype: AMXINT4 q * (16 d), AMXINT8 q * d, RAWINT4 (u - 8) * s, each product in
float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kt_convert.kt_runtime.format.byte_orders import AMX_TILED, COMPRESSED_TENSORS, ByteOrder
from kt_convert.kt_runtime.format.methods import K_BLOCK, QuantMethod
from kt_convert.kt_runtime.format.names import PROJECTIONS
from kt_convert.kt_runtime.format.safetensors_file import tensor_nbytes
from kt_convert.kt_runtime.format.spec import full_shape, shard_slice

JOB_FIELDS = ("w_off", "s_off", "n", "k", "dst_off", "dst_stride")
ROWS = 32  # rows per Triton program (one AMX row group)
GROUP_BLOCK_K = 128  # columns per program of the group-wise kernel


def scale_nbytes(method: QuantMethod, n: int, k: int) -> int:
    return tensor_nbytes(method.scale_dtype, (method.scale_count(n, k),))


def scratch_elements(capacity: int, hidden_size: int, intermediate_size: int) -> int:
    return capacity * 3 * hidden_size * intermediate_size


def scratch_views(flat, capacity: int, hidden_size: int, intermediate_size: int):
    """(w13 [capacity, 2I, H], w2 [capacity, H, I]) views of a flat scratch tensor."""
    H, I = hidden_size, intermediate_size
    cut = capacity * 2 * I * H
    return flat[:cut].view(capacity, 2 * I, H), flat[cut:cut + capacity * H * I].view(capacity, H, I)


def expert_jobs(method: QuantMethod, hidden_size: int, intermediate_size: int, threadpool_count: int, slot: int,
                capacity: int, offset_of) -> np.ndarray:
    """int64 [3 * T, 6] jobs of the expert dequantized into scratch slot `slot` of `capacity`;
    offset_of(proj, numa) -> (weight offset, scale offset) in the staging buffer."""
    H, I, T = hidden_size, intermediate_size, threadpool_count
    rows = []
    for proj in PROJECTIONS:
        n_full, k_full = full_shape(proj, H, I)
        if proj == "down":
            base = capacity * 2 * I * H + slot * H * I
        else:
            base = slot * 2 * I * H + (I * H if proj == "up" else 0)
        for t in range(T):
            s = shard_slice(proj, H, I, T, t)
            w_off, s_off = offset_of(proj, t)
            rows.append((w_off, s_off, s.n, s.k, base + s.row0 * k_full + s.col0, k_full))
    return np.array(rows, dtype=np.int64).reshape(-1, len(JOB_FIELDS))


def check_dims(method: QuantMethod, hidden_size: int, intermediate_size: int, threadpool_count: int) -> None:
    """ValueError where the kernels' program shapes do not divide the shards (the format's alignment rule
    already guarantees these; a hand-made PackedExperts might not)."""
    for proj in PROJECTIONS:
        s = shard_slice(proj, hidden_size, intermediate_size, threadpool_count, 0)
        if s.n % ROWS or s.k % method.k_align:
            raise ValueError(f"{method.name}: a {proj} shard of {s.n} x {s.k} cannot be dequantized on the GPU "
                             f"(rows must be a multiple of {ROWS}, columns of {method.k_align})")


@dataclass(frozen=True)
class StagedKernel:
    """The Triton dequantization of one byte order: columns per program (`block_k(method)`: a job of [n, k]
    takes n / ROWS x ceil(k / block_k) programs) and its launch on a grid."""

    block_k: Callable[[QuantMethod], int]
    launch: Callable  # (grid, staging, jobs, out, method) -> None


def _launch_tiled(grid, staging, jobs, out, method: QuantMethod) -> None:
    from .triton_dequant import dequant_tiled_kernel

    dequant_tiled_kernel[grid](staging, jobs, out, IS_INT4=method.bits == 4, N_BLOCK=method.n_block,
                               STEP=64 * method.elems_per_byte, EPB=method.elems_per_byte, K_BLOCK=K_BLOCK,
                               num_warps=4)


def _launch_groups(grid, staging, jobs, out, method: QuantMethod) -> None:
    from .triton_dequant import dequant_groups_kernel

    dequant_groups_kernel[grid](staging, jobs, out, GROUP=method.group_size, BLOCK_K=GROUP_BLOCK_K, num_warps=4)


STAGED: dict[ByteOrder, StagedKernel] = {
    AMX_TILED: StagedKernel(lambda m: 64 * m.elems_per_byte, _launch_tiled),  # one 64-byte tile column
    COMPRESSED_TENSORS: StagedKernel(lambda m: GROUP_BLOCK_K, _launch_groups),
}


def job_tiles(method: QuantMethod, jobs: np.ndarray) -> int:
    """Programs per job of the Triton kernel (grid axis 0): the most any job needs."""
    if not len(jobs):
        return 0
    n, k = jobs[:, 2], jobs[:, 3]
    block = STAGED[method.byte_order].block_k(method)
    return int((n // ROWS * (-(-k // block))).max())


def dequantize_staged_reference(staging, jobs: np.ndarray, method: QuantMethod, out) -> None:
    """The jobs on CPU torch tensors: staging uint8 (the buffer), out flat float32 or bfloat16."""
    import torch

    from .reference import dequantize_packed

    scale_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[method.scale_dtype]  # the scales' elements
    for w_off, s_off, n, k, dst, stride in np.asarray(jobs).tolist():
        w = staging[w_off:w_off + method.weight_bytes(n, k)]
        s = staging[s_off:s_off + scale_nbytes(method, n, k)].view(scale_dtype)
        values = dequantize_packed(w, s, n, k, method)
        out.as_strided((n, k), (stride, 1), dst).copy_(values)


def dequantize_staged_triton(staging, jobs, count: int, tiles: int, method: QuantMethod, out) -> None:
    """Queue the Triton kernel on the current stream: staging uint8 on the device, jobs an int64 [count, 6]
    tensor on the device (a view of the staging buffer), out flat float32 or bfloat16."""
    if not count:
        return
    STAGED[method.byte_order].launch((tiles, count), staging, jobs, out, method)
