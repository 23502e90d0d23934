"""MXFP4 (OCP microscaling E2M1 + E8M0 per 32) decoding, as kt-kernel reads it."""
from __future__ import annotations

import numpy as np
import torch

GROUP = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e8m0_to_float32(scale_bytes: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes placed in the fp32 exponent field, as kt does: 0x00 -> 0.0, 0xFF -> +inf."""
    return (scale_bytes.to(torch.int32) << 23).view(torch.float32)


def decode_mxfp4(blocks: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, K/2] packed bytes (low nibble = even column) + [N, K/32] E8M0 bytes -> bf16 [N, K].

    Every product of an E2M1 value and a power of two is exact in bf16, so decoding to fp32 and
    to bf16 agree (overflow gives inf in both).
    """
    blocks = torch.as_tensor(np.array(blocks, copy=True)).view(torch.uint8)  # sources are read-only maps
    scales = torch.as_tensor(np.array(scales, copy=True)).view(torch.uint8)
    n, half_k = blocks.shape
    k = half_k * 2
    if tuple(scales.shape) != (n, k // GROUP):
        raise ValueError(f"MXFP4 scales have shape {tuple(scales.shape)}, expected {(n, k // GROUP)}")
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(n, k).long()
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes]
    scale = e8m0_to_float32(scales).repeat_interleave(GROUP, dim=1)
    return (values * scale).to(torch.bfloat16)
