"""Triton kernels that dequantize staged packed experts in their on-disk byte order (quant/staged_dequant.py
says what a job is; docs/FORMAT.md §3 and §9 the byte orders).

dequant_tiled_kernel (AMXINT4 / AMXINT8): one program reads one 2048-byte tile pair, 32 rows x 64 bytes of
a shard, found by the closed form of §3, and writes its 32 x STEP values row-major. dequant_groups_kernel
(RAWINT4): one program reads 32 rows x BLOCK_K columns of row-major nibbles (the even column in the low
nibble, stored u = q + 8) and their bf16 group scales. Each value is one float32 product rounded once to
the output's dtype (to bfloat16 by _round_to_bf16, round half to even, so that the interpreter and the GPU
agree bit for bit). This module imports triton: import it only on the GPU path or under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _round_to_bf16


@triton.jit
def _job(jobs_ptr, job):
    row = jobs_ptr + job * 6
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5))


@triton.jit
def _store(out_ptr, offsets, v, mask):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = _round_to_bf16(v)  # exact in bf16 now: the store's conversion does not round again
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_tiled_kernel(src_ptr, jobs_ptr, out_ptr, IS_INT4: tl.constexpr, N_BLOCK: tl.constexpr,
                         STEP: tl.constexpr, EPB: tl.constexpr, K_BLOCK: tl.constexpr):
    """Grid (tile pairs per job, jobs). STEP: elements per 64-byte step (128 INT4, 64 INT8); EPB: elements per
    byte; N_BLOCK / K_BLOCK: the method's blocks (§3)."""
    job = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64)
    w_off, s_off, n, k, dst, stride = _job(jobs_ptr, job)
    steps = k // STEP
    r0 = (t // steps) * 32
    c0 = (t % steps) * STEP
    nb = (r0 // N_BLOCK) * N_BLOCK
    nbs = tl.minimum(n - nb, N_BLOCK)
    kb = (c0 // K_BLOCK) * K_BLOCK
    kbs = tl.minimum(k - kb, K_BLOCK)
    base = w_off + (nb * k + kb * nbs + (r0 - nb) * kbs + (c0 - kb) * 32) // EPB
    ri = tl.arange(0, 32)[:, None]
    cj = tl.arange(0, STEP)[None, :]
    cb = cj % 64  # the byte's column in the step (INT4: elements j and 64 + j share byte j)
    inner = (ri // 16) * 1024 + (cb // 4) * 64 + (ri % 16) * 4 + (cb % 4)
    valid = r0 < n  # programs past a shorter job's tiles (jobs of one table have equal tile counts)
    b = tl.load(src_ptr + base + inner, mask=valid, other=0).to(tl.int32)
    if IS_INT4:
        nib = tl.where(cj < 64, b & 0xF, b >> 4)
        q = nib - ((nib & 8) << 1)  # two's complement nibble
        mult = 16.0  # INT4 levels stand for multiples of 16 of the int8 grid
    else:
        q = b - ((b & 0x80) << 1)
        mult = 1.0
    scales = (src_ptr + s_off).to(tl.pointer_type(tl.float32))
    d = tl.load(scales + r0 + tl.arange(0, 32), mask=valid, other=0.0)
    v = q.to(tl.float32) * (d * mult)[:, None]
    _store(out_ptr, dst + (r0 + ri) * stride + c0 + cj, v, valid)


@triton.jit
def dequant_groups_kernel(src_ptr, jobs_ptr, out_ptr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (programs per job, jobs): 32 rows x BLOCK_K columns each; GROUP: columns per bf16 scale."""
    job = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64)
    w_off, s_off, n, k, dst, stride = _job(jobs_ptr, job)
    kblocks = (k + BLOCK_K - 1) // BLOCK_K
    rows = (t // kblocks) * 32 + tl.arange(0, 32)[:, None]
    cols = (t % kblocks) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    mask = (rows < n) & (cols < k)
    b = tl.load(src_ptr + w_off + rows * (k // 2) + cols // 2, mask=mask, other=0).to(tl.int32)
    u = (b >> ((cols & 1) * 4)) & 0xF
    scales = (src_ptr + s_off).to(tl.pointer_type(tl.uint16))
    s_bits = tl.load(scales + rows * (k // GROUP) + cols // GROUP, mask=mask, other=0).to(tl.int32)
    s = (s_bits << 16).to(tl.float32, bitcast=True)
    v = (u - 8).to(tl.float32) * s
    _store(out_ptr, dst + rows * stride + cols, v, mask)
