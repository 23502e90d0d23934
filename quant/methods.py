"""The packed weight methods (kt-kernel AMXINT4 / AMXINT8) and their layout constants."""
from __future__ import annotations

from dataclasses import dataclass

K_BLOCK = 3584  # K elements per K-block (kt GemmKernel224*)
TILE_ROWS = 32  # rows per 2048-byte tile pair
TILE_BYTES = 64  # bytes per tile row


@dataclass(frozen=True)
class QuantMethod:
    name: str  # our --quant-method value
    kt_method: str  # SGLang-KT --kt-method value
    kt_name: str  # prefix of kt's .kt file names
    n_block: int  # rows per N-block
    k_align: int  # K (and the NUMA slice of I) must be a multiple of this
    elems_per_byte: int
    levels: int  # quantization grid levels on each side of zero in the int8 domain

    def weight_bytes(self, n: int, k: int) -> int:
        return n * k // self.elems_per_byte

    @property
    def k_block_bytes(self) -> int:
        return K_BLOCK // self.elems_per_byte


INT4 = QuantMethod("int4", "AMXINT4", "INT4", n_block=128, k_align=128, elems_per_byte=2, levels=112)
INT8 = QuantMethod("int8", "AMXINT8", "INT8", n_block=64, k_align=64, elems_per_byte=1, levels=127)
METHODS = {m.name: m for m in (INT4, INT8)}


def get_method(name: str) -> QuantMethod:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown quant method {name!r}; expected one of {sorted(METHODS)}") from None
