"""Exactness to the kt-kernel that users run. kt-kernel is built with -O3 -ffast-math (kt's CMake,
GCC 12): GCC compiles the INT8 scale `amax / 127` as `amax * fl32(1/127)`, and crtfastmath.o turns
on FTZ and DAZ for the process that imports it. The torch reference and the C++ packer (every ISA
here, 1-4 threads) must give those bytes, whatever FTZ/DAZ/rounding state the process is in.

Oracles that do not share code with the packers: values measured against kt's compiled converter
(hard-coded), IEEE float32 enumeration in numpy, and kt's own instruction sequence replayed in numpy
float32 on this CPU with FTZ and DAZ switched on in MXCSR (numpy's float ops are SSE/AVX
instructions that obey it), which is the state kt-kernel leaves the process in."""
import contextlib

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from helpers.numerics import (INT8_RECIP_BITS, available_isas, fp8_subnormal_decode_rows, ftz_window_rows,
                              int8_recip_mantissas, kt_special_rows)
from kt_convert.kt_kernels import _testing
from kt_convert.kt_runtime.format.methods import INT4, INT8
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.kt_quant import quantize_rows, row_scales
from kt_convert.quant.reference import pack_reference

AVAILABLE_ISAS = available_isas()

MXCSR_IEEE = 0x1F80  # exceptions masked, round to nearest even, no FTZ/DAZ
FTZ, DAZ, ROUND_DOWN, ROUND_UP, ROUND_ZERO = 0x8000, 0x0040, 0x2000, 0x4000, 0x6000
C = np.uint32(INT8_RECIP_BITS).view(np.float32)


@contextlib.contextmanager
def mxcsr(value):
    """This thread's MXCSR set to value for the block (threads created meanwhile inherit it)."""
    old = _testing.set_mxcsr(value)
    try:
        yield
    finally:
        _testing.set_mxcsr(old)


def f32(bits):
    return np.uint32(bits).view(np.float32)


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def kt_on_this_cpu(x: np.ndarray, method) -> tuple[np.ndarray, np.ndarray]:
    """kt's _pack_block arithmetic as GCC compiles it (amx_kernels.hpp / amx_buffers.hpp), run with
    FTZ and DAZ on: amax = max|x|; INT8 d = amax * fl32(1/127) (mulss), INT4 d = fl32((double)amax *
    fl64(1/112)) (cvtss2sd, mulsd, cvtsd2ss); id = d ? 1/d : 0; q = rint(x * id) saturated; INT4 then
    round_4bit. Returns (q int8 [n, k] (INT4: levels -7..7), d float32 [n])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with mxcsr(MXCSR_IEEE | FTZ | DAZ), np.errstate(all="ignore"):
        amax = np.abs(x).max(axis=1)
        if method is INT8:
            d = amax * C
        else:
            d = (amax.astype(np.float64) * (1.0 / 112.0)).astype(np.float32)
        nz = d != 0
        inv = np.where(nz, np.float32(1) / np.where(nz, d, np.float32(1)), np.float32(0)).astype(np.float32)
        v = np.clip(np.rint(x * inv[:, None]), -128, 127).astype(np.int32)
    if method is INT4:
        r = ((np.abs(v) + 8) & 0xF0) >> 4
        v = np.where(v < 0, -r, r)
    return v.astype(np.int8), d


def _cpu_pack(method, src, k, isa, threads):
    dst = PackTarget.empty(method, src.shape[0], k)
    bad = pack_cpu(method, [(src, 0, k, dst)], isa=isa, num_threads=threads)
    return dst, bad[0]


# -- the INT8 scale constant ---------------------------------------------------------------------


def test_six_bf16_mantissas_differ_between_the_division_and_kts_multiplication():
    assert f32(INT8_RECIP_BITS) == np.float32(1) / np.float32(127)
    assert int8_recip_mantissas() == [0x0F, 0x10, 0x2F, 0x4F, 0x50, 0x6F]
    for m in int8_recip_mantissas():
        for exp in (1 + 7, 100, 127, 200, 254):  # every exponent with a normal scale behaves alike
            a = np.float32(f32((exp << 23) | (m << 16)))
            ours = row_scales(torch.tensor([a]), INT8).numpy()
            assert bits(ours) == bits(a * C) == bits(a / np.float32(127)) - 1, (hex(m), exp)


def test_known_kt_int8_scales():
    """Scales read from files made by kt's compiled converter (and the x86 FTZ rule below)."""
    for amax, kt_bits in ((0.0703125, 0x3A112244), (1.125, 0x3C112244), (127.0, 0x3F800000)):
        row = torch.zeros(32, 64, dtype=torch.bfloat16)
        row[:, 3] = -amax
        for d in (pack_reference(row, INT8)[1].numpy(), _cpu_pack(INT8, SourceMatrix(
                "bf16", row.view(torch.uint16).numpy()), 64, "auto", 2)[0].scales):
            assert (bits(d) == kt_bits).all(), (amax, hex(int(bits(d)[0])))
    assert bits(np.float32(0.0703125) / np.float32(127)) == 0x3A112245  # what the plain division gives


def test_int4_scale_multiplies_by_the_double_reciprocal_like_the_division():
    """GCC compiles kt's INT4 `amax / 112.0` as a multiplication by fl64(1/112); for every float32
    amax in these binades (around the FTZ threshold and at the top) both give the same float32 and
    the same flush decision."""
    m = np.arange(1 << 23, dtype=np.uint32)
    for exp in (6, 7, 8, 254):
        a = ((np.uint32(exp) << 23) | m).view(np.float32).astype(np.float64)
        assert np.array_equal(bits((a / 112.0).astype(np.float32)), bits((a * (1.0 / 112.0)).astype(np.float32)))
        t = 2.0**-126 * (1 - 2.0**-25)
        assert np.array_equal(a / 112.0 < t, a * (1.0 / 112.0) < t)


# -- FTZ / DAZ -------------------------------------------------------------------------------------


def test_this_cpu_flushes_after_rounding():
    """x86 FTZ decides tininess after rounding: a result that rounds (to 24 bits, unbounded exponent)
    up to 2^-126 is kept; one below 2^-126 * (1 - 2^-25) is flushed."""
    with mxcsr(MXCSR_IEEE | FTZ | DAZ), np.errstate(all="ignore"):
        up = np.float32(f32(0x03FE0000)) * C  # exact 2^-126 * (1 - 2^-28)
        tie = np.float32(2.0**-126 * (1 - 2.0**-25))  # the midpoint: rounds to even, up
        below = np.float32(2.0**-126 * (1 - 2.0**-25 - 2.0**-40))
        sub = np.float32(f32(0x00700000)) * np.float32(1.0)  # DAZ: read as 0
    assert bits(up) == bits(tie) == 0x00800000
    assert bits(below) == 0 and bits(sub) == 0
    with np.errstate(all="ignore"):  # IEEE: the same value below the threshold stays subnormal
        assert bits(np.float32(2.0**-126 * (1 - 2.0**-25 - 2.0**-40))) == 0x00800000
        assert bits(np.float32(2.0**-126 * (1 - 2.0**-24 - 2.0**-26))) == 0x007FFFFF


@pytest.mark.parametrize("method", [INT4, INT8])
def test_scales_around_the_ftz_threshold_match_this_cpu(method):
    """Every float32 amax from 2^-122 to 2^-118 (INT8 results on both sides of 2^-126, INT4 too):
    the reference's explicit FTZ equals the hardware's."""
    amax = np.arange(0x02800000, 0x04800000, dtype=np.uint32).view(np.float32)
    ours = row_scales(torch.from_numpy(amax), method).numpy()
    x = np.zeros((amax.size, 1), np.float32)
    x[:, 0] = amax
    _, kt = kt_on_this_cpu(x, method)
    assert np.array_equal(bits(ours), bits(kt))
    assert (ours == 0).any() and (bits(ours) == 0x00800000).any()


@pytest.mark.parametrize("method", [INT4, INT8])
def test_reference_equals_kt_replayed_on_this_cpu(method):
    w = kt_special_rows()
    q, d, bad = quantize_rows(w, method)
    kq, kd = kt_on_this_cpu(w.float().numpy(), method)
    assert bad == 0
    assert np.array_equal(bits(d.numpy()), bits(kd))
    assert np.array_equal(q.numpy(), kq)


def test_special_rows_give_the_expected_values():
    """A few rows of kt_special_rows checked against values worked out by hand."""
    w = kt_special_rows()
    amax = w.float().abs().amax(dim=1)
    by_amax = {int(b) >> 16: i for i, b in reversed(list(enumerate(amax.view(torch.int32))))}  # first row wins
    q8, d8, _ = quantize_rows(w, INT8)
    q4, d4, _ = quantize_rows(w, INT4)
    sub = [i for i in range(w.shape[0]) if 0 < amax[i] < 2.0**-126]  # rows of subnormals only
    assert len(sub) == 3
    for i in sub:
        assert d8[i] == 0 and d4[i] == 0 and not q8[i].any() and not q4[i].any()
    i = by_amax[0x03FE]  # INT8: 2^-126 * (1 - 2^-28) rounds up to 2^-126; INT4 normal
    assert bits(d8[i].numpy()) == 0x00800000 and q8[i].abs().max() == 127
    i = by_amax[0x03F0]  # INT8 flushed: d = 0 and all quants 0 (not -8 nibbles / INT32_MIN)
    assert d8[i] == 0 and not q8[i].any() and d4[i] > 0
    i, j = by_amax[0x03E0], by_amax[0x03DF]  # INT4: 1.75 * 2^-120 / 112 = 2^-126; just below -> 0
    assert bits(d4[i].numpy()) == 0x00800000 and d4[j] == 0 and not q4[j].any()
    i = by_amax[0x0380]  # 2^-120: both flushed
    assert d8[i] == 0 and d4[i] == 0 and not q8[i].any() and not q4[i].any()
    # d = 2^-126 with subnormal elements: they read as 0 (0x0070 * 2^126 would be 0.875 -> 1)
    daz = [i for i in range(w.shape[0]) if amax[i] == _bf16(0x03FE) and int(w[i, 1].view(torch.int16)) == 0x0070]
    assert len(daz) == 1
    assert q8[daz[0], 1:9].tolist() == [0, 0, 0, 0, 0, 1, -1, 2]
    # one huge value: d = fl32(bf16max * fl32(1/127)), the rest quantize to 0
    huge = [i for i in range(w.shape[0]) if amax[i] == _bf16(0x7F7F)]
    assert len(huge) == 2
    for i in huge:
        assert bits(d8[i].numpy()) == bits(np.float32(_bf16(0x7F7F)) * C)
        assert (q8[i].abs() == 127).sum() == 1 and (q8[i] == 0).sum() == w.shape[1] - 1
        assert (q4[i].abs() == 7).sum() == 1 and (q4[i] == 0).sum() == w.shape[1] - 1
    # ties: INT8 d = 1 row and INT4 d = 1 row
    i = [i for i in range(w.shape[0]) if amax[i] == 127 and w[i, 1] == 0.5][0]
    assert q8[i, :12].tolist() == [127, 0, 2, 2, -2, 0, 4, 126, -126, 64, 64, -2] and d8[i] == 1
    i = [i for i in range(w.shape[0]) if amax[i] == 112 and w[i, 1] == 7.5][0]
    assert q4[i, :14].tolist() == [7, 1, 1, 1, 2, 2, 7, 7, -1, -1, -2, -2, 3, 4] and d4[i] == 1
    for i in range(w.shape[0]):
        if amax[i] == 0:
            assert d8[i] == 0 and d4[i] == 0 and not q8[i].any() and not q4[i].any()


def _bf16(bits16):
    return float(np.uint32(bits16 << 16).view(np.float32))


# -- the C++ packer --------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
def test_cpu_packer_equals_reference_on_special_rows(isa, method):
    w = kt_special_rows()
    ref_w, ref_s, _ = pack_reference(w, method)
    src = SourceMatrix("bf16", w.view(torch.uint16).numpy())
    for threads in (1, 2, 3, 4):
        dst, bad = _cpu_pack(method, src, w.shape[1], isa, threads)
        assert bad == 0
        assert np.array_equal(dst.weight, ref_w.numpy()), f"{isa} threads={threads}"
        assert np.array_equal(bits(dst.scales), bits(ref_s.numpy())), f"{isa} threads={threads}"


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
def test_cpu_packer_scales_at_the_ftz_threshold(isa, method):
    x = ftz_window_rows(method)
    kq, kd = kt_on_this_cpu(x, method)
    ref_w, ref_s, _ = pack_reference(torch.from_numpy(x), method)
    dst, _ = _cpu_pack(method, SourceMatrix("f32", x), x.shape[1], isa, 2)
    assert np.array_equal(bits(dst.scales), bits(kd)) and np.array_equal(bits(ref_s.numpy()), bits(kd))
    assert np.array_equal(dst.weight, ref_w.numpy())
    assert np.array_equal(quantize_rows(torch.from_numpy(x), method)[0].numpy(), kq)
    assert (kd == 0).any() and (bits(kd) == 0x00800000).any() and (kd > 2.0**-126).any()


def test_fp8_decode_stays_ieee():
    _, full = fp8_subnormal_decode_rows()
    b = full.view(torch.int16).numpy().astype(np.uint16)
    assert (b[:, 0] == 0x03FE).all() and (b[0, 128:] == 0x0080).all() and (b[1, 130:200] == 0x0040).all()
    q, d, _ = quantize_rows(full, INT8)
    assert (bits(d.numpy()) == 0x00800000).all()
    assert (q[0, 128:] == 1).all() and (q[1, 130:200] == 0).all()


@pytest.mark.parametrize("state", [FTZ | DAZ, FTZ | DAZ | ROUND_ZERO, ROUND_UP, DAZ | ROUND_DOWN, "torch"],
                         ids=["ftz_daz", "ftz_daz_toward_zero", "round_up", "daz_round_down", "torch_flush_denormal"])
def test_cpu_packer_bytes_do_not_depend_on_the_process_fp_state(state):
    """Another library (kt-kernel itself, torch.set_flush_denormal, ...) may leave FTZ/DAZ or another
    rounding mode in MXCSR. The packer sets its own: same bytes on every ISA and thread count (pools
    created under the changed state inherit it)."""
    fp8_src, fp8_full = fp8_subnormal_decode_rows()
    cases = [(SourceMatrix("bf16", kt_special_rows().view(torch.uint16).numpy()), kt_special_rows()),
             (fp8_src, fp8_full)]
    expected = {(m.name, i): pack_reference(full, m)[:2] for m in (INT4, INT8) for i, (_, full) in enumerate(cases)}
    if state == "torch":
        set_state = contextlib.nullcontext()
        torch.set_flush_denormal(True)
    else:
        set_state = mxcsr(MXCSR_IEEE | state)
    try:
        with set_state:
            packed = {}
            for isa in AVAILABLE_ISAS:
                for threads in (1, 3, 4, 7):
                    for m in (INT4, INT8):
                        for i, (src, full) in enumerate(cases):
                            packed[(isa, threads, m.name, i)] = _cpu_pack(m, src, full.shape[1], isa, threads)[0]
            if state != "torch":  # the packer restored this thread's state
                assert (_testing.set_mxcsr(MXCSR_IEEE | state) & 0xFFC0) == (MXCSR_IEEE | state)
    finally:
        torch.set_flush_denormal(False)
    for (isa, threads, name, i), dst in packed.items():
        ref_w, ref_s = expected[(name, i)]
        assert np.array_equal(dst.weight, ref_w.numpy()), (isa, threads, name, i)
        assert np.array_equal(bits(dst.scales), bits(ref_s.numpy())), (isa, threads, name, i)


def test_reference_quantizer_does_not_depend_on_the_process_fp_state():
    w = kt_special_rows()
    x = ftz_window_rows(INT8)
    want = [quantize_rows(t, m) for t in (w, torch.from_numpy(x)) for m in (INT4, INT8)]
    with mxcsr(MXCSR_IEEE | FTZ | DAZ):
        got = [quantize_rows(t, m) for t in (w, torch.from_numpy(x)) for m in (INT4, INT8)]
    for (q0, d0, _), (q1, d1, _) in zip(want, got):
        assert torch.equal(q0, q1) and np.array_equal(bits(d0.numpy()), bits(d1.numpy()))
