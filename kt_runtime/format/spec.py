"""What a packed output holds (docs/FORMAT.md §4-§5): the NUMA split of one expert's matrices, kt's `.kt`
file names, and `PackedSpec`, with the tensors of a layer and their byte sizes (the one place those are
computed; the tensors of one pair come from the method's byte order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .byte_orders import Entry
from .methods import METHODS, QuantMethod, get_method
from .names import PROJECTIONS, layer_dir_name, numa_dir_name
from .safetensors_file import tensor_nbytes

# -- kt's --no-merge-safetensor file names ------------------------------------------------------------------


class KtFileName(NamedTuple):
    method: QuantMethod
    proj: str
    expert: int
    nbytes: int
    part: str  # "quant" | "scale"


def kt_file_names(method: str, proj: str, expert: int, weight_bytes: int, scale_count: int) -> tuple[str, str]:
    """--no-merge-safetensor file names (quant, scale) inside _layer_L/_numa_t/."""
    m = get_method(method)
    scale_bytes = tensor_nbytes(m.scale_dtype, (scale_count,))
    return (f"{m.kt_file_prefix}_{proj}_{expert}_{weight_bytes}Byte_quant_.kt",
            f"{m.kt_file_prefix}_{proj}_{expert}_{scale_bytes}Byte_scale_.kt")


KT_FILE = re.compile(r"^(" + "|".join(re.escape(m.kt_file_prefix) for m in METHODS.values() if m.kt_file_prefix)
                     + r")_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt$")


def parse_kt_file_name(name: str) -> KtFileName | None:
    m = KT_FILE.match(name)
    if not m:
        return None
    method = next(x for x in METHODS.values() if x.kt_file_prefix == m[1])
    return KtFileName(method, m[2], int(m[3]), int(m[4]), m[5])


def kt_file_paths(root: Path, layer: int, numa: int, method: str, proj: str, expert: int, weight_bytes: int,
                  scale_count: int) -> tuple[Path, Path]:
    folder = Path(root) / layer_dir_name(layer) / numa_dir_name(numa)
    quant, scale = kt_file_names(method, proj, expert, weight_bytes, scale_count)
    return folder / quant, folder / scale


# -- the NUMA split of one expert (docs/FORMAT.md §4) ---------------------------------------------


class ShardSlice(NamedTuple):
    """Rows [row0, row0+n) and columns [col0, col0+k) of the source matrix."""

    row0: int
    n: int
    col0: int
    k: int


def full_shape(proj: str, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
    """(n, k) of a whole projection: gate/up [I, H], down [H, I]."""
    return (hidden_size, intermediate_size) if proj == "down" else (intermediate_size, hidden_size)


def shard_slice(proj: str, hidden_size: int, intermediate_size: int, threadpool_count: int, t: int) -> ShardSlice:
    """NUMA shard t of T: gate/up rows [t*I_l, (t+1)*I_l) of [I, H]; down columns of [H, I]."""
    if intermediate_size % threadpool_count:
        raise ValueError(f"moe_intermediate_size {intermediate_size} is not divisible by threadpool count "
                         f"{threadpool_count}")
    i_l = intermediate_size // threadpool_count
    if proj in ("gate", "up"):
        return ShardSlice(row0=t * i_l, n=i_l, col0=0, k=hidden_size)
    if proj == "down":
        return ShardSlice(row0=0, n=hidden_size, col0=t * i_l, k=i_l)
    raise ValueError(f"unknown projection {proj!r}; expected one of {PROJECTIONS}")


def shard_shape(proj: str, hidden_size: int, intermediate_size: int, threadpool_count: int) -> tuple[int, int]:
    """(n, k) of one NUMA shard of a projection."""
    s = shard_slice(proj, hidden_size, intermediate_size, threadpool_count, 0)
    return s.n, s.k


# -- what an output holds --------------------------------------------------------------------------


@dataclass
class PackedSpec:
    """What a packed output holds and how it is computed: the method, the NUMA split, the experts'
    dimensions, the layers, the activation. The manifest's first fields (Manifest.spec); inferred
    from the tensors for a kt-kernel output without a manifest."""

    method: str
    threadpool_count: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layers: tuple[int, ...]
    activation: str = "silu"
    swiglu_limit: float | None = None

    @property
    def quant_method(self) -> QuantMethod:
        return get_method(self.method)

    def shard_shape(self, proj: str) -> tuple[int, int]:
        return shard_shape(proj, self.hidden_size, self.moe_intermediate_size, self.threadpool_count)

    def shard_sizes(self, proj: str) -> tuple[int, int]:
        """(weight bytes, scale count) of one NUMA shard of a projection."""
        n, k = self.shard_shape(proj)
        m = self.quant_method
        return m.weight_bytes(n, k), m.scale_count(n, k)

    def pair_entries(self, layer: int, proj: str, expert: int, numa: int) -> list[Entry]:
        """(key, dtype, shape) of the tensors of one NUMA shard of one expert's projection, in file order
        (the method's byte order names them: weight bytes and scales first)."""
        m = self.quant_method
        n, k = self.shard_shape(proj)
        return m.byte_order.pair_entries(m, layer, proj, expert, numa, n, k)

    def pair_arrays(self, layer: int, proj: str, expert: int, numa: int, weight: np.ndarray,
                    scale: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The packer's (weight bytes, scales) of one pair as the tensors pair_entries names."""
        m = self.quant_method
        n, k = self.shard_shape(proj)
        order = m.byte_order
        return order.pair_arrays(order.pair_entries(m, layer, proj, expert, numa, n, k), weight, scale, n, k)

    def layer_entries(self, layer: int) -> list[Entry]:
        """(key, dtype, shape) of every tensor of one merged layer shard, in file order."""
        entries = []
        for expert in range(self.num_experts):
            for proj in PROJECTIONS:
                for t in range(self.threadpool_count):
                    entries += self.pair_entries(layer, proj, expert, t)
        return entries

    def layer_data_bytes(self) -> int:
        """Packed bytes of one layer's tensors, without headers or padding; the same in both layouts.
        (Computed per expert, not summed over layer_entries: a damaged manifest may claim any number of
        experts.)"""
        per_expert = sum(tensor_nbytes(dtype, shape) for proj in PROJECTIONS
                         for _, dtype, shape in self.pair_entries(0, proj, 0, 0))
        return self.num_experts * self.threadpool_count * per_expert

    def kt_layer_files(self, layer: int) -> list[str]:
        """The --no-merge-safetensor files of a layer, relative to the output, in write order."""
        names = []
        for expert in range(self.num_experts):
            for proj in PROJECTIONS:
                weight, scales = self.shard_sizes(proj)
                for t in range(self.threadpool_count):
                    names += [f"{layer_dir_name(layer)}/{numa_dir_name(t)}/{f}"
                              for f in kt_file_names(self.method, proj, expert, weight, scales)]
        return names
