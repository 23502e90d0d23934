"""--kt-sft-manifest: an AMXINT8 `.kt`-folder output that kt-kernel's SFT path accepts as its persistent INT8
weights (kt_runtime/format/kt_sft_manifest.py). kt refuses any entry at the root of that folder other than its
manifest and the `_layer_L` folders, so this converter keeps its own files (kt_manifest.json, the lock, the
record of verified layers, the copied model files) in the sibling folder OUT.kt-convert (names.state_dir)."""
from __future__ import annotations

import json
from pathlib import Path

from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.kt_sft_manifest import KT_BYTE_ORDER, METHOD, weight_manifest
from kt_convert.kt_runtime.format.names import KT_SFT_MANIFEST_FILE
from kt_convert.kt_runtime.format.manifest import Manifest

from . import __version__

FLAG = "--kt-sft-manifest"


def refusal(method, merge: bool, layers: list[int] | None, resume_layer: int | None,
            shard: bool = False) -> str | None:
    """Why these options cannot make kt's SFT input (None: they can). method: the QuantMethod row."""
    if method.name != METHOD:
        return (f"{FLAG}: kt-kernel's SFT path loads INT8 .kt files of the layout {KT_BYTE_ORDER} (AMXINT8) only, not "
                f"{method.kt_method}: pass --quant-method int8")
    if merge:
        return f"{FLAG} describes kt's _layer_L/_numa_t .kt folders: add --no-merge-safetensor"
    if layers is not None:
        return (f"{FLAG}: kt-kernel's SFT validator requires every MoE layer of the model, so --layers cannot be "
                "used with it; convert every layer")
    if resume_layer is not None:
        return (f"{FLAG} cannot take over the layers of kt's own script (--resume-layer); completed layers of "
                "this converter are resumed without it: drop --resume-layer")
    if shard:
        return (f"{FLAG} is written by a single process at the end of the run; convert without --shard, "
                f"or without {FLAG}")
    return None


def write_weight_manifest(out: Path, manifest: Manifest) -> None:
    """OUT/kt-weight-manifest.json of a complete output (every layer recorded with its files' sha256)."""
    body = weight_manifest(manifest.spec, manifest.completed, f"kt-convert {__version__}")
    fsio.atomic_write_text(Path(out) / KT_SFT_MANIFEST_FILE, json.dumps(body, indent=1) + "\n")
