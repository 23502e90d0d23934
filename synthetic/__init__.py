"""Synthetic MoE checkpoints: the tests' oracle, and small models for the demo and the benchmarks.

Every family the converter reads, with its real key names, dtypes and config.json fields and small
random, deterministic contents (a seed and a name fix every byte). The generators share nothing with
the converter: they write through the format's safetensors writer (kt_runtime.format) and encode
with quant's reference encoders, so a converter bug cannot hide in a generator.

    v4_flash   DeepSeek-V4-Flash (MXFP4 experts, official / transformers / HF-alias key styles)
    families   every other family variant (FP8 block, BF16, FP16, compressed-tensors INT4, MXFP4,
               per-expert, fused, transposed and interleaved arrangements)
"""
from __future__ import annotations

if __name__ != "kt_convert.synthetic":  # this folder reached on sys.path by its own name: a second copy
    raise ImportError(f"{__name__!r} is the folder of kt_convert.synthetic in a source tree: "
                      "import kt_convert.synthetic (pip install -e . makes it importable)")

from .families import VARIANTS, FamilyCheckpoint, Variant, make_family_checkpoint
from .v4_flash import KEY_STYLES, PRESETS, STORAGES, SyntheticCheckpoint, make_v4_flash_checkpoint

V4_FLASH_VARIANT = "deepseek_v4_flash_mxfp4"  # the name of synthetic.v4_flash among the variants


def variants_by_family() -> dict[str, list[str]]:
    """{converter family: [variant names]}, the V4-Flash generator listed as V4_FLASH_VARIANT."""
    out: dict[str, list[str]] = {"deepseek_v4": [V4_FLASH_VARIANT]}
    for name, v in VARIANTS.items():
        out.setdefault(v.family, []).append(name)
    return out


__all__ = ["KEY_STYLES", "PRESETS", "STORAGES", "V4_FLASH_VARIANT", "VARIANTS", "FamilyCheckpoint",
           "SyntheticCheckpoint", "Variant", "make_family_checkpoint", "make_v4_flash_checkpoint", "variants_by_family"]
