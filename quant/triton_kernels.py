"""Fused Triton kernel: decode -> per-row amax -> kt AMXINT4/AMXINT8 quantization -> AMX tiling.

One program packs one group of 32 rows of one job (a source matrix slice) over its whole K:
pass 1 decodes the rows and takes their amax; pass 2 decodes them again, quantizes with kt's
exact fp32 rounding and stores each (32 rows x 64 bytes) step as one 2048-byte AMX tile pair at
its closed-form offset (docs/FORMAT.md §3). Only packed bytes and scales are written.

Numerics match quant.kt_quant / kernels_cpp bit for bit: kt's DAZ on the quantizer's inputs and FTZ
on the scale written out by hand, the scale in fp64 (libdevice div_rn, never Triton's approximate '/',
see _ftz_to_f32), multiply by fl32(1/d), rint (round half to even), cvtps2dq's out-of-range ->
INT32_MIN, INT4's ties-away 4-bit rounding. Source decoding is IEEE. Non-finite source values become 0
and are counted per job. This module imports triton: import it only on the GPU path.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton versions
    from triton.language.extra.cuda import libdevice

# Source kinds (quant.cpu.SourceMatrix.kind); int4_group splits by scale dtype.
KIND_BF16 = 0
KIND_F32 = 1
KIND_F16 = 2
KIND_MXFP4 = 3
KIND_FP8_BLOCK = 4
KIND_INT4_GROUP_BF16 = 5
KIND_INT4_GROUP_F32 = 6
KIND_NVFP4 = 7  # ModelOpt: group scale * global scale
KIND_NVFP4_DIV = 8  # compressed-tensors: group scale / global scale
KIND_MXFP8 = 9

# Per-job metadata (int64), in this order.
META_FIELDS = ("w_off", "w_row", "s_off", "s_row", "s_row0", "block_n", "block_k", "n", "k", "col0", "out_off",
               "scale_off", "g_bits")
META = len(META_FIELDS)

ROWS = 32  # rows per program: one AMX row group

if os.environ.get("TRITON_INTERPRET") == "1":
    # The CPU interpreter (tests without a GPU) has no libdevice; its numpy arithmetic is IEEE.
    @triton.jit
    def _div_rn(a, b):
        return a / b

    @triton.jit
    def _rint(y):  # RNE for |y| < 2^22; larger values are clamped to int8 by the caller anyway
        return (y + 12582912.0) - 12582912.0
else:
    @triton.jit
    def _div_rn(a, b):
        return libdevice.div_rn(a, b)  # IEEE division, round to nearest even

    @triton.jit
    def _rint(y):
        return libdevice.rint(y)  # round half to even (a subnormal y rounds to 0 either way)


# Triton links libdevice with nvvm-reflect-ftz (its fp32 functions flush subnormals; plain fp32
# multiplies, as in _decode, are IEEE). So the quantizer's inputs are flushed by a bit test (kt's
# DAZ), and the scale arithmetic runs in fp64 (never flushed) with kt's FTZ applied by hand
# (quant.kt_quant.ftz_to_float32): an fp32 * fp32 product is exact in fp64, so one rounding of it is
# fl32(amax * fl32(1/127)); fp32 operands divided in fp64 and rounded once to fp32 give the IEEE fp32
# quotient (53 >= 2 * 24 + 2). Every fp64 -> fp32 conversion here has a normal result.
@triton.jit
def _f64_bits(like, bits):
    return (tl.zeros_like(like).to(tl.int64) + bits).to(tl.float64, bitcast=True)


@triton.jit
def _ftz_to_f32(y):
    """fp64 >= 0 -> fp32 as x86 FTZ rounds it: 0 below 2^-126 * (1 - 2^-25), 2^-126 up to 2^-126,
    else round to nearest even."""
    flt_min = _f64_bits(y, 0x3810000000000000)  # 2^-126
    ftz_below = _f64_bits(y, 0x380FFFFFF0000000)  # 2^-126 * (1 - 2^-25)
    rounded = tl.where(y < flt_min, flt_min, y).to(tl.float32)
    return tl.where(y < ftz_below, 0.0, rounded)


@triton.jit
def _bits_to_f32(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_bf16(x):
    """torch's float -> bfloat16 (RNE, NaN kept), back as float."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + ((b >> 16) & 1) + 0x7FFF) & -65536  # -65536 == 0xFFFF0000
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return _bits_to_f32(tl.where(nan, b, r))


@triton.jit
def _nibble(in_ptr, w_off, w_row, rows, cols):
    """4-bit code of column `cols` in packed rows: low nibble = even column."""
    byte = tl.load(in_ptr + w_off + rows * w_row + (cols >> 1)).to(tl.int32)
    return tl.where((cols & 1) == 1, byte >> 4, byte & 0xF)


@triton.jit
def _e2m1(nib):
    """E2M1 code (bit 3 sign) -> fp32, exact."""
    mag = nib & 7
    ex = mag >> 1
    m = mag & 1
    vbits = tl.where(ex == 0, m * (126 << 23), ((ex + 126) << 23) | (m << 22))
    return _bits_to_f32(vbits | ((nib & 8) << 28))


@triton.jit
def _e4m3(byte):
    """F8_E4M3FN byte (int32) -> fp32, exact (0x7F/0xFF -> NaN)."""
    mag = byte & 0x7F
    normal = _bits_to_f32((mag << 20) + (120 << 23))
    sub = mag.to(tl.float32) * 0.001953125  # mag * 2^-9, exact
    v = tl.where((mag >> 3) == 0, sub, normal)
    v = tl.where(mag == 0x7F, _bits_to_f32(tl.zeros_like(mag) + 0x7FC00000), v)
    return tl.where((byte & 0x80) != 0, -v, v)


@triton.jit
def _decode(in_ptr, w_off, w_row, s_off, s_row, s_row0, block_n, block_k, g_bits, rows, cols, KIND: tl.constexpr):
    """fp32 values of source rows `rows` ([R, 1], job-local) at source columns `cols` ([1, C]);
    g_bits: nvfp4's per-tensor scale as fp32 bits."""
    if KIND == 0:  # bf16 bits
        p = (in_ptr + w_off).to(tl.pointer_type(tl.uint16))
        bits = tl.load(p + rows * (w_row // 2) + cols).to(tl.int32)
        x = _bits_to_f32(bits << 16)
    elif KIND == 1:  # f32, already bf16-exact
        p = (in_ptr + w_off).to(tl.pointer_type(tl.float32))
        x = tl.load(p + rows * (w_row // 4) + cols)
    elif KIND == 2:  # IEEE half -> fp32 (exact) -> bf16 RNE
        p = (in_ptr + w_off).to(tl.pointer_type(tl.float16))
        x = _round_to_bf16(tl.load(p + rows * (w_row // 2) + cols).to(tl.float32))
    elif KIND == 3:  # MXFP4: E2M1 code * E8M0 scale (byte in the fp32 exponent field)
        v = _e2m1(_nibble(in_ptr, w_off, w_row, rows, cols))
        e = tl.load(in_ptr + s_off + rows * s_row + (cols >> 5)).to(tl.int32)
        x = v * _bits_to_f32(e << 23)
    elif KIND == 7 or KIND == 8:  # NVFP4: E2M1 * fl32(E4M3 group scale * or / the per-tensor scale), to bf16
        v = _e2m1(_nibble(in_ptr, w_off, w_row, rows, cols))
        s = _e4m3(tl.load(in_ptr + s_off + rows * s_row + (cols >> 4)).to(tl.int32))
        g = _bits_to_f32((tl.zeros_like(s).to(tl.int64) + g_bits).to(tl.int32))
        if KIND == 7:
            t = s * g
        else:
            t = _div_rn(s, g)
        x = _round_to_bf16(v * t)
    elif KIND == 9:  # MXFP8: E4M3FN * E8M0 (byte in the fp32 exponent field), to bf16
        v = _e4m3(tl.load(in_ptr + w_off + rows * w_row + cols).to(tl.int32))
        e = tl.load(in_ptr + s_off + rows * s_row + (cols >> 5)).to(tl.int32)
        x = _round_to_bf16(v * _bits_to_f32(e << 23))
    elif KIND == 4:  # FP8 E4M3FN * float32 block scale, rounded to bf16
        byte = tl.load(in_ptr + w_off + rows * w_row + cols).to(tl.int32)
        v = _e4m3(byte)
        sp = (in_ptr + s_off).to(tl.pointer_type(tl.float32))
        s = tl.load(sp + ((s_row0 + rows) // block_n) * (s_row // 4) + cols // block_k)
        x = _round_to_bf16(v * s)
    else:  # INT4 group (compressed-tensors): (u - 8) * scale, rounded to bf16
        u = _nibble(in_ptr, w_off, w_row, rows, cols)
        if KIND == 5:
            sp = (in_ptr + s_off).to(tl.pointer_type(tl.uint16))
            s = _bits_to_f32(tl.load(sp + rows * (s_row // 2) + cols // block_k).to(tl.int32) << 16)
        else:
            sp = (in_ptr + s_off).to(tl.pointer_type(tl.float32))
            s = tl.load(sp + rows * (s_row // 4) + cols // block_k)
        x = _round_to_bf16((u - 8).to(tl.float32) * s)
    return x


@triton.jit
def _finite(x):
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def _quantizer_input(x):
    """What kt's quantizer reads: non-finite values (counted in pass 1) and subnormals (DAZ) as 0."""
    e = x.to(tl.int32, bitcast=True) & 0x7F800000
    return tl.where((e != 0x7F800000) & (e != 0), x, 0.0)


@triton.jit
def _quantize(x, inv, IS_INT4: tl.constexpr):
    """kt's rounding of x * inv: cvtps2dq (RNE; NaN / out of int32 -> INT32_MIN), saturate to
    int8, and for INT4 the int8 grid value to a 4-bit level with ties away from zero."""
    y = x * inv
    v = tl.where(tl.abs(y) < 2147483648.0, _rint(y), -2147483648.0)
    v = tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int32)
    if IS_INT4:
        a = tl.abs(v)
        r = ((a + 8) & 0xF0) >> 4
        v = tl.where(v < 0, -r, r)
    return v


@triton.jit
def pack_kernel(in_ptr, out_ptr, scale_ptr, count_ptr, jobs_ptr, tasks_ptr, task_base,
                KIND: tl.constexpr, IS_INT4: tl.constexpr, N_BLOCK: tl.constexpr, EPB: tl.constexpr,
                STEP: tl.constexpr, K_BLOCK: tl.constexpr, LEVELS: tl.constexpr, RECIP_F64_BITS: tl.constexpr):
    """The method's row (kt_runtime.format.methods) as constants: IS_INT4: 4-bit weights; N_BLOCK: rows per
    N-block; EPB: elements per byte; STEP = 64 * EPB elements per 64-byte step of a tile pair; K_BLOCK:
    elements per K-block; LEVELS: d = amax / LEVELS; RECIP_F64_BITS: the fp64 bits of fl32(1 / LEVELS) when
    the method multiplies by it (FP32_RECIPROCAL), 0 when it divides in fp64 (FP64_DIVIDE).
    Programs: one per (job, 32-row group) task."""

    task = tl.program_id(0).to(tl.int64) + task_base
    job = tl.load(tasks_ptr + 2 * task)
    row0 = tl.load(tasks_ptr + 2 * task + 1)
    meta = jobs_ptr + job * 13  # len(META_FIELDS)
    w_off = tl.load(meta + 0)
    w_row = tl.load(meta + 1)
    s_off = tl.load(meta + 2)
    s_row = tl.load(meta + 3)
    s_row0 = tl.load(meta + 4)
    block_n = tl.load(meta + 5)
    block_k = tl.load(meta + 6)
    n = tl.load(meta + 7)
    k = tl.load(meta + 8)
    col0 = tl.load(meta + 9)
    out_off = tl.load(meta + 10)
    scale_off = tl.load(meta + 11)
    g_bits = tl.load(meta + 12)

    r = tl.arange(0, 32)
    ri = r[:, None]
    rows = row0 + ri  # [32, 1] job-local rows
    cj = tl.arange(0, 64)[None, :]  # [1, 64]

    # pass 1: per-row amax of the finite values on the bits (subnormals read as 0: kt's DAZ), and
    # the count of non-finite values
    amax_bits = tl.zeros([32], dtype=tl.int32)
    bad = tl.zeros([32, 64], dtype=tl.int32)
    for kk in range(0, k, 64):
        x = _decode(in_ptr, w_off, w_row, s_off, s_row, s_row0, block_n, block_k, g_bits, rows, col0 + kk + cj, KIND)
        fin = _finite(x)
        bad += tl.where(fin, 0, 1)
        abs_bits = tl.where(fin, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        abs_bits = tl.where(abs_bits < 0x00800000, 0, abs_bits)
        amax_bits = tl.maximum(amax_bits, tl.max(abs_bits, axis=1))
    tl.atomic_add(count_ptr + job, tl.sum(bad))

    # kt's scale (FTZ): INT8 fl32(amax * fl32(1/127)); INT4 fl32((double)amax / 112.0); id = fl32(1 / d)
    amax = amax_bits.to(tl.float32, bitcast=True).to(tl.float64)  # 0 or normal: exact
    if RECIP_F64_BITS == 0:
        d = _ftz_to_f32(_div_rn(amax, tl.zeros_like(amax) + LEVELS))
    else:
        d = _ftz_to_f32(amax * _f64_bits(amax, RECIP_F64_BITS))  # INT8: fl32(1/127) = 0x3c010204, exact product
    nz = d != 0.0
    inv = _div_rn(tl.zeros_like(amax) + 1.0, tl.where(nz, d, 1.0).to(tl.float64)).to(tl.float32)
    inv = tl.where(nz, inv, 0.0)
    tl.store(scale_ptr + scale_off + row0 + r, d)
    inv2 = inv[:, None]

    # pass 2: quantize and store each 64-byte step as one tile pair at its closed-form offset
    nb = (row0 // N_BLOCK) * N_BLOCK
    nbs = tl.minimum(n - nb, N_BLOCK)
    ns = row0 - nb
    inner = (ri // 16) * 1024 + (cj // 4) * 64 + (ri % 16) * 4 + (cj % 4)  # [32, 64] in the tile pair
    for kk in range(0, k, STEP):
        kb = (kk // K_BLOCK) * K_BLOCK
        kbs = tl.minimum(k - kb, K_BLOCK)
        base = out_off + (nb * k + kb * nbs + ns * kbs + (kk - kb) * 32) // EPB
        x0 = _decode(in_ptr, w_off, w_row, s_off, s_row, s_row0, block_n, block_k, g_bits, rows, col0 + kk + cj, KIND)
        q0 = _quantize(_quantizer_input(x0), inv2, IS_INT4)
        if IS_INT4:  # byte j of a 128-wide step holds elements j (low nibble) and 64 + j (high)
            x1 = _decode(in_ptr, w_off, w_row, s_off, s_row, s_row0, block_n, block_k, g_bits, rows,
                         col0 + kk + 64 + cj, KIND)
            q1 = _quantize(_quantizer_input(x1), inv2, IS_INT4)
            byte = (q0 & 0xF) | ((q1 & 0xF) << 4)
        else:
            byte = q0 & 0xFF
        tl.store(out_ptr + base + inner, byte.to(tl.uint8))
