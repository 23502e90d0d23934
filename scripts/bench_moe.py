#!/usr/bin/env python3
"""Benchmark the CPU MoE engine (kt_kernels.MoELayer) against DRAM bandwidth and torch bf16.

decode : 1 token, top-k of E experts, H x I experts; cycles over enough layer copies that the
         packed bytes far exceed the last-level cache (--footprint-gb). Effective GB/s = packed
         bytes of the touched experts (gate+up+down, scales included) / time, against the DRAM read
         bandwidth (torch sum of a 1 GiB fp32 tensor, same run) and against torch bf16 F.linear
         over the same expert shapes (bf16 weights cycled the same way).
prefill: T tokens, top-k over E experts: TFLOP/s (2*T*k*3*H*I) against torch bf16 matmuls grouped by
         expert, and % of the AMX INT8 peak (cores x max MHz x 2048 ops/cycle) when AMX is present.

  python scripts/bench_moe.py                      # defaults sized for a small machine
  python scripts/bench_moe.py --footprint-gb 4 --json out.json   # big-L3 hosts
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import kt_kernels


def cpu_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores": len(os.sched_getaffinity(0)), "isa": kt_kernels.best_isa(),
            "features": {k: v for k, v in kt_kernels.cpu_features().items() if v}, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(l.split(":")[1]) for l in f if l.startswith("cpu MHz")]
        if mhz:
            info["CPU MHz"] = f"{max(mhz):.0f}"
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("L3 cache", "CPU max MHz", "CPU MHz", "NUMA node(s)", "Socket(s)"):
                info[key] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def timeit(fn, min_time=1.0, min_iters=5, warmup=2):
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if n >= min_iters and dt >= min_time:
            return dt / n


def dram_read_gbs(threads: int) -> float:
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    torch.set_num_threads(threads)
    best = min(timeit(lambda: x.sum(), min_time=0.5, min_iters=3, warmup=1) for _ in range(3))
    del x
    return (1 << 30) / best / 1e9


def packed_bytes(method, n, k):
    return n * k // (2 if method == "int4" else 1) + 4 * n


def random_layer(rng, method, E, H, I, numa):
    il = I // numa
    experts = []
    for _ in range(E):
        per = []
        for _t in range(numa):
            six = []
            for n, k in ((il, H), (il, H), (H, il)):
                w = np.frombuffer(rng.bytes(n * k // (2 if method == "int4" else 1)), np.uint8)
                s = (rng.random(n, dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32)
                six += [w, s]
            per.append(tuple(six))
        experts.append(per)
    return kt_kernels.MoELayer(method, experts, H, I, numa)


def bench_decode(args, method, H, I, threads, isa):
    E, k, numa = args.experts, args.topk, args.numa
    layer_bytes = E * 3 * packed_bytes(method, I // numa, H) * numa
    copies = max(2, int(np.ceil(args.footprint_gb * 1e9 / layer_bytes)))
    rng = np.random.default_rng(0)
    layers = [random_layer(rng, method, E, H, I, numa) for _ in range(copies)]
    x = np.random.default_rng(1).standard_normal((1, H)).astype(np.float32)
    ids = [np.sort(np.random.default_rng(i).permutation(E)[:k]).reshape(1, k).astype(np.int64) for i in range(64)]
    tw = np.full((1, k), 1.0 / k, np.float32)
    state = {"i": 0}

    def step():
        i = state["i"] = state["i"] + 1
        layers[i % copies].forward(x, ids[i % 64], tw, isa, threads)

    t = min(timeit(step, min_time=args.min_time / 2, min_iters=copies * 2) for _ in range(2))
    touched = k * 3 * packed_bytes(method, I // numa, H) * numa
    return {"method": method, "H": H, "I": I, "experts": E, "topk": k, "numa": numa, "layer_copies": copies,
            "footprint_GB": copies * layer_bytes / 1e9, "us_per_token": t * 1e6, "touched_MB": touched / 1e6,
            "GBps": touched / t / 1e9}


def bench_torch_decode(args, H, I, threads):
    torch.set_num_threads(threads)
    E, k = args.experts, args.topk
    expert_bytes = 3 * H * I * 2
    n = max(2 * k, int(np.ceil(args.footprint_gb * 1e9 / expert_bytes)))
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(I, H, generator=g).to(torch.bfloat16), torch.randn(I, H, generator=g).to(torch.bfloat16),
           torch.randn(H, I, generator=g).to(torch.bfloat16)) for _ in range(n)]
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    state = {"i": 0}

    def step():
        i = state["i"]
        out = torch.zeros(1, H, dtype=torch.bfloat16)
        for j in range(k):
            wg, wu, wd = ws[(i + j) % n]
            out += F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        state["i"] = i + k
        return out

    t = timeit(step, min_time=args.min_time, min_iters=max(5, 2 * n // k))
    return {"H": H, "I": I, "bf16_experts": n, "us_per_token": t * 1e6, "GBps_bf16": k * expert_bytes / t / 1e9}


def bench_prefill(args, method, H, I, threads, isa):
    E, k, T, numa = args.prefill_experts, args.topk, args.prefill_tokens, args.numa
    layer = random_layer(np.random.default_rng(2), method, E, H, I, numa)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g).numpy()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).numpy().astype(np.int64)
    tw = np.full((T, k), 1.0 / k, np.float32)
    t = timeit(lambda: layer.forward(x, ids, tw, isa, threads), min_time=args.min_time, min_iters=3, warmup=1)
    flops = 2.0 * T * k * 3 * H * I
    return {"method": method, "tokens": T, "experts": E, "topk": k, "H": H, "I": I, "ms": t * 1e3,
            "TFLOPs": flops / t / 1e12}


def bench_torch_prefill(args, H, I, threads):
    torch.set_num_threads(threads)
    E, k, T = args.prefill_experts, args.topk, args.prefill_tokens
    g = torch.Generator().manual_seed(3)
    ws = [(torch.randn(I, H, generator=g).to(torch.bfloat16), torch.randn(I, H, generator=g).to(torch.bfloat16),
           torch.randn(H, I, generator=g).to(torch.bfloat16)) for _ in range(E)]
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    groups = [(ids == e).nonzero(as_tuple=True) for e in range(E)]

    def step():
        out = torch.zeros(T, H, dtype=torch.float32)
        for e, (tok, _slot) in enumerate(groups):
            if len(tok):
                xe = x[tok]
                wg, wu, wd = ws[e]
                out.index_add_(0, tok, F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd).float())
        return out

    t = timeit(step, min_time=args.min_time, min_iters=3, warmup=1)
    return {"ms": t * 1e3, "TFLOPs": 2.0 * T * k * 3 * H * I / t / 1e12}


def amx_peak_tflops(info, threads):
    mhz = info.get("CPU max MHz") or info.get("CPU MHz")  # KVM guests often show only the nominal MHz
    try:
        return threads * float(mhz) * 1e6 * 2048 / 1e12
    except (TypeError, ValueError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="int4,int8")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", default="1024,2048", help="decode intermediate sizes")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--numa", type=int, default=1, help="threadpool_count of the packed layout")
    ap.add_argument("--footprint-gb", type=float, default=1.0, help="packed bytes cycled over in decode (>> L3)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-experts", type=int, default=64)
    ap.add_argument("--prefill-inter", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="0 = every CPU of this process")
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    info = cpu_info()
    threads = args.threads or info["cores"]
    print(f"CPU: {info['cpu']}  cores={info['cores']}  ISA={info['isa']}  L3={info.get('L3 cache', '?')}  "
          f"max MHz={info.get('CPU max MHz', info.get('CPU MHz', '?'))}  threads={threads}", flush=True)
    res = {"machine": info, "threads": threads, "isa": args.isa, "decode": [], "prefill": []}
    # Some VMs hand out host memory lazily on first touch: fault in the footprint once before timing.
    warm = np.ones(int(args.footprint_gb * 2.5e9) // 8, np.float64)
    del warm
    dram_read_gbs(threads)
    bw = dram_read_gbs(threads)
    res["dram_read_GBps"] = bw
    print(f"DRAM read bandwidth (torch sum of 1 GiB fp32): {bw:.1f} GB/s", flush=True)
    methods = args.methods.split(",")

    if not args.skip_decode:
        for I in (int(v) for v in args.inter.split(",")):
            tb = None if args.skip_torch else bench_torch_decode(args, args.hidden, I, threads)
            if tb:
                print(f"decode torch bf16 H={args.hidden} I={I}: {tb['us_per_token']:.0f} us/token "
                      f"({tb['GBps_bf16']:.1f} GB/s of bf16)", flush=True)
            for m in methods:
                r = bench_decode(args, m, args.hidden, I, threads, args.isa)
                r["vs_dram"] = r["GBps"] / bw
                if tb:
                    r["torch_bf16_us_per_token"] = tb["us_per_token"]
                    r["speedup_vs_torch_bf16"] = tb["us_per_token"] / r["us_per_token"]
                res["decode"].append(r)
                print(f"decode {m} H={args.hidden} I={I} top{args.topk}/{args.experts}: {r['us_per_token']:.0f} us/token, "
                      f"{r['GBps']:.1f} GB/s = {r['vs_dram']:.2f} of DRAM read"
                      + (f", {r['speedup_vs_torch_bf16']:.2f}x torch bf16" if tb else "")
                      + f"  (footprint {r['footprint_GB']:.2f} GB)", flush=True)

    if not args.skip_prefill:
        I = args.prefill_inter
        tb = None if args.skip_torch else bench_torch_prefill(args, args.hidden, I, threads)
        if tb:
            print(f"prefill torch bf16 T={args.prefill_tokens} top{args.topk}/{args.prefill_experts} H={args.hidden} "
                  f"I={I}: {tb['ms']:.1f} ms, {tb['TFLOPs']:.3f} TFLOP/s", flush=True)
        peak = amx_peak_tflops(info, threads) if info["isa"] == "amx" else None
        for m in methods:
            r = bench_prefill(args, m, args.hidden, I, threads, args.isa)
            if tb:
                r["torch_bf16_TFLOPs"] = tb["TFLOPs"]
                r["speedup_vs_torch_bf16"] = r["TFLOPs"] / tb["TFLOPs"]
            if peak:
                r["amx_int8_peak_TFLOPs"] = peak
                r["pct_amx_peak"] = 100 * r["TFLOPs"] / peak
            res["prefill"].append(r)
            print(f"prefill {m}: {r['ms']:.1f} ms, {r['TFLOPs']:.3f} TFLOP/s"
                  + (f", {r['speedup_vs_torch_bf16']:.2f}x torch bf16" if tb else "")
                  + (f", {r['pct_amx_peak']:.1f}% of AMX INT8 peak ({peak:.1f} TFLOP/s)" if peak else ""), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
