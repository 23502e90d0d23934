"""kt_runtime.format, the on-disk format's own package: torch-free, one error base class."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_format_loads_no_engine():
    code = ("import sys, kt_runtime.format, kt_runtime.format.layout, kt_runtime.format.manifest, "
            "kt_runtime.format.safetensors_file, kt_runtime.format.fsio, kt_runtime.format.input_files, "
            "kt_runtime.format.json_fields, kt_runtime.format.digest\n"
            "bad = sorted(m for m in ('torch', 'triton', 'kt_kernels', 'convert', 'quant', 'kt_runtime.cpu_moe', "
            "'kt_runtime.loader', 'kt_runtime.hybrid') if m in sys.modules)\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing kt_runtime.format loaded {out.stdout.strip()}"


@pytest.mark.parametrize("name", ["SafetensorsFormatError", "SafetensorsChangedError", "ManifestError",
                                  "PackedWeightsError", "UnsafePathError", "InputFileError", "FieldError"])
def test_every_format_error_derives_from_one_base(name):
    import kt_runtime
    from kt_runtime import format as room

    cls = getattr(room, name)
    assert issubclass(cls, room.PackedFormatError) and issubclass(cls, ValueError)
    if name == "PackedWeightsError":
        assert kt_runtime.PackedWeightsError is cls
