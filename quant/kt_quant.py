"""kt-kernel's per-row symmetric quantization (research kt_format.md §1), in readable torch.

All arithmetic is fp32 as in kt's SIMD code: d = amax/127 (INT8) or fl32(amax/112.0 in double)
(INT4); values are multiplied by fl32(1/d) and rounded half to even; INT4 then rounds the int8
grid value to a multiple of 16 with ties away from zero (15 levels, -7..7).
"""
from __future__ import annotations

import torch

from .methods import INT4, INT8, QuantMethod


def zero_nonfinite(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """NaN/Inf -> 0, and how many there were (the packers do the same and report the count)."""
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    return (torch.where(finite, x, torch.zeros_like(x)) if bad else x), bad


def row_scales(amax: torch.Tensor, method: QuantMethod) -> torch.Tensor:
    amax = amax.to(torch.float32)
    if method is INT8:
        return amax / torch.tensor(127.0, dtype=torch.float32)
    return (amax.to(torch.float64) / 112.0).to(torch.float32)


def cvt_rne_int32(y: torch.Tensor) -> torch.Tensor:
    """cvtps2dq: round half to even; NaN and values outside int32 become INT32_MIN."""
    in_range = y.abs() < 2.0**31
    return torch.where(in_range, torch.round(torch.where(in_range, y, 0.0)), -(2.0**31)).to(torch.int64)


def round_4bit(v: torch.Tensor) -> torch.Tensor:
    r = ((v.abs() + 8) & 0xF0) >> 4
    return torch.where(v < 0, -r, r)


def quantize_rows(w: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[N, K] bf16/fp32 -> (q int8 [N, K] with INT4 levels -7..7, d float32 [N], non-finite count)."""
    if method not in (INT4, INT8):
        raise ValueError(f"unsupported method {method}")
    x, nonfinite = zero_nonfinite(w.to(torch.float32))
    d = row_scales(x.abs().amax(dim=1), method)
    inv = torch.where(d != 0, torch.tensor(1.0, dtype=torch.float32) / torch.where(d != 0, d, 1.0), 0.0)
    v = cvt_rne_int32(x * inv[:, None]).clamp(-128, 127)
    if method is INT4:
        v = round_4bit(v)
    return v.to(torch.int8), d, nonfinite


def dequantize_rows(q: torch.Tensor, d: torch.Tensor, method: QuantMethod) -> torch.Tensor:
    step = d * 16 if method is INT4 else d
    return q.to(torch.float32) * step[:, None]
