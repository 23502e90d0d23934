#!/usr/bin/env python3
"""RAWINT4's scale rule: its error against simpler rules, and what packing costs.

    python scripts/bench_rawint4.py [--groups 2000] [--json FILE]

Error: relative squared error sum((w - q d)^2) / sum(w^2) over random groups (gaussian, laplace, student-t 3,
scaled by 0.02 and rounded to bf16) for group sizes 32, 64, 128, of
  * amax/7:       d = bf16(amax / 7) rounded up, q = clamp(rint(w / d), -7, 7)  (no weight clipped);
  * -8..7 former: the rule before codes were limited to -7..7: d = bf16(amax/7) or bf16(amax/8), whichever
                  errs less without clipping, q = clamp(rint(w / d), -8, 7);
  * least error:  the packer (kernels_cpp/pack_group.cpp), codes -7..7.
The two baselines are computed here in numpy. Speed: the packer on a BF16 matrix (1024 x 4096), rawint4-g32/-g128
against int4 (AMXINT4) in the same run, best of --reps, one thread and every thread, at each ISA level of --isa
(the packer's rows: portable is the reference's event sweep, avx2/avx512 the SIMD search); --extension times
another build of the packer (e.g. the previous commit's) with the same script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def bf16(x: np.ndarray, up: bool = False) -> np.ndarray:
    """float32 -> bf16 values (round to nearest even, or up toward +inf for positive x)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0xFFFF) & ~np.uint64(0xFFFF)) if up else ((u + 0x7FFF + ((u >> 16) & 1)) & ~np.uint64(0xFFFF))
    return u.astype(np.uint32).view(np.float32)


def sse(x: np.ndarray, d: np.ndarray, lo: int) -> np.ndarray:
    safe = np.where(d == 0, 1.0, d)
    q = np.where(d == 0, 0.0, np.clip(np.round(x / safe), lo, 7))
    return ((x - q * d) ** 2).sum(-1)


def amax7(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(-1, keepdims=True).astype(np.float32)
    return bf16(amax / np.float32(7), up=True).astype(np.float64)


def former(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(-1, keepdims=True).astype(np.float32)
    d7, d8 = (bf16(amax / np.float32(n)).astype(np.float64) for n in (7, 8))
    e7 = sse(x, d7, -8)
    r8 = np.round(x / np.where(d8 == 0, 1.0, d8))
    e8 = np.where(((r8 > 7) | (r8 < -8)).any(-1), np.inf, sse(x, d8, -8))
    return np.minimum(e7, e8)


def least_error(x: np.ndarray, g: int) -> np.ndarray:
    import torch

    from kt_convert.kt_runtime.format.methods import method_for
    from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
    from kt_convert.quant.group_int4 import dequantize_groups

    method = method_for("rawint4", g)
    n = x.shape[0]
    dst = PackTarget.empty(method, n, g)
    pack_cpu(method, [(SourceMatrix("f32", x.astype(np.float32)), 0, g, dst)])
    deq = dequantize_groups(torch.from_numpy(dst.weight), torch.from_numpy(dst.scales), n, g, g).double().numpy()
    return ((x - deq) ** 2).sum(-1)


def errors(groups: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for g in (32, 64, 128):
        for dist, draw in (("gaussian", lambda s: rng.standard_normal(s)), ("laplace", lambda s: rng.laplace(size=s)),
                           ("student-t 3", lambda s: rng.standard_t(3, s))):
            x = bf16((draw((groups, g)) * 0.02).astype(np.float32)).astype(np.float64)
            total = (x ** 2).sum()
            e7, e8, ls = sse(x, amax7(x), -7).sum(), former(x).sum(), least_error(x, g).sum()
            rows.append({"group": g, "weights": dist, "amax7": e7 / total, "former_minus8": e8 / total,
                         "least_error": ls / total, "least_vs_amax7": ls / e7, "least_vs_former": ls / e8})
    return rows


def speed(reps: int, threads: int, isa: str) -> dict:
    from kt_convert import kt_kernels

    rng = np.random.default_rng(0)
    n, k = 1024, 4096
    bits = bf16((rng.standard_normal((n, k)) * 0.02).astype(np.float32)).view(np.uint32) >> 16
    bits = bits.astype(np.uint16)
    level = {} if isa == "auto" else {"isa": isa}  # an older build (--extension) may not take isa
    out = {}
    for name, group in (("int4", 0), ("rawint4-g32", 32), ("rawint4-g128", 128)):
        ow = np.empty(n * k // 2, np.uint8)
        os_ = np.empty(n * k // group if group else n, np.uint16 if group else np.float32)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            kt_kernels.pack(name, [("bf16", bits, None, 0, k, ow, os_)], num_threads=threads, **level)
            best = min(best, time.perf_counter() - t)
        out[name] = n * k / best / 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--speed-only", action="store_true", help="skip the error table")
    ap.add_argument("--isa", default="auto", help="comma-separated ISA levels to time the packer at (auto, portable, "
                                                  "avx2, avx512, amx; default auto: the best this CPU runs)")
    ap.add_argument("--extension", help="time this build of kt_kernels (a .so), e.g. another checkout's, instead "
                                        "of the installed one (before/after comparisons)")
    args = ap.parse_args()
    if args.extension:
        import importlib.util

        spec = importlib.util.spec_from_file_location("kt_kernels", args.extension)
        sys.modules["kt_convert.kt_kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["kt_convert.kt_kernels"])
    rows = [] if args.speed_only else errors(args.groups, args.seed)
    print(f"{'group':>5} {'weights':<12} {'amax/7':>9} {'-8..7 former':>13} {'least error':>12} {'vs amax/7':>10} {'vs former':>10}")
    for r in rows:
        print(f"{r['group']:>5} {r['weights']:<12} {r['amax7']:9.3e} {r['former_minus8']:13.3e} {r['least_error']:12.3e} "
              f"{r['least_vs_amax7']:10.3f} {r['least_vs_former']:10.3f}")
    speeds = {f"{isa} {t}": speed(args.reps, t, isa) for isa in args.isa.split(",") for t in (1, 0)}
    for key, s in speeds.items():
        isa, t = key.split()
        print(f"packing, {isa}, {'1 thread' if t == '1' else 'every thread'}: "
              + ", ".join(f"{k} {v:.1f} Melem/s" for k, v in s.items())
              + f"; rawint4-g32 / int4 = {s['rawint4-g32'] / s['int4']:.4f}")
    if args.json:
        from kt_convert.kt_runtime.format.fsio import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"machine": platform.processor() or platform.machine(),
                                                       "cpus": os.cpu_count(), "errors": rows,
                                                       "speed_melem_per_s": speeds},
                                                      indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
