#!/usr/bin/env python3
"""Benchmark prefill chunks through one MoE layer and an 8-layer stack: the CPU path, the GPU prefill path and the
PCIe floor, in the same run, and the crossover token count (the gpu_prefill_token_threshold for this host).

    python scripts/bench_prefill.py                        # small layer: H=1024, I=512, 64 experts, top-6
    python scripts/bench_prefill.py --v4-flash --json prefill.json   # H=4096, I=2048, 256 experts, top-6

Weights: a synthetic DeepSeek-V4-Flash layer (MXFP4, synthetic.v4_flash) converted with the real converter into
a new temporary folder, or --workdir, and removed at the end (--keep: kept and reused by later runs with the same
--workdir and settings). Routing: per token, top-k distinct experts drawn uniformly (pre-drawn, on the device
as a router leaves them); --gpu-experts (default 0) hot experts stay resident on the GPU.

Per chunk of T tokens (--tokens, default 512, 2048, 4096, 8192), median ms of --iters calls:
  cpu    HybridMoE without a threshold: routing and x to the host, the CPU engine on every CPU-resident expert,
         the result back to the device (the path below the threshold);
  gpu    HybridMoE with gpu_prefill_token_threshold=1: the CPU-resident experts the chunk touches streamed to the
         GPU (pinned staging, copy stream, Triton dequantization, grouped GEMMs);
  floor  packed bytes of the experts the chunk touches / the measured host-to-device rate of pinned memory:
         what PCIe alone costs. gpu_of_floor = floor / gpu (1.0: PCIe-bound with nothing else showing).
Stage breakdown of one traced GPU call: uploads (sum of the copy-stream intervals), compute (dequantization and
GEMMs, sum of the compute-stream intervals), and the gather rate of the copy threads (mapped file -> pinned);
a diagnostic beside it: the mapped shard registered with CUDA and copied without the gather (mapped_h2d).
Stack (--layers, default 8; 0: skip): that many HybridMoE layers over the same packed layer, each input the
previous output (tanh(x + y)), routing on the device: tokens/s for the CPU path, the GPU path and the floor.
Crossover: the chunk size where the GPU path overtakes the CPU path, interpolated between the measured sizes.
Targets at 4096 tokens: gpu_of_floor >= 0.7 and cpu / gpu >= 2.

Without CUDA only the CPU path runs (it says so); the GPU path, the floor and the crossover need a CUDA GPU
and triton. Prints machine info and one JSON document (also to --json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "scripts"):  # the project, and bench_hybrid beside this script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_hybrid import machine_info, packed_layer  # noqa: E402

V4_FLASH = {"hidden": 4096, "intermediate": 2048, "experts": 256, "topk": 6}
SMALL = {"hidden": 1024, "intermediate": 512, "experts": 64, "topk": 6}


def timed(fn, iters: int, warmup: int, sync) -> float:
    """Median ms of fn() over iters calls, after warmup calls; sync() after each."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def sig3(x: float) -> float:
    return float(f"{x:.3g}")


def h2d_rate(device, nbytes: int = 256 << 20, reps: int = 5) -> float:
    """GB/s of one pinned host buffer copied to the device (median of reps; --cpu-prefill: a host copy)."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def gather_rate(prefill, experts) -> float:
    """GB/s of the copy threads gathering these experts' packed bytes from the mappings into one pinned slot,
    group by group as a prefill call does (no upload)."""
    from kt_runtime.hybrid.expert_staging import stage_group
    from kt_runtime.hybrid.prefill_plan import transfer_groups

    plan, ws = prefill.plan, prefill.ws
    slot = torch.empty(plan.slot_bytes, dtype=torch.uint8, pin_memory=ws.cuda).numpy()
    groups = [stage_group(g, [prefill.sources.pieces[e] for e in g], prefill._jobs(plan.group_experts))
              for g in transfer_groups(experts, plan.group_experts)]
    t0 = time.perf_counter()
    for g in groups:
        for f in ws.gather(g, prefill.sources.regions, slot):
            f.result()
    return sum(g.nbytes for g in groups) / (time.perf_counter() - t0) / 1e9


def mapped_rate(prefill, device) -> dict:
    """Diagnostic: the layer's mapped shard registered with CUDA (cudaHostRegister, read-only) and copied to the
    device straight from the mapping, without the copy threads' gather: GB/s and the registration's seconds, or
    the error (e.g. where the driver refuses file-backed memory)."""
    import warnings

    view = max(prefill.sources.regions, key=lambda v: v.nbytes)
    nbytes = min(view.nbytes, 1 << 30)
    cudart = torch.cuda.cudart()
    ptr = view.__array_interface__["data"][0]
    t0 = time.perf_counter()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, view.nbytes, 8))  # cudaHostRegisterReadOnly
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": str(e)}
    register_s = time.perf_counter() - t0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only mapping: only read here
            src = torch.from_numpy(view[:nbytes])
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dst.copy_(src, non_blocking=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        return {"gbps": round(nbytes / (a.elapsed_time(b) / 1e3) / 1e9, 2), "register_s": round(register_s, 3),
                "pinned": src.is_pinned(), "bytes": nbytes}
    finally:
        torch.cuda.synchronize(device)
        cudart.cudaHostUnregister(ptr)


def routing(T: int, E: int, k: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k]
    w = torch.softmax(torch.randn(T, k, generator=g), -1)
    return ids.to(device), w.to(device)


def touched(ids: torch.Tensor, gpu_mask: torch.Tensor) -> list[int]:
    """The CPU-resident experts a chunk routes to."""
    used = torch.zeros(gpu_mask.numel(), dtype=torch.bool)
    used[ids.reshape(-1).cpu()] = True
    return (used & ~gpu_mask).nonzero().flatten().tolist()


def trace_stages(h, x, ids, w) -> dict:
    """One traced GPU call: summed upload and compute intervals (ms) and the call's wall time on the device."""
    ws = h.prefill.ws
    if not ws.cuda:
        return {}
    ws.trace = []
    h(x, ids, w)
    torch.cuda.synchronize()
    spans = ws.trace
    ws.trace = None
    if not spans:
        return {}
    up = sum(s["h2d"][0].elapsed_time(s["h2d"][1]) for s in spans)
    comp = sum(s["compute"][0].elapsed_time(s["compute"][1]) for s in spans)
    wall = spans[0]["h2d"][0].elapsed_time(spans[-1]["compute"][1])
    return {"groups": len(spans), "upload_ms": round(up, 3), "compute_ms": round(comp, 3),
            "first_upload_to_last_compute_ms": round(wall, 3), "staged_mb": round(sum(s["bytes"] for s in spans) / 1e6, 1)}


def crossover(rows: list[dict]) -> dict:
    """The chunk size where the GPU path gets faster than the CPU path (linear between measured sizes)."""
    pts = [(r["tokens"], r["cpu_ms"] - r["gpu_ms"]) for r in rows if r.get("gpu_ms") is not None]
    if not pts:
        return {"tokens": None, "note": "not measured (no GPU path)"}
    if pts[0][1] >= 0:
        return {"tokens": pts[0][0], "note": f"the GPU path is already faster at the smallest chunk ({pts[0][0]})"}
    for (t0, d0), (t1, d1) in zip(pts, pts[1:]):
        if d0 < 0 <= d1:
            return {"tokens": int(round(t0 + (t1 - t0) * (-d0) / (d1 - d0))), "note": f"between {t0} and {t1}"}
    return {"tokens": None, "note": f"the CPU path is faster up to the largest chunk ({pts[-1][0]})"}


def main(argv=None) -> int:
    from kt_runtime.format.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--v4-flash", action="store_true", help="DeepSeek-V4-Flash dims: H=4096, I=2048, 256 experts, "
                                                              "top-6 (default: H=1024, I=512, 64 experts, top-6)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--topk", type=int)
    ap.add_argument("--tokens", default="512,2048,4096,8192", help="chunk sizes, comma-separated")
    ap.add_argument("--layers", type=int, default=8, help="layers of the stack (0: one layer only)")
    ap.add_argument("--gpu-experts", type=int, default=0, help="experts resident on the GPU per layer")
    ap.add_argument("--method", choices=list(METHODS), default="int4")
    ap.add_argument("--threadpool-count", type=int, default=1, help="NUMA shards of the packed weights")
    ap.add_argument("--threads", type=int, default=None, help="CPU engine threads (default: every core but one)")
    ap.add_argument("--memory", type=int, default=None, help="gpu_prefill_memory in bytes (default 2 GiB)")
    ap.add_argument("--gemm", choices=["auto", "grouped", "loop"], default="auto")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workdir", default=None,
                    help="where the packed layer goes (default: a new temporary folder); removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the packed layer; a later run with this --workdir reuses it")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("--cpu-prefill", action="store_true",
                    help="run the GPU path's code on the CPU (to test this script without a GPU: its numbers mean "
                         "nothing, the floor is a host copy)")
    args = ap.parse_args(argv)
    dims = V4_FLASH if args.v4_flash else SMALL
    for key, value in dims.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        chunks = sorted({int(t) for t in args.tokens.split(",")})
    except ValueError:
        ap.error(f"--tokens: comma-separated token counts, got {args.tokens!r}")
    if not chunks or chunks[0] < 1:
        ap.error("--tokens: positive token counts")
    if not 0 <= args.gpu_experts < args.experts or args.topk > args.experts:
        ap.error("need 0 <= --gpu-experts < --experts and --topk <= --experts")

    from synthetic.scratch import Scratch

    with Scratch(args.workdir, "bench_prefill_", keep=args.keep) as scratch:
        args.scratch = scratch
        return run(args, chunks)


def run(args, chunks: list[int]) -> int:
    import kt_runtime
    from kt_runtime.hybrid.gpu_prefill import PrefillWorkspace, unavailable_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    print("# " + " | ".join(f"{k}: {v}" for k, v in info.items()), file=sys.stderr)
    why_not = None if args.cpu_prefill else unavailable_reason(device)
    if args.cpu_prefill:
        device = torch.device("cpu")
        print("# --cpu-prefill: the GPU path's code runs on the CPU; its numbers mean nothing", file=sys.stderr)
    elif why_not:
        print(f"# CPU path only: {why_not} (the GPU path, the PCIe floor and the crossover need a CUDA GPU and "
              "triton)", file=sys.stderr)
    w = kt_runtime.load_experts(packed_layer(args), verify=False)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    cpu = kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device, num_threads=args.threads)
    gpu = None
    if not why_not:
        ws = PrefillWorkspace(device, args.memory, gemm=args.gemm)
        gpu = kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device, num_threads=args.threads,
                                   gpu_prefill_token_threshold=1, prefill_workspace=ws)
    result = {"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("scratch", "json")},
              "cpu_only": bool(why_not), "cpu_only_reason": why_not}
    if gpu is not None:
        p = gpu.prefill.plan
        rate = h2d_rate(device)
        result["gpu"] = {"h2d_gbps": round(rate, 2), "gemm": "grouped" if ws.grouped_gemm_ok(gpu.gpu_dtype) else "loop",
                         "memory_budget": ws.memory, "group_experts": p.group_experts, "pair_block": p.pair_block,
                         "slot_mb": round(p.slot_bytes / 1e6, 1),
                         "gather_gbps": round(gather_rate(gpu.prefill, range(w.num_experts)), 2)}
        if ws.cuda:
            result["gpu"]["mapped_h2d"] = mapped_rate(gpu.prefill, device)
        print(f"# pinned host-to-device {rate:.1f} GB/s; copy threads gather {result['gpu']['gather_gbps']} GB/s; "
              f"{p.group_experts} experts per transfer group; GEMM {result['gpu']['gemm']}; mapped file registered "
              f"and copied: {result['gpu'].get('mapped_h2d')}", file=sys.stderr)
    gpu_mask = cpu.gpu_mask
    rows = []
    for T in chunks:
        ids, wt = routing(T, w.num_experts, args.topk, seed=T, device=device)
        x = (torch.randn(T, w.hidden_size, generator=torch.Generator().manual_seed(T)) * 0.5).to(torch.bfloat16).to(device)
        row = {"tokens": T, "experts_touched": len(touched(ids, gpu_mask))}
        row["cpu_ms"] = round(timed(lambda: cpu(x, ids, wt), args.iters, args.warmup, sync), 3)
        row["cpu_tok_s"] = round(T / row["cpu_ms"] * 1e3, 1)
        if gpu is not None:
            row["gpu_ms"] = round(timed(lambda: gpu(x, ids, wt), args.iters, args.warmup, sync), 3)
            row["gpu_tok_s"] = round(T / row["gpu_ms"] * 1e3, 1)
            nbytes = gpu.prefill.sources.packed_bytes(touched(ids, gpu_mask))
            row["floor_ms"] = round(nbytes / (rate * 1e9) * 1e3, 3)
            row["floor_tok_s"] = round(T / row["floor_ms"] * 1e3, 1)
            row["gpu_of_floor"] = sig3(row["floor_ms"] / row["gpu_ms"])
            row["gpu_speedup_vs_cpu"] = sig3(row["cpu_ms"] / row["gpu_ms"])
            row["stages"] = trace_stages(gpu, x, ids, wt)
        rows.append(row)
        print("# " + json.dumps({k: v for k, v in row.items() if k != "stages"}), file=sys.stderr)
    result["one_layer"] = rows
    result["crossover"] = crossover(rows)
    if args.layers > 0:
        result["stack"] = stack(args, w, cpu, gpu, chunks, device, sync, rate if gpu is not None else None)
    at = next((r for r in rows if r["tokens"] == 4096 and "gpu_ms" in r), None)
    if at is not None:
        result["targets_4096"] = {"gpu_of_floor": at["gpu_of_floor"], "gpu_of_floor_met": at["gpu_of_floor"] >= 0.7,
                                  "speedup_vs_cpu": at["gpu_speedup_vs_cpu"], "speedup_met": at["gpu_speedup_vs_cpu"] >= 2}
    c = result["crossover"]
    if c["tokens"] is None:
        print(f"# crossover: {c['note']}", file=sys.stderr)
    else:
        print(f"# crossover: {c['tokens']} tokens ({c['note']}): gpu_prefill_token_threshold={c['tokens']} for this "
              "host", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        from kt_runtime.format.fsio import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0


def stack(args, w, cpu, gpu, chunks, device, sync, rate) -> list[dict]:
    """tokens/s of args.layers layers in a row (the same packed layer), each input the previous layer's output."""
    import kt_runtime

    L = args.layers
    cpu_layers = [cpu] + [kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device,
                                               num_threads=args.threads) for _ in range(L - 1)]
    gpu_layers = None
    if gpu is not None:
        gpu_layers = [gpu] + [kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device,
                                                   num_threads=args.threads, gpu_prefill_token_threshold=1,
                                                   prefill_workspace=gpu.prefill.ws) for _ in range(L - 1)]
    out = []
    for T in chunks:
        routes = [routing(T, w.num_experts, args.topk, seed=1000 * T + i, device=device) for i in range(L)]
        x0 = (torch.randn(T, w.hidden_size, generator=torch.Generator().manual_seed(T)) * 0.5).to(torch.bfloat16)
        x0 = x0.to(device)

        def step(layers):
            x = x0
            for h, (ids, wt) in zip(layers, routes):
                x = torch.tanh(x + h(x, ids, wt))
            return x

        row = {"tokens": T, "layers": L}
        ms = timed(lambda: step(cpu_layers), args.iters, args.warmup, sync)
        row["cpu_ms"], row["cpu_tok_s"] = round(ms, 3), round(T / ms * 1e3, 1)
        if gpu_layers is not None:
            ms = timed(lambda: step(gpu_layers), args.iters, args.warmup, sync)
            row["gpu_ms"], row["gpu_tok_s"] = round(ms, 3), round(T / ms * 1e3, 1)
            floor = sum(gpu.prefill.sources.packed_bytes(touched(ids, cpu.gpu_mask)) for ids, _ in routes) / (rate * 1e9)
            row["floor_ms"], row["floor_tok_s"] = round(floor * 1e3, 3), round(T / floor, 1)
            row["gpu_of_floor"] = sig3(floor * 1e3 / ms)
        out.append(row)
        print("# stack " + json.dumps(row), file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
