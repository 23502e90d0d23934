"""The packed weight methods: one row per method, and the alignment rule every reader and writer uses.

A row says everything the format, the converter and the runtime need to know about a method; the
CLI choices, the manifest checks, the reader's inference and the CPU engine read it from here, and
kernels_cpp's `method_info` holds the same numbers (tests/test_format_room.py compares them). What depends
on how the bytes are ordered is asked of the row's byte order (byte_orders.py). Adding a method is a row
here (with a new ByteOrder when its bytes are ordered another way) plus its kernels (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .byte_orders import AMX_TILED, BYTE_ORDERS, COMPRESSED_TENSORS, ByteOrder
from .errors import FixableError

# The AMX-tiled byte order (docs/FORMAT.md §3): K-blocks of 3584 elements, 2048-byte tile pairs of
# 32 rows x 64 bytes.
K_BLOCK = 3584
TILE_ROWS = 32
TILE_BYTES = 64

FP32_RECIPROCAL = "fp32-reciprocal"  # d = fl32(amax * fl32(1 / levels)) (what GCC -ffast-math makes of amax / levels)
FP64_DIVIDE = "fp64-divide"  # d = fl32((double)amax / levels)
# per group: the bf16 scale d with the least squared error sum((w - q d)^2), q = clamp(rint(w / d), -7, 7)
# (the smallest such d; docs/FORMAT.md §9)
BF16_LEAST_SQUARES = "bf16-least-squares"
SCALE_ARITHMETIC = (FP32_RECIPROCAL, FP64_DIVIDE, BF16_LEAST_SQUARES)


@dataclass(frozen=True)
class QuantMethod:
    name: str  # --quant-method value and the manifest's "method"
    kt_method: str  # SGLang-KT --kt-method value
    kt_file_prefix: str  # prefix of kt's --no-merge-safetensor .kt file names
    bits: int  # bits per stored weight (4: two per byte)
    levels: int  # d = amax / levels: the largest |q| in the int8 grid (INT4 then rounds to multiples of 16)
    scale_arithmetic: str  # how amax / levels is computed, bit for bit (FP32_RECIPROCAL | FP64_DIVIDE)
    byte_order: ByteOrder  # how the weights and scales lie on disk (byte_orders.BYTE_ORDERS)
    n_block: int  # rows per N-block
    k_align: int  # K, and the NUMA slice of I, must be multiples of this
    group_size: int | None = None  # None: one scale per output row; else K elements per scale
    scale_dtype: str = "F32"  # safetensors dtype of the scales
    cli_name: str = ""  # --quant-method value when rows differ only in group_size ("" : name)

    def __post_init__(self):
        if self.byte_order not in BYTE_ORDERS:
            raise ValueError(f"method {self.name}: byte order {self.byte_order!r} is not one of {BYTE_ORDERS}")
        if self.scale_arithmetic not in SCALE_ARITHMETIC:
            raise ValueError(f"method {self.name}: scale_arithmetic {self.scale_arithmetic!r} is not one of "
                             f"{SCALE_ARITHMETIC}")
        if 8 % self.bits:
            raise ValueError(f"method {self.name}: {self.bits} bits do not divide a byte")
        if self.group_size is not None and self.k_align % self.group_size:
            raise ValueError(f"method {self.name}: k_align {self.k_align} is not a multiple of group_size "
                             f"{self.group_size}")

    @property
    def choice(self) -> str:
        """The --quant-method value that selects this row (with --group-size when several rows share it)."""
        return self.cli_name or self.name

    @property
    def elems_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def k_block_bytes(self) -> int:
        return K_BLOCK // self.elems_per_byte

    def weight_bytes(self, n: int, k: int) -> int:
        return n * k // self.elems_per_byte

    def scale_count(self, n: int, k: int) -> int:
        return self.byte_order.scale_count(self, n, k)

    def max_error(self, amax: float) -> float:
        """A bound on |dequantized - source| of any weight whose row (or group) has the largest |weight|
        amax: one step of the grid the method can represent, amax / (2^(bits-1) - 1), with a margin for the
        scale's rounding; plus what flushing to zero loses (a scale below float32's smallest normal is 0,
        so a row with amax < levels * 2^-126 packs as zeros, and subnormal weights as 0). The exact worst
        cases are about half of it: 0.5 d for INT8, 8.5 d of 112 d for INT4. The least-squares scale
        (RAWINT4) may clip: one weight errs at most the square root of the group's error at amax/7 (rounded
        up), which every weight's half step bounds, so the bound is sqrt(group) / 2 steps (groups of g - 1
        equal small weights and one large reach about half of it). An error well past this bound is not
        quantization (verify: not the output's source)."""
        step = (1 + 2 ** -6) / (2 ** (self.bits - 1) - 1) * amax
        if self.scale_arithmetic == BF16_LEAST_SQUARES:
            step *= math.sqrt(self.group_size) / 2
        return step + self.levels * 2.0 ** -126


INT4 = QuantMethod("int4", "AMXINT4", "INT4", bits=4, levels=112, scale_arithmetic=FP64_DIVIDE,
                   byte_order=AMX_TILED, n_block=128, k_align=128)
INT8 = QuantMethod("int8", "AMXINT8", "INT8", bits=8, levels=127, scale_arithmetic=FP32_RECIPROCAL,
                   byte_order=AMX_TILED, n_block=64, k_align=64)

def _rawint4(group: int) -> QuantMethod:
    return QuantMethod(f"rawint4-g{group}", "RAWINT4", "", bits=4, levels=7, scale_arithmetic=BF16_LEAST_SQUARES,
                       byte_order=COMPRESSED_TENSORS, n_block=1, k_align=group, group_size=group, scale_dtype="BF16",
                       cli_name="rawint4")


RAWINT4_G32, RAWINT4_G64, RAWINT4_G128 = _rawint4(32), _rawint4(64), _rawint4(128)
METHODS: dict[str, QuantMethod] = {m.name: m for m in (INT4, INT8, RAWINT4_G32, RAWINT4_G64, RAWINT4_G128)}
# --quant-method values, in table order, and the group sizes each takes (() : none)
CHOICES: dict[str, tuple[int, ...]] = {}
for _m in METHODS.values():
    CHOICES.setdefault(_m.choice, ())
    if _m.group_size is not None:
        CHOICES[_m.choice] += (_m.group_size,)
# group 32: the one group size every kt-kernel RAWINT4 kernel computes (its AMX/AVX-512 one, AMXInt4_KGroup,
# returns NaN or crashes at 64 and 128: docs/FORMAT.md §9), and it carries INT4 sources of groups 32, 64, 128
DEFAULT_GROUP_SIZE = 32


def method_for(choice: str, group_size: int | None = None) -> QuantMethod:
    """The row of a --quant-method value and --group-size (None: the default where the choice takes one).
    FixableError (a ValueError) naming what is accepted."""
    c = str(choice).lower()
    if c in METHODS and c not in CHOICES and group_size is None:  # a row's own name (manifests, scripts)
        return METHODS[c]
    if c not in CHOICES:
        raise FixableError(f"unknown quant method {choice!r}; expected one of {sorted(CHOICES)}")
    groups = CHOICES[c]
    if not groups:
        if group_size is not None:
            raise FixableError(f"--group-size applies to {', '.join(k for k, g in CHOICES.items() if g)}, "
                               f"not to {c} (one scale per row)")
        return METHODS[c]
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    for m in METHODS.values():
        if m.choice == c and m.group_size == g:
            return m
    raise FixableError(f"--group-size {g} is not available for {c}; expected one of {list(groups)}")


def get_method(name: str) -> QuantMethod:
    """The row of a --quant-method / manifest method name (FixableError naming the known ones)."""
    try:
        return METHODS[name.lower()]
    except (KeyError, AttributeError):
        raise FixableError(f"unknown quant method {name!r}; expected one of {sorted(METHODS)}") from None


def alignment_problem(method: QuantMethod, hidden_size: int, intermediate_size: int, threadpool_count: int,
                      *, flags: bool = False, intermediate_key: str = "moe_intermediate_size") -> str | None:
    """Why `method` cannot hold experts of hidden size H and intermediate size I split over T NUMA
    pools, or None: the rule is I % T == 0, H % k_align == 0 and (I / T) % k_align == 0
    (docs/FORMAT.md §1). flags: name T and the method as the command line does; intermediate_key: I's
    name in the model's config.json (gpt-oss: intermediate_size)."""
    a, H, I, T = method.k_align, hidden_size, intermediate_size, threadpool_count
    pools = "--threadpool-count" if flags else "threadpool_count"
    needs = f"which {'--quant-method ' if flags else ''}{method.name} needs"
    if I % T:
        return f"{intermediate_key} {I} is not divisible by {pools} {T}"
    if H % a:
        return f"hidden_size {H} is not a multiple of {a}, {needs}"
    if (I // T) % a:
        return f"{intermediate_key} / threadpool_count = {I} / {T} = {I // T} is not a multiple of {a}, {needs}"
    return None


def working_threadpool_counts(method: QuantMethod, hidden_size: int, intermediate_size: int,
                              limit: int = 16) -> list[int]:
    return [t for t in range(1, limit + 1) if alignment_problem(method, hidden_size, intermediate_size, t) is None]
