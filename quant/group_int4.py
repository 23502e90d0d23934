"""Readable torch reference of the group-wise INT4 method (kt's RAWINT4, compressed-tensors
pack-quantized): the C++ packer (kernels_cpp/pack_group.cpp) writes the same bytes.

Per group of `group` columns of a row: the codes q = clamp(rint_even(w / d), -7, 7) (kt's RAWINT4 kernels
compute the level -8 wrongly, docs/FORMAT.md §9) with the bf16 scale d that gives the least squared error
sum((w - q d)^2); on a tie the smaller d. Found here by trying every bf16 value from amax/64 to 2 amax, the
interval the least-error scale lies in for groups of up to 128 (FORMAT.md §9); d = 0 for an all-zero group.
Stored: u = q + 8, two per byte, the even column in the low nibble; the scale as bf16 bits.
Dequantized: (u - 8) * d, exact in float32.

A source that already is group-wise INT4 with bf16 scales, in groups that hold whole output groups, is not
quantized again: its codes and scales are the output's (quant.source_formats.carries_codes).
"""
from __future__ import annotations

import torch

MAX_LEVEL = 7
BAND_BELOW, BAND_ABOVE = 6 * 128, 128  # bf16 bit patterns below / above amax: amax/64 .. 2 amax
MAX_BF16_BITS = 0x7F7F
GROUPS_PER_CHUNK = 256  # groups whose candidate scales are tried at once (bounds the reference's memory)


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int64) -> their float32 values."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def least_squares_scales(x: torch.Tensor) -> torch.Tensor:
    """bf16-exact float32 groups [G, g] -> float32 [G]: each group's bf16 scale with the least squared error
    over the levels -7..7 (the smallest such scale; 0 for an all-zero group), by trying every candidate."""
    a = x.abs().to(torch.float64)
    amax = x.abs().amax(-1)
    top = (amax.view(torch.int32) >> 16).to(torch.int64)  # amax is bf16-exact
    lo = (top - BAND_BELOW).clamp(min=1)
    hi = (top + BAND_ABOVE).clamp(max=MAX_BF16_BITS)
    bits = lo[:, None] + torch.arange(BAND_BELOW + BAND_ABOVE + 1)
    valid = bits <= hi[:, None]
    p = _bits_to_float(bits.clamp(max=MAX_BF16_BITS)).to(torch.float64)  # [G, C]
    best = torch.empty(len(x), dtype=torch.float32)
    for c in range(0, len(x), GROUPS_PER_CHUNK):
        ac, pc = a[c : c + GROUPS_PER_CHUNK], p[c : c + GROUPS_PER_CHUNK]
        q = (ac[:, None, :] / pc[..., None]).round_().clamp_(max=MAX_LEVEL)  # codes of |w|, [G, C, g]
        # squared error minus sum a^2: p (p sum q^2 - 2 sum a q), exact in float64 for these values
        f = pc * (pc * torch.einsum("gcj,gcj->gc", q, q) - 2 * torch.bmm(q, ac[..., None])[..., 0])
        f = torch.where(valid[c : c + GROUPS_PER_CHUNK], f, torch.full_like(f, float("inf")))
        best[c : c + GROUPS_PER_CHUNK] = pc.gather(1, f.argmin(-1, keepdim=True))[:, 0].to(torch.float32)
    return torch.where(amax == 0, torch.zeros_like(best), best)


def quantize_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-exact weights [N, K] (K a multiple of group) -> (packed uint8 [N, K/2], bf16 scales [N, K/group])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"K {k} is not a multiple of the group size {group}")
    x = w.to(torch.float32).reshape(n * (k // group), group)
    d = least_squares_scales(x).to(torch.float64)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.where(d[:, None] == 0, 0.0, torch.round(x.double() / safe[:, None])).clamp(-MAX_LEVEL, MAX_LEVEL)
    u = (q.to(torch.int32) + 8).to(torch.uint8).reshape(n, k)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), d.to(torch.bfloat16).reshape(n, k // group)


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
