#!/usr/bin/env python3
"""The C++ packer alone on one core: every checkpoint source format x quant method x ISA level (forced).

    python scripts/bench_pack.py [--isa avx512,avx2,portable] [--methods int4,int8,rawint4-g128]
                                 [--sources nvfp4,mxfp8] [--json OUT.json]

Each source is one synthetic expert matrix (--rows x --cols, the synthetic checkpoints' encodings:
synthetic/families.py) packed whole on one thread (decode + quantize + tile, or the RAWINT4 group
quantizer). Rate: weights per second of this process's CPU time, best of --reps rounds (rounds alternate
the ISA levels), so that other jobs on a shared machine do not inflate it; each level against AVX-512's
(the target for AVX2: within 1.5x) and every level's bytes against the first's. The whole conversion,
I/O included, is scripts/bench_convert.py --isa.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ISA_LEVELS = ("portable", "avx2", "avx512", "amx")


def sources(n: int, k: int) -> dict:
    """kind -> SourceMatrix of one random expert matrix in each checkpoint format (NVFP4 in both encodings: ModelOpt
    multiplies the group scales by its per-tensor scale, compressed-tensors divides them by its inverse)."""
    import numpy as np

    from kt_convert.quant.cpu import SourceMatrix
    from kt_convert.quant.source_formats import SOURCE_FORMATS
    from kt_convert.synthetic.families import _encode

    block, group = (128, 128), 32
    out = {}
    for kind, fmt in SOURCE_FORMATS.items():
        if fmt.input_type is None:  # f32: the packers' test input, not a checkpoint format
            continue
        t = _encode(np.random.default_rng(0), kind, n, k, block, group)
        if kind == "int4_group":
            out[kind] = SourceMatrix(kind, t["packed"], t["scale"], (1, group))
        elif kind == "fp8_block":
            out[kind] = SourceMatrix(kind, t["weight"], t["scale"], block)
        elif kind == "nvfp4":
            g = float(t["global"])
            out[kind] = SourceMatrix(kind, t["weight"], t["scale"], global_scale=g)
            out["nvfp4-ct"] = SourceMatrix(kind, t["weight"], t["scale"], global_scale=float(np.float32(1 / g)),
                                           global_divides=True)
        else:  # bf16 and f16 as uint16 bits, mxfp4 and mxfp8 with their E8M0 scales
            out[kind] = SourceMatrix(kind, t["weight"].view(np.uint16) if kind == "f16" else t["weight"], t.get("scale"))
    return out


def measure(method_names: list[str], isas: list[str], n: int, k: int, reps: int, only: list[str] | None = None) -> dict:
    import numpy as np

    from kt_convert.kt_runtime.format.methods import get_method
    from kt_convert.quant.cpu import PackTarget, pack_cpu

    srcs = sources(n, k)
    if only:
        srcs = {name: src for name, src in srcs.items() if name in only}
    res = {}
    for name in method_names:
        method = get_method(name)
        for kind, src in srcs.items():
            best = {isa: float("inf") for isa in isas}
            outs = {}
            for _ in range(reps):
                for isa in isas:
                    dst = PackTarget.empty(method, n, k)
                    c0 = time.process_time()
                    pack_cpu(method, [(src, 0, k, dst)], isa=isa, num_threads=1)
                    best[isa] = min(best[isa], time.process_time() - c0)
                    outs[isa] = dst
            row = {isa: {"weights_per_cpu_s": n * k / s} for isa, s in best.items()}
            first = outs[isas[0]]
            for isa in isas:
                row[isa]["same_bytes"] = bool(np.array_equal(outs[isa].weight, first.weight)
                                              and np.array_equal(outs[isa].scales, first.scales))
                if "avx512" in row:
                    row[isa]["avx512_over_this"] = row["avx512"]["weights_per_cpu_s"] / row[isa]["weights_per_cpu_s"]
            res[f"{name} {kind}"] = row
            cells = "".join(f"{r['weights_per_cpu_s'] / 1e6:>10.0f}" + (f" ({r['avx512_over_this']:.2f}x)"
                                                                        if "avx512_over_this" in r else "")
                            + ("" if r["same_bytes"] else " DIFFERENT") for r in row.values())
            print(f"{name:<14}{kind:<12}{cells}", flush=True)
    return res


def main() -> None:
    from kt_convert import kt_kernels

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default=None, help="comma list of ISA levels (default: every level this CPU has, "
                                                "best first)")
    ap.add_argument("--methods", default="int4,int8,rawint4-g128", help="comma list of quant methods")
    ap.add_argument("--sources", default=None, help="comma list of source formats (default: all; nvfp4 is ModelOpt's "
                                                    "encoding, nvfp4-ct compressed-tensors')")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    best = kt_kernels.best_isa()
    isas = a.isa.split(",") if a.isa else list(reversed(ISA_LEVELS[: ISA_LEVELS.index(best) + 1]))
    for isa in isas:
        try:
            kt_kernels.resolve_isa(isa)
        except ValueError as e:
            sys.exit(f"--isa: {e}")
    only = a.sources.split(",") if a.sources else None
    known = list(sources(64, 64))
    if only and set(only) - set(known):
        sys.exit(f"--sources: unknown {', '.join(sorted(set(only) - set(known)))} (expected some of {', '.join(known)})")
    print(f"{os.uname().machine}, best ISA {best}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{a.rows} x {a.cols} per matrix, one thread, M weights per CPU-second (x: avx512's rate / this one)")
    print(f"{'method':<14}{'source':<12}" + "".join(f"{isa:>10}" + (" " * 8 if "avx512" in isas else "")
                                                      for isa in isas))
    res = {"date": time.strftime("%Y-%m-%d"), "best_isa": best, "rows": a.rows, "cols": a.cols,
           "rates": measure(a.methods.split(","), isas, a.rows, a.cols, a.reps, only)}
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
