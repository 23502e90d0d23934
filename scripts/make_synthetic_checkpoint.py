#!/usr/bin/env python3
"""Write a synthetic MoE checkpoint of any supported family (real keys, dtypes and config; random contents).

    python scripts/make_synthetic_checkpoint.py --list
    python scripts/make_synthetic_checkpoint.py OUT                           # DeepSeek-V4-Flash, MXFP4
    python scripts/make_synthetic_checkpoint.py OUT --preset v4-flash-tiny [--experts N] [--layers N]
        [--storage I8|U8|F4] [--key-style official|model|hf_alias] [--mtp-layers N] [--shards N]
        [--single-file] [--no-index] [--experts-only] [--seed S]
    python scripts/make_synthetic_checkpoint.py OUT --family deepseek_v3 [--variant kimi_k2_int4]
        [--hidden-size H] [--moe-intermediate-size I] [--experts N] [--layers N] [--mtp-layers N]
        [--shards N] [--block BN BK] [--group G] [--seed S]

--family picks a converter family, --variant one of its variants (default: the family's first; --list
shows them all). Exit 2 on a bad combination.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from kt_convert import synthetic

V4_ONLY = ("preset", "storage", "key_style", "single_file", "no_index", "experts_only")
FAMILY_ONLY = ("block", "group")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def listing() -> str:
    lines = []
    for family, names in synthetic.variants_by_family().items():
        lines.append(family)
        for name in names:
            if name == synthetic.V4_FLASH_VARIANT:
                what = (f"MXFP4 per-expert; presets {', '.join(synthetic.PRESETS)}, storage "
                        f"{'/'.join(synthetic.STORAGES)}, key styles {'/'.join(synthetic.KEY_STYLES)}")
            else:
                v = synthetic.VARIANTS[name]
                what = f"{v.encoding} {v.arrangement} (model_type {v.model_type})"
            lines.append(f"  {name:24s} {what}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path, nargs="?", help="output directory")
    p.add_argument("--list", action="store_true", help="list the families and their variants, then exit")
    p.add_argument("--family", default="deepseek_v4", help="converter family (default deepseek_v4)")
    p.add_argument("--variant", help="variant of the family (default: its first)")
    p.add_argument("--experts", type=int, help="routed experts per layer")
    p.add_argument("--layers", type=int, help="decoder layers")
    p.add_argument("--hidden-size", type=int, help="H")
    p.add_argument("--moe-intermediate-size", type=int, help="I")
    p.add_argument("--mtp-layers", type=int, help="MTP blocks with routed experts (families that have them)")
    p.add_argument("--shards", type=int, help="number of safetensors shards")
    p.add_argument("--seed", type=int, default=0)
    v4 = p.add_argument_group(f"{synthetic.V4_FLASH_VARIANT} only")
    v4.add_argument("--preset", choices=sorted(synthetic.PRESETS), help="dimensions (default v4-flash-tiny)")
    v4.add_argument("--storage", choices=synthetic.STORAGES, help="packed FP4 storage dtype (default I8)")
    v4.add_argument("--key-style", choices=synthetic.KEY_STYLES, help="key names (default official)")
    v4.add_argument("--single-file", action="store_true", default=None, help="one model.safetensors, no index")
    v4.add_argument("--no-index", action="store_true", default=None, help="do not write model.safetensors.index.json")
    v4.add_argument("--experts-only", action="store_true", default=None, help="omit the non-expert tensors")
    fam = p.add_argument_group("other variants only")
    fam.add_argument("--block", type=int, nargs=2, metavar=("BN", "BK"), help="FP8 weight_block_size (default 128 128)")
    fam.add_argument("--group", type=int, help="compressed-tensors INT4 group size (default 32)")
    return p


def make(a: argparse.Namespace):
    families = synthetic.variants_by_family()
    if a.family not in families:
        raise ValueError(f"unknown family {a.family!r}; choose one of {', '.join(families)} (--list shows them)")
    variant = a.variant or families[a.family][0]
    if variant not in families[a.family]:
        raise ValueError(f"{a.family} has no variant {variant!r}; its variants: {', '.join(families[a.family])}")
    v4 = variant == synthetic.V4_FLASH_VARIANT
    wrong = [name for name in (FAMILY_ONLY if v4 else V4_ONLY) if getattr(a, name) is not None]
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} does not apply to {variant}")
    common = {k: v for k, v in dict(num_experts=a.experts, num_layers=a.layers, hidden_size=a.hidden_size,
                                    seed=a.seed).items() if v is not None}
    if v4:
        return synthetic.make_v4_flash_checkpoint(
            a.out, a.preset or "v4-flash-tiny", moe_intermediate_size=a.moe_intermediate_size,
            storage=a.storage or "I8", key_style=a.key_style or "official", mtp_layers=a.mtp_layers or 0,
            num_shards=a.shards, single_file=bool(a.single_file), write_index=not a.no_index,
            include_non_expert=not a.experts_only, **common)
    extra = {k: v for k, v in dict(intermediate_size=a.moe_intermediate_size, mtp_layers=a.mtp_layers,
                                   num_shards=a.shards, group=a.group,
                                   block=tuple(a.block) if a.block else None).items() if v is not None}
    return synthetic.make_family_checkpoint(a.out, variant, **common, **extra)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.list:
        print(listing())
        return 0
    if a.out is None:
        p.error("the output directory is required (or --list)")
    try:
        ckpt = make(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(ckpt.path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"{ckpt.path}  {_human(size)} in {len(files)} safetensors file(s), family {ckpt.config.get('model_type')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
