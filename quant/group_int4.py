"""Readable torch reference of the group-wise INT4 method (kt's RAWINT4, compressed-tensors
pack-quantized): the C++ packer (kernels_cpp/pack_ref.cpp:quantize_groups_row) writes the same bytes.

Per group of `group` columns of a row: amax = max |w|; the candidate scales d7 = bf16(fl32(amax / 7)) and
d8 = bf16(fl32(amax / 8)) (round to nearest even); q = clamp(rint_even(fl32(w / d)), -8, 7) (0 where d is
0); the group keeps d8 when no weight falls outside -8..7 with it (none is clipped) and its squared error
sum((w - q d)^2) (float64) is the smaller, else d7. So every weight is within half a step, and d8 (a step
1/8 finer) is taken where the group's extreme is negative or has room below 7.5 d8.
Stored: u = q + 8, two per byte, the even column in the low nibble; the scale as bf16 bits.
Dequantized: (u - 8) * d, exact in float32.
"""
from __future__ import annotations

import torch


def _quantize_with(x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [N, G, g], d float32 [N, G, 1] -> (q int32, squared error float64 [N, G]; inf where a weight
    would be clipped)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    r = torch.where(d == 0, torch.zeros_like(x), torch.round(x / safe))
    q = r.clamp(-8, 7)
    err = (x.double() - q.double() * d.double()).pow(2).sum(-1)
    err = torch.where(((r > 7) | (r < -8)).any(-1), torch.full_like(err, float("inf")), err)
    return q.to(torch.int32), err


def quantize_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-exact weights [N, K] (K a multiple of group) -> (packed uint8 [N, K/2], bf16 scales [N, K/group])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"K {k} is not a multiple of the group size {group}")
    x = w.to(torch.float32).reshape(n, k // group, group)
    amax = x.abs().amax(-1, keepdim=True)
    d7 = (amax / 7).to(torch.bfloat16).to(torch.float32)
    d8 = (amax / 8).to(torch.bfloat16).to(torch.float32)
    q7, e7 = _quantize_with(x, d7)
    q8, e8 = _quantize_with(x, d8)
    use8 = e8 < e7
    q = torch.where(use8[..., None], q8, q7).reshape(n, k)
    d = torch.where(use8[..., None], d8, d7).reshape(n, k // group)
    u = (q + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), d.to(torch.bfloat16)


def unpack_nibbles(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """uint8 [N, K/2] (or the same bytes flat) -> stored nibbles u (0..15) int32 [N, K]."""
    b = packed.reshape(n, k // 2).to(torch.int32)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(n, k)


def dequantize_groups(packed: torch.Tensor, scales: torch.Tensor, n: int, k: int, group: int) -> torch.Tensor:
    """Packed bytes + bf16 scales (bfloat16 or uint16 bits, [N, K/group] or flat) -> float32 [N, K], exact."""
    s = scales if scales.dtype == torch.bfloat16 else scales.contiguous().view(torch.int16).view(torch.bfloat16)
    s = s.reshape(n, k // group).to(torch.float32)
    # one float32 product per element, in place over groups (no repeated scale matrix, no int32 copies);
    # u - 8 is exact in float32
    b = packed.reshape(n, k // 2).view(torch.uint8)
    x = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(n, k).to(torch.float32).sub_(8)
    return x.view(n, k // group, group).mul_(s[:, :, None]).view(n, k)
