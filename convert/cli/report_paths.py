"""Report paths (--json, --html) of every command: resolved before the command starts and refused when
they name a file the command reads or writes (an input checkpoint's file, an output's manifest, shard,
index, copied file or record, in the output folder or in its records folder OUT.kt-convert, a file the
user named such as the job file or eval's text, another report); then written as a new file renamed into
place (the report role of kt_runtime/format/files.py)."""
from __future__ import annotations

import os
from pathlib import Path

from kt_convert.kt_runtime.format.files import RunFiles, check_reports, resolved
from kt_convert.kt_runtime.format.fsio import atomic_write_text
from kt_convert.kt_runtime.format.hub_cache import RepoCache
from kt_convert.kt_runtime.format.input_files import containment_root
from kt_convert.kt_runtime.format.names import KT_SFT_MANIFEST_FILE, state_dir

from ..output_dir import is_output_entry
from ..source import HUB_ID, hub_cache_dir


def add_input(files: RunFiles, spec: str) -> None:
    """The checkpoint `spec` names: a local folder (everything in it), a .safetensors file (its folder:
    the config and model files beside it are read too), or a hub id (its folder of the Hugging Face cache)."""
    path = Path(os.path.expanduser(spec))
    if os.path.exists(path):
        folder = path if path.is_dir() else path.parent
        files.folder(f"the input checkpoint {folder}", containment_root(folder))
        return
    m = HUB_ID.match(spec)
    if m:
        files.folder(f"the Hugging Face cache folder of {m['repo']}", RepoCache(hub_cache_dir(), m["repo"]).path)


def add_output(files: RunFiles, out: Path, kt_tree: bool = False) -> None:
    """What a conversion writes (and verify and eval read) in the output folder and in its records folder.
    kt_tree: the output holds kt-kernel's SFT tree (--kt-sft-manifest), beside which kt's loader refuses any
    other file, so all of the folder is the run's."""
    if kt_tree or os.path.lexists(Path(out) / KT_SFT_MANIFEST_FILE):
        files.folder(f"the output {out}, kt-kernel's SFT tree (nothing else may be in it)", out)
    else:
        files.folder(f"the output {out}", out, is_output_entry)
    real = resolved(out)
    if real.name:  # the root folder has no folder beside it
        files.folder(f"the records folder of the output {out}", state_dir(real), is_output_entry)


def check_report_paths(reports: dict[str, Path | None], *, inputs: tuple[str, ...] = (), outputs=(),
                       kt_tree: bool = False, user_files: dict[str, Path | None] | None = None) -> None:
    """UnsafePathError (exit 2) naming the option whose report path is a file of this command.
    user_files: {what: path} of the files the user named that the command reads (None: not given)."""
    if not any(p is not None and str(p) != "-" for p in reports.values()):
        return
    files = RunFiles()
    for spec in inputs:
        add_input(files, spec)
    for out in outputs:
        add_output(files, out, kt_tree)
    for what, path in (user_files or {}).items():
        if path is not None:
            files.file(what, path)
    check_reports(files, reports)


def write_report(path: Path, text: str) -> None:
    """A new file renamed into place: never written through a link, never half-written."""
    atomic_write_text(Path(path), text)
