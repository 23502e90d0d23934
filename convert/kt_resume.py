"""--resume-layer N on an output that kt-kernel's own convert_cpu_weights.py started (no
kt_manifest.json): its layers before N are taken over only if they are byte for byte what this
converter writes for them, checked by converting each again into a scratch folder; otherwise the
run stops and says which layer and file differ, or why that output cannot be resumed at all."""
from __future__ import annotations

import re
from pathlib import Path

from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.digest import file_sha256
from kt_convert.kt_runtime.format.names import LAYER_DIR, MANIFEST_FILE
from kt_convert.kt_runtime.format.manifest import Manifest, write_manifest
from kt_convert.kt_runtime.format.writer import KtFolderWriter

from .announce import layer_ranges
from .errors import UserError
from .layer_io import LayerOutput, LayerReader
from .layer_pack import convert_layer, experts_per_batch
from .source_reader import default_read_threads

KT_MERGED_SHARD = re.compile(r"^model-\d{5}-of-PLACEHOLDER\.safetensors$")  # kt's shard names until its run ends
SCRATCH = ".kt_resume_check"  # fresh conversions of the layers being checked; removed afterwards


def kt_started_layout(out: Path) -> str | None:
    """"kt-folders" or "merged" when `out` holds layers of kt's own script and no manifest of ours."""
    if not out.is_dir() or (out / MANIFEST_FILE).exists():
        return None
    names = fsio.list_dir(out)
    if any(KT_MERGED_SHARD.match(n) for n in names):
        return "merged"
    if any(LAYER_DIR.match(n) and (out / n).is_dir() for n in names):
        return "kt-folders"
    return None


def _layers(lps) -> str:
    return f"layer{'s' if len(lps) != 1 else ''} {layer_ranges([lp.layer for lp in lps])}"


def _fix() -> str:
    return "pass --overwrite to convert every layer again, or convert into an empty directory"


def adopt_kt_layers(out: Path, plan, manifest: Manifest, resume_layer: int, run, progress, packer, ckpt) -> None:
    """Records in `manifest` (and writes it) the layers before `resume_layer` that kt's script left
    in `out`, after checking each against a fresh conversion (packer: convert.packers.make_packer's; run:
    the RunOptions); UserError naming what differs."""
    layout = kt_started_layout(out)
    if layout == "merged":
        raise UserError(
            f"{out} holds model-NNNNN-of-PLACEHOLDER.safetensors shards of kt-kernel's convert_cpu_weights.py in "
            "its merged mode: kt names and indexes those shards only when its run ends, and its --resume-layer "
            "numbers them from 1 again (overwriting the earlier ones), so they cannot be resumed; " + _fix())
    if plan.layout != "kt-folders":
        raise UserError(f"{out} holds kt's _layer_L folders (kt's --no-merge-safetensor): add --no-merge-safetensor "
                        "to resume them, or " + _fix())
    present = {int(LAYER_DIR.match(n)[1]) for n in fsio.list_dir(out) if LAYER_DIR.match(n) and (out / n).is_dir()}
    wanted = [lp for lp in plan.layers if lp.layer < resume_layer]
    missing = [lp.layer for lp in wanted if lp.layer not in present]
    if missing:
        raise UserError(f"--resume-layer {resume_layer} says the layers before {resume_layer} are done, but {out} "
                        f"has no _layer_L folder for layer(s) {layer_ranges(missing)}; pass the first missing layer "
                        f"(--resume-layer {missing[0]}), or " + _fix())
    progress.note(f"--resume-layer {resume_layer}: checking kt's {_layers(wanted)} in this output against a fresh "
                  "conversion")
    scratch = out / SCRATCH
    fsio.remove(scratch)
    fsio.make_dir(scratch)
    reader = LayerReader(ckpt, plan, wanted, experts_per_batch(plan), threads=default_read_threads())
    try:
        for lp in wanted:
            writer = KtFolderWriter(scratch, lp.layer, plan.method.name)
            try:
                nonfinite: dict[str, int] = {}
                convert_layer(reader, plan, lp, [LayerOutput(plan.method, plan.threadpool_count, writer)], run,
                              progress, nonfinite, packer)
                fresh = writer.commit()
                fresh.nonfinite = nonfinite
            except BaseException:
                writer.abort()
                raise
            _compare(out, lp.layer, fresh)
            manifest.completed[lp.layer] = fresh  # the same files, names and bytes: the same record
            fsio.remove(scratch / f"_layer_{lp.layer}")
    finally:
        reader.close()
        fsio.discard(scratch)
    again = sorted(present - {lp.layer for lp in wanted})
    if again:  # kt's own --resume-layer converts these again too
        progress.note(f"--resume-layer {resume_layer}: removing kt's _layer_L folders of layers {layer_ranges(again)} "
                      "(from the resume layer on, converted again)")
    for layer in again:
        fsio.remove(out / f"_layer_{layer}")
    write_manifest(out, manifest)
    progress.note(f"--resume-layer {resume_layer}: kt's {_layers(wanted)} {'match' if len(wanted) != 1 else 'matches'} "
                  "a fresh conversion byte for byte: kept and recorded in kt_manifest.json")


def _compare(out: Path, layer: int, fresh) -> None:
    folder = f"_layer_{layer}"
    have = {f"{folder}/{name}" for name in fsio.tree_files(out / folder)}
    expected = set(fresh.files)
    why = None
    if have - expected:
        why = f"it holds files this conversion does not write ({sorted(have - expected)[0]}, ...)"
    elif expected - have:
        why = f"{sorted(expected - have)[0]} is missing (the layer was not finished)"
    else:
        for name in fresh.files:
            p, q = out / name, out / SCRATCH / name
            if p.stat().st_size != q.stat().st_size:
                why = f"{name} is {p.stat().st_size} bytes, a fresh conversion writes {q.stat().st_size}"
                break
            if file_sha256(p) != file_sha256(q):
                why = f"the bytes of {name} differ from a fresh conversion's"
                break
    if why is not None:
        raise UserError(f"--resume-layer: layer {layer} in {out} cannot be kept: {why}; it was converted with "
                        "other settings or by another version of kt-kernel's script, or is damaged; " + _fix())
