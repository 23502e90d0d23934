"""Readable reference for the whole numeric path: bf16 matrix -> kt packed bytes and back."""
from __future__ import annotations

import torch

from kt_runtime.format.layout import full_shape, shard_slice
from kt_runtime.format.methods import QuantMethod

from .amx_tiling import tile, untile
from .group_int4 import dequantize_groups, quantize_groups
from .kt_quant import dequantize_rows, quantize_rows


def pack_reference(w: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bf16 [N, K] -> (tiled uint8 bytes, float32 scales [N], non-finite count); group-wise methods:
    (row-major packed bytes [N, K/2], bf16 scales [N, K/group], non-finite count)."""
    if method.group_size is not None:
        x = w.to(torch.float32)
        finite = torch.isfinite(x)
        packed, scales = quantize_groups(torch.where(finite, x, torch.zeros_like(x)), method.group_size)
        return packed, scales, int((~finite).sum())
    q, d, nonfinite = quantize_rows(w, method)
    return tile(q, method), d, nonfinite


def dequantize_packed(weight: torch.Tensor, scales: torch.Tensor, n: int, k: int, method: QuantMethod) -> torch.Tensor:
    """Tiled bytes + scales -> float32 [N, K] (group-wise: row-major bytes + bf16 scales)."""
    if method.group_size is not None:
        return dequantize_groups(weight, scales, n, k, method.group_size)
    return dequantize_rows(untile(weight, n, k, method), torch.as_tensor(scales).reshape(-1), method)


def pack_expert_reference(w: torch.Tensor, proj: str, hidden_size: int, intermediate_size: int, threadpool_count: int,
                          method: QuantMethod) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One projection's full bf16 matrix -> per-NUMA-shard (bytes, scales)."""
    if tuple(w.shape) != full_shape(proj, hidden_size, intermediate_size):
        raise ValueError(f"{proj} has shape {tuple(w.shape)}, expected {full_shape(proj, hidden_size, intermediate_size)}")
    out = []
    for t in range(threadpool_count):
        s = shard_slice(proj, hidden_size, intermediate_size, threadpool_count, t)
        weight, scales, _ = pack_reference(w[s.row0 : s.row0 + s.n, s.col0 : s.col0 + s.k], method)
        out.append((weight, scales))
    return out


def merge_shards(proj: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Per-NUMA dequantized float matrices -> the unsharded matrix (one shard: that matrix, not a copy)."""
    if len(shards) == 1:
        return shards[0]
    return torch.cat(shards, dim=1 if proj == "down" else 0)
