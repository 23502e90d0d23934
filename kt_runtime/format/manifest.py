"""kt_manifest.json and the shards' __metadata__ (docs/FORMAT.md §5): what a packed output holds, how
it was made, and which layers are complete.

kt-kernel ignores both; the reader checks an output against them and the converter resumes from the
manifest. `shard_metadata` is what the converter writes into a merged shard, `shard_metadata_problem`
what the reader checks it with: the facts come from one function, `shard_facts`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .digest import DIGEST_NAME
from .errors import InputFileError, ManifestError
from .names import FORMAT_VERSION, LAYOUTS, MANIFEST_FILE
from .spec import PackedSpec
from .methods import METHODS, alignment_problem, get_method
from .input_files import (MANIFEST_MAX_BYTES, parse_json, read_capped, relative_name_problem,
                          resolve_inside)
from .json_fields import describe
from .fsio import atomic_write_text


@dataclass
class LayerRecord:
    layer: int
    files: list[str]  # paths relative to the output dir (a shard, or a _layer_L folder's files)
    nbytes: int
    sha256: str  # kt_runtime.format.digest tree digest of the files' bytes, in the listed order
    # kt_runtime.format.digest.source_digest of the source bytes the layer was converted from (also in a merged
    # shard's __metadata__); None: recorded by a converter before this field
    source_sha256: str | None = None
    # source tensor -> NaN/Inf values packed as 0 (--allow-nonfinite); written only when there are any
    nonfinite: dict[str, int] = field(default_factory=dict)
    # the plain sha256 of each file, in `files` order: kept for --kt-sft-manifest outputs only (kt's manifest
    # lists them); absent (None, not written) otherwise
    file_sha256: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.nonfinite:
            del d["nonfinite"]
        if self.file_sha256 is None:
            del d["file_sha256"]
        return d


@dataclass(kw_only=True)
class Manifest(PackedSpec):
    """What a packed output holds (the PackedSpec fields), how it was made, and how far it got."""

    layers: list[int]  # (a list in JSON)
    layout: str  # the output's form on disk: names.MERGED | names.KT_FOLDERS
    num_shards: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    converter_version: str = ""
    format_version: int = FORMAT_VERSION
    digest: str = DIGEST_NAME  # how completed[*].sha256 is computed (kt_runtime.format.digest)
    completed: dict[int, LayerRecord] = field(default_factory=dict)
    complete: bool = False  # every layer, the index and the copied files are written
    # Every MoE layer of the source model (None: not recorded, by converters before this field);
    # `layers` is what was converted: fewer only when --layers narrowed the job, and then partial.
    model_layers: list[int] | None = None
    partial: bool = False

    @property
    def kt_method(self) -> str:
        return get_method(self.method).kt_method

    @property
    def spec(self) -> PackedSpec:
        """The PackedSpec part alone (layers as a tuple)."""
        values = {f.name: getattr(self, f.name) for f in fields(PackedSpec)}
        return PackedSpec(**{**values, "layers": tuple(self.layers)})

    def identity(self) -> dict[str, Any]:
        """The fields that must match for an output directory to be resumed."""
        return {
            "format_version": self.format_version, "method": self.method, "threadpool_count": self.threadpool_count,
            "hidden_size": self.hidden_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts, "layers": list(self.layers), "layout": self.layout,
            "num_shards": self.num_shards, "source_fingerprint": self.source.get("fingerprint"), "digest": self.digest,
            "options": self.options,
        }

    def to_json(self) -> str:
        d = asdict(self)
        d["kt_method"] = self.kt_method
        d["completed"] = {str(k): v.to_dict() for k, v in sorted(self.completed.items())}
        order = list(d)  # format version 1 writes "layout" right after "layers"
        order.insert(order.index("layers") + 1, order.pop(order.index("layout")))
        return json.dumps({k: d[k] for k in order}, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> "Manifest":
        try:
            d = parse_json(text.encode(), Path(where), MANIFEST_FILE)
        except InputFileError as e:
            raise ManifestError(f"{str(e).removesuffix('; re-download it')}; re-run the conversion to rewrite it") from None
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ManifestError(f"{where}: format_version {version!r} is not supported (this version reads {FORMAT_VERSION})")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - d.keys())
        if missing:
            raise ManifestError(f"{where}: malformed manifest (missing {', '.join(missing)})")
        try:
            args = {k: v for k, v in d.items() if k in known}
            raw = args.pop("completed", None) or {}
            if not isinstance(raw, dict):
                raise TypeError(f"completed must be an object, got {type(raw).__name__}")
            completed = {}
            for k, v in raw.items():
                if not isinstance(v, dict):
                    raise TypeError(f"completed[{k!r}] must be an object")
                completed[int(k)] = LayerRecord(**v)
            m = cls(**args, completed=completed)
        except (TypeError, ValueError, OverflowError) as e:
            raise ManifestError(f"{where}: malformed manifest ({e})") from None
        kt_method = d.get("kt_method")
        m.check(where)
        if kt_method is not None and kt_method != m.kt_method:
            raise ManifestError(f"{where}: kt_method {kt_method!r} contradicts method {m.method!r}")
        return m

    def check(self, where: str = MANIFEST_FILE) -> None:
        def bad(msg: str):
            raise ManifestError(f"{where}: {msg}")

        if not isinstance(self.method, str) or self.method not in METHODS:
            bad(f"unknown method {self.method!r} (this version knows {sorted(METHODS)})")
        for name in ("threadpool_count", "hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            bad(f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_experts {self.num_experts}")
        problem = alignment_problem(get_method(self.method), self.hidden_size, self.moe_intermediate_size,
                                    self.threadpool_count)
        if problem is not None:
            bad(problem)
        if not isinstance(self.layers, list) or not all(_is_int(x) and x >= 0 for x in self.layers):
            bad("layers must be a list of non-negative integers")
        if len(set(self.layers)) != len(self.layers):
            bad("layers lists a layer twice")
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            bad(f"unknown layout {self.layout!r}")
        method = get_method(self.method)
        problem = method.byte_order.record_problem(method, self.layout, self.threadpool_count)
        if problem is not None:
            bad(problem)
        if not isinstance(self.activation, str):
            bad(f"activation must be a string, got {self.activation!r}")
        if self.swiglu_limit is not None and (isinstance(self.swiglu_limit, bool)
                                              or not isinstance(self.swiglu_limit, (int, float))
                                              or not 0 < self.swiglu_limit < math.inf):
            bad(f"swiglu_limit must be a finite number > 0 or null, got {describe(self.swiglu_limit)}")
        if not _is_int(self.num_shards) or self.num_shards < 0:
            bad(f"num_shards must be a non-negative integer, got {self.num_shards!r}")
        for name in ("source", "options"):
            if not isinstance(getattr(self, name), dict):
                bad(f"{name} must be an object")
        if not isinstance(self.converter_version, str):
            bad("converter_version must be a string")
        if not isinstance(self.complete, bool):
            bad(f"complete must be true or false, got {self.complete!r}")
        for layer, rec in self.completed.items():
            if layer not in self.layers:
                bad(f"completed layer {layer} is not among the planned layers")
            if rec.layer != layer or not _is_int(rec.layer):
                bad(f"completed[{layer}] is a record of layer {rec.layer!r}")
            if not isinstance(rec.files, list) or not rec.files or any(relative_name_problem(f) for f in rec.files):
                bad(f"completed[{layer}].files must be a non-empty list of paths inside the output directory")
            if len(set(rec.files)) != len(rec.files):
                bad(f"completed[{layer}].files lists a file twice")
            if not _is_int(rec.nbytes) or rec.nbytes < 0:
                bad(f"completed[{layer}].nbytes must be a non-negative integer, got {rec.nbytes!r}")
            if not isinstance(rec.sha256, str) or not _SHA256.fullmatch(rec.sha256):
                bad(f"completed[{layer}].sha256 is not a sha256 hex digest")
            if not isinstance(rec.nonfinite, dict) or not all(isinstance(k, str) and _is_int(v) and v > 0
                                                              for k, v in rec.nonfinite.items()):
                bad(f"completed[{layer}].nonfinite must map tensor names to positive counts")
            if rec.source_sha256 is not None and (not isinstance(rec.source_sha256, str)
                                                  or not _SHA256.fullmatch(rec.source_sha256)):
                bad(f"completed[{layer}].source_sha256 is not a sha256 hex digest")
            if rec.file_sha256 is not None and (
                    not isinstance(rec.file_sha256, list) or len(rec.file_sha256) != len(rec.files)
                    or not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in rec.file_sha256)):
                bad(f"completed[{layer}].file_sha256 must list one sha256 hex digest per file")
        if self.complete and len(self.completed) != len(self.layers):
            bad("complete is true but not every layer is completed")
        if self.model_layers is not None:
            if not isinstance(self.model_layers, list) or not all(_is_int(x) and x >= 0 for x in self.model_layers):
                bad("model_layers must be a list of non-negative integers")
            if not set(self.layers) <= set(self.model_layers):
                bad("layers lists layers that model_layers does not")
        if not isinstance(self.partial, bool):
            bad(f"partial must be true or false, got {describe(self.partial)}")
        narrowed = self.model_layers is not None and sorted(self.layers) != sorted(self.model_layers)
        if self.partial != narrowed:
            bad(f"partial is {str(self.partial).lower()} but layers {'differ from' if narrowed else 'equal'} "
                "model_layers")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_manifest(out_dir: Path) -> Manifest | None:
    """The manifest of an output directory (None if it has none): a regular file inside it, of at
    most MANIFEST_MAX_BYTES, strictly checked; ManifestError otherwise."""
    path = Path(out_dir) / MANIFEST_FILE
    if not os.path.lexists(path):
        return None
    try:
        resolve_inside(out_dir, MANIFEST_FILE)
        data = read_capped(path, MANIFEST_MAX_BYTES, what=MANIFEST_FILE)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: a symlink to a missing file; delete it") from None
    except InputFileError as e:
        raise ManifestError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return Manifest.from_json(text, str(path))


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Atomic: write a temp file, fsync, rename, fsync the directory."""
    atomic_write_text(Path(out_dir) / MANIFEST_FILE, manifest.to_json())


def shard_facts(spec: PackedSpec, layer: int, manifest: Manifest | None,
                source_sha256: str | None = None) -> dict[str, str]:
    """The facts a merged layer shard's __metadata__ carries, as strings, in the order written. Without a
    manifest (an output inferred from its tensors) only those the tensors determine. The source is named by
    its contents (source_sha256: given, else the layer's record), never by where or when it was read; a
    layer recorded without it (an older converter) carried the manifest's source fingerprint instead."""
    facts = {"kt_format_version": FORMAT_VERSION, "kt_method": spec.quant_method.kt_method,
             "quant_method": spec.method, "threadpool_count": spec.threadpool_count, "hidden_size": spec.hidden_size,
             "moe_intermediate_size": spec.moe_intermediate_size, "num_experts": spec.num_experts}
    if manifest is not None:
        facts["num_experts_per_tok"] = spec.num_experts_per_tok
    facts["layer"] = layer
    if manifest is not None:
        facts.update(activation=spec.activation, swiglu_limit=spec.swiglu_limit)
        record = manifest.completed.get(layer)
        source_sha256 = source_sha256 or (record.source_sha256 if record is not None else None)
        if source_sha256 is not None:
            facts["source_sha256"] = source_sha256
        else:
            facts["source_fingerprint"] = manifest.source.get("fingerprint")
    return {k: "" if v is None else str(v) for k, v in facts.items()}


def shard_metadata(manifest: Manifest, layer: int, source_sha256: str) -> dict[str, str]:
    """The __metadata__ the converter writes into the merged shard of `layer`, converted from the source bytes
    whose identity is source_sha256 (kt_runtime.format.digest.source_digest)."""
    return {"format": "pt", **shard_facts(manifest.spec, layer, manifest, source_sha256),
            "converter_version": manifest.converter_version}


def shard_metadata_problem(metadata: dict[str, str], spec: PackedSpec, layer: int,
                           manifest: Manifest | None) -> str | None:
    """What in a shard's __metadata__ contradicts the manifest (every fact must be there and agree) or,
    without one, the tensors (the facts present must agree); None if nothing does. The converter's
    version is not compared: a resumed output holds shards of several versions."""
    strict = manifest is not None
    for key, want in shard_facts(spec, layer, manifest).items():
        got = metadata.get(key)
        if got is None and not strict:
            continue
        if got != want:
            return f"__metadata__ {key} is {got!r} but the {'manifest says' if strict else 'tensors say'} {want!r}"
    return None
