"""The source formats the packers decode, one row each, under one name: the `kind`.

The kind names a format everywhere: SourceMatrix.kind, the C++ packer's SourceKind (the same name in
upper case), the Triton kernel's KIND code, the converter's plan and the synthetic generators'
encodings; `input_type` is kt's --input-type spelling of it. Adding a source format is a row here, its
decoders (torch reference, C++, Triton) and the plan's recognition of its tensors (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceFormat:
    kind: str
    input_type: str | None  # --input-type value; None: not a checkpoint format (f32 is the packers' test input)
    elements_per_item: int  # matrix elements per stored array item (mxfp4, nvfp4: 2 per byte; int4_group: 8 per int32)
    gpu_code: int  # quant.triton_kernels KIND code (int4_group with float32 scales, nvfp4 whose global scale divides: + 1)
    description: str  # what the user is told is supported
    float_dtype: str | None = None  # safetensors dtype of a plain float format (stored as is)


SOURCE_FORMATS: dict[str, SourceFormat] = {f.kind: f for f in (
    SourceFormat("mxfp4", "fp4", 2, 3, "MXFP4 (I8/U8/F4 + E8M0)"),
    SourceFormat("fp8_block", "fp8", 1, 4, "FP8 block (F8_E4M3 + F32 scales)"),
    SourceFormat("bf16", "bf16", 1, 0, "BF16", float_dtype="BF16"),
    SourceFormat("f16", "fp16", 1, 2, "FP16", float_dtype="F16"),
    SourceFormat("int4_group", "int4", 8, 5, "compressed-tensors INT4"),
    SourceFormat("nvfp4", "nvfp4", 2, 7, "NVFP4 (U8 E2M1 + F8_E4M3 per 16 + F32 per-tensor scale)"),
    SourceFormat("mxfp8", "mxfp8", 1, 9, "MXFP8 (F8_E4M3 + E8M0 per 32)"),
    SourceFormat("f32", None, 1, 1, "float32 holding bf16 values"),
)}
# --input-type value -> kind, in the table's order
INPUT_TYPES: dict[str, str] = {f.input_type: f.kind for f in SOURCE_FORMATS.values() if f.input_type}
# safetensors dtype of a plain float expert tensor -> kind
FLOAT_KINDS: dict[str, str] = {f.float_dtype: f.kind for f in SOURCE_FORMATS.values() if f.float_dtype}
SUPPORTED = ", ".join(f.description for f in SOURCE_FORMATS.values() if f.input_type)


def input_type_of(kind: str) -> str:
    return SOURCE_FORMATS[kind].input_type


def carries_codes(method, kind: str, block, scale_itemsize: int) -> bool:
    """The one exact path: a group-wise INT4 output (method) keeps the codes and scales of a group-wise INT4
    source (kind int4_group, block = (1, source group)) with bf16 scales (itemsize 2) whose groups each hold
    whole output groups (the scale repeated over them); nothing is quantized again (docs/FORMAT.md §9)."""
    return (method.group_size is not None and kind == "int4_group" and scale_itemsize == 2
            and block[1] % method.group_size == 0)
