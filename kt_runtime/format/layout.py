"""Names and sizes of the packed on-disk format (docs/FORMAT.md), shared by writer and loader."""
from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_FILE = "kt_manifest.json"
INDEX_FILE = "model.safetensors.index.json"
LOCK_FILE = ".kt_convert.lock"
PROJECTIONS = ("gate", "up", "down")
PARTS = ("weight", "scale")
ALIGN = 64  # merged shards: data section and every tensor start on a 64-byte boundary
METHOD_INFO = {  # name: (kt --kt-method, .kt prefix, elements per byte, N_BLOCK, K alignment)
    "int4": ("AMXINT4", "INT4", 2, 128, 128),
    "int8": ("AMXINT8", "INT8", 1, 64, 64),
}


def merged_key(layer: int, proj: str, expert: int, numa: int, part: str) -> str:
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{numa}.{part}"


def shard_file_name(index: int, count: int) -> str:
    """1-based shard index, as transformers and kt name shards."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def layer_dir_name(layer: int) -> str:
    return f"_layer_{layer}"


def kt_file_names(method: str, proj: str, expert: int, weight_bytes: int, n: int) -> tuple[str, str]:
    """--no-merge-safetensor file names (quant, scale) inside _layer_L/_numa_t/."""
    prefix = METHOD_INFO[method][1]
    return (f"{prefix}_{proj}_{expert}_{weight_bytes}Byte_quant_.kt", f"{prefix}_{proj}_{expert}_{4 * n}Byte_scale_.kt")


def kt_file_paths(root: Path, layer: int, numa: int, method: str, proj: str, expert: int, weight_bytes: int,
                  n: int) -> tuple[Path, Path]:
    folder = Path(root) / layer_dir_name(layer) / f"_numa_{numa}"
    quant, scale = kt_file_names(method, proj, expert, weight_bytes, n)
    return folder / quant, folder / scale


def shard_shape(proj: str, hidden_size: int, intermediate_size: int, numa_count: int) -> tuple[int, int]:
    """(n, k) of one NUMA shard of a projection."""
    i_l = intermediate_size // numa_count
    return (hidden_size, i_l) if proj == "down" else (i_l, hidden_size)


def weight_bytes(method: str, n: int, k: int) -> int:
    return n * k // METHOD_INFO[method][2]


def layer_tensor_entries(layer: int, method: str, num_experts: int, hidden_size: int, intermediate_size: int,
                         numa_count: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, dtype, shape) of every tensor of one merged layer shard, in file order."""
    entries = []
    for expert in range(num_experts):
        for proj in PROJECTIONS:
            n, k = shard_shape(proj, hidden_size, intermediate_size, numa_count)
            for numa in range(numa_count):
                entries.append((merged_key(layer, proj, expert, numa, "weight"), "I8", (weight_bytes(method, n, k),)))
                entries.append((merged_key(layer, proj, expert, numa, "scale"), "F32", (n,)))
    return entries
