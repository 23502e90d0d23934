"""kt_manifest.json: what a packed output holds, how it was made, and which layers are complete.

kt-kernel ignores it; our loader validates against it and the converter resumes from it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .format import FORMAT_VERSION, MANIFEST_FILE, METHOD_INFO


class ManifestError(ValueError):
    pass


@dataclass
class LayerRecord:
    layer: int
    files: list[str]  # paths relative to the output dir (a shard, or a _layer_L folder's files)
    nbytes: int
    sha256: str  # over the files' bytes in the listed order


@dataclass
class Manifest:
    method: str
    threadpool_count: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layers: list[int]
    layout: str  # "merged" | "kt-folders"
    activation: str = "silu"
    swiglu_limit: float | None = None
    num_shards: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    converter_version: str = ""
    format_version: int = FORMAT_VERSION
    completed: dict[int, LayerRecord] = field(default_factory=dict)
    complete: bool = False  # every layer, the index and the copied files are written

    @property
    def kt_method(self) -> str:
        return METHOD_INFO[self.method][0]

    def identity(self) -> dict[str, Any]:
        """The fields that must match for an output directory to be resumed."""
        return {
            "format_version": self.format_version, "method": self.method, "threadpool_count": self.threadpool_count,
            "hidden_size": self.hidden_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts, "layers": list(self.layers), "layout": self.layout,
            "num_shards": self.num_shards, "source_fingerprint": self.source.get("fingerprint"),
            "options": self.options,
        }

    def to_json(self) -> str:
        d = asdict(self)
        d["kt_method"] = self.kt_method
        d["completed"] = {str(k): asdict(v) for k, v in sorted(self.completed.items())}
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{where}: format_version {version!r} is not supported (this version reads {FORMAT_VERSION})")
        known = {f.name for f in fields(cls)}
        try:
            args = {k: v for k, v in d.items() if k in known}
            completed = {int(k): LayerRecord(**v) for k, v in (args.pop("completed", None) or {}).items()}
            m = cls(**args, completed=completed)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({e})") from None
        m.check(where)
        return m

    def check(self, where: str = MANIFEST_FILE) -> None:
        def bad(msg: str):
            raise ManifestError(f"{where}: {msg}")

        if self.method not in METHOD_INFO:
            bad(f"unknown method {self.method!r} (this version knows {sorted(METHOD_INFO)})")
        for name in ("threadpool_count", "hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.moe_intermediate_size % self.threadpool_count:
            bad(f"moe_intermediate_size {self.moe_intermediate_size} is not divisible by threadpool_count {self.threadpool_count}")
        if not isinstance(self.layers, list) or not all(isinstance(x, int) and x >= 0 for x in self.layers):
            bad("layers must be a list of non-negative integers")
        if self.layout not in ("merged", "kt-folders"):
            bad(f"unknown layout {self.layout!r}")
        for layer in self.completed:
            if layer not in self.layers:
                bad(f"completed layer {layer} is not among the planned layers")


def read_manifest(out_dir: Path) -> Manifest | None:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read ({e})") from None
    return Manifest.from_json(text, str(path))


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Atomic: write a temp file, fsync, rename, fsync the directory."""
    atomic_write_text(Path(out_dir) / MANIFEST_FILE, manifest.to_json())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a partial temp behind
        raise
    fsync_dir(path.parent)


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the files' bytes in order (a layer's record)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
