"""Packer and engine inputs of the tests: random bf16 matrices, the ISA levels this CPU runs, and the rows
that pin down kt-kernel's exact numerics (tests/test_kt_exact.py, tests/test_gpu.py)."""
from __future__ import annotations


def random_bf16(n, k, seed, scale=1.0):
    """A random bf16 matrix with an all-zero row and an outlier (packer test input)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * scale).to(torch.bfloat16)
    w[0, :] = 0
    w[1, 5] = 40.0 * scale
    return w


ISA_LEVELS = ("portable", "avx2", "avx512", "amx")  # kt_kernels' ISA levels, lowest first


def available_isas() -> list[str]:
    """Every ISA level this CPU runs (up to kt_kernels.best_isa()): tests force each in turn."""
    from kt_convert import kt_kernels

    return list(ISA_LEVELS[: ISA_LEVELS.index(kt_kernels.best_isa()) + 1])


INT8_RECIP_BITS = 0x3C010204  # fl32(1/127), the constant GCC -ffast-math multiplies by


def int8_recip_mantissas():
    """The 7-bit bf16 mantissas m for which fl32(a * fl32(1/127)) != fl32(a / 127) (a = 1.m), found
    by enumeration in plain numpy float32 (IEEE; independent of the packers)."""
    import numpy as np

    c = np.uint32(INT8_RECIP_BITS).view(np.float32)
    a = ((np.uint32(127) << 23) | (np.arange(128, dtype=np.uint32) << 16)).view(np.float32)
    return [int(m) for m in np.nonzero(a * c != a / np.float32(127))[0]]


def _bf16_value(bits):
    import numpy as np

    return float(np.uint32(bits << 16).view(np.float32))


def kt_special_rows(k=256, seed=0):
    """bf16 [160, k] rows at the edges of kt's quantizer, then random rows up to 160 (an INT4 N-block
    of 128 plus a tail; two INT8 N-blocks plus a tail):

    amax at each bf16 mantissa where fl32(a * fl32(1/127)) differs from fl32(a / 127) (several
    exponents and signs, 0.0703125 among them); exact rounding ties for INT8 (d = 2^j) and INT4
    (d = 2^j, int8 grid ties and 4-bit ties); rows of subnormals only; rows whose scale would be
    subnormal (flushed to 0) or rounds up to 2^-126; subnormal elements in a row with d = 2^-126;
    all-zero and all -0 rows; one huge value (+-bf16 max) among small ones."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    n = 160
    w = np.zeros((n, k), dtype=np.float32)
    r = 0

    def random_row(amax, sign=1.0):
        row = (rng.uniform(-1, 1, size=k) * amax).astype(np.float32)
        row[rng.integers(0, k)] = sign * amax
        return row

    for m in int8_recip_mantissas():
        for exp, sign in ((127 - 4, 1.0), (127, -1.0), (127 + 20, 1.0), (127 - 100, -1.0)):
            w[r] = random_row(_bf16_value((exp << 7) | m), sign)
            r += 1
    w[r] = random_row(0.0703125)  # 1.125 * 2^-4: kt's scale 0x3a112244 (fl32(a/127) is 0x3a112245)
    r += 1
    for j in (0, -3, 5):  # INT8: amax 127 * 2^j gives d = 2^j; ties at (n + 0.5) * 2^j round to even
        w[r, :12] = np.array([127, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 126.5, -126.5, 63.5, 64.5, -1.5]) * 2.0**j
        r += 1
    for j in (0, -3, 5):  # INT4: amax 112 * 2^j gives d = 2^j; int8 ties, then 4-bit ties away from zero
        w[r, :14] = np.array([112, 7.5, 8.5, 8, 23.5, 24, 104, 111, -7.5, -8, -24, -23.5, 40, 56]) * 2.0**j
        r += 1
    for bits in (0x0001, 0x807F, 0x0040):  # subnormal rows: amax reads as 0 (DAZ) -> d = 0, q = 0
        w[r] = np.float32(_bf16_value(bits)) * (rng.integers(0, 2, size=k) * 2 - 1)
        r += 1
    # scales that would be subnormal (flushed: d = 0, q = 0), exactly 2^-126, or rounding up to it:
    # 0x03FE = 1.984375 * 2^-120: INT8 product 2^-126 * (1 - 2^-28) -> 2^-126 (tininess after rounding);
    # 0x03F0: INT8 2^-126 * 0.945 -> 0; 0x03E0 = 1.75 * 2^-120: INT4 d = 2^-126 exactly; 0x03DF: INT4 -> 0;
    # 2^-120: both flushed; 0x0100 = 2^-125: both flushed
    for bits in (0x03FE, 0x03F0, 0x03E0, 0x03DF, 0x0380, 0x0100):
        w[r] = random_row(_bf16_value(bits))
        r += 1
    # d = 2^-126 (INT8): subnormal elements would quantize to +-1 without DAZ (0x0070 * 2^126 = 0.875)
    w[r] = random_row(_bf16_value(0x03FE))
    w[r, 1:9] = [_bf16_value(b) for b in (0x0070, 0x807F, 0x0060, 0x0041, 0x8070, 0x0080, 0x8080, 0x00C0)]
    r += 1
    r += 1  # an all-zero row
    w[r] = -0.0
    r += 1
    for sign in (1.0, -1.0):  # one huge value among small ones
        w[r] = (rng.standard_normal(k) * 0.01).astype(np.float32)
        w[r, rng.integers(0, k)] = sign * _bf16_value(0x7F7F)
        r += 1
    while r < n:  # random rows whose amax walks through every bf16 mantissa and many exponents
        w[r] = random_row(_bf16_value((int(rng.integers(1, 255)) << 7) | (r % 128)), 1.0 - 2.0 * (r % 2))
        r += 1
    return torch.from_numpy(w).to(torch.bfloat16)


def ftz_window_rows(method):
    """float32 rows (the packers' "f32" kind) whose amax lies around the FTZ threshold: the scales
    0, 2^-126 and the first normals, as the hardware decides them."""
    import numpy as np

    from kt_convert.kt_runtime.format.methods import INT8

    lo = 0x03FD0000 if method is INT8 else 0x03DF0000
    amax = np.arange(lo, lo + 0x20000, 0x40, dtype=np.uint32).view(np.float32)[:2048]
    x = np.zeros((amax.size, method.k_align), np.float32)
    x[:, 0] = amax
    x[:, 1] = -amax * np.float32(0.4)
    x[:, 2] = np.uint32(0x00600000).view(np.float32)  # a subnormal element: 0 under DAZ
    return x


def fp8_subnormal_decode_rows():
    """FP8 rows whose IEEE decode makes subnormals: column block 1 has a subnormal F32 scale, and
    1.0 * 0x007FFF00 rounds (bf16, to nearest even) up to 2^-126, a normal value; column block 0
    sets amax = 1.984375 * 2^-120, so INT8 d = 2^-126 and those values quantize to 1 (to 0 if the
    decode product were flushed)."""
    import numpy as np

    from kt_convert.quant.cpu import SourceMatrix
    from kt_convert.quant.decoders import decode_fp8_block

    n, k = 32, 256
    w = np.zeros((n, k), np.uint8)
    w[:, 0] = 0x38  # 1.0 * block-0 scale = amax
    w[:, 1:128] = np.random.default_rng(1).integers(0, 0x38, size=(n, 127), dtype=np.uint8)
    w[:, 128:] = 0x38  # 1.0 * subnormal scale
    w[1::2, 130:200] = 0x30  # 0.5 * subnormal scale: stays subnormal -> 0
    s = np.array([[0x03FE0000, 0x007FFF00]], np.uint32).view(np.float32)
    return SourceMatrix("fp8_block", w, s, (32, 128)), decode_fp8_block(w, s, (32, 128))
