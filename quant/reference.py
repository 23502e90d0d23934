"""Readable reference for the whole numeric path: bf16 matrix -> kt packed bytes and back.

Each byte order of the format (kt_runtime.format.byte_orders) has its reference here, in REFERENCES: the
format imports no torch, so its ByteOrder objects are keys of this table (as gguf-py's quants are keyed by
its quantization types), and a method's numerics are reference_for(method).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kt_convert.kt_runtime.format.byte_orders import AMX_TILED, COMPRESSED_TENSORS, ByteOrder
from kt_convert.kt_runtime.format.methods import QuantMethod
from kt_convert.kt_runtime.format.spec import full_shape, shard_slice

from .amx_tiling import tile, untile
from .group_int4 import dequantize_groups, quantize_groups
from .kt_quant import dequantize_rows, quantize_rows


@dataclass(frozen=True)
class Reference:
    """The torch reference of one byte order.
    pack(w [N, K], method) -> (weight bytes, scales, non-finite count), as the packers write them;
    dequantize(weight, scales, n, k, method) -> float32 [N, K]."""

    pack: Callable[[torch.Tensor, QuantMethod], tuple[torch.Tensor, torch.Tensor, int]]
    dequantize: Callable[[torch.Tensor, torch.Tensor, int, int, QuantMethod], torch.Tensor]


def _pack_tiled(w: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor, int]:
    q, d, nonfinite = quantize_rows(w, method)
    return tile(q, method), d, nonfinite


def _dequantize_tiled(weight: torch.Tensor, scales: torch.Tensor, n: int, k: int, method: QuantMethod) -> torch.Tensor:
    return dequantize_rows(untile(weight, n, k, method), torch.as_tensor(scales).reshape(-1), method)


def _pack_groups(w: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = w.to(torch.float32)
    finite = torch.isfinite(x)
    packed, scales = quantize_groups(torch.where(finite, x, torch.zeros_like(x)), method.group_size)
    return packed, scales, int((~finite).sum())


def _dequantize_groups(weight: torch.Tensor, scales: torch.Tensor, n: int, k: int, method: QuantMethod) -> torch.Tensor:
    return dequantize_groups(weight, scales, n, k, method.group_size)


REFERENCES: dict[ByteOrder, Reference] = {
    AMX_TILED: Reference(_pack_tiled, _dequantize_tiled),  # tiled bytes, float32 scales [N]
    COMPRESSED_TENSORS: Reference(_pack_groups, _dequantize_groups),  # row-major nibbles [N, K/2], bf16 [N, K/group]
}


def reference_for(method: QuantMethod) -> Reference:
    return REFERENCES[method.byte_order]


def pack_reference(w: torch.Tensor, method: QuantMethod) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bf16 [N, K] -> (weight bytes, scales, non-finite count) in the method's byte order."""
    return reference_for(method).pack(w, method)


def dequantize_packed(weight: torch.Tensor, scales: torch.Tensor, n: int, k: int, method: QuantMethod) -> torch.Tensor:
    """Weight bytes + scales in the method's byte order -> float32 [N, K]."""
    return reference_for(method).dequantize(weight, scales, n, k, method)


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


def dequantize_expert(packed, layer: int, expert: int, proj: str) -> torch.Tensor:
    """One projection of one expert of a packed output (kt_runtime.format.reader.PackedOutput) as its whole
    float32 matrix ([I, H] for gate/up, [H, I] for down): each NUMA shard dequantized, then merged."""
    spec = packed.spec
    method = spec.quant_method
    n, k = spec.shard_shape(proj)
    parts = []
    for t in range(spec.threadpool_count):
        w, s = packed.expert_tensors(layer, expert, proj, t)
        parts.append(dequantize_packed(torch.from_numpy(np.array(w)), torch.from_numpy(np.array(s)), n, k, method))
    return merge_shards(proj, parts)
