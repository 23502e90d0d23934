"""kt-kernel's per-row symmetric quantization (docs/FORMAT.md §2), in readable torch.

kt-kernel is compiled with -ffast-math: GCC turns its INT8 ``amax / 127`` into ``amax * fl32(1/127)``,
and crtfastmath.o turns on FTZ and DAZ for the process. So, as kt's users get it:

* inputs are read with DAZ: a subnormal value counts as zero (in amax and when quantized);
* INT8 ``d = fl32(amax * fl32(1/127))``, INT4 ``d = fl32((double)amax / 112.0)``, with FTZ: a scale
  that would be subnormal is 0 (x86 detects tininess after rounding, see ``ftz_to_float32``);
* values are multiplied by ``fl32(1/d)`` and rounded half to even; INT4 then rounds the int8 grid
  value to a multiple of 16 with ties away from zero (15 levels, -7..7).

Everything is written out explicitly (bit tests, an exact fp64 product), so the results do not depend
on the FTZ/DAZ state of this process. Source decoding stays IEEE (docs/FORMAT.md §2).
"""
from __future__ import annotations

import numpy as np
import torch

from kt_convert.kt_runtime.format.methods import FP32_RECIPROCAL, QuantMethod

FLT_MIN = 2.0**-126
# A result below this is flushed to zero: rounded to 24 bits with an unbounded exponent it is below
# 2^-126 (tininess after rounding, as x86 FTZ does; the midpoint itself rounds up, to even).
FTZ_BELOW = FLT_MIN * (1.0 - 2.0**-25)


def zero_nonfinite(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """NaN/Inf -> 0, and how many there were (the packers do the same and report the count)."""
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    return (torch.where(finite, x, torch.zeros_like(x)) if bad else x), bad


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """DAZ on float32: values with a zero exponent field (subnormals) read as +0."""
    return torch.where((x.view(torch.int32) & 0x7F800000) == 0, torch.zeros_like(x), x)


def ftz_to_float32(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 results -> float32 rounded to nearest even, flushed as x86 FTZ does:
    0 below FTZ_BELOW, 2^-126 in [FTZ_BELOW, 2^-126) (those round up to it), else the usual rounding."""
    rounded = torch.where(x < FLT_MIN, torch.full_like(x, FLT_MIN), x).to(torch.float32)
    return torch.where(x < FTZ_BELOW, torch.zeros_like(rounded), rounded)


def fp32_reciprocal(levels: int) -> float:
    """fl32(1 / levels), the constant GCC -ffast-math multiplies by (INT8: 0x3c010204)."""
    return float(np.float32(1) / np.float32(levels))


def row_scales(amax: torch.Tensor, method: QuantMethod) -> torch.Tensor:
    """amax (float32, zero or normal) -> kt's scales d = amax / method.levels, computed as the method's
    row says: FP32_RECIPROCAL, fl32(amax * fl32(1/levels)) (the product is exact in float64, so one
    rounding gives it); FP64_DIVIDE, fl32((double)amax / levels)."""
    a = amax.to(torch.float64)
    if method.scale_arithmetic == FP32_RECIPROCAL:
        return ftz_to_float32(a * fp32_reciprocal(method.levels))
    return ftz_to_float32(a / float(method.levels))


def cvt_rne_int32(y: torch.Tensor) -> torch.Tensor:
    """cvtps2dq: round half to even; NaN and values outside int32 become INT32_MIN."""
    in_range = y.abs() < 2.0**31
    return torch.where(in_range, torch.round(torch.where(in_range, y, 0.0)), -(2.0**31)).to(torch.int64)


def round_4bit(v: torch.Tensor) -> torch.Tensor:
    r = ((v.abs() + 8) & 0xF0) >> 4
    return torch.where(v < 0, -r, r)


def quantize_rows(w: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[N, K] bf16/fp32 -> (q int8 [N, K] with INT4 levels -7..7, d float32 [N], non-finite count)."""
    x, nonfinite = zero_nonfinite(w.to(torch.float32))
    x = flush_subnormal(x)
    d = row_scales(x.abs().amax(dim=1), method)
    # d is 0 or normal, so 1/d is normal and exact IEEE whatever the FTZ state
    inv = torch.where(d != 0, torch.tensor(1.0, dtype=torch.float32) / torch.where(d != 0, d, 1.0), 0.0)
    v = cvt_rne_int32(x * inv[:, None]).clamp(-128, 127)
    if method.bits == 4:
        v = round_4bit(v)
    return v.to(torch.int8), d, nonfinite


def dequantize_rows(q: torch.Tensor, d: torch.Tensor, method: QuantMethod) -> torch.Tensor:
    step = d * (1 << (8 - method.bits))  # INT4 levels -7..7 stand for multiples of 16 of the int8 grid
    # a float copy scaled in place: one float32 product per element as before, without torch's slower
    # mixed int8 x float32 product and its second [N, K] array
    return q.to(torch.float32, copy=True).mul_(step[:, None])
