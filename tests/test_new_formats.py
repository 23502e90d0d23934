"""NVFP4 (ModelOpt and compressed-tensors) and MXFP8 sources: the reference decoders against values
worked out by hand from the published formats (docs/FORMAT.md §6), and the C++ packer (every ISA
available here) against kt's quantization of the reference-decoded weights, byte for byte."""
import struct

import numpy as np
import pytest
import torch

from kt_convert.kt_runtime.format.methods import INT4, INT8, METHODS
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.decoders import decode_mxfp8, decode_nvfp4, decode_source
from kt_convert.quant.reference import pack_reference
from helpers.numerics import available_isas

AVAILABLE_ISAS = available_isas()
RAWINT4 = METHODS["rawint4-g32"]


def f32(x: float) -> float:
    """x rounded to float32 (struct's 'f' is IEEE single, round to nearest even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16(x: float) -> float:
    """float32 x rounded to bfloat16, round to nearest even, by hand on the bits."""
    b = struct.unpack("<I", struct.pack("<f", x))[0]
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", b))[0]


# E2M1 codes and E4M3 / E8M0 bytes with their values, from the OCP MX and NVFP4 definitions
# (E2M1: sign bit 3, exponent bias 1; E4M3FN: bias 7, 0x7F NaN; E8M0: 2^(e-127)).
E2M1 = {0x3: 1.5, 0x7: 6.0, 0x9: -0.5, 0xF: -6.0, 0x0: 0.0, 0x5: 3.0}
E4M3 = {0x38: 1.0, 0x41: 2.25, 0x30: 0.5, 0x01: 2.0 ** -9, 0xC8: -4.0, 0x40: 2.0}


def nvfp4_row(codes: list[int]) -> np.ndarray:
    """Two codes per byte, the even column in the low nibble."""
    return np.array([[codes[i] | (codes[i + 1] << 4) for i in range(0, len(codes), 2)]], np.uint8)


@pytest.mark.parametrize("divides", [False, True])
def test_nvfp4_decode_by_hand(divides):
    # one row of 32 columns = two groups; group 0 scale 0x38 (1.0), group 1 scale 0x41 (2.25)
    codes = [0x3, 0x7, 0x9, 0xF, 0x2] + [0] * 11 + [0xF, 0x5] + [0] * 14
    g = 3.0
    got = decode_nvfp4(nvfp4_row(codes), np.array([[0x38, 0x41]], np.uint8), g, divides).float()[0]
    t0 = f32(1.0 / 3.0) if divides else 3.0  # ModelOpt multiplies by weight_scale_2, compressed-tensors divides
    t1 = 0.75 if divides else 6.75
    assert got[0].item() == bf16(f32(1.5 * t0))
    assert got[1].item() == bf16(f32(6.0 * t0))
    assert got[2].item() == bf16(f32(-0.5 * t0))
    assert got[3].item() == bf16(f32(-6.0 * t0))
    assert got[16].item() == (-4.5 if divides else -40.5)  # -6 * t1, exact in bf16
    assert got[17].item() == (2.25 if divides else 20.25)
    # code 0x2 is 1.0: 1.0 * fl32(1 / 3) = 0x3EAAAAAB, whose bf16 rounding is 0x3EAB (0.333984375)
    assert got[4].item() == (0.333984375 if divides else 3.0)


def test_nvfp4_divide_and_multiply_differ_where_rounding_matters():
    """fl32(s / g) is not fl32(s * fl32(1 / g)): the two layouts keep their own operation."""
    g = 0.1  # a float32 that is not a power of two
    codes = [0x3] * 16
    mul = decode_nvfp4(nvfp4_row(codes), np.array([[0x38]], np.uint8), f32(g), False).float()[0, 0].item()
    div = decode_nvfp4(nvfp4_row(codes), np.array([[0x38]], np.uint8), f32(g), True).float()[0, 0].item()
    assert mul == bf16(f32(1.5 * f32(g)))
    assert div == bf16(f32(1.5 * f32(1.0 / f32(g))))
    assert abs(div - 15.0) < 0.1 and abs(mul - 0.15) < 0.001


def test_mxfp8_decode_by_hand():
    w = np.array([[0x40, 0xC8, 0x01, 0x38] + [0] * 28 + [0x41] + [0] * 31], np.uint8)
    s = np.array([[126, 130]], np.uint8)  # 2^-1, 2^3
    got = decode_mxfp8(w, s).float()[0]
    assert got[:4].tolist() == [1.0, -2.0, 2.0 ** -10, 0.5]
    assert got[32].item() == 18.0
    # kt reads E8M0 0 as 0 (the byte in the fp32 exponent field) and 255 as inf
    zero = decode_mxfp8(np.full((1, 32), 0x38, np.uint8), np.array([[0]], np.uint8)).float()
    assert (zero == 0).all()
    inf = decode_mxfp8(np.full((1, 32), 0x38, np.uint8), np.array([[255]], np.uint8)).float()
    assert torch.isinf(inf).all()


def _nvfp4(rng, n, k, divides):
    w = np.frombuffer(rng.bytes(n * k // 2), np.uint8).reshape(n, k // 2).copy()
    s = rng.integers(0x20, 0x58, size=(n, k // 16), dtype=np.uint8)  # E4M3 0.0078..12, no NaN
    s[0, 0] = 0  # a zero group scale
    return SourceMatrix("nvfp4", w, s, global_scale=f32(0.0123), global_divides=divides)


def _mxfp8(rng, n, k):
    w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    w[(w & 0x7F) == 0x7F] = 0x30  # no NaN codes
    w[0, :16] = np.arange(16)  # subnormal E4M3 codes
    s = rng.integers(115, 132, size=(n, k // 32), dtype=np.uint8)
    s[1, 0] = 0  # kt's E8M0 0 reads as 0
    return SourceMatrix("mxfp8", w, s)


SOURCES = {"nvfp4-modelopt": lambda rng, n, k: _nvfp4(rng, n, k, False),
           "nvfp4-ct": lambda rng, n, k: _nvfp4(rng, n, k, True),
           "mxfp8": _mxfp8}


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8, RAWINT4], ids=lambda m: m.name)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_cpu_packer_equals_kt_quantization_of_the_decoded_weights(source, method, isa):
    rng = np.random.default_rng(7)
    n, k = 64, 384
    src = SOURCES[source](rng, n, k)
    ref_w, ref_s, _ = pack_reference(decode_source(src), method)
    dst = PackTarget.empty(method, n, k)
    assert pack_cpu(method, [(src, 0, k, dst)], isa=isa) == [0]
    assert np.array_equal(dst.weight, ref_w.numpy().reshape(-1))
    ref_bits = ref_s.contiguous().view(torch.int16 if ref_s.dtype == torch.bfloat16 else torch.int32).numpy()
    assert np.array_equal(dst.scales.view(np.uint8), ref_bits.view(np.uint8).reshape(-1))
    # a column slice (the NUMA shard of down) decodes the same columns
    half = k // 3 if method is not INT4 else 128
    dst2 = PackTarget.empty(method, n, k - half)
    pack_cpu(method, [(src, half, k - half, dst2)], isa=isa)
    ref2, _, _ = pack_reference(decode_source(src)[:, half:], method)
    assert np.array_equal(dst2.weight, ref2.numpy().reshape(-1))


def test_int8_scale_of_an_nvfp4_row_by_hand():
    """One NVFP4 row whose largest value is 6 * fl32(2.25 * 3) = 40.5: kt's INT8 scale fl32(40.5 * fl32(1/127))."""
    codes = [0x7] * 64
    codes[5] = 0xF  # -6
    w = nvfp4_row(codes)
    s = np.array([[0x38, 0x38, 0x38, 0x41]], np.uint8)
    src = SourceMatrix("nvfp4", np.repeat(w, 32, axis=0), np.repeat(s, 32, axis=0), global_scale=3.0)
    dst = PackTarget.empty(INT8, 32, 64)
    pack_cpu(INT8, [(src, 0, 64, dst)])
    expected = f32(40.5 * f32(1.0 / 127.0))
    assert dst.scales[0] == np.float32(expected)


def test_nonfinite_nvfp4_and_mxfp8_values_are_counted():
    # E4M3 NaN scale (0x7F) in NVFP4; E8M0 255 (inf) in MXFP8
    w = np.full((32, 32), 0x22, np.uint8)
    s = np.full((32, 4), 0x38, np.uint8)
    s[3, 1] = 0x7F
    dst = PackTarget.empty(INT8, 32, 64)
    assert pack_cpu(INT8, [(SourceMatrix("nvfp4", w, s, global_scale=1.0), 0, 64, dst)]) == [16]
    w8 = np.full((32, 64), 0x38, np.uint8)
    s8 = np.full((32, 2), 127, np.uint8)
    s8[0, 1] = 255
    assert pack_cpu(INT8, [(SourceMatrix("mxfp8", w8, s8), 0, 64, dst)]) == [32]


@pytest.mark.parametrize("g", [0.0, -1.0, float("inf"), float("nan")])
def test_packer_refuses_a_bad_global_scale(g):
    src = SourceMatrix("nvfp4", np.zeros((32, 32), np.uint8), np.zeros((32, 4), np.uint8), global_scale=g)
    with pytest.raises(ValueError, match="global_scale"):
        pack_cpu(INT8, [(src, 0, 64, PackTarget.empty(INT8, 32, 64))])
