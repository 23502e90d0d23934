"""CPU packer (kernels_cpp via the kt_kernels extension): same bytes as quant.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kt_convert.kt_runtime.format.methods import QuantMethod
from kt_convert.kt_runtime.format.safetensors_file import numpy_dtype

from .source_formats import SOURCE_FORMATS, carries_codes


@dataclass(frozen=True)
class SourceMatrix:
    """One source matrix as stored (rows contiguous; row strides are free, so strided views of
    fused tensors need no copy). Kinds:

    * "bf16": uint16 bf16 bits [N, K]; "f32": float32 [N, K] whose values are already bf16-exact;
    * "mxfp4": uint8 [N, K/2] (low nibble = even column) + E8M0 uint8 scales [N, K/32];
    * "f16": uint16 IEEE half bits [N, K], rounded to bf16 (RNE) when decoded;
    * "fp8_block": uint8 F8_E4M3FN [N, K] + float32 scales [cdiv(N_all, bn), cdiv(K, bk)] with
      block = (bn, bk); row0 is the first row's index in the scale grid (row slices keep the grid);
      decoded as bf16(fp32(w) * scale);
    * "int4_group": int32 words [N, K/8] (compressed-tensors pack-quantized: element j of a word
      at bits 4j, stored q + 8) + bf16 (uint16 bits) or float32 scales [N, K/g] with block = (1, g);
      decoded as bf16(fp32(u - 8) * fp32(scale));
    * "nvfp4": uint8 [N, K/2] E2M1 codes (as mxfp4) + F8_E4M3 uint8 scales [N, K/16] and the per-tensor
      float32 global_scale, which multiplies each group scale (ModelOpt) or divides it (global_divides,
      compressed-tensors): bf16(fl32(v * fl32(s * g))) or bf16(fl32(v * fl32(s / g)));
    * "mxfp8": uint8 F8_E4M3 [N, K] + E8M0 uint8 scales [N, K/32]: bf16(fp32(w) * 2^(e-127)).
    """

    kind: str
    weight: np.ndarray
    scales: np.ndarray | None = None
    block: tuple[int, int] | None = None
    row0: int = 0
    global_scale: float = 1.0  # nvfp4: the per-tensor scale (a float32 value)
    global_divides: bool = False  # nvfp4: the group scale is divided by global_scale (else multiplied)

    @property
    def shape(self) -> tuple[int, int]:
        n, cols = self.weight.shape
        return n, cols * SOURCE_FORMATS[self.kind].elements_per_item

    def rows(self, row0: int, n: int) -> "SourceMatrix":
        weight = self.weight[row0 : row0 + n]
        if self.kind == "fp8_block":  # the block grid is indexed by absolute row
            return SourceMatrix(self.kind, weight, self.scales, self.block, self.row0 + row0)
        scales = None if self.scales is None else self.scales[row0 : row0 + n]
        return SourceMatrix(self.kind, weight, scales, self.block, 0, self.global_scale, self.global_divides)

    def carries_codes(self, method: QuantMethod, col0: int = 0) -> bool:
        """Packed for `method` from column col0, this source keeps its codes and scales
        (quant.source_formats.carries_codes; a slice that starts inside an output group is quantized)."""
        return (self.scales is not None and carries_codes(method, self.kind, self.block, self.scales.itemsize)
                and col0 % method.group_size == 0)

    def job_args(self) -> tuple:
        """The block tuple the C++ packer takes for fp8_block / int4_group, the per-tensor scale of nvfp4,
        else ()."""
        if self.kind in ("fp8_block", "int4_group"):
            return ((self.row0, self.block[0], self.block[1]),)
        if self.kind == "nvfp4":
            return ((float(self.global_scale), bool(self.global_divides)),)
        return ()


@dataclass
class PackTarget:
    """Where one packed matrix goes: tiled bytes and fp32 scales (writable, contiguous)."""

    weight: np.ndarray
    scales: np.ndarray

    @classmethod
    def empty(cls, method: QuantMethod, n: int, k: int) -> "PackTarget":
        return cls(np.empty(method.weight_bytes(n, k), dtype=np.uint8),
                   np.empty(method.scale_count(n, k), dtype=numpy_dtype(method.scale_dtype)))


def pack_cpu(method: QuantMethod, jobs: list[tuple[SourceMatrix, int, int, PackTarget]], *, isa: str = "auto",
             num_threads: int = 0) -> list[int]:
    """Packs columns [col0, col0+k) of each source into its target; returns non-finite counts.
    num_threads: 0 (every CPU) .. kt_kernels.MAX_THREADS, else ValueError."""
    from kt_convert import kt_kernels

    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or \
            not 0 <= num_threads <= kt_kernels.MAX_THREADS:
        raise ValueError(f"num_threads must be an int in [0, {kt_kernels.MAX_THREADS}], got {num_threads!r}")

    args = [(src.kind, src.weight, src.scales, col0, k, dst.weight, dst.scales, *src.job_args(),
             *((True,) if src.carries_codes(method, col0) else ()))
            for src, col0, k, dst in jobs]
    return kt_kernels.pack(method.name, args, isa=isa, num_threads=num_threads)
