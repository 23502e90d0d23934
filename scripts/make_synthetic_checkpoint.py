#!/usr/bin/env python3
"""Write a synthetic DeepSeek-V4-Flash-shaped checkpoint (real keys and dtypes, random contents).

    python scripts/make_synthetic_checkpoint.py OUT --preset v4-flash-tiny [--experts N] [--layers N]
        [--storage I8|U8|F4] [--key-style official|model|hf_alias] [--mtp-layers N] [--shards N]
        [--single-file] [--seed S]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

try:
    from convert.synthetic import KEY_STYLES, PRESETS, STORAGES, make_v4_flash_checkpoint
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from convert.synthetic import KEY_STYLES, PRESETS, STORAGES, make_v4_flash_checkpoint


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path, help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="v4-flash-tiny")
    p.add_argument("--experts", type=int, help="routed experts per layer (overrides the preset)")
    p.add_argument("--layers", type=int, help="MoE layers (overrides the preset)")
    p.add_argument("--hidden-size", type=int, help="H (multiple of 32)")
    p.add_argument("--moe-intermediate-size", type=int, help="I (multiple of 32)")
    p.add_argument("--storage", choices=STORAGES, default="I8", help="packed FP4 storage dtype")
    p.add_argument("--key-style", choices=KEY_STYLES, default="official")
    p.add_argument("--mtp-layers", type=int, default=0, help="add N MTP blocks (with routed experts)")
    p.add_argument("--shards", type=int, help="number of safetensors shards (default: ~1 per 2 GB)")
    p.add_argument("--single-file", action="store_true", help="one model.safetensors, no index")
    p.add_argument("--no-index", action="store_true", help="do not write model.safetensors.index.json")
    p.add_argument("--experts-only", action="store_true", help="omit the non-expert tensors")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        ckpt = make_v4_flash_checkpoint(
            a.out, a.preset, num_experts=a.experts, num_layers=a.layers, hidden_size=a.hidden_size,
            moe_intermediate_size=a.moe_intermediate_size, storage=a.storage, key_style=a.key_style,
            mtp_layers=a.mtp_layers, num_shards=a.shards, single_file=a.single_file,
            write_index=not a.no_index, include_non_expert=not a.experts_only, seed=a.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in ckpt.files)
    print(f"{ckpt.path}  {_human(size)} in {len(ckpt.files)} safetensors file(s), "
          f"{len(ckpt.expert_keys)} routed-expert tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
