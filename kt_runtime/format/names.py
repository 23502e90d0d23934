"""The names of a packed output's files and folders, and its two layouts (docs/FORMAT.md §4-§5).

Each name is built by one function and parsed by the pattern beside it. A layout is the form an output
takes on disk: `merged` (one safetensors shard per layer) or `kt-folders` (kt's --no-merge-safetensor
`_layer_L/_numa_t/*.kt` files); the manifest records it as "layout". The tensor keys inside the files belong
to the byte order of the method (byte_orders.py), the `.kt` file names to the method row (spec.py).
"""
from __future__ import annotations

import re
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_FILE = "kt_manifest.json"
INDEX_FILE = "model.safetensors.index.json"
LOCK_FILE = ".kt_convert.lock"
VERIFIED_FILE = ".kt_verified.json"  # the reader's record of layers it hashed (format/verified.py)
# --kt-sft-manifest: kt-kernel's SFT loader accepts nothing at the root of its weight folder but its own
# manifest and the _layer_L folders, so this converter's files (MANIFEST_FILE, LOCK_FILE, VERIFIED_FILE, the
# copied model files) go to the sibling folder state_dir(OUT) (docs/FORMAT.md §5)
KT_SFT_MANIFEST_FILE = "kt-weight-manifest.json"
STATE_DIR_SUFFIX = ".kt-convert"

MERGED = "merged"  # one safetensors shard per layer (model-0000L-of-0000N.safetensors), indexed
KT_FOLDERS = "kt-folders"  # kt's _layer_L/_numa_t/*.kt files
LAYOUTS = (MERGED, KT_FOLDERS)

PROJECTIONS = ("gate", "up", "down")


def is_published(relative_name: str) -> bool:
    """A file of an output that users publish or load, and so the same bytes from the same source contents
    and options whatever the run (docs/FORMAT.md §5, Reproducibility): every file but the manifest (it says
    where the source was read) and dot-files (the lock, the verified record, the --shard folder)."""
    parts = relative_name.split("/")
    return parts[-1] != MANIFEST_FILE and not any(part.startswith(".") for part in parts)


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
