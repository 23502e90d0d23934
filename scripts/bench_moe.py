#!/usr/bin/env python3
"""Benchmark the CPU MoE engine (kt_kernels.MoELayer) against DRAM bandwidth and torch bf16.

decode : 1 token, top-k of E experts, H x I experts; cycles over enough layer copies that the
         packed bytes far exceed the last-level cache (--footprint-gb per configuration; a layer is
         revisited only after (copies-1) x touched bytes of other traffic). Effective GB/s = packed
         bytes of the touched experts (gate+up+down, scales included) / time, against the DRAM read
         bandwidth measured in the same run (torch sum of a 1 GiB fp32 tensor, and a C++ streaming
         read of 1 GiB by the engine's own thread pool; the C++ read again at the start of every round,
         for ratios against the bandwidth of the same minute on shared machines) and against torch
         bf16 F.linear over the same expert shapes (bf16 weights cycled the same way).
timing : every configuration is built first; then --reps rounds, each round timing every
         configuration in turn (a warm-up pass over all its layer copies, then --min-time seconds);
         the median over rounds is reported (min and max too), so drift and order effects show up
         as spread instead of bias.
prefill: for each of --prefill-tokens (default 512 and 4096) tokens, top-k over E experts: TFLOP/s
         (2*T*k*3*H*I) against torch bf16 matmuls grouped by expert, and % of the AMX INT8 peak
         (threads x max MHz x 2048 ops/cycle) when AMX is present; per busy core: flops / CPU seconds
         of the process per call (spin-waits included; not diluted by other jobs on a shared
         machine) against one core's peak; then one profiled call per method: time per engine stage
         summed over threads (profile_ms) and each stage's share (stage_share_pct).
         --int8-modes also times each way the AMX INT8 kernel reads B (first shape).
kernel : the dot kernel of each ISA alone (kt_kernels._testing.dot_stream, one call per 32-row group,
         1 activation row): weights per cycle per core, in cache (one 128-row matrix, L2 resident)
         and streaming (--footprint-gb of matrices, H x I gate shape) on 1 and on all threads, against
         the C++ streaming read on as many threads. Cycles = thread CPU time x the core clock measured
         by a chain of dependent register adds (kt_kernels._testing.core_clock_ghz; no PMU needed, so it
         works in VMs; the TSC runs at the nominal frequency, not the core's).
--isa takes a comma list (auto and the engine's ISA rows: portable, avx2, avxvnni, avx512, amx); every ISA
runs on the same layers in the same rounds; an ISA this CPU does not run is skipped with a line saying so.
avx2 is the VPMADDUBSW kernel, avxvnni the VPDPBUSD one (CPUs with AVX-VNNI).

Sizes: the defaults finish in about a minute on 2 cores (decode at I=2048 over 0.5 GB, prefill at 512
tokens, 3 rounds); --full gives the sizes docs/BENCHMARKS.md reports (decode at I=1024 and 2048 over 2 GB
each, prefill at 512 and 4096 tokens, 5 decode rounds). A flag given explicitly wins over either.

  python scripts/bench_moe.py                      # about a minute on 2 cores
  python scripts/bench_moe.py --full --json out.json               # the sizes of docs/BENCHMARKS.md
  python scripts/bench_moe.py --full --footprint-gb 4 --json out.json   # big-L3 hosts
  python scripts/bench_moe.py --isa avx512,avxvnni,avx2,portable --skip-prefill   # ISA paths side by side
  python scripts/bench_moe.py --threads 2 --skip-decode --skip-torch --prefill-reps 5   # prefill only
  python scripts/bench_moe.py --methods int4,rawint4-g128,rawint4-g32 --skip-prefill --skip-kernel   # RAWINT4 vs AMXINT4
--methods takes method rows (kt_runtime/format/methods.py): int4, int8, rawint4-g32/-g64/-g128 (kt's RAWINT4,
group-wise; the kernel section covers the tiled methods only).
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

from kt_convert import kt_kernels
from kt_convert.kt_kernels import _testing


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


def timeit(fn, min_time=0.3, min_iters=3, warmup=2, cpu=False):
    """Seconds per call (wall); with cpu=True also the process's CPU seconds per call (every thread)."""
    for _ in range(warmup):
        fn()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if n >= min_iters and dt >= min_time:
            return (dt / n, (time.process_time() - c0) / n) if cpu else dt / n


def summarize(ts):
    ts = sorted(ts)
    return {"median": float(np.median(ts)), "min": ts[0], "max": ts[-1], "reps": len(ts)}


def aligned_bytes(nbytes, fill_rng=None):
    """64-byte aligned uint8 buffer of nbytes, filled (every page touched, no shared zero pages)."""
    raw = np.empty(nbytes + 64, np.uint8)
    buf = raw[(-raw.ctypes.data) % 64:][:nbytes]
    block = np.frombuffer((fill_rng or np.random.default_rng(123)).bytes(1 << 24), np.uint8)
    for off in range(0, nbytes, block.size):
        n = min(block.size, nbytes - off)
        buf[off:off + n] = block[:n]
    return buf


def read_bandwidth(threads):
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    torch.set_num_threads(threads)
    torch_gbs = (1 << 30) / min(timeit(lambda: x.sum(), min_time=0.3, min_iters=3, warmup=1) for _ in range(3)) / 1e9
    del x
    buf = aligned_bytes(1 << 30)
    _testing.read_bandwidth(buf, threads, 2)  # warm-up (pool start, page faults)
    cpp_gbs = _testing.read_bandwidth(buf, threads, 5)
    del buf
    return torch_gbs, cpp_gbs


# (option, default, --full): the default finishes in about a minute on 2 cores; --full is docs/BENCHMARKS.md's
SIZES = (("inter", "2048", "1024,2048"), ("footprint_gb", 0.5, 2.0), ("reps", 3, 5), ("prefill_reps", 2, 3),
         ("prefill_tokens", "512", "512,4096"))


def runnable_isas(names: list[str], ap) -> list[str]:
    """The --isa names this CPU runs (the engine's answer, kt_kernels.moe_isas()); a line for each one it does not
    run (skipped)."""
    rows = [r["name"] for r in _testing.isa_table()]
    here = kt_kernels.moe_isas()
    out = []
    for name in names:
        if name != "auto" and name not in rows:
            ap.error(f"--isa {name}: not one of auto, {', '.join(rows)}")
        if name == "auto" or name in here:
            out.append(name)
        else:
            print(f"skipping --isa {name}: this CPU lacks its features (the engine runs {', '.join(here)} here)",
                  flush=True)
    if not out:
        ap.error(f"--isa {','.join(names)}: none of these runs on this CPU (the engine runs {', '.join(here)} here)")
    return out


def method_row(method):
    from kt_convert.kt_runtime.format.methods import get_method

    return get_method(method)


def packed_bytes(method, n, k):
    """Weight and scale bytes of one packed [n, k] matrix (group-wise methods: bf16 scales per group)."""
    m = method_row(method)
    return m.weight_bytes(n, k) + m.scale_count(n, k) * (2 if m.scale_dtype == "BF16" else 4)


def random_layer(rng, method, E, H, I, threadpool_count, pool=None):
    """pool: a big pre-filled byte buffer the weights are sliced from (fast for multi-GB footprints)."""
    il = I // threadpool_count
    experts = []
    off = 0
    for _ in range(E):
        per = []
        for _t in range(threadpool_count):
            six = []
            for n, k in ((il, H), (il, H), (H, il)):
                row = method_row(method)
                nb = row.weight_bytes(n, k)
                if pool is None:
                    w = np.frombuffer(rng.bytes(nb), np.uint8)
                else:
                    w = pool[off:off + nb]
                    off += (nb + 63) // 64 * 64
                s = (rng.random(row.scale_count(n, k), dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32)
                if row.scale_dtype == "BF16":  # group-wise: bf16 bits
                    s = (s.view(np.uint32) >> 16).astype(np.uint16)
                six += [w, s]
            per.append(tuple(six))
        experts.append(per)
    return kt_kernels.MoELayer(method, experts, H, I, threadpool_count)


def bf16_experts(count, H, I, g):
    """count experts of (gate [I,H], up [I,H], down [H,I]) bf16 weights, filled from one random
    4M-element block drawn from generator g (cheap to make, yet every expert has its own memory)."""
    block = (torch.randn(1 << 22, generator=g) * 0.02).to(torch.bfloat16)

    def mat(r, c):
        t = torch.empty(r * c, dtype=torch.bfloat16)
        for off in range(0, r * c, block.numel()):
            nn = min(block.numel(), r * c - off)
            t[off:off + nn] = block[:nn]
        return t.view(r, c)

    return [(mat(I, H), mat(I, H), mat(H, I)) for _ in range(count)]


class DecodeCase:
    def __init__(self, args, method, H, I, threads):
        E, k, threadpool_count = args.experts, args.topk, args.threadpool_count
        self.method, self.H, self.I, self.threads, self.isa = method, H, I, threads, "auto"
        layer_bytes = E * 3 * (packed_bytes(method, I // threadpool_count, H) + 64) * threadpool_count
        self.copies = max(2, int(np.ceil(args.footprint_gb * 1e9 / layer_bytes)))
        rng = np.random.default_rng(0)
        self.pool = aligned_bytes(self.copies * layer_bytes, rng)
        self.layers = [random_layer(rng, method, E, H, I, threadpool_count, self.pool[c * layer_bytes:(c + 1) * layer_bytes])
                       for c in range(self.copies)]
        self.x = np.random.default_rng(1).standard_normal((1, H)).astype(np.float32)
        self.ids = [np.sort(np.random.default_rng(i).permutation(E)[:k]).reshape(1, k).astype(np.int64)
                    for i in range(64)]
        self.tw = np.full((1, k), 1.0 / k, np.float32)
        self.i = 0
        self.touched = k * 3 * packed_bytes(method, I // threadpool_count, H) * threadpool_count
        self.weights = k * 3 * H * I  # weights read per token
        self.info = {"method": method, "H": H, "I": I, "experts": E, "topk": k, "threadpool_count": threadpool_count,
                     "layer_copies": self.copies, "footprint_GB": self.copies * layer_bytes / 1e9,
                     "touched_MB": self.touched / 1e6,
                     "bytes_between_revisits_MB": (self.copies - 1) * self.touched / 1e6}
        self.times = {}

    def step(self):
        self.i += 1
        self.layers[self.i % self.copies].forward(self.x, self.ids[self.i % 64], self.tw, self.isa, self.threads)

    def rep(self, min_time, isa="auto"):
        self.isa = isa
        for _ in range(self.copies):  # warm-up: every copy once (pages, pool, frequency)
            self.step()
        self.times.setdefault(isa, []).append(timeit(self.step, min_time=min_time, min_iters=2 * self.copies, warmup=0))

    def result(self, isa="auto"):
        t = summarize(self.times[isa])
        return dict(self.info, isa=isa, us_per_token=t["median"] * 1e6, us_min=t["min"] * 1e6, us_max=t["max"] * 1e6,
                    reps=t["reps"], GBps=self.touched / t["median"] / 1e9, weights_per_s=self.weights / t["median"])


class TorchDecodeCase:
    def __init__(self, args, H, I, threads):
        self.H, self.I, self.threads, self.k = H, I, threads, args.topk
        expert_bytes = 3 * H * I * 2
        self.n = max(2 * self.k, int(np.ceil(args.footprint_gb * 1e9 / expert_bytes)))
        g = torch.Generator().manual_seed(0)
        self.ws = bf16_experts(self.n, H, I, g)
        self.x = torch.randn(1, H, generator=g).to(torch.bfloat16)
        self.i = 0
        self.expert_bytes = expert_bytes
        self.times = []

    def step(self):
        i = self.i
        out = torch.zeros(1, self.H, dtype=torch.bfloat16)
        for j in range(self.k):
            wg, wu, wd = self.ws[(i + j) % self.n]
            out += F.linear(F.silu(F.linear(self.x, wg)) * F.linear(self.x, wu), wd)
        self.i = i + self.k
        return out

    def rep(self, min_time):
        torch.set_num_threads(self.threads)
        for _ in range(self.n // self.k + 1):
            self.step()
        self.times.append(timeit(self.step, min_time=min_time, min_iters=max(3, 2 * self.n // self.k), warmup=0))

    def result(self):
        t = summarize(self.times)
        return {"H": self.H, "I": self.I, "bf16_experts": self.n, "us_per_token": t["median"] * 1e6,
                "us_min": t["min"] * 1e6, "us_max": t["max"] * 1e6, "reps": t["reps"],
                "GBps_bf16": self.k * self.expert_bytes / t["median"] / 1e9}


def prefill_inputs(args, T):
    E, k = args.prefill_experts, args.topk
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, args.hidden, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, ids


PROFILE_STAGES = ("q", "pack", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait")


class PrefillCase:
    def __init__(self, args, method, H, I, threads, tokens, layer=None):
        self.method, self.H, self.I, self.threads, self.isa = method, H, I, threads, "auto"
        E, k, T = args.prefill_experts, args.topk, tokens
        self.layer = layer or random_layer(np.random.default_rng(2), method, E, H, I, args.threadpool_count)
        x, ids = prefill_inputs(args, T)
        self.x, self.ids = x.numpy(), ids.numpy().astype(np.int64)
        self.tw = np.full((T, k), 1.0 / k, np.float32)
        self.flops = 2.0 * T * k * 3 * H * I
        self.info = {"method": method, "tokens": T, "experts": E, "topk": k, "H": H, "I": I}
        self.times, self.cpu_times = {}, {}

    def step(self):
        self.layer.forward(self.x, self.ids, self.tw, self.isa, self.threads)

    def rep(self, min_time, isa="auto"):
        self.isa = isa
        wall, cpu = timeit(self.step, min_time=min_time, min_iters=3, warmup=1, cpu=True)
        self.times.setdefault(isa, []).append(wall)
        self.cpu_times.setdefault(isa, []).append(cpu)

    def profile(self, isa="auto"):
        """One extra call with the engine's stage profile on (seconds summed over threads, wall)."""
        self.isa = isa
        _testing.profile(1)
        try:
            t0 = time.perf_counter()
            self.step()
            call = time.perf_counter() - t0
            p = dict(_testing.profile())
        finally:
            _testing.profile(0)
        if not p:
            return None
        p["python_call"] = call
        return p

    def result(self, isa="auto"):
        """Wall time per call (median [min-max] over rounds) and TFLOP/s; CPU seconds per call of the
        whole process (every thread, spin-waits included) and TFLOP/s per busy core = flops / CPU
        seconds, which a machine shared with other jobs does not dilute (a descheduled thread
        accrues no CPU time); then the stage profile of one more call and each stage's share of
        the summed stage time."""
        t = summarize(self.times[isa])
        c = summarize(self.cpu_times[isa])
        r = dict(self.info, isa=isa, ms=t["median"] * 1e3, ms_min=t["min"] * 1e3, ms_max=t["max"] * 1e3,
                 reps=t["reps"], TFLOPs=self.flops / t["median"] / 1e12, cpu_ms=c["median"] * 1e3,
                 cpu_ms_min=c["min"] * 1e3, cpu_ms_max=c["max"] * 1e3, TFLOPs_per_core=self.flops / c["median"] / 1e12,
                 TFLOPs_per_core_min=self.flops / c["max"] / 1e12, TFLOPs_per_core_max=self.flops / c["min"] / 1e12)
        p = self.profile(isa)
        if p:
            counts = ("threads", "gate_groups_per_task", "down_cols_per_task", "rows_per_token_block", "gemm_min_rows")
            r["profile_ms"] = {k: (v if k in counts else v * 1e3) for k, v in p.items()}
            total = sum(r["profile_ms"].get(k, 0.0) for k in PROFILE_STAGES)
            if total > 0:
                r["stage_share_pct"] = {k: 100 * r["profile_ms"][k] / total for k in PROFILE_STAGES
                                        if k in r["profile_ms"]}
        return r


class TorchPrefillCase:
    def __init__(self, args, H, I, threads, tokens):
        self.threads = threads
        E, k, T = args.prefill_experts, args.topk, tokens
        g = torch.Generator().manual_seed(4)
        self.ws = bf16_experts(E, H, I, g)
        x, ids = prefill_inputs(args, T)
        self.x = x.to(torch.bfloat16)
        self.groups = [(ids == e).nonzero(as_tuple=True) for e in range(E)]
        self.T, self.H = T, H
        self.flops = 2.0 * T * k * 3 * H * I
        self.times = []

    def step(self):
        out = torch.zeros(self.T, self.H, dtype=torch.float32)
        for e, (tok, _slot) in enumerate(self.groups):
            if len(tok):
                xe = self.x[tok]
                wg, wu, wd = self.ws[e]
                out.index_add_(0, tok, F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd).float())
        return out

    def rep(self, min_time):
        torch.set_num_threads(self.threads)
        self.times.append(timeit(self.step, min_time=min_time, min_iters=3, warmup=1))

    def result(self):
        t = summarize(self.times)
        return {"ms": t["median"] * 1e3, "ms_min": t["min"] * 1e3, "ms_max": t["max"] * 1e3, "reps": t["reps"],
                "TFLOPs": self.flops / t["median"] / 1e12}


def call_overhead_us(threads, isa):
    """Fixed cost of one decode call: a tiny layer (H=256, I=256, 4 experts, top-2) that lives in L1/L2."""
    layer = random_layer(np.random.default_rng(5), "int8", 4, 256, 256, 1)
    x = np.ones((1, 256), np.float32)
    ids = np.array([[0, 2]], np.int64)
    tw = np.full((1, 2), 0.5, np.float32)
    ts = [timeit(lambda: layer.forward(x, ids, tw, isa, threads), min_time=0.1, min_iters=50, warmup=50)
          for _ in range(5)]
    return float(np.median(ts)) * 1e6


def kernel_bench(args, isas, methods, threads, ghz, read_gbs):
    """The dot kernel of each ISA alone: in cache and streaming, 1 thread and `threads` threads; --reps
    rounds, each over every configuration (interleaved, so load changes spread over all), median."""
    from kt_convert.kt_runtime.format.byte_orders import AMX_TILED

    H, I = args.hidden, int(args.inter.split(",")[0])
    big = aligned_bytes(int(args.footprint_gb * 1e9) // 4096 * 4096)
    small = aligned_bytes(threads * 128 * H)  # one 128-row matrix per thread (L2 resident)
    configs = []
    for method in [m for m in methods if method_row(m).byte_order is AMX_TILED]:  # the tiled dot kernels
        per_byte = method_row(method).elems_per_byte
        mat = I * H // per_byte
        for isa in isas:
            for th in sorted({1, threads}):
                configs.append((method, isa, "L2", th, small[: th * 128 * H // per_byte], 128))
                configs.append((method, isa, "stream", th, big[: len(big) // mat * mat], I))
    runs = {c[:4]: [] for c in configs}
    for _ in range(args.reps):
        for method, isa, where, th, buf, n in configs:
            _testing.dot_stream(method, buf, n, H, 1, isa, th, 0.05)  # warm-up
            runs[(method, isa, where, th)].append(_testing.dot_stream(method, buf, n, H, 1, isa, th,
                                                                      args.kernel_time))
    out = []
    for (method, isa, where, th), rs in runs.items():
        rs = sorted(rs, key=lambda d: d["weights_per_cpu_s"])
        r = rs[len(rs) // 2]
        row = {"method": method, "isa": isa, "where": where, "threads": th, "GBps": r["GBps"],
               "weights_per_cycle_core": r["weights_per_cpu_s"] / (ghz * 1e9),
               "weights_per_cycle_core_max": rs[-1]["weights_per_cpu_s"] / (ghz * 1e9), "cpu_share": r["cpu_share"]}
        if where == "stream":
            row["vs_cpp_read"] = r["GBps"] / read_gbs[th]
        out.append(row)
        print(f"kernel {method} {isa:12s} {where:6s} threads={th}: {r['GBps']:6.1f} GB/s, "
              f"{row['weights_per_cycle_core']:5.1f} weights/cycle/core (max {row['weights_per_cycle_core_max']:.1f})"
              + (f", {row['vs_cpp_read']:.2f} of the C++ read" if where == "stream" else "")
              + (f" (ran {100 * r['cpu_share']:.0f}% of the wall time)" if r["cpu_share"] < 0.9 else ""), flush=True)
    return out


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
    ap.add_argument("--inter", default=None, help="decode intermediate sizes (default 2048; --full: 1024,2048)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--threadpool-count", "--numa", type=int, default=1, help="NUMA pools of the packed output (T)")
    ap.add_argument("--footprint-gb", type=float, default=None,
                    help="packed bytes cycled over per decode configuration (>> L3; default 0.5; --full: 2 GB = 6.7x "
                         "a 300 MB L3)")
    ap.add_argument("--reps", type=int, default=None, help="decode rounds (median reported; default 3, --full 5)")
    ap.add_argument("--prefill-reps", type=int, default=None, help="prefill rounds (median reported; default 2, "
                    "--full 3)")
    ap.add_argument("--prefill-tokens", default=None, help="prefill token counts, comma-separated (default 512; "
                    "--full 512,4096)")
    ap.add_argument("--full", action="store_true", help="the sizes docs/BENCHMARKS.md reports (see above)")
    ap.add_argument("--prefill-experts", type=int, default=64)
    ap.add_argument("--prefill-inter", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="0 = every CPU of this process")
    ap.add_argument("--isa", default="auto", help="comma list: auto, portable, avx2, avxvnni, avx512, amx")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds timed per configuration and round")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true", help="skip the dot-kernel-alone section")
    ap.add_argument("--int8-modes", action="store_true",
                    help="also time each way the AMX INT8 kernel reads B (first prefill shape)")
    ap.add_argument("--kernel-time", type=float, default=0.3, help="seconds per kernel measurement")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    for name, quick, full in SIZES:  # a flag given explicitly wins
        if getattr(args, name) is None:
            setattr(args, name, full if args.full else quick)
    isas = runnable_isas(args.isa.split(","), ap)

    info = cpu_info()
    threads = args.threads or info["cores"]
    print(f"CPU: {info['cpu']}  cores={info['cores']}  ISA={info['isa']}  L3={info.get('L3 cache', '?')}  "
          f"max MHz={info.get('CPU max MHz', info.get('CPU MHz', '?'))}  threads={threads}", flush=True)
    res = {"machine": info, "threads": threads, "isa": ",".join(isas), "reps": args.reps, "min_time": args.min_time,
           "footprint_GB_per_config": args.footprint_gb, "spin_us": os.environ.get("KT_MOE_SPIN_US", "2000"),
           "decode": [], "prefill": []}
    t_start = time.perf_counter()
    torch_bw, cpp_bw = read_bandwidth(threads)
    res["dram_read_GBps"] = torch_bw
    res["cpp_stream_read_GBps"] = cpp_bw
    print(f"read bandwidth: torch sum of 1 GiB fp32 {torch_bw:.1f} GB/s; C++ streaming read of 1 GiB "
          f"(MoE pool) {cpp_bw:.1f} GB/s", flush=True)
    res["core_clock_GHz"] = _testing.core_clock_ghz()
    print(f"core clock (dependent adds over thread CPU time): {res['core_clock_GHz']:.2f} GHz", flush=True)
    res["call_overhead_us"] = call_overhead_us(threads, isas[0])
    print(f"decode call overhead (tiny layer in cache, {isas[0]}): {res['call_overhead_us']:.1f} us", flush=True)
    methods = args.methods.split(",")

    if not args.skip_kernel:
        buf = aligned_bytes(1 << 30)
        read_gbs = {th: _testing.read_bandwidth(buf, th, 5) for th in sorted({1, threads})}
        del buf
        res["cpp_stream_read_GBps_by_threads"] = read_gbs
        print("C++ streaming read: " + ", ".join(f"{v:.1f} GB/s on {th} thread(s)" for th, v in read_gbs.items()),
              flush=True)
        res["kernel"] = kernel_bench(args, isas, methods, threads, res["core_clock_GHz"], read_gbs)

    if not args.skip_decode:
        inters = [int(v) for v in args.inter.split(",")]
        cases = [DecodeCase(args, m, args.hidden, I, threads) for I in inters for m in methods]
        tcases = {} if args.skip_torch else {I: TorchDecodeCase(args, args.hidden, I, threads) for I in inters}
        print(f"decode: {len(cases)} configurations built ({time.perf_counter() - t_start:.0f} s)", flush=True)
        read_buf = aligned_bytes(1 << 30)
        round_read = []  # C++ read in every round: ratios against the bandwidth of the same minute
        for r in range(args.reps):
            round_read.append(_testing.read_bandwidth(read_buf, threads, 2))
            for c in tcases.values():
                c.rep(args.min_time)
            for c in cases:
                for isa in isas:
                    c.rep(args.min_time, isa)
        del read_buf
        res["cpp_stream_read_GBps_by_round"] = round_read
        tb = {I: c.result() for I, c in tcases.items()}
        for I, t in tb.items():
            res.setdefault("decode_torch_bf16", []).append(t)
            print(f"decode torch bf16 H={args.hidden} I={I}: {t['us_per_token']:.0f} us/token "
                  f"[{t['us_min']:.0f}-{t['us_max']:.0f}] ({t['GBps_bf16']:.1f} GB/s of bf16)", flush=True)
        for c in cases:
            for isa in isas:
                r = c.result(isa)
                r["vs_dram"] = r["GBps"] / torch_bw
                r["vs_cpp_stream"] = r["GBps"] / cpp_bw
                r["vs_cpp_stream_same_round"] = float(np.median([c.touched / t / 1e9 / rd
                                                                 for t, rd in zip(c.times[isa], round_read)]))
                r["weights_per_cycle_core"] = r["weights_per_s"] / threads / (res["core_clock_GHz"] * 1e9)
                if c.I in tb:
                    r["torch_bf16_us_per_token"] = tb[c.I]["us_per_token"]
                    r["speedup_vs_torch_bf16"] = tb[c.I]["us_per_token"] / r["us_per_token"]
                res["decode"].append(r)
                print(f"decode {c.method} {isa} H={args.hidden} I={c.I} top{args.topk}/{args.experts}: "
                      f"{r['us_per_token']:.0f} us/token [{r['us_min']:.0f}-{r['us_max']:.0f}], {r['GBps']:.1f} GB/s = "
                      f"{r['vs_dram']:.2f} of torch-sum read, {r['vs_cpp_stream']:.2f} of C++ read "
                      f"({r['vs_cpp_stream_same_round']:.2f} against the read of each round), "
                      f"{r['weights_per_cycle_core']:.1f} weights/cycle/core"
                      + (f", {r['speedup_vs_torch_bf16']:.2f}x torch bf16" if c.I in tb else "")
                      + f"  (footprint {r['footprint_GB']:.2f} GB, {r['layer_copies']} copies)", flush=True)
        del cases, tcases

    if not args.skip_prefill:
        I = args.prefill_inter
        token_counts = [int(v) for v in str(args.prefill_tokens).split(",")]
        # one packed layer per method, shared by every token count
        layers = {m: random_layer(np.random.default_rng(2), m, args.prefill_experts, args.hidden, I, args.threadpool_count)
                  for m in methods}
        peak = amx_peak_tflops(info, threads) if info["isa"] == "amx" else None
        core_peak = amx_peak_tflops(info, 1) if info["isa"] == "amx" else None
        for T in token_counts:
            pcases = [PrefillCase(args, m, args.hidden, I, threads, T, layers[m]) for m in methods]
            tcase = None if args.skip_torch else TorchPrefillCase(args, args.hidden, I, threads, T)
            for r in range(args.prefill_reps):
                if tcase:
                    tcase.rep(args.min_time)
                for c in pcases:
                    for isa in isas:
                        c.rep(args.min_time, isa)
            tb = tcase.result() if tcase else None
            del tcase
            if tb:
                tb["tokens"] = T
                res.setdefault("prefill_torch_bf16", []).append(tb)
                print(f"prefill torch bf16 T={T} top{args.topk}/{args.prefill_experts} H={args.hidden} I={I}: "
                      f"{tb['ms']:.1f} ms [{tb['ms_min']:.1f}-{tb['ms_max']:.1f}], {tb['TFLOPs']:.3f} TFLOP/s",
                      flush=True)
            for c in pcases:
                for isa in isas:
                    r = c.result(isa)
                    if tb:
                        r["torch_bf16_TFLOPs"] = tb["TFLOPs"]
                        r["speedup_vs_torch_bf16"] = r["TFLOPs"] / tb["TFLOPs"]
                    if peak and isa in ("auto", "amx"):
                        r["amx_int8_peak_TFLOPs"] = peak
                        r["pct_amx_peak"] = 100 * r["TFLOPs"] / peak
                        r["amx_int8_peak_TFLOPs_per_core"] = core_peak
                        r["pct_amx_peak_per_core"] = 100 * r["TFLOPs_per_core"] / core_peak
                    res["prefill"].append(r)
                    print(f"prefill {c.method} {isa} T={T} top{args.topk}/{args.prefill_experts} H={args.hidden} "
                          f"I={I}: {r['ms']:.1f} ms [{r['ms_min']:.1f}-{r['ms_max']:.1f}], {r['TFLOPs']:.3f} TFLOP/s"
                          + (f", {r['speedup_vs_torch_bf16']:.2f}x torch bf16" if tb else "")
                          + (f", {r['pct_amx_peak']:.1f}% of AMX INT8 peak ({peak:.1f} TFLOP/s)" if "pct_amx_peak" in r
                             else ""), flush=True)
                    print(f"  per busy core: {r['cpu_ms']:.1f} CPU-ms per call [{r['cpu_ms_min']:.1f}-"
                          f"{r['cpu_ms_max']:.1f}], {r['TFLOPs_per_core']:.3f} TFLOP/s [{r['TFLOPs_per_core_min']:.3f}-"
                          f"{r['TFLOPs_per_core_max']:.3f}]"
                          + (f" = {r['pct_amx_peak_per_core']:.1f}% of one core's AMX INT8 peak ({core_peak:.2f} "
                             "TFLOP/s)" if "pct_amx_peak_per_core" in r else ""), flush=True)
                    if "profile_ms" in r:
                        pm, sh = r["profile_ms"], r.get("stage_share_pct", {})
                        print("  stages (ms summed over threads, share): " + ", ".join(
                            f"{k}={pm[k]:.1f} ({sh.get(k, 0):.0f}%)" for k in PROFILE_STAGES if k in pm)
                            + f"; wall {pm['wall']:.1f} ms (region {pm.get('region', 0):.1f}, python call "
                            f"{pm['python_call']:.1f})", flush=True)
            # AMX INT8: each way the tile kernel reads B (results identical), same layer and inputs; first shape
            amx_isa = next((i for i in isas if i in ("auto", "amx")), None)
            if T == token_counts[0] and args.int8_modes and info["isa"] == "amx" and amx_isa:
                c8 = next((c for c in pcases if c.method == "int8"), None)
                if c8 is not None:
                    default_mode = _testing.knob("amx_int8_mode")
                    modes = {}
                    try:
                        for mode in (0, 1, 2, 3):
                            _testing.knob("amx_int8_mode", mode)
                            c8.times, c8.cpu_times = {}, {}
                            for _ in range(args.prefill_reps):
                                c8.rep(args.min_time, amx_isa)
                            r = c8.result(amx_isa)
                            modes[str(mode)] = {k: r[k] for k in ("ms", "ms_min", "ms_max", "cpu_ms")}
                            modes[str(mode)]["profile_ms"] = r.get("profile_ms")
                            pm = r.get("profile_ms") or {}
                            print(f"prefill int8 T={T} B mode {mode}: {r['ms']:.1f} ms [{r['ms_min']:.1f}-"
                                  f"{r['ms_max']:.1f}], {r['cpu_ms']:.1f} CPU-ms; g_dot={pm.get('g_dot', 0):.1f} "
                                  f"d_dot={pm.get('d_dot', 0):.1f}", flush=True)
                    finally:
                        _testing.knob("amx_int8_mode", default_mode)
                    res["prefill_int8_modes"] = {"tokens": T, "default": default_mode, "modes": modes}
            del pcases
    res["bench_seconds"] = time.perf_counter() - t_start

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
