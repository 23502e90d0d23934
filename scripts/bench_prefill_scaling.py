#!/usr/bin/env python3
"""How the CPU engine's prefill scales with threads, and what the cores themselves do meanwhile.

For each thread count (--threads, in order), in one run:
  probes : register-only loops on that many threads at once (kt_kernels._testing.probe): the core clock
           (dependent adds), VPDPBUSD and, on AMX CPUs, TDPBSSD per CPU second and thread. A per-thread rate
           that falls as threads are added is the cores' own (frequency, a tile unit or core shared under the
           hypervisor), not the engine's schedule or its memory traffic.
  ours   : MoELayer.forward at each --tokens, top-8 of 64 experts, H=4096, I=1024 (bench_moe.py's prefill
           shapes): wall ms (median of --reps rounds), CPU ms per call, TFLOP/s per busy core, and the stage
           profile of one call.
  kt     : with --kt-bench (shared peers kit: kt/bench_kt_moe.py and a kt-kernel build, see its README),
           kt-kernel's prefill at the same shapes and thread count, as a child process right after ours.
Per-core figures at t threads are then compared with those at the first thread count. JSON with --json.

  python scripts/bench_prefill_scaling.py --threads 1,4,16 --tokens 512,4096 --json scaling.json
  python scripts/bench_prefill_scaling.py --threads 1,4,16 --tokens 512,4096 --kt-bench PEERS/kt/bench_kt_moe.py \\
      --kt-ext-dir /tmp/peers-build/kt-native/ext --kt-lib-dir PEERS/kt/sysroot/lib --json scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

from kt_convert import kt_kernels
from kt_convert.kt_kernels import _testing

from bench_moe import PrefillCase, cpu_info, random_layer  # scripts/ is this script's folder


def probes(threads: int, seconds: float) -> dict:
    """Mean and min per-thread rate of each probe this CPU runs, with `threads` threads at once."""
    kinds = ["clock"] + (["vnni"] if "avx512" in kt_kernels.moe_isas() else []) + \
        (["amx"] if "amx" in kt_kernels.moe_isas() else [])
    out = {}
    for kind in kinds:
        rows = _testing.probe(kind, threads, [], seconds)
        rates = [r["per_cpu_s"] for r in rows]
        out[kind] = {"mean": float(np.mean(rates)), "min": float(np.min(rates)),
                     "cpu_share": float(np.mean([r["cpu_share"] for r in rows]))}
    return out


def ours(args, layers: dict, threads: int, tokens: int) -> list[dict]:
    cfg = SimpleNamespace(prefill_experts=args.experts, topk=args.topk, threadpool_count=1, hidden=args.hidden)
    cases = [PrefillCase(cfg, m, args.hidden, args.inter, threads, tokens, layers[m]) for m in args.methods]
    for _ in range(args.reps):
        for c in cases:
            c.rep(args.min_time)
    return [c.result() for c in cases]


def kt(args, threads: int, tokens: int) -> list[dict]:
    """kt-kernel's prefill (the peers kit's bench_kt_moe.py) at this thread count and token count."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.kt_lib_dir:
        env["LD_LIBRARY_PATH"] = args.kt_lib_dir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    methods = [m for m in args.methods if m in ("int4", "int8")]
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "kt.jsonl")
        cmd = [sys.executable, args.kt_bench, "--ext-dir", args.kt_ext_dir, "--threads", str(threads), "--skip-decode",
               "--methods", ",".join(methods), "--prefill-tokens", str(tokens), "--prefill-experts", str(args.experts),
               "--prefill-inter", str(args.inter), "--hidden", str(args.hidden), "--topk", str(args.topk),
               "--prefill-reps", str(args.reps), "--min-time", str(args.min_time), "--tag", f"scaling-t{threads}",
               "--jsonl", jsonl]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.kt_timeout)
        if proc.returncode != 0:
            print(f"kt-kernel bench exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}", flush=True)
            return []
        with open(jsonl) as f:
            return [r for r in map(json.loads, f) if r.get("phase") == "prefill"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,4,16", help="thread counts, comma-separated (the first is the baseline)")
    ap.add_argument("--tokens", default="512,4096", help="prefill token counts, comma-separated")
    ap.add_argument("--methods", default="int4,int8", help="method rows (kt-kernel runs int4 and int8 only)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="rounds per configuration (median reported)")
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--probe-seconds", type=float, default=1.0)
    ap.add_argument("--kt-bench", help="the peers kit's kt/bench_kt_moe.py")
    ap.add_argument("--kt-ext-dir", help="the folder of the kt-kernel build's kt_kernel_ext*.so")
    ap.add_argument("--kt-lib-dir", help="prepended to LD_LIBRARY_PATH for kt-kernel (the kit's sysroot/lib)")
    ap.add_argument("--kt-timeout", type=float, default=900)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.kt_bench and not args.kt_ext_dir:
        ap.error("--kt-bench needs --kt-ext-dir")
    thread_counts = [int(v) for v in args.threads.split(",")]
    token_counts = [int(v) for v in args.tokens.split(",")]

    info = cpu_info()
    print(f"CPU: {info['cpu']}  cores={info['cores']}  ISA={info['isa']}  engine ISAs={kt_kernels.moe_isas()}",
          flush=True)
    rng = np.random.default_rng(2)
    layers = {m: random_layer(rng, m, args.experts, args.hidden, args.inter, 1) for m in args.methods}
    res = {"machine": info, "args": vars(args), "runs": []}
    t0 = time.perf_counter()
    base = {}
    for th in thread_counts:
        kt_kernels.start_moe_pool(th)
        run = {"threads": th, "probes": probes(th, args.probe_seconds), "ours": [], "kt": []}
        pr = run["probes"]
        base.setdefault("probes", pr)
        print(f"threads={th}: probes per thread " + ", ".join(
            f"{k} {v['mean'] / 1e9:.2f} G/s ({v['mean'] / base['probes'][k]['mean']:.2f} of {thread_counts[0]} "
            f"thread(s), ran {100 * v['cpu_share']:.0f}% of the wall time)" for k, v in pr.items()), flush=True)
        for T in token_counts:
            mine = ours(args, layers, th, T)
            theirs = kt(args, th, T) if args.kt_bench else []
            run["ours"] += mine
            run["kt"] += theirs
            for r in mine:
                key = (r["method"], T)
                per_core = r["TFLOPs"] / th
                base.setdefault(("ours",) + key, per_core)
                k = next((x for x in theirs if x["method"] == r["method"]), None)
                line = (f"  T={T} {r['method']}: ours {r['ms']:.1f} ms [{r['ms_min']:.1f}-{r['ms_max']:.1f}], "
                        f"{per_core:.3f} TFLOP/s per thread ({per_core / base[('ours',) + key]:.2f} of "
                        f"{thread_counts[0]} thread(s)), {r['TFLOPs_per_core']:.3f} per busy core")
                if k:
                    kt_core = k["TFLOPs"] / th
                    base.setdefault(("kt",) + key, kt_core)
                    line += (f"; kt {k['ms']:.1f} ms [{k['ms_min']:.1f}-{k['ms_max']:.1f}], {kt_core:.3f} per thread "
                             f"({kt_core / base[('kt',) + key]:.2f} of {thread_counts[0]}); kt / ours "
                             f"{k['ms'] / r['ms']:.2f}")
                print(line, flush=True)
                if "profile_ms" in r:
                    p = r["profile_ms"]
                    print("    stages (ms summed over threads): " + ", ".join(
                        f"{s}={p[s]:.1f}" for s in ("q", "pack", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait")
                        if s in p), flush=True)
        res["runs"].append(run)
    res["bench_seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
