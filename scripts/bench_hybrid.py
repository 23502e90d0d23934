#!/usr/bin/env python3
"""Benchmark one hybrid MoE layer at DeepSeek-V4 dims: the hybrid step against its CPU part alone and its
GPU part alone, in the same run.

    python scripts/bench_hybrid.py                    # H=4096, I=2048, 256 experts, top-6, 16 on the GPU
    python scripts/bench_hybrid.py --experts 64 --gpu-experts 8 --json out.json

Weights: a synthetic DeepSeek-V4-Flash layer (MXFP4, synthetic.v4_flash) converted with the real
converter into a new temporary folder, or --workdir, and removed at the end; with --keep it stays (its path is
printed) and later runs with the same --workdir and settings reuse it. Routing: decode (--tokens 1),
top-k; per token --gpu-hits of the k experts are GPU experts (the hot ones) and the rest distinct CPU
experts, drawn at random from --routings pre-drawn routings cycled through, so CPU weights stream
from DRAM. x, top-k ids and weights start on the GPU, as the router leaves them in a model.

Reported (median ms per step): hybrid = HybridMoE.forward incl. the device->host routing copy, split,
GPU launch, CPU engine and sum (decode: the CUDA-graph path); cpu = the CPU engine alone on the same CPU
rows; gpu = the GPU experts alone as the hybrid step runs them (decode: input copies + graph replays),
gpu_eager = the same experts launched op by op; cpu_all = every top-k expert on the CPU (what the GPU
experts save); serial = cpu then gpu without overlap; hybrid_launcher = the step through the launcher thread
(cuda_graphs off); hybrid_all_threads = the hybrid step with a CPU engine on every core; hybrid_fewer_threads = with two
engine threads fewer;
handoff_us = a no-op job through the GPU launcher thread and back; stages_us = median host time per stage of
the hybrid step (HybridMoE.profile) and tail_sync (waiting for the GPU after the call returns).
Target: hybrid <= 1.1 x max(cpu, gpu). Prints machine info, then one JSON document.

Multi-layer decode step (--layers N, e.g. 8): N HybridMoE layers over the same packed layer (each with its
own GPU experts and routing; the CPU weights, 256 x 12.6 MB at V4 int4, stream from DRAM either way), each
behind a stand-in attention (bf16 [H,H] matmul + tanh) and a router (linear + top-k + softmax) on the GPU,
residual adds; one token per step. Reported as tokens/s (1000 / median step ms): all_cpu (every expert on
the CPU: HybridMoE with no GPU experts, forward), hybrid_eager (forward: routing to the host each layer),
hybrid_stream (forward_stream, not captured), hybrid_captured (the whole step in one CUDA graph, replayed),
hybrid_captured_defer1 (the same with defer=1), serial (captured, each layer's GPU part queued after its CPU
part), and for the per-layer ratio the captured step with only the CPU part, only the GPU part, and no MoE
(attention + router alone): per layer hybrid / max(CPU part, GPU part) = (captured - none) /
max(cpu_only - none, gpu_only - none). Without CUDA the graph modes are skipped (reported as such) and the
rest runs on the CPU device (numbers not representative: the "GPU" experts share the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")


def machine_info(device: torch.device) -> dict:
    from kt_convert import kt_kernels

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "isa": kt_kernels.best_isa(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return info


def packed_layer(args) -> Path:
    """Convert (once) a synthetic V4-Flash layer with --experts experts into args.scratch (or reuse the one an
    earlier --keep run left there); returns the packed dir."""
    from kt_convert import kt_runtime
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.convert.units import size
    from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

    name = f"v4-H{args.hidden}-I{args.intermediate}-E{args.experts}-{args.method}-T{args.threadpool_count}"
    out = args.scratch.reused(name)
    if out is not None:
        try:
            w = kt_runtime.load_experts(out, verify=False)
        except Exception as e:  # noqa: BLE001 - unfinished or damaged: not ours to replace
            raise SystemExit(f"{out} does not load ({e}): remove it or choose another --workdir") from None
        if (w.num_experts, w.hidden_size, w.moe_intermediate_size) != (args.experts, args.hidden, args.intermediate):
            raise SystemExit(f"{out} holds other experts: remove it or choose another --workdir")
        print(f"# reusing {out}", file=sys.stderr)
        return out
    out, src = args.scratch.new(name), args.scratch.new(name + "-source")
    t0 = time.perf_counter()
    make_v4_flash_checkpoint(src, "v4-flash-layer", num_experts=args.experts, num_layers=1, hidden_size=args.hidden,
                             moe_intermediate_size=args.intermediate, include_non_expert=False)
    r = convert(ConvertOptions(input_path=str(src), output=out, quant_method=args.method,
                               threadpool_count=args.threadpool_count, progress=False))
    args.scratch.discard(src)
    print(f"# built {out} in {time.perf_counter() - t0:.1f} s ({size(r.output_bytes)} packed)", file=sys.stderr)
    return out


def routings(args, R: int, g: torch.Generator):
    E, N, k, T, hits = args.experts, args.gpu_experts, args.topk, args.tokens, args.gpu_hits
    out = []
    for _ in range(R):
        ids = torch.empty(T, k, dtype=torch.int64)
        for t in range(T):
            gpu = torch.randperm(N, generator=g)[:hits]
            cpu = N + torch.randperm(E - N, generator=g)[:k - hits]
            ids[t] = torch.cat([gpu, cpu])[torch.randperm(k, generator=g)]
        w = torch.softmax(torch.randn(T, k, generator=g), -1)
        out.append((ids, w))
    return out


def bench(fn, iters: int, warmup: int, sync) -> dict:
    for i in range(warmup):
        fn(i)
    sync()
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "p10_ms": sorted(times)[len(times) // 10] * 1e3,
            "p90_ms": sorted(times)[(9 * len(times)) // 10] * 1e3}


def main(argv=None) -> int:
    from kt_convert.kt_runtime.format.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--gpu-experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--gpu-hits", type=int, default=2, help="of the top-k experts per token, how many are GPU experts")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per step (1: decode)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--method", choices=list(METHODS), default="int4")
    ap.add_argument("--threadpool-count", type=int, default=1, help="NUMA shards of the packed weights")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU engine threads (default: HybridMoE's, every core but one; 0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help="HybridMoE(cuda_graphs=...): auto = on for CUDA devices (on with --device cpu: the decode path run eagerly)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--routings", type=int, default=64)
    ap.add_argument("--workdir", default=None,
                    help="where the packed layer goes (default: a new temporary folder); removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true",
                    help="keep the packed layer (its path is printed); a later run with this --workdir reuses it")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("--layers", type=int, default=0, help="> 0: the multi-layer decode step with this many MoE layers")
    args = ap.parse_args(argv)
    if not 0 <= args.gpu_hits <= min(args.topk, args.gpu_experts) or args.topk - args.gpu_hits > args.experts - args.gpu_experts:
        ap.error("need 0 <= gpu-hits <= min(topk, gpu-experts) and topk - gpu-hits <= experts - gpu-experts")

    from kt_convert.synthetic.scratch import Scratch

    with Scratch(args.workdir, "bench_hybrid_", keep=args.keep) as scratch:
        args.scratch = scratch
        return multi_layer(args) if args.layers > 0 else one_layer(args)


def one_layer(args) -> int:
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.cpu_moe import CPUMoE
    from kt_convert.kt_runtime.hybrid.launcher import launcher
    from kt_convert.kt_runtime.hybrid.routing import cpu_rows

    device = torch.device(args.device)
    info = machine_info(device)
    print("# " + " | ".join(f"{k}: {v}" for k, v in info.items()), file=sys.stderr)
    w = kt_runtime.load_experts(packed_layer(args), verify=False)
    t0 = time.perf_counter()
    h = kt_runtime.HybridMoE(w, 0, num_gpu_experts=args.gpu_experts, device=device, num_threads=args.threads,
                             cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs])
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_graphs = h.capture_decode_graphs() if args.tokens == 1 else 0
    capture_s = time.perf_counter() - t0
    threads = h.cpu.num_threads or info["cores"]
    cpu_all = CPUMoE(w, 0, num_threads=h.cpu.num_threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    g = torch.Generator().manual_seed(0)
    R = args.routings
    routes = routings(args, R, g)
    x_host = torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16)
    x_dev = x_host.to(device)
    dev_routes = [(i.to(device), wt.to(device)) for i, wt in routes]
    parts = [h.split(i, wt) for i, wt in routes]
    hits = [h.decode_hits(i[0], wt[0].tolist()) if args.tokens == 1 else None for i, wt in routes]
    decode = h.cuda_graphs and args.tokens == 1 and all(r is not None for r in hits)
    out = torch.zeros(args.tokens, args.hidden, dtype=torch.float32, device=device)

    def hybrid(i):
        ids, wt = dev_routes[i % R]
        h.forward(x_dev, ids, wt)

    def cpu_part(i):
        cp = parts[i % R][0]
        if cp is not None:
            h.cpu.forward(cpu_rows(x_host, cp), cp.ids, cp.weights)

    def gpu_eager(i):
        gp = parts[i % R][1]
        if gp is not None:
            h.gpu.compute(x_dev, gp, out)

    def gpu_part(i):  # as the hybrid step runs it
        if decode:
            h.launch_decode_gpu(x_host, hits[i % R][2])  # the token from the host, as the step has it
        else:
            gpu_eager(i)

    def serial(i):
        cpu_part(i)
        gpu_part(i)
        sync()

    def with_settings(graphs, engine_threads):
        def step(i):
            own = h.cuda_graphs, h.cpu.num_threads
            h.cuda_graphs, h.cpu.num_threads = graphs, engine_threads
            try:
                hybrid(i)
            finally:
                h.cuda_graphs, h.cpu.num_threads = own
        return step

    hybrid_launcher = with_settings(False, h.cpu.num_threads)
    hybrid_all_threads = with_settings(h.cuda_graphs, 0)
    # two engine threads fewer (contention between spinning workers and this thread)
    hybrid_fewer_threads = with_settings(h.cuda_graphs, max(1, threads - 2))

    def handoff(i):
        launcher().submit(int).wait()

    def all_cpu(i):
        ids, wt = routes[i % R]
        cpu_all.forward(x_host, ids, wt)

    res = {}
    for name, fn in (("cpu", cpu_part), ("gpu", gpu_part), ("gpu_eager", gpu_eager), ("hybrid", hybrid),
                     ("serial", serial), ("cpu_all", all_cpu), ("hybrid_all_threads", hybrid_all_threads),
                     ("hybrid_fewer_threads", hybrid_fewer_threads),
                     ("hybrid_launcher", hybrid_launcher), ("hybrid_again", hybrid)):
        res[name] = bench(fn, args.iters, args.warmup, sync)
    res_handoff = bench(handoff, args.iters, args.warmup, lambda: None)
    # per-stage breakdown of the hybrid step (host times) and the wait for the GPU after it returns
    for i in range(args.warmup):
        hybrid(i)
    sync()
    h.profile, tails, totals = {}, [], []
    for i in range(args.iters):
        t0 = time.perf_counter()
        hybrid(i)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        tails.append(t2 - t1)
        totals.append(t2 - t0)
    prof, h.profile = h.profile, None
    stages = {k: round(statistics.median(v) * 1e6, 1) for k, v in prof.items()}
    stages["tail_sync"] = round(statistics.median(tails) * 1e6, 1)
    stages["total"] = round(statistics.median(totals) * 1e6, 1)
    hybrid_ms = min(res["hybrid"]["median_ms"], res["hybrid_again"]["median_ms"])
    bound = max(res["cpu"]["median_ms"], res["gpu"]["median_ms"])
    report = {
        "machine": info,
        "config": {"hidden": args.hidden, "intermediate": args.intermediate, "experts": args.experts,
                   "topk": args.topk, "tokens": args.tokens, "gpu_experts": args.gpu_experts,
                   "gpu_hits_per_token": args.gpu_hits, "method": args.method,
                   "threadpool_count": args.threadpool_count, "threads": threads,
                   "spin_us": os.environ.get("KT_MOE_SPIN_US", "2000"),
                   "device": str(device), "iters": args.iters, "gpu_experts_load_s": round(load_s, 2),
                   "decode_path": bool(decode), "decode_graphs": n_graphs, "graph_capture_s": round(capture_s, 2)},
        "ms": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in res.items()},
        "handoff_us": round(res_handoff["median_ms"] * 1e3, 1),
        "stages_us": stages,
        "hybrid_ms": round(hybrid_ms, 4),
        "ratio_hybrid_over_max_part": round(hybrid_ms / bound, 3) if bound > 0 else None,
        "ratio_hybrid_over_serial": round(hybrid_ms / res["serial"]["median_ms"], 3),
        "ratio_hybrid_over_cpu_all": round(hybrid_ms / res["cpu_all"]["median_ms"], 3),
        "ratio_launcher_over_max_part": round(res["hybrid_launcher"]["median_ms"] / bound, 3) if bound > 0 else None,
        "target": "hybrid <= 1.1 x max(cpu, gpu)",
        "target_met": bool(bound > 0 and hybrid_ms <= 1.1 * bound),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


class DecodeStep:
    """One token through N layers: stand-in attention, router, MoE (see the module doc), on `device`."""

    def __init__(self, layers, hidden, experts, topk, device, gpu_bias=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layers, self.topk = layers, topk
        self.attn = [(torch.randn(hidden, hidden, generator=g) / hidden ** 0.5).to(device, torch.bfloat16)
                     for _ in layers]
        # router: a random linear; gpu_bias favours the GPU experts (ids 0..G-1) so that about --gpu-hits of
        # the top-k land there, as with frequency placement
        self.router = []
        for _ in layers:
            r = torch.randn(experts, hidden, generator=g) / hidden ** 0.5
            self.router.append(r.to(device, torch.bfloat16))
        self.router_bias = gpu_bias

    def __call__(self, x, mode="stream", parts="both"):
        for a, r, moe in zip(self.attn, self.router, self.layers):
            x = x + torch.tanh(x @ a)
            logits = (x @ r.T).float()
            if self.router_bias is not None:
                logits = logits + self.router_bias
            w, ids = torch.topk(logits, self.topk, dim=-1)
            w = torch.softmax(w, -1)
            if parts == "none":
                continue
            y = moe.forward_stream(x, ids, w, parts=parts) if mode == "stream" else moe.forward(x, ids, w)
            x = x + y.to(x.dtype)
        return x


def multi_layer(args) -> int:
    """The multi-layer decode step (--layers): tokens/s of every mode, per-layer ratio, JSON."""
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.hybrid import stream_ops
    from kt_convert.kt_runtime.hybrid.stream_path import DeferralChain

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info = machine_info(device)
    print("# " + " | ".join(f"{k}: {v}" for k, v in info.items()), file=sys.stderr)
    if cuda and not stream_ops.available():
        print("error: CUDA host functions cannot be queued here (no cuLaunchHostFunc / cudaLaunchHostFunc found)",
              file=sys.stderr)
        return 2
    w = kt_runtime.load_experts(packed_layer(args), verify=False)
    L, G, H, E = args.layers, args.gpu_experts, args.hidden, args.experts
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def layers(n_gpu, defer=0):
        hs = [kt_runtime.HybridMoE(w, 0, num_gpu_experts=n_gpu, device=device, num_threads=args.threads)
              for _ in range(L)]
        if defer:
            chain = DeferralChain()
            for i, h in enumerate(hs):
                h.defer = defer if i < L - 1 else 0
                h.deferral, h.defer_carry = chain, i < L - 1
        return hs

    # a router bias that puts about gpu_hits of the top-k on the GPU experts: +b on ids < G, tuned once
    t0 = time.perf_counter()
    hybrid_layers = layers(G)
    load_s = time.perf_counter() - t0
    bias = torch.zeros(E, device=device)
    probe = DecodeStep(hybrid_layers, H, E, args.topk, device, None)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, H, generator=g).to(device, torch.bfloat16) for _ in range(args.routings)]
    for b in [i * 0.25 for i in range(40)]:
        bias[:G] = b
        hits = []
        for x in xs[:16]:
            logits = (x @ probe.router[0].T).float() + bias
            hits.append(int((torch.topk(logits, args.topk).indices < G).sum()))
        if statistics.mean(hits) >= args.gpu_hits:
            break
    steps = {
        "all_cpu": (DecodeStep(layers(0), H, E, args.topk, device, bias), "eager", "both"),
        "hybrid_eager": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "eager", "both"),
        "hybrid_stream": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "stream", "both"),
    }
    graph_modes = {
        "hybrid_captured": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "both"),
        "hybrid_captured_defer1": (DecodeStep(layers(G, defer=1), H, E, args.topk, device, bias), "both"),
        "serial": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "serial"),
        "cpu_only": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "cpu"),
        "gpu_only": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "gpu"),
        "none": (DecodeStep(hybrid_layers, H, E, args.topk, device, bias), "none"),
    }
    res, skipped = {}, []
    for name, (step, mode, parts) in steps.items():
        res[name] = bench(lambda i: step(xs[i % len(xs)], mode, parts), args.iters, args.warmup, sync)
    for name, (step, parts) in graph_modes.items():
        if not cuda:
            if parts == "both":
                skipped.append(name)
                continue
            res[name] = bench(lambda i: step(xs[i % len(xs)], "stream", parts), args.iters, args.warmup, sync)
            continue
        static_in = xs[0].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step(static_in, "stream", parts)
        torch.cuda.current_stream().wait_stream(s)
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static_in, "stream", parts)

        def replay(i, graph=graph, static_in=static_in):
            static_in.copy_(xs[i % len(xs)])
            graph.replay()

        res[name] = bench(replay, args.iters, args.warmup, sync)
    ms = {k: v["median_ms"] for k, v in res.items()}
    report = {
        "machine": info,
        "config": {"layers": L, "hidden": H, "intermediate": args.intermediate, "experts": E, "topk": args.topk,
                   "gpu_experts": G, "gpu_hits_target": args.gpu_hits, "router_gpu_bias": round(float(bias[0]), 2),
                   "method": args.method, "threads": hybrid_layers[0].cpu.num_threads or info["cores"],
                   "device": str(device), "iters": args.iters, "gpu_experts_load_s": round(load_s, 2),
                   "host_function_launcher": stream_ops.launcher_name() if cuda else None},
        "ms_per_step": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in res.items()},
        "tokens_per_s": {k: round(1e3 / v, 1) for k, v in ms.items()},
        "skipped_without_cuda": skipped,
    }
    if "none" in ms and {"cpu_only", "gpu_only"} <= ms.keys():
        best = "hybrid_captured" if "hybrid_captured" in ms else "hybrid_stream"
        cpu_l, gpu_l = (ms["cpu_only"] - ms["none"]) / L, (ms["gpu_only"] - ms["none"]) / L
        hyb_l = (ms[best] - ms["none"]) / L
        report["per_layer_ms"] = {"hybrid": round(hyb_l, 4), "cpu_part": round(cpu_l, 4), "gpu_part": round(gpu_l, 4),
                                  "attention_router": round(ms["none"] / L, 4), "from": best}
        report["ratio_per_layer_hybrid_over_max_part"] = round(hyb_l / max(cpu_l, gpu_l), 3) if max(cpu_l, gpu_l) > 0 \
            else None
        # the multi-layer target: faster than all-CPU by at least the GPU experts' share of the CPU time
        share = args.gpu_hits / args.topk
        report["target_step"] = {"hybrid_ms": round(ms[best], 4), "all_cpu_ms": round(ms["all_cpu"], 4),
                                 "gpu_share": round(share, 3),
                                 "met": bool(ms[best] <= ms["all_cpu"] - share * (ms["all_cpu"] - ms["none"]))}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
