"""Names, keys and shapes of the packed format (docs/FORMAT.md §4-§5).

Each name is built by one function and parsed by the pattern beside it; the NUMA split of one
expert's matrices; `PackedSpec`, what a packed output holds, with the tensors of a layer and
their byte sizes (the one place those are computed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .methods import METHODS, QuantMethod, get_method
from .safetensors_file import tensor_nbytes

FORMAT_VERSION = 1
MANIFEST_FILE = "kt_manifest.json"
INDEX_FILE = "model.safetensors.index.json"
LOCK_FILE = ".kt_convert.lock"
VERIFIED_FILE = ".kt_verified.json"  # the loader's record of layers it hashed (format/verified.py)
# --kt-sft-manifest: kt-kernel's SFT loader accepts nothing at the root of its weight folder but its own
# manifest and the _layer_L folders, so this converter's files (MANIFEST_FILE, LOCK_FILE, VERIFIED_FILE, the
# copied model files) go to the sibling folder state_dir(OUT) (docs/FORMAT.md §5)
KT_SFT_MANIFEST_FILE = "kt-weight-manifest.json"
STATE_DIR_SUFFIX = ".kt-convert"


def is_published(relative_name: str) -> bool:
    """A file of an output that users publish or load, and so the same bytes from the same source contents
    and options whatever the run (docs/FORMAT.md §5, Reproducibility): every file but the manifest (it says
    where the source was read) and dot-files (the lock, the verified record, the --shard folder)."""
    parts = relative_name.split("/")
    return parts[-1] != MANIFEST_FILE and not any(part.startswith(".") for part in parts)


PROJECTIONS = ("gate", "up", "down")
PARTS = ("weight", "scale")
ALIGN = 64  # merged shards: data section and every tensor start on a 64-byte boundary

# -- names and their parsers ---------------------------------------------------------------------


class MergedKey(NamedTuple):
    layer: int
    proj: str
    expert: int
    numa: int  # NUMA shard index, 0 .. threadpool_count - 1
    part: str


def merged_key(layer: int, proj: str, expert: int, numa: int, part: str) -> str:
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{numa}.{part}"


MERGED_KEY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.numa\.(\d+)\.(weight|scale)$")


def parse_merged_key(key: str) -> MergedKey | None:
    m = MERGED_KEY.match(key)
    return MergedKey(int(m[1]), m[2], int(m[3]), int(m[4]), m[5]) if m else None


def ct_key(layer: int, proj: str, expert: int, part: str) -> str:
    """compressed-tensors expert keys (the group-wise INT4 layout): what kt's RAWINT4 loader
    (CompressedSafeTensorLoader) finds under base `model.layers.{L}`, the first prefix it tries, for every
    family (docs/FORMAT.md §7). part: weight_packed | weight_scale | weight_shape."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.{part}"


CT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\."
                    r"(weight_packed|weight_scale|weight_shape)$")


def state_dir(root: Path) -> Path:
    """Where the converter keeps its own files for an output whose folder holds kt's SFT tree only."""
    root = Path(root)
    return root.with_name(root.name + STATE_DIR_SUFFIX)


def shard_file_name(index: int, count: int) -> str:
    """1-based shard index, as transformers and kt name shards."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def layer_dir_name(layer: int) -> str:
    return f"_layer_{layer}"


LAYER_DIR = re.compile(r"^_layer_(\d+)$")
LAYER_DIR_TEMPORARY = re.compile(r"^_layer_\d+\.(tmp|old)$")  # what an interrupted run leaves (FORMAT.md §5)


def numa_dir_name(numa: int) -> str:
    return f"_numa_{numa}"


NUMA_DIR = re.compile(r"^_numa_(\d+)$")


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

    def pair_entries(self, layer: int, proj: str, expert: int, numa: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, dtype, shape) of the tensors of one NUMA shard of one expert's projection, in file order:
        AMX-tiled weight bytes and scales; or (NUMA-free) compressed-tensors weight_packed int32 [N, K/8],
        weight_scale bf16 [N, K/group] and weight_shape int64 [2]."""
        m = self.quant_method
        if m.numa_split:
            weight, scales = self.shard_sizes(proj)
            return [(merged_key(layer, proj, expert, numa, "weight"), "I8", (weight,)),
                    (merged_key(layer, proj, expert, numa, "scale"), m.scale_dtype, (scales,))]
        n, k = self.shard_shape(proj)
        return [(ct_key(layer, proj, expert, "weight_packed"), "I32", (n, k // 8)),
                (ct_key(layer, proj, expert, "weight_scale"), m.scale_dtype, (n, k // m.group_size)),
                (ct_key(layer, proj, expert, "weight_shape"), "I64", (2,))]

    def pair_arrays(self, layer: int, proj: str, expert: int, numa: int, weight: np.ndarray,
                    scale: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The packer's (weight bytes, scales) of one pair as the tensors pair_entries names."""
        entries = self.pair_entries(layer, proj, expert, numa)
        if self.quant_method.numa_split:
            return [(entries[0][0], weight), (entries[1][0], scale)]
        n, k = self.shard_shape(proj)
        return [(entries[0][0], weight), (entries[1][0], scale), (entries[2][0], np.array([n, k], dtype=np.int64))]

    def layer_entries(self, layer: int) -> list[tuple[str, str, tuple[int, ...]]]:
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
