"""Every checkpoint family: the new source decoders (C++ packer on every ISA here against the torch
reference, byte for byte) and end-to-end conversion of every family's synthetic checkpoint against
the reference quantizer applied to that family's bf16 decode."""
import numpy as np
import pytest
import torch

import kt_kernels
from quant import INT4, INT8
from quant.cpu import PackTarget, SourceMatrix, pack_cpu
from quant.decoders import (decode_f16, decode_fp8_block, decode_int4_group, e4m3_to_float32, encode_int4_words,
                            unpack_int4_words)
from quant.reference import pack_reference

ISAS = ["portable", "avx2", "avx512", "amx"]
AVAILABLE_ISAS = ISAS[: ISAS.index(kt_kernels.best_isa()) + 1]


def _cpu_pack(method, src, col0, k, isa, threads=2):
    dst = PackTarget.empty(method, src.shape[0], k)
    bad = pack_cpu(method, [(src, col0, k, dst)], isa=isa, num_threads=threads)
    return dst, bad[0]


def _assert_packs_like_reference(method, src, full_bf16, col0, k, isa, nonfinite=0):
    ref_w, ref_s, ref_bad = pack_reference(full_bf16[:, col0 : col0 + k], method)
    dst, bad = _cpu_pack(method, src, col0, k, isa)
    assert bad == ref_bad == nonfinite
    assert np.array_equal(dst.weight, ref_w.numpy())
    assert np.array_equal(dst.scales.view(np.uint32), ref_s.numpy().view(np.uint32))


def _fp8_bytes(rng, n, k):
    w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    w[(w & 0x7F) == 0x7F] = 0x3C  # no NaN codes in the random part
    return w


def test_e4m3_decode_matches_the_format():
    codes = np.arange(256, dtype=np.uint8)
    got = e4m3_to_float32(codes).numpy()
    for c in range(256):
        e, m, neg = (c >> 3) & 0xF, c & 7, c >> 7
        if c & 0x7F == 0x7F:
            assert np.isnan(got[c])
            continue
        v = m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        assert got[c] == (-v if neg else v), c


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
@pytest.mark.parametrize("block", [(128, 128), (64, 32), (128, 48)])  # 48: lanes straddle scales
def test_cpu_fp8_block_matches_reference(isa, method, block):
    rng = np.random.default_rng(1)
    n, ktot = 320, 640  # 2.5 x 5 blocks of 128: partial row blocks
    w = _fp8_bytes(rng, n, ktot)
    grid = (-(-n // block[0]), -(-ktot // block[1]))
    # scales that make products need rounding to bf16 (not powers of two)
    s = (2.0 ** rng.integers(-12, -4, size=grid) * rng.uniform(1, 2, size=grid)).astype(np.float32)
    full = decode_fp8_block(w, s, block)
    for row0, rows, col0, k in ((0, 320, 0, 640), (64, 128, 0, 640), (0, 320, 128, 256), (192, 64, 384, 256)):
        src = SourceMatrix("fp8_block", w, s, block).rows(row0, rows)
        _assert_packs_like_reference(method, src, full[row0 : row0 + rows], col0, k, isa)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_cpu_fp8_nan_codes_and_overflow_are_nonfinite(isa):
    rng = np.random.default_rng(2)
    w = _fp8_bytes(rng, 64, 128)
    w[3, 5], w[4, 6] = 0x7F, 0xFF  # E4M3FN NaN
    w[7, 7] = 0x7E  # 448 * 2^120 overflows fp32 -> inf
    s = np.full((1, 1), 2.0 ** 120, dtype=np.float32)
    full = decode_fp8_block(w, s, (128, 128))
    _assert_packs_like_reference(INT8, SourceMatrix("fp8_block", w, s, (128, 128)), full, 0, 128, isa,
                                 nonfinite=int((~torch.isfinite(full.float())).sum()))


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
def test_cpu_f16_matches_reference(isa, method):
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((64, 384)) * 0.05).astype(np.float16)
    h[0, :12] = np.array([6e-8, 1e-5, -3e-6, 65504, -65504, 0.1, 0, -0.0, 1, 2, 1.00390625, 1.01171875],
                         dtype=np.float16)  # subnormals, extremes, ties to even
    full = decode_f16(h.view(np.uint16))
    assert torch.equal(full, torch.from_numpy(h).to(torch.bfloat16))
    for col0, k in ((0, 384), (128, 256)):
        _assert_packs_like_reference(method, SourceMatrix("f16", h.view(np.uint16)), full, col0, k, isa)


def test_int4_words_round_trip_and_bit_order():
    u = np.arange(16)[None, :].repeat(2, 0)
    words = encode_int4_words(u)
    assert words.shape == (2, 2) and words.dtype == np.int32
    assert words[0, 0] == 0x76543210 and words[0, 1] == np.uint32(0xFEDCBA98).view(np.int32)
    assert np.array_equal(unpack_int4_words(words).numpy(), u)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
@pytest.mark.parametrize("scale_dtype,group", [("BF16", 32), ("F32", 32), ("BF16", 128), ("BF16", 8)])
def test_cpu_int4_group_matches_reference(isa, method, scale_dtype, group):
    rng = np.random.default_rng(4)
    n, ktot = 64, 512
    u = rng.integers(0, 16, size=(n, ktot))
    words = encode_int4_words(u)
    sc = rng.uniform(0.001, 0.01, size=(n, ktot // group)).astype(np.float32)
    scales = (sc.view(np.uint32) >> 16).astype(np.uint16) if scale_dtype == "BF16" else sc
    full = decode_int4_group(words, scales, group, scale_dtype)
    want = (torch.from_numpy(u - 8).float() * torch.from_numpy(
        (scales.astype(np.uint32) << 16).view(np.float32) if scale_dtype == "BF16" else sc).repeat_interleave(group, 1))
    assert torch.equal(full, want.to(torch.bfloat16))
    for col0, k in ((0, 512), (128, 256)):
        _assert_packs_like_reference(method, SourceMatrix("int4_group", words, scales, (1, group)), full, col0, k, isa)


def test_cpu_packer_rejects_bad_block_arguments():
    w = np.zeros((64, 128), np.uint8)
    dst = PackTarget.empty(INT8, 64, 128)
    with pytest.raises(ValueError, match="scales do not cover"):
        pack_cpu(INT8, [(SourceMatrix("fp8_block", w, np.ones((1, 1), np.float32), (32, 128)), 0, 128, dst)])
    with pytest.raises(ValueError, match="float32"):
        pack_cpu(INT8, [(SourceMatrix("fp8_block", w, np.ones((1, 1), np.float64), (128, 128)), 0, 128, dst)])
    with pytest.raises(ValueError, match="need scales"):
        pack_cpu(INT8, [(SourceMatrix("int4_group", np.zeros((64, 16), np.int32), None, (1, 32)), 0, 128, dst)])
