"""Benchmark: GPU conversion (--device cuda) against the time to read the same input files, the CPU
path on every core, and the GPU kernel alone. Writes JSON; prints a table and the ratios.

    python scripts/bench_convert_gpu.py --work /tmp/ktbench --json bench.json
        [--experts 256 --layers 3 --method int4 --numa 2] [--skip-cpu] [--skip-cold]

Makes a v4-flash-layer checkpoint (H=4096, I=2048, MXFP4; 256 experts x 3 layers is about 10 GB)
under --work unless one is there, then measures in this order: reads of the input files from the
page cache (one stream, and 16 threads), the fused kernel on device-resident batches, the GPU
conversion (page cache), the CPU conversion (page cache), and, where `echo 3 >
/proc/sys/vm/drop_caches` works, a cold read and a cold GPU conversion. Each conversion runs in a
child process so that its peak RSS is its own; the per-layer peaks show whether RSS grows with the
number of layers. GPU and CPU outputs are compared through their manifests' per-layer checksums.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def input_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def read_sequential(paths: list[Path]) -> tuple[float, int]:
    buf = bytearray(64 << 20)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


def read_parallel(paths: list[Path], threads: int = 16, piece: int = 64 << 20) -> tuple[float, int]:
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


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- child: one conversion, instrumented ---------------------------------------------------------


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
                                    threadpool_count=args["numa"], device=args["device"], progress=False,
                                    overwrite=True))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    import resource

    out = {"wall_s": wall, "report": report.to_dict(), "peak_rss_bytes": max(peak["rss"], rss_bytes()),
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_after_each_layer": layer_peaks, **busy}
    if packers and hasattr(packers[0], "stats"):
        out["gpu_packer"] = packers[0].stats
    return out


def run_child(ckpt: Path, out: Path, device: str, method: str, numa: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    args = {"ckpt": str(ckpt), "out": str(out), "device": device, "method": method, "numa": numa}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise RuntimeError(f"{device} conversion failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_checksums(out: Path) -> dict:
    m = json.loads((out / "kt_manifest.json").read_text())
    return {k: v.get("sha256") for k, v in sorted(m.get("completed", {}).items())}


# -- the kernel alone -----------------------------------------------------------------------------


def kernel_throughput(method_name: str, numa: int, experts: int = 16, H: int = 4096, I: int = 2048) -> dict:
    import numpy as np
    import torch

    from quant import get_method
    from quant.cpu import PackTarget, SourceMatrix
    from quant.gpu import fill_staging, launch, plan_batch
    from quant.numa import full_shape, shard_slice

    method = get_method(method_name)
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(experts):
        for proj in ("gate", "up", "down"):
            n, k = full_shape(proj, H, I)
            src = SourceMatrix("mxfp4", rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8),
                               rng.integers(118, 133, size=(n, k // 32), dtype=np.uint8))
            for t in range(numa):
                s = shard_slice(proj, H, I, numa, t)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/ktbench")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--method", default="int4")
    ap.add_argument("--numa", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return

    import torch

    work = Path(a.work)
    ckpt = work / f"ckpt-e{a.experts}-l{a.layers}"
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "method": a.method,
                 "threadpool_count": a.numa, "experts": a.experts, "layers": a.layers}
    if not (ckpt / "config.json").exists():
        from convert.synthetic import make_v4_flash_checkpoint

        t0 = time.perf_counter()
        make_v4_flash_checkpoint(ckpt, "v4-flash-layer", num_experts=a.experts, num_layers=a.layers)
        res["make_checkpoint_s"] = time.perf_counter() - t0
    files = input_files(ckpt)
    res["input_file_bytes"] = sum(p.stat().st_size for p in files)

    def show(name, value):
        print(f"{name:<44} {value}", flush=True)

    read_sequential(files)  # into the page cache
    res["read_seq_warm_s"], _ = read_sequential(files)
    res["read_par_warm_s"], _ = read_parallel(files)
    res["read_warm_s"] = min(res["read_seq_warm_s"], res["read_par_warm_s"])
    show("read, page cache (1 stream / 16 threads)", f"{res['read_seq_warm_s']:.2f} s / {res['read_par_warm_s']:.2f} s")
    res["writer_floor"] = w = writer_floor(work)
    show("one thread: sha256 / write / write+fsync", f"{w['sha256_gb_s']:.2f} / {w['write_gb_s']:.2f} / "
         f"{w['write_fsync_gb_s']:.2f} GB/s")
    res["kernel"] = kernel_throughput(a.method, a.numa)
    k = res["kernel"]
    show("kernel: source GB/s, weights/s", f"{k['kernel_input_gb_s']:.0f} GB/s, {k['kernel_weights_per_s'] / 1e9:.0f} G/s")
    show("PCIe H2D / D2H", f"{k['h2d_gb_s']:.1f} / {k['d2h_gb_s']:.1f} GB/s")

    gpu_out, cpu_out = work / "out-gpu", work / "out-cpu"
    res["gpu_warm"] = run_child(ckpt, gpu_out, "cuda", a.method, a.numa)
    g = res["gpu_warm"]
    show("GPU conversion, page cache", f"{g['wall_s']:.2f} s, peak RSS {g['peak_rss_bytes'] / 2**30:.2f} GiB")
    show("  busy: pack / write / commit", f"{g['pack_s']:.2f} / {g['write_s']:.2f} / {g['commit_s']:.2f} s")
    show("  start: to packer / make packer / 1st pack", f"{g.get('start_to_packer_s', 0):.2f} / "
         f"{g.get('make_packer_s', 0):.2f} / {g.get('first_pack_s', 0):.2f} s")
    gpu_sums = layer_checksums(gpu_out)
    if not a.skip_cpu:
        res["cpu_warm"] = run_child(ckpt, cpu_out, "cpu", a.method, a.numa)
        c = res["cpu_warm"]
        show("CPU conversion, page cache", f"{c['wall_s']:.2f} s, peak RSS {c['peak_rss_bytes'] / 2**30:.2f} GiB")
        show("  busy: pack / write / commit", f"{c['pack_s']:.2f} / {c['write_s']:.2f} / {c['commit_s']:.2f} s")
        res["gpu_equals_cpu"] = gpu_sums == layer_checksums(cpu_out)
        show("GPU output == CPU output (per-layer sha256)", res["gpu_equals_cpu"])
        shutil.rmtree(cpu_out)
    shutil.rmtree(gpu_out)
    if not a.skip_cold and drop_caches():
        res["read_seq_cold_s"], _ = read_sequential(files)
        drop_caches()
        res["read_par_cold_s"], _ = read_parallel(files)
        res["read_cold_s"] = min(res["read_seq_cold_s"], res["read_par_cold_s"])
        drop_caches()
        res["gpu_cold"] = run_child(ckpt, gpu_out, "cuda", a.method, a.numa)
        show("read, cold (1 stream / 16 threads)", f"{res['read_seq_cold_s']:.2f} s / {res['read_par_cold_s']:.2f} s")
        gc = res["gpu_cold"]
        show("GPU conversion, cold", f"{gc['wall_s']:.2f} s; busy pack / write / commit {gc['pack_s']:.2f} / "
             f"{gc['write_s']:.2f} / {gc['commit_s']:.2f} s")
        shutil.rmtree(gpu_out)
    else:
        res["cold"] = "skipped" if a.skip_cold else "drop_caches not permitted"

    ratios = {"gpu_warm_over_read_warm": g["wall_s"] / res["read_warm_s"],
              "gpu_warm_over_read_seq_warm": g["wall_s"] / res["read_seq_warm_s"]}
    if "cpu_warm" in res:
        ratios["cpu_warm_over_gpu_warm"] = res["cpu_warm"]["wall_s"] / g["wall_s"]
    if "gpu_cold" in res:
        ratios["gpu_cold_over_read_cold"] = res["gpu_cold"]["wall_s"] / res["read_cold_s"]
    peaks = g["rss_after_each_layer"]
    if peaks:
        ratios["peak_rss_last_over_first_layer"] = peaks[-1] / peaks[0]
    res["ratios"] = ratios
    for name, value in ratios.items():
        show(name, f"{value:.3f}")
    text = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
