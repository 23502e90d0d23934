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
         GPU (copy stream, Triton dequantization, grouped GEMMs), in the first staging of --staging (default
         auto: copied straight from the mapping registered with CUDA, or, where the registration fails, gathered
         into pinned slots first); `gpu_staging` says which ran. Every further --staging (default: gather) is
         measured in the same run with its own workspace, under `compared`, with the same fields;
  floor  packed bytes of the experts the chunk touches / the measured host-to-device rate of pinned memory:
         what PCIe alone costs. gpu_of_floor = floor / gpu (1.0: PCIe-bound with nothing else showing).
Stage breakdown of one traced GPU call per staging: uploads (sum of the copy-stream intervals), compute
(dequantization and GEMMs, sum of the compute-stream intervals), first upload to last compute, the lead-in (the
call's start on the caller's stream to its first upload: routing to the host, split, layout, the first gathers)
and the tail (last compute to the call's end). Per staging (gpu.staging): the staging the layer used and,
registered, the bytes it page-locked and the seconds that took (at its first call), or why the registration
failed; the gather rate of the copy threads (mapped file -> pinned) beside them.
Stack (--layers, default 8; 0: skip): that many HybridMoE layers over the same packed layer, each input the
previous output (tanh(x + y)), routing on the device: tokens/s for the CPU path, the GPU path (and each compared
staging) and the floor.
Crossover: the chunk size where the GPU path overtakes the CPU path, interpolated between the measured sizes
(crossover; crossover_compared for the other stagings). Targets at 4096 tokens: gpu_of_floor >= 0.7 and
cpu / gpu >= 2.

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
for path in (ROOT / "scripts",):  # bench_hybrid beside this script
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
    from kt_convert.kt_runtime.hybrid.expert_staging import stage_group
    from kt_convert.kt_runtime.hybrid.prefill_plan import transfer_groups

    plan, ws = prefill.plan, prefill.ws
    slot = torch.empty(plan.slot_bytes, dtype=torch.uint8, pin_memory=ws.cuda).numpy()
    groups = [stage_group(g, [prefill.sources.pieces[e] for e in g], prefill._jobs(plan.group_experts))
              for g in transfer_groups(experts, plan.group_experts)]
    t0 = time.perf_counter()
    for g in groups:
        for f in ws.gather(g, prefill.sources.regions, slot):
            f.result()
    return sum(g.nbytes for g in groups) / (time.perf_counter() - t0) / 1e9


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
    """One traced GPU call (events on the device): summed upload and compute intervals, first upload to last
    compute, the lead-in (call start to first upload) and the tail (last compute to call end), in ms."""
    ws = h.prefill.ws
    if not ws.cuda:
        return {}
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    torch.cuda.synchronize()
    ws.trace = []
    start, end = ev(), ev()
    start.record()
    h(x, ids, w)
    end.record()
    torch.cuda.synchronize()
    spans = ws.trace
    ws.trace = None
    if not spans:
        return {}
    up = sum(s["h2d"][0].elapsed_time(s["h2d"][1]) for s in spans)
    comp = sum(s["compute"][0].elapsed_time(s["compute"][1]) for s in spans)
    staged = sum(s["bytes"] for s in spans)
    return {"groups": len(spans), "upload_ms": round(up, 3), "compute_ms": round(comp, 3),
            "first_upload_to_last_compute_ms": round(spans[0]["h2d"][0].elapsed_time(spans[-1]["compute"][1]), 3),
            "lead_in_ms": round(start.elapsed_time(spans[0]["h2d"][0]), 3),
            "tail_ms": round(spans[-1]["compute"][1].elapsed_time(end), 3),
            "call_ms": round(start.elapsed_time(end), 3), "staged_mb": round(staged / 1e6, 1),
            "upload_gbps": round(staged / up / 1e6, 2) if up > 0 else None}


def crossover(rows: list[dict]) -> dict:
    """The chunk size where the GPU path (the rows' gpu_ms) gets faster than the CPU path (linear between measured
    sizes)."""
    pts = [(r["tokens"], r["cpu_ms"] - r["gpu_ms"]) for r in rows if r.get("gpu_ms") is not None]
    if not pts:
        return {"tokens": None, "note": "not measured (no GPU path)"}
    if pts[0][1] >= 0:
        return {"tokens": pts[0][0], "note": f"the GPU path is already faster at the smallest chunk ({pts[0][0]})"}
    for (t0, d0), (t1, d1) in zip(pts, pts[1:]):
        if d0 < 0 <= d1:
            return {"tokens": int(round(t0 + (t1 - t0) * (-d0) / (d1 - d0))), "note": f"between {t0} and {t1}"}
    return {"tokens": None, "note": f"the CPU path is faster up to the largest chunk ({pts[-1][0]})"}


def gpu_fields(h, ms: float, T: int, cpu_ms: float, floor_ms: float) -> dict:
    """A GPU measurement's fields (the same for the main staging and each compared one)."""
    return {"gpu_staging": h.prefill.staging(), "gpu_ms": round(ms, 3), "gpu_tok_s": round(T / ms * 1e3, 1),
            "gpu_of_floor": sig3(floor_ms / ms), "gpu_speedup_vs_cpu": sig3(cpu_ms / ms)}


def staging_report(h) -> dict:
    """What a layer's staging came to: used, and the registration's bytes and seconds or its error."""
    p = h.prefill
    out = {"used": p.staging(), "registered_gb": round(p.registered_bytes / 1e9, 3),
           "registration_s": round(p.registration_s, 3)}
    if p.registration_error:
        out["registration_error"] = p.registration_error
    return out


def say_crossover(label: str, c: dict) -> None:
    if c["tokens"] is None:
        print(f"# crossover{label}: {c['note']}", file=sys.stderr)
    else:
        print(f"# crossover{label}: {c['tokens']} tokens ({c['note']}): gpu_prefill_token_threshold={c['tokens']} "
              "for this host", file=sys.stderr)


def main(argv=None) -> int:
    from kt_convert.kt_runtime.format.methods import METHODS
    from kt_convert.kt_runtime.hybrid.prefill_plan import STAGINGS

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
    ap.add_argument("--staging", default="auto,gather",
                    help="GPU prefill stagings, comma-separated (auto, registered, gather): the first is the GPU "
                         "path, the others are measured beside it (default: auto,gather)")
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
    stagings = list(dict.fromkeys(args.staging.split(",")))
    if not stagings or any(m not in STAGINGS for m in stagings):
        ap.error(f"--staging: comma-separated names of {', '.join(STAGINGS)}, got {args.staging!r}")
    args.stagings = stagings
    if not 0 <= args.gpu_experts < args.experts or args.topk > args.experts:
        ap.error("need 0 <= --gpu-experts < --experts and --topk <= --experts")

    from kt_convert.synthetic.scratch import Scratch

    with Scratch(args.workdir, "bench_prefill_", keep=args.keep) as scratch:
        args.scratch = scratch
        return run(args, chunks)


def run(args, chunks: list[int]) -> int:
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.hybrid.gpu_prefill import PrefillWorkspace, unavailable_reason

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
    gpus: dict = {}  # staging asked for -> HybridMoE with its own workspace; the first is the GPU path
    if not why_not:
        for staging in args.stagings:
            ws = PrefillWorkspace(device, args.memory, gemm=args.gemm, staging=staging)
            gpus[staging] = kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device,
                                                 num_threads=args.threads, gpu_prefill_token_threshold=1,
                                                 prefill_workspace=ws)
    result = {"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("scratch", "json", "stagings")},
              "cpu_only": bool(why_not), "cpu_only_reason": why_not}
    rate = None
    if gpus:
        first = next(iter(gpus.values()))
        p, ws = first.prefill.plan, first.prefill.ws
        rate = h2d_rate(device)
        result["gpu"] = {"h2d_gbps": round(rate, 2), "gemm": "grouped" if ws.grouped_gemm_ok(first.gpu_dtype) else "loop",
                         "memory_budget": ws.memory, "group_experts": p.group_experts, "pair_block": p.pair_block,
                         "slot_mb": round(p.slot_bytes / 1e6, 1),
                         "gather_gbps": round(gather_rate(first.prefill, range(w.num_experts)), 2), "staging": {}}
        print(f"# pinned host-to-device {rate:.1f} GB/s; copy threads gather {result['gpu']['gather_gbps']} GB/s; "
              f"{p.group_experts} experts per transfer group; GEMM {result['gpu']['gemm']}", file=sys.stderr)
    gpu_mask = cpu.gpu_mask
    rows = []
    for T in chunks:
        ids, wt = routing(T, w.num_experts, args.topk, seed=T, device=device)
        x = (torch.randn(T, w.hidden_size, generator=torch.Generator().manual_seed(T)) * 0.5).to(torch.bfloat16).to(device)
        row = {"tokens": T, "experts_touched": len(touched(ids, gpu_mask))}
        row["cpu_ms"] = round(timed(lambda: cpu(x, ids, wt), args.iters, args.warmup, sync), 3)
        row["cpu_tok_s"] = round(T / row["cpu_ms"] * 1e3, 1)
        if gpus:
            nbytes = first.prefill.sources.packed_bytes(touched(ids, gpu_mask))
            row["floor_ms"] = round(nbytes / (rate * 1e9) * 1e3, 3)
            row["floor_tok_s"] = round(T / row["floor_ms"] * 1e3, 1)
        for staging, h in gpus.items():
            ms = timed(lambda: h(x, ids, wt), args.iters, args.warmup, sync)  # the first call registers
            if staging not in result["gpu"]["staging"]:
                report = result["gpu"]["staging"][staging] = staging_report(h)
                print(f"# staging {staging}: {json.dumps(report)}", file=sys.stderr)
            fields = gpu_fields(h, ms, T, row["cpu_ms"], row["floor_ms"])
            fields["stages"] = trace_stages(h, x, ids, wt)
            if h is first:
                row.update(fields)
            else:
                row.setdefault("compared", {})[staging] = fields
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("stages", "compared")}
        for staging, fields in row.get("compared", {}).items():
            brief[staging] = {k: v for k, v in fields.items() if k != "stages"}
        print("# " + json.dumps(brief), file=sys.stderr)
    result["one_layer"] = rows
    if gpus:
        result["crossover"] = dict(crossover(rows), staging=first.prefill.staging())
        result["crossover_compared"] = {staging: crossover([dict(r, **r["compared"][staging]) for r in rows])
                                        for staging in list(gpus)[1:]}
    else:
        result["crossover"] = crossover(rows)
    if args.layers > 0:
        result["stack"] = stack(args, w, cpu, gpus, chunks, device, sync, rate)
    at = next((r for r in rows if r["tokens"] == 4096 and "gpu_ms" in r), None)
    if at is not None:
        result["targets_4096"] = {"gpu_staging": at["gpu_staging"], "gpu_of_floor": at["gpu_of_floor"],
                                  "gpu_of_floor_met": at["gpu_of_floor"] >= 0.7,
                                  "speedup_vs_cpu": at["gpu_speedup_vs_cpu"], "speedup_met": at["gpu_speedup_vs_cpu"] >= 2}
    say_crossover(f" ({result['crossover']['staging']})" if gpus else "", result["crossover"])
    for staging, c in result.get("crossover_compared", {}).items():
        say_crossover(f" (compared: {staging})", c)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        from kt_convert.kt_runtime.format.fsio import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0


def stack(args, w, cpu, gpus, chunks, device, sync, rate) -> list[dict]:
    """tokens/s of args.layers layers in a row (the same packed layer), each input the previous layer's output:
    the CPU path, the GPU path and each compared staging."""
    from kt_convert import kt_runtime

    L = args.layers
    cpu_layers = [cpu] + [kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device,
                                               num_threads=args.threads) for _ in range(L - 1)]
    gpu_layers = {staging: [h] + [kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device,
                                                       num_threads=args.threads, gpu_prefill_token_threshold=1,
                                                       prefill_workspace=h.prefill.ws) for _ in range(L - 1)]
                  for staging, h in gpus.items()}
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
        if gpu_layers:
            prefill = next(iter(gpus.values())).prefill
            floor = sum(prefill.sources.packed_bytes(touched(ids, cpu.gpu_mask)) for ids, _ in routes) / (rate * 1e9)
            row["floor_ms"], row["floor_tok_s"] = round(floor * 1e3, 3), round(T / floor, 1)
        for i, (staging, layers) in enumerate(gpu_layers.items()):
            ms = timed(lambda: step(layers), args.iters, args.warmup, sync)
            fields = gpu_fields(layers[0], ms, T, row["cpu_ms"], row["floor_ms"])
            if i == 0:
                row.update(fields)
            else:
                row.setdefault("compared", {})[staging] = fields
        out.append(row)
        print("# stack " + json.dumps(row), file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
