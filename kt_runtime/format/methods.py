"""The packed weight methods: one row per method, and the alignment rule every reader and writer uses.

A row says everything the format, the converter and the runtime need to know about a method; the
CLI choices, the manifest checks, the loader's inference and the CPU engine read it from here, and
kernels_cpp's `method_info` holds the same numbers (tests/test_format_room.py compares them). Adding
a method is a row here plus its kernels (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

# The AMX-tiled layout (docs/FORMAT.md §3): K-blocks of 3584 elements, 2048-byte tile pairs of
# 32 rows x 64 bytes.
K_BLOCK = 3584
TILE_ROWS = 32
TILE_BYTES = 64

AMX_TILED = "amx-tiled"  # kt's BufferB: N-blocks x K-blocks of tile pairs, per NUMA shard, per-row scales
LAYOUTS = (AMX_TILED,)
FP32_RECIPROCAL = "fp32-reciprocal"  # d = fl32(amax * fl32(1 / levels)) (what GCC -ffast-math makes of amax / levels)
FP64_DIVIDE = "fp64-divide"  # d = fl32((double)amax / levels)
SCALE_ARITHMETIC = (FP32_RECIPROCAL, FP64_DIVIDE)


@dataclass(frozen=True)
class QuantMethod:
    name: str  # --quant-method value and the manifest's "method"
    kt_method: str  # SGLang-KT --kt-method value
    kt_file_prefix: str  # prefix of kt's --no-merge-safetensor .kt file names
    bits: int  # bits per stored weight (4: two per byte)
    levels: int  # d = amax / levels: the largest |q| in the int8 grid (INT4 then rounds to multiples of 16)
    scale_arithmetic: str  # how amax / levels is computed, bit for bit (FP32_RECIPROCAL | FP64_DIVIDE)
    layout: str  # byte order of the weights (LAYOUTS)
    n_block: int  # rows per N-block
    k_align: int  # K, and the NUMA slice of I, must be multiples of this
    group_size: int | None = None  # None: one scale per output row; else K elements per scale
    scale_dtype: str = "F32"  # safetensors dtype of the scales

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"method {self.name}: layout {self.layout!r} is not one of {LAYOUTS}")
        if self.scale_arithmetic not in SCALE_ARITHMETIC:
            raise ValueError(f"method {self.name}: scale_arithmetic {self.scale_arithmetic!r} is not one of "
                             f"{SCALE_ARITHMETIC}")
        if 8 % self.bits:
            raise ValueError(f"method {self.name}: {self.bits} bits do not divide a byte")

    @property
    def elems_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def k_block_bytes(self) -> int:
        return K_BLOCK // self.elems_per_byte

    def weight_bytes(self, n: int, k: int) -> int:
        return n * k // self.elems_per_byte

    def scale_count(self, n: int, k: int) -> int:
        return n if self.group_size is None else n * (k // self.group_size)


INT4 = QuantMethod("int4", "AMXINT4", "INT4", bits=4, levels=112, scale_arithmetic=FP64_DIVIDE, layout=AMX_TILED,
                   n_block=128, k_align=128)
INT8 = QuantMethod("int8", "AMXINT8", "INT8", bits=8, levels=127, scale_arithmetic=FP32_RECIPROCAL, layout=AMX_TILED,
                   n_block=64, k_align=64)
METHODS: dict[str, QuantMethod] = {m.name: m for m in (INT4, INT8)}


def get_method(name: str) -> QuantMethod:
    """The row of a --quant-method / manifest method name (ValueError naming the known ones)."""
    try:
        return METHODS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown quant method {name!r}; expected one of {sorted(METHODS)}") from None


def alignment_problem(method: QuantMethod, hidden_size: int, intermediate_size: int, threadpool_count: int,
                      *, flags: bool = False) -> str | None:
    """Why `method` cannot hold experts of hidden size H and intermediate size I split over T NUMA
    pools, or None: the rule is I % T == 0, H % k_align == 0 and (I / T) % k_align == 0
    (docs/FORMAT.md §1). flags: name T and the method as the command line does."""
    a, H, I, T = method.k_align, hidden_size, intermediate_size, threadpool_count
    pools = "--threadpool-count" if flags else "threadpool_count"
    needs = f"which {'--quant-method ' if flags else ''}{method.name} needs"
    if I % T:
        return f"moe_intermediate_size {I} is not divisible by {pools} {T}"
    if H % a:
        return f"hidden_size {H} is not a multiple of {a}, {needs}"
    if (I // T) % a:
        return f"moe_intermediate_size / threadpool_count = {I} / {T} = {I // T} is not a multiple of {a}, {needs}"
    return None


def working_threadpool_counts(method: QuantMethod, hidden_size: int, intermediate_size: int,
                              limit: int = 16) -> list[int]:
    return [t for t in range(1, limit + 1) if alignment_problem(method, hidden_size, intermediate_size, t) is None]
