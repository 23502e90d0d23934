"""CPU packer (kernels_cpp via the kt_kernels extension): same bytes as quant.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .methods import QuantMethod


@dataclass(frozen=True)
class SourceMatrix:
    """One source matrix as stored: kind "bf16" (uint16 bits [N, K]), "f32" ([N, K], values
    already bf16-exact) or "mxfp4" (uint8 [N, K/2] + E8M0 uint8 [N, K/32])."""

    kind: str
    weight: np.ndarray
    scales: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n, cols = self.weight.shape
        return (n, cols * 2) if self.kind == "mxfp4" else (n, cols)

    def rows(self, row0: int, n: int) -> "SourceMatrix":
        scales = None if self.scales is None else self.scales[row0 : row0 + n]
        return SourceMatrix(self.kind, self.weight[row0 : row0 + n], scales)


@dataclass
class PackTarget:
    """Where one packed matrix goes: tiled bytes and fp32 scales (writable, contiguous)."""

    weight: np.ndarray
    scales: np.ndarray

    @classmethod
    def empty(cls, method: QuantMethod, n: int, k: int) -> "PackTarget":
        return cls(np.empty(method.weight_bytes(n, k), dtype=np.uint8), np.empty(n, dtype=np.float32))


def pack_cpu(method: QuantMethod, jobs: list[tuple[SourceMatrix, int, int, PackTarget]], *, isa: str = "auto",
             num_threads: int = 0) -> list[int]:
    """Packs columns [col0, col0+k) of each source into its target; returns non-finite counts."""
    import kt_kernels

    args = [(src.kind, src.weight, src.scales, col0, k, dst.weight, dst.scales) for src, col0, k, dst in jobs]
    return kt_kernels.pack(method.name, args, isa=isa, num_threads=num_threads)
