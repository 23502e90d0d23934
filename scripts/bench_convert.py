#!/usr/bin/env python3
"""Conversion benchmark: the converter against the time to read the same files, measured in the same run.

    python scripts/bench_convert.py [--json OUT.json]                      # CPU path (any machine)
    python scripts/bench_convert.py --device cuda --experts 256 --layers 3 [--skip-cpu] [--json OUT.json]

Makes a v4-flash-layer checkpoint (DeepSeek-V4-Flash expert shapes, H=4096, I=2048, MXFP4; E=32 x 2
layers is about 0.86 GB, E=256 x 3 layers about 10 GB) under --workdir unless one is there, then
measures, in this order:

  1. reads of the input files from the page cache: `cat` to /dev/null, one Python stream, 16 threads;
  2. the writer floor: what one thread does here (sha256, os.write to the output disk, + fsync);
  3. --device cuda only: the fused kernel alone on device-resident batches, and PCIe H2D / D2H;
  4. the conversion on --device (page cache; best of --repeat);
  5. --device cuda only, unless --skip-cpu: the CPU path on --threads (default every core) for
     comparison, and GPU output == CPU output through the manifests' per-layer sha256;
  6. where `echo 3 > /proc/sys/vm/drop_caches` works (root) and not --skip-cold: cold reads and a
     cold conversion on --device.

Each conversion runs in a child process (this script with a hidden --child), so its peak RSS is
its own; the child samples RSS every 10 ms, records it after each layer (RSS must not grow with
the number of layers) and times the packer, MergedShardWriter.write and .commit (busy seconds;
commit runs on its own thread, overlapped with packing). A conversion's `process_s` is the child
process's wall time, start-up included, as a user of the converter sees it: rates and ratios use it;
`wall_s` is the convert() call inside it (torch/triton import and packer start-up included).
With --device cpu neither this script nor its children import triton (nor torch); the GPU-only
measurements are skipped with a note.

Prints one line per measurement as it is taken, then the ratios, then the JSON report (written to
--json instead when that is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

READ_THREADS = 16
GB, GIB = 1e9, 2**30


# -- machine ------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    """CPU, cores, ISA, memory, versions; the GPU's name only with --device cuda (torch is not
    imported otherwise)."""
    from importlib import metadata

    import kt_kernels

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for pkg in ("torch", "triton"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": kt_kernels.best_isa(), "memory_gb": round(mem / GB, 1),
            "python": platform.python_version(), **versions, "gpu": gpu, "date": time.strftime("%Y-%m-%d")}


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- reading the input ------------------------------------------------------------------------------


def input_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def time_cat(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def read_sequential(paths: list[Path]) -> tuple[float, int]:
    buf = bytearray(64 << 20)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


def read_parallel(paths: list[Path], threads: int = READ_THREADS, piece: int = 64 << 20) -> tuple[float, int]:
    from concurrent.futures import ThreadPoolExecutor

    tasks = [(p, off, min(piece, p.stat().st_size - off)) for p in paths for off in range(0, p.stat().st_size, piece)]
    local = threading.local()

    def read(task):
        p, off, n = task
        if not hasattr(local, "buf"):
            local.buf = bytearray(piece)
        with open(p, "rb", buffering=0) as f:
            f.seek(off)
            return f.readinto(memoryview(local.buf)[:n])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(read, tasks))
    return time.perf_counter() - t0, total


def time_reads(files: list[Path], cold: bool) -> dict:
    """cat, one stream, 16 threads; warm: the files are read into the page cache first and cat is
    the best of two; cold: the page cache is dropped before each."""
    def prepare():
        if cold:
            drop_caches()

    if not cold:
        time_cat(files)
    prepare()
    cat_s = time_cat(files) if cold else min(time_cat(files) for _ in range(2))
    prepare()
    seq_s, _ = read_sequential(files)
    prepare()
    par_s, _ = read_parallel(files)
    return {"cat_s": cat_s, "seq_s": seq_s, "par_s": par_s, "fastest_s": min(cat_s, seq_s, par_s)}


# -- writing ------------------------------------------------------------------------------------------


def writer_floor(work: Path, nbytes: int = 1 << 30) -> dict:
    """What one writer thread can do here: sha256, os.write to the output disk, fsync."""
    import hashlib

    import numpy as np

    buf = np.random.default_rng(0).integers(0, 256, size=64 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(nbytes // buf.nbytes):
        h.update(buf)
    sha = time.perf_counter() - t0
    path = work / "write-test.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for _ in range(nbytes // buf.nbytes):
        os.write(fd, buf)
    write = time.perf_counter() - t0
    os.fsync(fd)
    fsync = time.perf_counter() - t0 - write
    os.close(fd)
    path.unlink()
    return {"sha256_gb_s": nbytes / sha / 1e9, "write_gb_s": nbytes / write / 1e9,
            "write_fsync_gb_s": nbytes / (write + fsync) / 1e9}


# -- child: one conversion, instrumented ---------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: dict) -> dict:
    from convert import pipeline
    from convert.pipeline import ConvertOptions, convert
    from convert.writer import MergedShardWriter

    peak = {"rss": rss_bytes()}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak["rss"] = max(peak["rss"], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    busy = {"pack_s": 0.0, "write_s": 0.0, "commit_s": 0.0}
    layer_peaks, packers = [], []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                busy[name] += time.perf_counter() - t0
        return wrapper

    MergedShardWriter.write = timed("write_s", MergedShardWriter.write)
    MergedShardWriter.commit = timed("commit_s", MergedShardWriter.commit)
    real_make, real_layer = pipeline.make_packer, pipeline.convert_layer

    def make_packer(device, threads=0):
        t = time.perf_counter()
        busy["start_to_packer_s"] = t - t0
        p = real_make(device, threads)
        busy["make_packer_s"] = time.perf_counter() - t
        packers.append(p)

        class Timed:
            def __call__(self, method, jobs):
                t1 = time.perf_counter()
                try:
                    return p(method, jobs)
                finally:
                    busy["pack_s"] += time.perf_counter() - t1
                    busy.setdefault("first_pack_s", time.perf_counter() - t1)

            def close(self):
                p.close()
        return Timed()

    def convert_layer(*a, **kw):
        real_layer(*a, **kw)
        layer_peaks.append(max(peak["rss"], rss_bytes()))

    pipeline.make_packer, pipeline.convert_layer = make_packer, convert_layer
    t0 = time.perf_counter()
    report = convert(ConvertOptions(input_path=args["ckpt"], output=Path(args["out"]), quant_method=args["method"],
                                    threadpool_count=args["threadpool_count"], cpuinfer_threads=args["threads"],
                                    device=args["device"], progress=False, overwrite=True))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    import resource

    out = {"wall_s": wall, "report": report.to_dict(), "peak_rss_bytes": max(peak["rss"], rss_bytes()),
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_after_each_layer": layer_peaks, **busy,
           "imported": {m: m in sys.modules for m in ("torch", "triton")}}
    if packers and hasattr(packers[0], "stats"):
        out["gpu_packer"] = packers[0].stats
    return out


def run_child(ckpt: Path, out: Path, device: str, method: str, threadpool_count: int, threads: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    args = {"ckpt": str(ckpt), "out": str(out), "device": device, "method": method, "threadpool_count": threadpool_count, "threads": threads}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process_s = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{device} conversion failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": process_s}


def layer_checksums(out: Path) -> dict:
    m = json.loads((out / "kt_manifest.json").read_text())
    return {k: v.get("sha256") for k, v in sorted(m.get("completed", {}).items())}


# -- the kernel alone -----------------------------------------------------------------------------


def kernel_throughput(method_name: str, threadpool_count: int, experts: int = 16, H: int = 4096, I: int = 2048) -> dict:
    import numpy as np
    import torch

    from kt_runtime.format.methods import get_method
    from quant.cpu import PackTarget, SourceMatrix
    from quant.gpu import fill_staging, launch, plan_batch
    from kt_runtime.format.layout import full_shape, shard_slice

    method = get_method(method_name)
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(experts):
        for proj in ("gate", "up", "down"):
            n, k = full_shape(proj, H, I)
            src = SourceMatrix("mxfp4", rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8),
                               rng.integers(118, 133, size=(n, k // 32), dtype=np.uint8))
            for t in range(threadpool_count):
                s = shard_slice(proj, H, I, threadpool_count, t)
                jobs.append((src.rows(s.row0, s.n), s.col0, s.k, PackTarget.empty(method, s.n, s.k)))
    plan = plan_batch(method, jobs)
    staging = torch.empty(plan.in_bytes, dtype=torch.uint8, pin_memory=True)
    fill_staging(plan, staging.numpy())
    dev_in = torch.empty(plan.in_bytes, dtype=torch.uint8, device="cuda")
    dev_out = torch.empty(plan.out_bytes, dtype=torch.uint8, device="cuda")
    host_out = torch.empty(plan.out_bytes, dtype=torch.uint8, pin_memory=True)

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]

    h2d = timed(lambda: dev_in.copy_(staging, non_blocking=True))
    kern = timed(lambda: launch(method, plan, dev_in, dev_out))
    d2h = timed(lambda: host_out.copy_(dev_out, non_blocking=True))
    return {"experts": experts, "input_bytes": plan.input_bytes, "output_bytes": plan.out_bytes,
            "kernel_s": kern, "kernel_input_gb_s": plan.input_bytes / kern / 1e9,
            "kernel_weights_per_s": experts * 3 * H * I / kern,
            "h2d_gb_s": plan.in_bytes / h2d / 1e9, "d2h_gb_s": plan.out_bytes / d2h / 1e9}


# -- main ------------------------------------------------------------------------------------------


def show(name, value) -> None:
    print(f"{name:<46} {value}", flush=True)


def main() -> None:
    from kt_runtime.format.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="the converter's --device (default cpu); cuda adds the kernel, the CPU comparison, "
                         "GPU == CPU")
    ap.add_argument("--workdir", "--work", type=Path, default=Path(tempfile.gettempdir()) / "kt_bench_convert",
                    help="checkpoint (kept and reused) and outputs (removed) (default: %(default)s)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer (default 32)")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers (default 2)")
    ap.add_argument("--quant-method", "--method", default="int4", choices=list(METHODS))
    ap.add_argument("--threadpool-count", "--numa", type=int, default=2, help="NUMA split T (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="CPU packing threads (0: all cores)")
    ap.add_argument("--repeat", type=int, default=2, help="page-cache conversions on --device; the best is "
                                                          "reported (default 2)")
    ap.add_argument("--skip-cpu", action="store_true", help="--device cuda: no CPU conversion for comparison")
    ap.add_argument("--skip-cold", action="store_true", help="no cold reads or cold conversion")
    ap.add_argument("--json", type=Path, default=None, help="write the JSON report here (else it is printed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return

    gpu = a.device == "cuda"
    if gpu:
        from quant.gpu import gpu_unavailable_reason  # imports neither triton nor the kernels

        if why := gpu_unavailable_reason():
            print(f"--device cuda: {why}; run without --device cuda for the CPU path", file=sys.stderr)
            sys.exit(2)
    notes: list[str] = []
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    threads = a.threads or os.cpu_count()
    res: dict = {"machine": machine_info(a.device),
                 "settings": {"device": a.device, "quant_method": a.quant_method,
                              "threadpool_count": a.threadpool_count, "cpu_threads": threads, "repeat": a.repeat}}
    m = res["machine"]
    show("machine", f"{m['cpu']}, {m['cores']} cores, {m['isa']}, {m['memory_gb']} GB; python {m['python']}, "
         f"torch {m['torch']}, triton {m['triton']}" + (f"; {m['gpu']}" if gpu else ""))

    ckpt = work / f"v4-flash-layer-e{a.experts}-l{a.layers}"
    made_s = None
    if not (ckpt / "config.json").exists():
        from synthetic.v4_flash import make_v4_flash_checkpoint

        shutil.rmtree(ckpt, ignore_errors=True)
        t0 = time.perf_counter()
        make_v4_flash_checkpoint(ckpt, "v4-flash-layer", num_experts=a.experts, num_layers=a.layers,
                                 include_non_expert=False)
        made_s = time.perf_counter() - t0
    cfg = json.loads((ckpt / "config.json").read_text())
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    files = input_files(ckpt)
    file_bytes = sum(p.stat().st_size for p in files)
    params = 3 * H * I * a.experts * a.layers
    res["checkpoint"] = {"path": str(ckpt), "experts": a.experts, "layers": a.layers, "hidden_size": H,
                         "moe_intermediate_size": I, "files": len(files), "file_bytes": file_bytes,
                         "params": params, "make_checkpoint_s": made_s}
    show("checkpoint (v4-flash-layer, MXFP4)", f"E={a.experts} x {a.layers} layers, H={H} I={I}: "
         f"{file_bytes / GB:.2f} GB, {params / 1e9:.2f} G params" + (f" (made in {made_s:.0f} s)" if made_s else ""))

    def show_reads(r: dict, when: str) -> None:
        show(f"read, {when} (cat / 1 stream / {READ_THREADS} threads)",
             f"{r['cat_s']:.2f} / {r['seq_s']:.2f} / {r['par_s']:.2f} s = "
             f"{file_bytes / r['cat_s'] / GB:.2f} / {file_bytes / r['seq_s'] / GB:.2f} / "
             f"{file_bytes / r['par_s'] / GB:.2f} GB/s")

    res["read_warm"] = rw = time_reads(files, cold=False)
    show_reads(rw, "page cache")
    res["writer_floor"] = w = writer_floor(work)
    show("one thread: sha256 / write / write+fsync", f"{w['sha256_gb_s']:.2f} / {w['write_gb_s']:.2f} / "
         f"{w['write_fsync_gb_s']:.2f} GB/s")
    if gpu:
        res["kernel"] = k = kernel_throughput(a.quant_method, a.threadpool_count)
        show("kernel: source GB/s, weights/s", f"{k['kernel_input_gb_s']:.0f} GB/s, "
             f"{k['kernel_weights_per_s'] / 1e9:.0f} G/s")
        show("PCIe H2D / D2H", f"{k['h2d_gb_s']:.1f} / {k['d2h_gb_s']:.1f} GB/s")
    else:
        notes.append("--device cpu: GPU kernel throughput, PCIe H2D/D2H, the CPU comparison and the GPU == CPU "
                     "check are GPU-only and were skipped (run with --device cuda on a GPU host)")
        show("GPU kernel, PCIe, GPU == CPU", "skipped (--device cpu)")

    def add_rates(r: dict, cpu_path: bool) -> dict:
        r["input_gb_s"] = r["report"]["input_bytes"] / r["process_s"] / GB
        r["g_params_s"] = params / r["process_s"] / 1e9
        if cpu_path:
            r["g_params_s_per_core"] = r["g_params_s"] / threads
        return r

    def show_run(name: str, r: dict, cpu_path: bool) -> None:
        per_core = f", {r['g_params_s_per_core']:.3f} G params/s per core" if cpu_path else ""
        show(name, f"{r['process_s']:.2f} s ({r['wall_s']:.2f} s in convert()), {r['input_gb_s']:.2f} GB/s in, "
             f"{r['g_params_s']:.2f} G params/s{per_core}, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB")
        show("  busy: pack / write / commit", f"{r['pack_s']:.2f} / {r['write_s']:.2f} / {r['commit_s']:.2f} s")
        show("  start: to packer / make packer / 1st pack", f"{r.get('start_to_packer_s', 0):.2f} / "
             f"{r.get('make_packer_s', 0):.2f} / {r.get('first_pack_s', 0):.2f} s")
        show("  peak RSS after each layer (GiB)", " / ".join(f"{b / GIB:.2f}" for b in r["rss_after_each_layer"]))

    dev, label = ("gpu", "GPU") if gpu else ("cpu", "CPU")
    out_dev, out_cpu = work / f"out-{dev}", work / "out-cpu"
    runs = [run_child(ckpt, out_dev, a.device, a.quant_method, a.threadpool_count, a.threads)
            for _ in range(max(1, a.repeat))]
    res[f"{dev}_warm"] = g = add_rates(min(runs, key=lambda r: r["process_s"]), not gpu)
    g["all_process_s"] = [r["process_s"] for r in runs]
    show_run(f"{label} conversion, page cache (best of {len(runs)})", g, not gpu)
    if not gpu and g["imported"]["triton"]:
        notes.append("warning: the CPU conversion imported triton")
    if gpu:
        gpu_sums = layer_checksums(out_dev)
        if not a.skip_cpu:
            res["cpu_warm"] = c = add_rates(run_child(ckpt, out_cpu, "cpu", a.quant_method, a.threadpool_count,
                                                      a.threads), True)
            show_run(f"CPU conversion ({threads} threads), page cache", c, True)
            res["gpu_equals_cpu"] = gpu_sums == layer_checksums(out_cpu)
            show("GPU output == CPU output (per-layer sha256)", res["gpu_equals_cpu"])
            shutil.rmtree(out_cpu)
        else:
            notes.append("--skip-cpu: no CPU conversion, no GPU == CPU check")
    shutil.rmtree(out_dev)

    if a.skip_cold:
        res["cold"] = "skipped (--skip-cold)"
    elif drop_caches():
        res["read_cold"] = rc = time_reads(files, cold=True)
        show_reads(rc, "cold")
        drop_caches()
        res[f"{dev}_cold"] = gc = add_rates(run_child(ckpt, out_dev, a.device, a.quant_method, a.threadpool_count,
                                                      a.threads), not gpu)
        show_run(f"{label} conversion, cold", gc, not gpu)
        shutil.rmtree(out_dev)
    else:
        res["cold"] = "drop_caches not permitted (needs root): page-cache numbers only"
    if isinstance(res.get("cold"), str):
        notes.append(f"cold: {res['cold']}")

    ratios = {f"{dev}_warm_over_read_warm": g["process_s"] / rw["fastest_s"],
              f"{dev}_warm_over_cat_warm": g["process_s"] / rw["cat_s"],
              f"{dev}_warm_over_read_seq_warm": g["process_s"] / rw["seq_s"]}
    if "cpu_warm" in res and gpu:
        ratios["cpu_warm_over_gpu_warm"] = res["cpu_warm"]["process_s"] / g["process_s"]
        ratios["cpu_warm_over_read_warm"] = res["cpu_warm"]["process_s"] / rw["fastest_s"]
    if f"{dev}_cold" in res:
        ratios[f"{dev}_cold_over_read_cold"] = res[f"{dev}_cold"]["process_s"] / res["read_cold"]["fastest_s"]
        ratios[f"{dev}_cold_over_cat_cold"] = res[f"{dev}_cold"]["process_s"] / res["read_cold"]["cat_s"]
    peaks = g["rss_after_each_layer"]
    if peaks:
        ratios["peak_rss_last_over_first_layer"] = peaks[-1] / peaks[0]
    res["ratios"] = ratios
    res["notes"] = notes
    for name, value in ratios.items():
        show(name, f"{value:.3f}")
    for note in notes:
        print(f"note: {note}", flush=True)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
        print(f"JSON report: {a.json}")
    else:
        print(text)


if __name__ == "__main__":
    main()
