"""Byte orders: how a method's packed matrices and scales lie in an output, and what an output in that
order can be (docs/FORMAT.md §3, §7).

A quant method row (methods.py) refers to one ByteOrder, and everything that differs between byte orders is
asked of it rather than decided by a test of the method at each reader and writer: the keys and tensors of
one pair (one NUMA shard of one expert's projection: `pair_entries`, `pair_arrays`), what a reader checks
beyond their dtypes and shapes (`pair_problem`), the scale count, whether matrices are split per NUMA pool on
disk (`numa_split`, `stored_pools`), what an output in this order refuses (`output_problem`: kt's .kt folders,
a SwiGLU clamp; `record_problem`: the same in a manifest; `cuda_packer`: packed by the Triton packer or on
the CPU only), and the quantization_config an output declares (`quantization_config`). The format imports no
torch, so the reference numerics of each order are registered under it in quant (quant/reference.py:
REFERENCES, quant/staged_dequant.py: STAGED).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .names import MERGED

Entry = tuple[str, str, tuple[int, ...]]  # (tensor key, safetensors dtype, shape)


# -- the keys of each byte order and their parsers --------------------------------------------------------


class MergedKey(NamedTuple):
    layer: int
    proj: str
    expert: int
    numa: int  # NUMA shard index, 0 .. threadpool_count - 1
    part: str


def merged_key(layer: int, proj: str, expert: int, numa: int, part: str) -> str:
    """kt's merged-safetensors key of one NUMA shard's tiled weight bytes or scales (part: weight | scale)."""
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{numa}.{part}"


MERGED_KEY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.numa\.(\d+)\.(weight|scale)$")


def parse_merged_key(key: str) -> MergedKey | None:
    m = MERGED_KEY.match(key)
    return MergedKey(int(m[1]), m[2], int(m[3]), int(m[4]), m[5]) if m else None


def ct_key(layer: int, proj: str, expert: int, part: str) -> str:
    """compressed-tensors expert keys: what kt's RAWINT4 loader (CompressedSafeTensorLoader) finds under base
    `model.layers.{L}`, the first prefix it tries, for every family (docs/FORMAT.md §7).
    part: weight_packed | weight_scale | weight_shape."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.{part}"


CT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\."
                    r"(weight_packed|weight_scale|weight_shape)$")


# -- the byte orders ----------------------------------------------------------------------------------------


class ByteOrder:
    """What every byte order answers. A pair's entries always start with its weight bytes and its scales
    (what the packer fills and the engine reads); an order may add tensors after them."""

    name = ""  # the order's name in docs/FORMAT.md and the method table
    numa_split = True  # split on disk per NUMA pool (kt's BufferB); False: whole matrices, split by kt in RAM
    cuda_packer = True  # the Triton packer (quant/gpu.py) writes it; False: packed on the CPU only

    def scale_count(self, method, n: int, k: int) -> int:
        raise NotImplementedError

    def pair_entries(self, method, layer: int, proj: str, expert: int, numa: int, n: int, k: int) -> list[Entry]:
        """(key, dtype, shape) of the tensors of one pair of an [n, k] shard, in file order."""
        raise NotImplementedError

    def pair_arrays(self, entries: list[Entry], weight: np.ndarray, scale: np.ndarray, n: int,
                    k: int) -> list[tuple[str, np.ndarray]]:
        """The packer's (weight bytes, scales) of one pair as the tensors `entries` name."""
        return [(entries[0][0], weight), (entries[1][0], scale)]

    def pair_problem(self, entries: list[Entry], arrays: list[np.ndarray], n: int, k: int) -> str | None:
        """What is wrong with a pair read back (its tensors' dtypes and shapes already match `entries`)."""
        return None

    def stored_pools(self, threadpool_count: int) -> int:
        """The NUMA pools an output for `threadpool_count` pools holds on disk."""
        return threadpool_count if self.numa_split else 1

    def output_problem(self, method, layout: str, swiglu_limit: float | None, where: str) -> str | None:
        """Why an output of `method` cannot be written as `layout` for a model with this SwiGLU clamp (None:
        it can); where: the model's config, named in a refusal that concerns the model."""
        return None

    def record_problem(self, method, layout: str, threadpool_count: int) -> str | None:
        """Why a manifest recording `method` in `layout` for `threadpool_count` pools cannot be right."""
        return None

    def quantization_config(self, method) -> dict | None:
        """config.json's quantization_config of an output (None: the copied config.json is left as it is)."""
        return None

    def __repr__(self) -> str:
        return f"<byte order {self.name}>"


class TiledRows(ByteOrder):
    """kt's AMX BufferB: N-blocks x K-blocks of 2048-byte tile pairs per NUMA shard, one float32 scale per
    row (docs/FORMAT.md §3), under kt's merged keys (or in its .kt files)."""

    name = "amx-tiled"

    def scale_count(self, method, n: int, k: int) -> int:
        return n

    def pair_entries(self, method, layer: int, proj: str, expert: int, numa: int, n: int, k: int) -> list[Entry]:
        return [(merged_key(layer, proj, expert, numa, "weight"), "I8", (method.weight_bytes(n, k),)),
                (merged_key(layer, proj, expert, numa, "scale"), method.scale_dtype, (self.scale_count(method, n, k),))]


class GroupWise(ByteOrder):
    """compressed-tensors pack-quantized, what kt's RAWINT4 loads: whole row-major matrices under the model's
    own expert keys (kt splits them per NUMA pool in RAM, so the output holds one pool), int32 words of 8
    offset-binary nibbles (element j at bits 4j), bf16 scales per group of K, and the matrix's shape
    (docs/FORMAT.md §7). kt's loader reads safetensors only, and kt refuses a SwiGLU clamp with it."""

    name = "compressed-tensors"
    numa_split = False
    cuda_packer = False

    def scale_count(self, method, n: int, k: int) -> int:
        return n * (k // method.group_size)

    def pair_entries(self, method, layer: int, proj: str, expert: int, numa: int, n: int, k: int) -> list[Entry]:
        return [(ct_key(layer, proj, expert, "weight_packed"), "I32", (n, k // 8)),
                (ct_key(layer, proj, expert, "weight_scale"), method.scale_dtype, (n, k // method.group_size)),
                (ct_key(layer, proj, expert, "weight_shape"), "I64", (2,))]

    def pair_arrays(self, entries: list[Entry], weight: np.ndarray, scale: np.ndarray, n: int,
                    k: int) -> list[tuple[str, np.ndarray]]:
        return [*super().pair_arrays(entries, weight, scale, n, k), (entries[2][0], np.array([n, k], dtype=np.int64))]

    def pair_problem(self, entries: list[Entry], arrays: list[np.ndarray], n: int, k: int) -> str | None:
        shape = [int(v) for v in arrays[2]]
        return None if shape == [n, k] else f"tensor {entries[2][0]} says {shape}, expected {[n, k]}"

    def output_problem(self, method, layout: str, swiglu_limit: float | None, where: str) -> str | None:
        if swiglu_limit is not None:
            return (f"{where}: this model clamps its SwiGLU (swiglu_limit {swiglu_limit}), which kt-kernel "
                    f"refuses with --kt-method {method.kt_method}: convert with --quant-method int4 or int8 "
                    "(AMXINT4/AMXINT8 apply the clamp), or serve the checkpoint's MXFP4 experts natively with "
                    "--kt-method MXFP4")
        if layout != MERGED:
            return (f"--no-merge-safetensor: --quant-method {method.choice} writes safetensors only (kt's "
                    f"{method.kt_method} loader reads no .kt folders); drop --no-merge-safetensor")
        return None

    def record_problem(self, method, layout: str, threadpool_count: int) -> str | None:
        if layout != MERGED or threadpool_count != self.stored_pools(threadpool_count):
            return (f"method {method.name} is stored as whole matrices in safetensors shards: layout must be "
                    f"{MERGED} and threadpool_count 1, got {layout!r} and {threadpool_count}")
        return None

    def quantization_config(self, method) -> dict | None:
        """As compressed-tensors writes it (symmetric int4, group strategy, pack-quantized), targeting the
        routed experts' projections only."""
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"],
                "weights": {"num_bits": method.bits, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": method.group_size, "dynamic": False, "actorder": None,
                            "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
                "input_activations": None, "output_activations": None}},
            "ignore": [],
            "kv_cache_scheme": None,
        }


AMX_TILED = TiledRows()
COMPRESSED_TENSORS = GroupWise()
BYTE_ORDERS = (AMX_TILED, COMPRESSED_TENSORS)
