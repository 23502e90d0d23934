"""kt-weight-manifest.json: what kt-kernel's SFT path requires at the root of an AMXINT8 `--no-merge-safetensor`
tree before it loads a byte of it (kvcache-ai/ktransformers 95009ea, kt-kernel/python/sft/weight_manifest.py
`validate_persistent_int8_weights`, added by #2141), built from the converter's layer records; and the same
rules checked on a tree (`verify`). docs/FORMAT.md §5.

kt's rules: the root holds exactly this file and one `_layer_L` folder per MoE layer of the model; each
`_layer_L` exactly `_numa_0 .. _numa_{T-1}`; each of those exactly the listed regular files, named
`INT8_{gate,up,down}_{E}_{bytes}Byte_{quant,scale}_.kt`, of the sizes of an int8 [n, k] matrix and n fp32
scales; schema 2 lists each file's lowercase sha256, which kt checks by default. No symlink anywhere.

The bytes are AMXINT8's: kt's SFT class for this byte order, `AMX_SFT_MOE_TP<GemmKernel224Int8>`
(operators/amx/sft_moe.hpp), derives from the inference class `AMX_MOE_TP<GemmKernel224Int8>` and loads its
forward weights with that class's `load_weights` / `read_weights` (operators/amx/moe.hpp) into the same
`GemmKernel224Int8::BufferB`, whose byte order the extension reports as `kt-int8-n32-k64-vnni-v1`
(ext_bindings.cpp: `__int8_weight_layout__`); #2141 added a oneDNN compensation computed in memory from those
bytes, not stored.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from . import files, fsio
from .digest import BLOCK, file_sha256, tree_sha256_of_files
from .errors import InputFileError
from .input_files import MANIFEST_MAX_BYTES
from .names import KT_SFT_MANIFEST_FILE, layer_dir_name, numa_dir_name
from .spec import PackedSpec, parse_kt_file_name
from .manifest import LayerRecord

SCHEMA_VERSION = 2
KT_BYTE_ORDER = "kt-int8-n32-k64-vnni-v1"  # kt's name for AMXINT8's byte order (its manifest's "layout")
METHOD = "int8"  # the method row whose bytes are in that order (AMXINT8)


def weight_manifest(spec: PackedSpec, records: dict[int, LayerRecord], producer: str) -> dict[str, Any]:
    """kt's schema-2 manifest of a complete output (every layer of spec recorded, with its files' sha256)."""
    layers = []
    for layer in spec.layers:
        rec = records[layer]
        if rec.file_sha256 is None:
            raise ValueError(f"layer {layer}: no per-file sha256 recorded")
        names = [parse_kt_file_name(Path(f).name) for f in rec.files]
        if None in names:
            raise ValueError(f"layer {layer}: a file that is not a .kt name is recorded")
        sizes = [name.nbytes for name in names]
        if sum(sizes) != rec.nbytes:
            raise ValueError(f"layer {layer}: the file names add up to {sum(sizes)} bytes, the record says {rec.nbytes}")
        files = [{"path": f, "size_bytes": n, "sha256": h} for f, n, h in zip(rec.files, sizes, rec.file_sha256)]
        layers.append({"index": layer, "numa_count": spec.threadpool_count, "state": "ready", "files": files,
                       "bytes": rec.nbytes})
    return {"schema_version": SCHEMA_VERSION, "state": "ready", "expert_weight_format": "int8", "layout": KT_BYTE_ORDER,
            "threadpool_count": spec.threadpool_count, "expert_num": spec.num_experts,
            "hidden_size": spec.hidden_size, "intermediate_size": spec.moe_intermediate_size,
            "layers": layers, "bytes": sum(layer["bytes"] for layer in layers), "producer": producer}


def record_digests_problem(root: Path, rec: LayerRecord) -> str | None:
    """Whether a record's per-file sha256s are those of its files, given that its tree digest is (the reader
    checks that): for files of one 64 MiB block the tree digest is the sha256 of their sha256s, so nothing is
    read; a longer file is hashed."""
    if rec.file_sha256 is None:
        return f"layer {rec.layer} has no per-file sha256 in the converter's records"
    sizes = [os.lstat(root / f).st_size for f in rec.files]
    if all(0 < n <= BLOCK for n in sizes):
        ok = tree_sha256_of_files(rec.file_sha256) == rec.sha256
    else:
        ok = all(file_sha256(root / f) == h for f, h in zip(rec.files, rec.file_sha256))
    return None if ok else f"layer {rec.layer}: the per-file sha256s recorded do not match its files"


def weight_manifest_problem(root: Path, spec: PackedSpec, records: dict[int, LayerRecord]) -> str | None:
    """What in the tree at root, or in its kt-weight-manifest.json, kt's SFT validator would refuse or what
    contradicts the converter's records; None when both are what a conversion writes."""
    problem = _tree_problem(Path(root), spec, records)  # first: the manifest is then a regular file, no link
    if problem:
        return problem
    path = Path(root) / KT_SFT_MANIFEST_FILE
    try:
        found = files.read_json(path, files.OUTPUT, what=KT_SFT_MANIFEST_FILE, max_bytes=MANIFEST_MAX_BYTES)
    except InputFileError as e:
        return str(e)
    if not isinstance(found, dict):
        return f"{path}: not a JSON object"
    try:
        want = weight_manifest(spec, records, found.get("producer"))
    except ValueError as e:
        return f"{path}: cannot be compared with the converter's records ({e})"
    for key in want:
        if found.get(key) != want[key]:
            return f"{path}: {key} differs from the converter's records"
    extra = sorted(set(found) - set(want))
    return f"{path}: unexpected fields {extra}" if extra else None


def _tree_problem(root: Path, spec: PackedSpec, records: dict[int, LayerRecord]) -> str | None:
    """kt's inventory rules: exactly these entries at every level, real folders and regular files."""
    want = {KT_SFT_MANIFEST_FILE: "file", **{layer_dir_name(layer): "dir" for layer in spec.layers}}
    problem = _entries_problem(root, want)
    if problem:
        return problem
    numa_dirs = {numa_dir_name(t): "dir" for t in range(spec.threadpool_count)}
    for layer in spec.layers:
        layer_dir = root / layer_dir_name(layer)
        problem = _entries_problem(layer_dir, numa_dirs)
        if problem:
            return problem
        listed = [Path(f) for f in records[layer].files]
        for numa in numa_dirs:
            problem = _entries_problem(layer_dir / numa, {p.name: "file" for p in listed if p.parent.name == numa})
            if problem:
                return problem
    return None


def _entries_problem(folder: Path, want: dict[str, str]) -> str | None:
    """folder holds exactly the names of `want`, each a real directory ("dir") or regular file ("file")."""
    found = {name: os.lstat(folder / name).st_mode for name in fsio.list_dir(folder)}
    extra, missing = sorted(set(found) - set(want)), sorted(set(want) - set(found))
    if extra or missing:
        what = " and ".join(([f"holds {', '.join(extra[:3])}"] if extra else [])
                            + ([f"lacks {', '.join(missing[:3])}"] if missing else []))
        return f"{folder} {what}: kt-kernel's SFT loader accepts exactly the entries its manifest lists"
    for name, mode in found.items():
        if not (stat.S_ISDIR(mode) if want[name] == "dir" else stat.S_ISREG(mode)):
            return f"{folder / name} is not a real {'directory' if want[name] == 'dir' else 'regular file'}"
    return None
