"""The packed on-disk format in one place (docs/FORMAT.md), shared by the converter and the runtime.

torch-free (numpy only): `convert` writes through it, `kt_runtime` reads through it, and importing it
never loads the CPU/GPU engine.

    errors          FixableError (the root of every error a user can fix), PackedFormatError and one
                    subclass per rule that can be broken
    files           the file layer: every file access under a declared role (with fsio, input_files,
                    hub_cache); the one JSON reader
    layout          names, keys and their parsers; shard geometry; PackedSpec (what an output holds)
    manifest        kt_manifest.json and each shard's __metadata__, written and checked
    safetensors_file  the safetensors container: strict reader, layout planner, writer
    digest          the layer digest recorded in the manifest
    fsio            crash-safe, no-follow creation, replacement and removal of output files
    input_files     reading files an input names: containment, regular files only, capped strict JSON
    hub_cache       a repository's folder of a Hugging Face cache: identifiers checked, paths inside
    json_fields     typed reads of JSON fields
"""
from .errors import (FieldError, FixableError, InputFileError, ManifestError, PackedFormatError, PackedWeightsError,
                     SafetensorsChangedError, SafetensorsFormatError, UnsafePathError)
from .names import FORMAT_VERSION, INDEX_FILE, LOCK_FILE, MANIFEST_FILE, PROJECTIONS
from .manifest import LayerRecord, Manifest, read_manifest, write_manifest
from .safetensors_file import SafetensorsFile, TensorInfo

__all__ = [
    "FORMAT_VERSION", "INDEX_FILE", "LOCK_FILE", "MANIFEST_FILE", "PROJECTIONS",
    "FieldError", "FixableError", "InputFileError", "ManifestError", "PackedFormatError", "PackedWeightsError",
    "SafetensorsChangedError", "SafetensorsFormatError", "UnsafePathError",
    "LayerRecord", "Manifest", "read_manifest", "write_manifest", "SafetensorsFile", "TensorInfo",
]
