"""The packed on-disk format in one place (docs/FORMAT.md), shared by the converter and the runtime.

torch-free (numpy only): `convert` writes through it, `kt_runtime` reads through it, and importing it
never loads the CPU/GPU engine.

    errors          FixableError (the root of every error a user can fix), PackedFormatError and one
                    subclass per rule that can be broken
    files           the file layer: every file access under a declared role (with fsio, input_files,
                    hub_cache); the one JSON reader
    names           the files and folders of an output and their parsers; its two layouts (merged, kt-folders)
    methods         the quant-method table (one row per method) and the alignment rule
    byte_orders     how a method's matrices and scales lie on disk (the row's byte order): keys, pair
                    tensors, read checks, refusals, config extras
    spec            kt's .kt file names, the NUMA split, PackedSpec (what an output holds)
    reader          a packed output opened, checked against its manifest and mapped (PackedOutput)
    writer          the layer writers (merged shard, kt folder), the index, the quantization_config
    manifest        kt_manifest.json and each shard's __metadata__, written and checked
    safetensors_file  the safetensors container: strict reader, file planner, writer
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
