#!/usr/bin/env python3
"""Conversion benchmark: the converter against the physical floor of the same job, measured in the same run.

    python scripts/bench_convert.py [--json OUT.json]                                  # CPU path (any machine)
    python scripts/bench_convert.py --isa avx512,avx2,portable --skip-cold             # the packer's ISA levels
    python3 scripts/bench_convert.py --device cuda,cpu --experts 256 --layers 3 [--drop-caches] [--json OUT.json]

Makes a v4-flash-layer checkpoint (DeepSeek-V4-Flash expert shapes, H=4096, I=2048, MXFP4; E=32 x 2
layers is about 0.86 GB, E=256 x 3 layers about 10 GB) under --workdir unless one is there, then
measures, in this order:

  1. reads of the input files from the page cache: `cat` to /dev/null, one Python stream, 16 threads;
  2. the writer floor: what one thread does here (sha256, os.write to the output disk, + fsync);
  3. the copy floor: `cp` of the input files to the output disk + `sync` of the copies (fsync), warm
     (inputs in the page cache) -- what any converter that reads these bytes and writes as many durably
     must pay;
  4. with cuda: the fused kernel alone on device-resident batches, and PCIe H2D / D2H;
  5. the conversion on each --device (page cache; best of --repeat), with the converter's own
     per-stage timings (read, pack = decode + quantize + tile, write, commit = fsync + rename + digest,
     GPU start-up and its stages); cuda and cpu together: GPU output == CPU output (layer sha256);
     --isa: the CPU conversion once per ISA level of the C++ packer (KT_PACK_ISA), and before it the
     packer alone per level on one core, each against AVX-512's per core and the copy floor (all
     outputs equal);
  6. unless --skip-cold: the same copy and conversions "cold". The page cache is dropped
     (`echo 3 > /proc/sys/vm/drop_caches`, root) only with --drop-caches: never by default, since it
     slows every other job on a shared host; without it these rows are labelled "not cold".

Each conversion runs in a child process (this script with a hidden --child), so its peak RSS is
its own; the child samples RSS every 10 ms and records it after each layer (RSS must not grow with
the number of layers). A conversion's `process_s` is the child process's wall time, start-up included,
as a user of the converter sees it: rates and ratios use it; `wall_s` is the convert() call inside it.
With --device cpu neither this script nor its children import triton (nor torch).

--cores 2,4: each device's conversion again with the CPU limited to n cores (the child's affinity, and
--cpuinfer-threads n), warm and cold; --auto: what --device auto chooses (a child that plans and probes, without
converting) on every core and on each n. Both end with one more table: the settings against the copy floor,
peak RSS and pinned memory, and the targets (GPU <= 1.05x the CPU on every core, the CPU on 2 cores >= 2x the
GPU's time, --device auto picking the faster). The JSON is written after each of these runs.

Prints one line per measurement as it is taken, then one table (machine; copy floor, each device, warm
and cold; conversion / copy, target <= 1.15) and the JSON report (written to --json when given).
"""
from __future__ import annotations

import argparse
import contextlib
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

READ_THREADS = 16
GB, GIB = 1e9, 2**30


# -- machine ------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    """CPU, cores, ISA, memory, versions; the GPU's name only with --device cuda (torch is not
    imported otherwise)."""
    from importlib import metadata

    from kt_convert import kt_kernels

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
            "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "python": platform.python_version(), **versions, "gpu": gpu, "date": time.strftime("%Y-%m-%d")}


def drop_caches() -> bool:
    """Drops the page cache (root only). Called only under --drop-caches."""
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


NOT_COLD = "not cold (page cache kept: no --drop-caches)"


def cache_state(cold: bool, drop: bool) -> str:
    """Drops the page cache when a cold measurement is asked for and --drop-caches was given; returns
    the label of what the next measurement sees."""
    if not cold:
        return "warm"
    if not drop:
        return NOT_COLD
    return "cold" if drop_caches() else "not cold (drop_caches failed: needs root)"


def time_reads(files: list[Path], cold: bool, drop: bool = False) -> dict:
    """cat, one stream, 16 threads; warm: the files are read into the page cache first and cat is
    the best of two; cold: the page cache is dropped before each (with drop only)."""
    labels = []

    def prepare():
        if cold:
            labels.append(cache_state(True, drop))

    if not cold:
        time_cat(files)
    prepare()
    cat_s = time_cat(files) if cold else min(time_cat(files) for _ in range(2))
    prepare()
    seq_s, _ = read_sequential(files)
    prepare()
    par_s, _ = read_parallel(files)
    return {"cat_s": cat_s, "seq_s": seq_s, "par_s": par_s, "fastest_s": min(cat_s, seq_s, par_s),
            "cache": labels[0] if labels else "warm"}


def copy_floor(files: list[Path], dest: Path, cold: bool, drop: bool) -> dict:
    """The physical floor of a conversion: `cp` of the input files into `dest` (on the output disk),
    then `sync` of the copies (fsync of each), as one user would do it. warm: the inputs are read into
    the page cache first; cold: the page cache is dropped first (only with drop). The copies are
    removed afterwards."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if not cold:
        time_cat(files)
    cache = cache_state(cold, drop)
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(dest)], check=True)
    cp_s = time.perf_counter() - t0
    subprocess.run(["sync", *(str(dest / f.name) for f in files)], check=True)
    total = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    copied = sum((dest / f.name).stat().st_size for f in files)
    shutil.rmtree(dest)
    return {"seconds": total, "cp_s": cp_s, "sync_s": total - cp_s, "bytes": copied, "cache": cache,
            "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}


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
    """One conversion in this process: the report (with the converter's per-stage timings), peak RSS
    (sampled every 10 ms) and RSS after each layer."""
    from kt_convert.convert import pipeline
    from kt_convert.convert.packers import pack_isa
    from kt_convert.convert.pipeline import ConvertOptions, convert

    if args.get("choose"):
        return auto_choice_here(args)
    peak = {"rss": rss_bytes()}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak["rss"] = max(peak["rss"], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    layer_peaks = []
    real_layer = pipeline.convert_layer

    def convert_layer(*a, **kw):
        last_write = real_layer(*a, **kw)
        layer_peaks.append(max(peak["rss"], rss_bytes()))
        return last_write

    pipeline.convert_layer = convert_layer
    t0 = time.perf_counter()
    report = convert(ConvertOptions(input_path=args["ckpt"], output=Path(args["out"]), quant_method=args["method"],
                                    threadpool_count=args["threadpool_count"], cpuinfer_threads=args["threads"],
                                    device=args["device"], progress=False, overwrite=True))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "report": report.to_dict(), "peak_rss_bytes": max(peak["rss"], rss_bytes()),
            "ru_maxrss_bytes": ru.ru_maxrss * 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
            "rss_after_each_layer": layer_peaks, "pack_isa": pack_isa(),
            "imported": {m: m in sys.modules for m in ("torch", "triton")}}


def run_child(ckpt: Path, out: Path, device: str, method: str, threadpool_count: int, threads: int,
              isa: str | None = None) -> dict:
    """isa: the packer's ISA level in the child (KT_PACK_ISA); None: as this process's environment says."""
    if out.exists():
        shutil.rmtree(out)
    args = {"ckpt": str(ckpt), "out": str(out), "device": device, "method": method, "threadpool_count": threadpool_count, "threads": threads}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"KT_PACK_ISA": isa} if isa else {})}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env=env)
    process_s = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{device} conversion failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": process_s}


def layer_checksums(out: Path) -> dict:
    m = json.loads((out / "kt_manifest.json").read_text())
    return {k: v.get("sha256") for k, v in sorted(m.get("completed", {}).items())}


# -- decode vs quantize + tile ----------------------------------------------------------------------


def pack_split(method_name: str, threadpool_count: int, threads: int, isa: str = "auto", experts: int = 4,
               H: int = 4096, I: int = 2048, reps: int = 3) -> dict:
    """The C++ packer fuses decode, quantize and tile; to see what the MXFP4 decode costs, the same
    batch (the same values) is packed from MXFP4 and from bf16 (no decode, but 3.8x the bytes read).
    Best of `reps` each, on `threads` threads and on one (the per-core rate: weights per second of
    this process's CPU time, which other jobs on the machine do not inflate), at ISA level `isa`."""
    import numpy as np

    from kt_convert.kt_runtime.format.spec import full_shape, shard_slice
    from kt_convert.kt_runtime.format.methods import get_method
    from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu

    method = get_method(method_name)
    rng = np.random.default_rng(0)
    e2m1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    np.float32)
    jobs = {"mxfp4": [], "bf16": []}
    for _ in range(experts):
        for proj in ("gate", "up", "down"):
            n, k = full_shape(proj, H, I)
            blocks = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
            scales = rng.integers(118, 133, size=(n, k // 32), dtype=np.uint8)
            codes = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(n, k)
            values = e2m1[codes] * np.exp2(scales.astype(np.float32) - 127).repeat(32, axis=1)
            bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: E2M1 x 2^e fits bf16
            for kind, src in (("mxfp4", SourceMatrix("mxfp4", blocks, scales)), ("bf16", SourceMatrix("bf16", bf16))):
                for t in range(threadpool_count):
                    sl = shard_slice(proj, H, I, threadpool_count, t)
                    jobs[kind].append((src.rows(sl.row0, sl.n), sl.col0, sl.k, PackTarget.empty(method, sl.n, sl.k)))
    out = {"experts": experts, "threads": threads, "isa": isa, "weights": experts * 3 * H * I}
    for kind, js in jobs.items():
        times, cpu = [], []
        for n_threads in (threads, 1):
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                pack_cpu(method, js, isa=isa, num_threads=n_threads)
                (times if n_threads == threads else cpu).append((time.perf_counter() - t0, time.process_time() - c0))
        out[f"{kind}_s"] = min(t for t, _ in times)
        out[f"{kind}_one_core_cpu_s"] = min(c for _, c in cpu)
        out[f"{kind}_weights_per_core_s"] = out["weights"] / out[f"{kind}_one_core_cpu_s"]
    same = all(np.array_equal(a[3].weight, b[3].weight) for a, b in zip(jobs["mxfp4"], jobs["bf16"]))
    out["same_bytes"] = same
    out["decode_share"] = max(0.0, 1 - out["bf16_s"] / out["mxfp4_s"])
    return out


# -- the kernel alone -----------------------------------------------------------------------------


def kernel_throughput(method_name: str, threadpool_count: int, experts: int = 16, H: int = 4096, I: int = 2048) -> dict:
    import numpy as np
    import torch

    from kt_convert.kt_runtime.format.methods import get_method
    from kt_convert.quant.cpu import PackTarget, SourceMatrix
    from kt_convert.quant.gpu import fill_staging, launch, plan_batch
    from kt_convert.kt_runtime.format.spec import full_shape, shard_slice

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


# -- the CPU limited to a few cores, and what --device auto chooses ---------------------------------------


def parse_cores(text: str) -> list[int]:
    try:
        cores = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        cores = []
    if not cores or cores[0] < 1:
        raise argparse.ArgumentTypeError(f"--cores: a comma list of core counts, e.g. 2,4; got {text!r}")
    return cores


@contextlib.contextmanager
def on_cpus(n: int | None):
    """This process, and the converters it starts (they inherit it), on its first n allowed CPUs (None: all)."""
    allowed = sorted(os.sched_getaffinity(0))
    if n is None:
        yield allowed
        return
    if n > len(allowed):
        sys.exit(f"--cores {n}: this process may run on {len(allowed)} CPUs only")
    os.sched_setaffinity(0, allowed[:n])
    try:
        yield allowed[:n]
    finally:
        os.sched_setaffinity(0, allowed)


def auto_choice_here(args: dict) -> dict:
    """In a child: what --device auto chooses for this conversion on the CPUs this process may use."""
    from kt_convert.convert.pipeline import ConvertOptions, auto_device

    t0 = time.perf_counter()
    choice = auto_device(ConvertOptions(input_path=args["ckpt"], output=Path(args["out"]), quant_method=args["method"],
                                        threadpool_count=args["threadpool_count"], cpuinfer_threads=args["threads"],
                                        device="auto"))
    return {"device": choice.device, "reason": choice.reason, "cpu_s_estimate": choice.cpu_s,
            "gpu_s_estimate": choice.gpu_s, "seconds": time.perf_counter() - t0, "cpus": len(os.sched_getaffinity(0))}


def auto_choice(ckpt: Path, out: Path, method: str, threadpool_count: int, threads: int) -> dict:
    args = {"ckpt": str(ckpt), "out": str(out), "method": method, "threadpool_count": threadpool_count,
            "threads": threads, "choose": True}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"--device auto's choice failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def limited_key(cores: int | None) -> str:
    return "all" if cores is None else str(cores)


def limited_conversions(res: dict, settings: list[int | None], devices: list[str], ckpt: Path, work: Path, method: str,
                        threadpool_count: int, repeat: int, cold: bool, drop: bool, save) -> None:
    """Each device's conversion with the CPU limited to n cores (affinity, and --cpuinfer-threads n), warm (best of
    `repeat`) or cold, into res["limited"][n]; with peak RSS after each layer and the GPU's pinned memory.
    save(): writes the report so far (a run cut short keeps what it measured)."""
    gb = res["checkpoint"]["file_bytes"] / GB
    for n in settings:
        with on_cpus(n):
            entry = res.setdefault("limited", {}).setdefault(limited_key(n), {})
            for dev in devices:
                tries = []
                for _ in range(1 if cold else max(1, repeat)):
                    cache = cache_state(cold, drop)
                    r = run_child(ckpt, work / f"out-{dev}-{limited_key(n)}", dev, method, threadpool_count, n or 0)
                    r["cache"] = cache
                    tries.append(r)
                r = min(tries, key=lambda x: x["process_s"])
                r["all_process_s"] = [x["process_s"] for x in tries]
                entry[f"{dev}_{'cold' if cold else 'warm'}"] = r
                shutil.rmtree(work / f"out-{dev}-{limited_key(n)}")
                rss = " / ".join(f"{b / GIB:.2f}" for b in r["rss_after_each_layer"])
                show(f"{LABEL[dev]} conversion on {n or 'all'} cores, {cache}",
                     f"{r['process_s']:.2f} s ({gb / r['process_s']:.2f} GB/s in), peak RSS per layer {rss} GiB, "
                     f"pinned {pinned_mib(r):.0f} MiB")
                save()


def pinned_mib(run: dict) -> float:
    return run["report"]["timings"].get("gpu_pinned_mib", 0)


def limited_phase(res: dict, a, devices: list[str], ckpt: Path, work: Path, cold: bool) -> None:
    """--cores and --auto: the conversions on a few cores (warm or cold), and (warm) what --device auto chooses on
    every core and on each of those."""
    def save() -> None:
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")

    if a.cores:
        limited_conversions(res, a.cores, devices, ckpt, work, a.quant_method, a.threadpool_count, a.repeat, cold,
                            a.drop_caches, save)
    if a.auto and not cold:
        auto_choices(res, [None, *a.cores], ckpt, work, a.quant_method, a.threadpool_count)
    if a.cores or a.auto:
        res["limited_targets"] = [{"name": n, "value": v, "target": t, "met": ok}
                                  for n, v, t, ok in limited_checks(res)]
        save()


def setting(res: dict, key: str) -> dict:
    """The runs of one core setting; every core's are the main runs."""
    entry = dict(res.get("limited", {}).get(key, {}))
    if key == "all":
        entry.update({k: res[k] for k in ("cuda_warm", "cpu_warm", "cuda_cold", "cpu_cold") if k in res})
    return entry


def auto_choices(res: dict, settings: list[int | None], ckpt: Path, work: Path, method: str,
                 threadpool_count: int) -> None:
    for n in settings:
        with on_cpus(n):
            c = auto_choice(ckpt, work / "out-auto", method, threadpool_count, n or 0)
        res.setdefault("limited", {}).setdefault(limited_key(n), {})["auto"] = c
        show(f"--device auto on {n or 'all'} cores", f"{c['device']} ({c['reason']})")


GPU_OVER_CPU_ALL = 1.05  # the GPU path's time over the CPU path's on every core, at most
CPU2_OVER_GPU = 2.0  # the CPU path on 2 cores over the GPU path's time, at least


def limited_checks(res: dict) -> list[tuple[str, object, str, bool]]:
    """(name, value, target, met) of the targets the core settings measure: the GPU against the CPU on every
    core, the CPU on 2 cores against the GPU, and --device auto's choice against the faster measured path."""
    checks = []
    for key in ["all", *(k for k in res.get("limited", {}) if k != "all")]:
        entry = setting(res, key)
        for when in ("warm", "cold"):
            gpu, cpu = entry.get(f"cuda_{when}"), entry.get(f"cpu_{when}")
            if gpu and cpu and key == "all":
                ratio = gpu["process_s"] / cpu["process_s"]
                checks.append((f"GPU / CPU on every core, {when}", ratio, f"<= {GPU_OVER_CPU_ALL}",
                               ratio <= GPU_OVER_CPU_ALL))
            if gpu and cpu and key == "2":
                ratio = cpu["process_s"] / gpu["process_s"]
                checks.append((f"CPU on 2 cores / GPU on 2 cores, {when}", ratio, f">= {CPU2_OVER_GPU}",
                               ratio >= CPU2_OVER_GPU))
        auto = entry.get("auto")
        measured = {d: entry[f"{d}_warm"]["process_s"] for d in ("cuda", "cpu") if f"{d}_warm" in entry}
        if auto and len(measured) == 2:
            faster = min(measured, key=measured.get)
            tie = max(measured.values()) <= 1.05 * min(measured.values())  # either is right
            checks.append((f"--device auto on {key} cores picks the faster (or a 5% tie)", auto["device"], faster,
                           auto["device"] == faster or tie))
    return checks


def limited_table(res: dict) -> str:
    """Each core setting: both paths warm and cold against the copy floor of the same cache state, the GPU's
    speed-up, what --device auto chose, and the targets."""
    lines = ["CPU limited to n cores (sched_setaffinity of the converter and --cpuinfer-threads n):",
             f"  {'cores':<7}{'path':<6}{'warm s':>9}{'/ copy':>8}{'cold s':>9}{'/ copy':>8}"
             f"{'peak RSS GiB':>14}{'pinned MiB':>12}"]
    for key in ["all", *(k for k in res.get("limited", {}) if k != "all")]:
        entry = setting(res, key)
        for dev in ("cuda", "cpu"):
            if f"{dev}_warm" not in entry and f"{dev}_cold" not in entry:
                continue
            cells = []
            for when in ("warm", "cold"):
                r, floor = entry.get(f"{dev}_{when}"), res.get(f"copy_{when}")
                over = f"{r['process_s'] / floor['seconds']:>8.2f}" if r and floor else f"{'-':>8}"
                cells += [f"{r['process_s']:>9.2f}" if r else f"{'-':>9}", over]
            r = entry.get(f"{dev}_warm") or entry.get(f"{dev}_cold")
            lines.append(f"  {key:<7}{LABEL[dev]:<6}{''.join(cells)}{r['peak_rss_bytes'] / GIB:>14.2f}"
                         f"{pinned_mib(r):>12.0f}")
        for when in ("warm", "cold"):
            gpu, cpu = entry.get(f"cuda_{when}"), entry.get(f"cpu_{when}")
            if gpu and cpu:
                lines.append(f"  {key:<7}CPU / GPU time, {when}: {cpu['process_s'] / gpu['process_s']:.2f}")
        if entry.get("auto"):
            lines.append(f"  {key:<7}--device auto chose {entry['auto']['device']} ({entry['auto']['reason']})")
    all_cores, two = setting(res, "all"), setting(res, "2")
    for when in ("warm", "cold"):
        if f"cuda_{when}" in all_cores and f"cpu_{when}" in two:
            ratio = two[f"cpu_{when}"]["process_s"] / all_cores[f"cuda_{when}"]["process_s"]
            lines.append(f"  CPU on 2 cores / GPU on every core, {when}: {ratio:.2f}")
    checks = limited_checks(res)
    if checks:
        lines.append("targets:")
        lines += [f"  {name:<58}{value if isinstance(value, str) else f'{value:.2f}':>8}  (target {target}: "
                  f"{'met' if ok else 'not met'})" for name, value, target, ok in checks]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def show(name, value) -> None:
    print(f"{name:<46} {value}", flush=True)


TARGET = 1.15  # conversion / copy floor
ISA_TARGET = 1.5  # a forced ISA level: per core within 1.5x of AVX-512's, and conversion / copy floor
LABEL = {"cpu": "CPU", "cuda": "GPU"}
ISA_LEVELS = ("portable", "avx2", "avx512", "amx")


def parse_isas(text: str) -> list[str]:
    isas = list(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    if not isas or any(i not in ISA_LEVELS for i in isas):
        raise argparse.ArgumentTypeError(f"--isa: a comma list of {', '.join(ISA_LEVELS)}, got {text!r}")
    return isas


# A run is one conversion setting: "cuda", "cpu" (the packer's best ISA level) or "cpu-<isa>" (KT_PACK_ISA).
def run_device(run: str) -> str:
    return run.split("-")[0]


def run_isa(run: str) -> str | None:
    return run.split("-", 1)[1] if "-" in run else None


def label(run: str) -> str:
    return LABEL[run_device(run)] + (f" {run_isa(run)}" if run_isa(run) else "")


def parse_devices(text: str) -> list[str]:
    devices = list(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
    if not devices or any(d not in LABEL for d in devices):
        raise argparse.ArgumentTypeError(f"--device: a comma list of cpu and cuda, got {text!r}")
    return devices


def stage_table(runs: dict[str, dict]) -> list[str]:
    """Rows: the converter's stages (convert.timings.STAGES order); columns: the runs."""
    from kt_convert.convert.timings import STAGES

    names = list(runs)
    stages = [k for k in STAGES if any(k in r["report"]["timings"] for r in runs.values())]
    width = max(16, *(len(n) + 2 for n in names))
    lines = [f"  {'stage (busy seconds, summed over threads)':<44}" + "".join(f"{n:>{width}}" for n in names)]
    for k in stages:
        cells = []
        for r in runs.values():
            v = r["report"]["timings"].get(k)
            cells.append("-" if v is None else (f"{v:.2f}" if k.endswith("_s") else f"{v:.0f}"))
        lines.append(f"  {k:<44}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append(f"  {'process wall time (start-up included)':<44}" + "".join(f"{r['process_s']:>{width}.2f}"
                                                                           for r in runs.values()))
    return lines


def summary_table(res: dict, runs: list[str], threads: int) -> str:
    m, ck = res["machine"], res["checkpoint"]
    gb = ck["file_bytes"] / GB
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['isa']}), {m['memory_gb']} GB, load average "
             f"{m['load_average']}"
             + (f", {m['gpu']}" if m.get("gpu") else "") + f"; python {m['python']}, torch {m['torch']}, "
             f"triton {m['triton']}; {m['date']}",
             f"input: E={ck['experts']} x {ck['layers']} layers, {gb:.2f} GB; output {res['settings']['quant_method']}, "
             f"threadpool count {res['settings']['threadpool_count']}, CPU threads {threads}",
             f"  {'':<38}{'cache':<44}{'seconds':>9}{'GB/s in':>9}{'CPU s':>8}{'/ copy':>8}"]
    for when in ("warm", "cold"):
        floor = res.get(f"copy_{when}")
        if floor is None:
            continue
        lines.append(f"  {'copy floor (cp + sync)':<38}{floor['cache']:<44}{floor['seconds']:>9.2f}"
                     f"{gb / floor['seconds']:>9.2f}{floor['cpu_s']:>8.2f}{1.0:>8.2f}")
        for run in runs:
            r = res.get(f"{run}_{when}")
            if r is None:
                continue
            name = f"{label(run)} conversion" + (f" ({threads} threads)" if run_device(run) == "cpu" else "")
            ratio = r["process_s"] / floor["seconds"]
            verdict = "met" if ratio <= TARGET else "not met"
            lines.append(f"  {name:<38}{r['cache']:<44}{r['process_s']:>9.2f}{r['input_gb_s']:>9.2f}"
                         f"{r['cpu_s']:>8.2f}{ratio:>8.2f}  (target <= {TARGET}: {verdict})")
    columns = {f"{label(run)} {res[f'{run}_{w}']['cache'].split(' (')[0]}": res[f"{run}_{w}"]
               for w in ("warm", "cold") for run in runs if f"{run}_{w}" in res}
    lines.append("where the time goes:")
    lines += stage_table(columns)
    if "isa_levels" in res:
        lines += isa_table(res)
    return "\n".join(lines)


RATES = ("pack_weights_per_core_s", "conversion_weights_per_core_s", "conversion_weights_per_cpu_s")


def isa_levels(res: dict, runs: list[str]) -> dict:
    """Per forced ISA level: the packer's rate on one core (pack_split), the conversion's per core (wall time
    on the CPU threads) and per CPU-second (the child's user + system time: what other jobs on the machine
    do not inflate), each against AVX-512's where it was measured; the conversion against the warm copy floor."""
    out = {}
    for run in runs:
        isa = run_isa(run)
        if isa is None:
            continue
        split, conv = res["pack_split"][run], res[f"{run}_warm"]
        out[isa] = {"pack_weights_per_core_s": split["mxfp4_weights_per_core_s"],
                    "conversion_weights_per_core_s": conv["g_params_s_per_core"] * 1e9,
                    "conversion_weights_per_cpu_s": res["checkpoint"]["params"] / conv["cpu_s"],
                    "conversion_over_copy_warm": conv["process_s"] / res["copy_warm"]["seconds"]}
    if "avx512" in out:
        for r in out.values():
            for rate in RATES:
                r[f"avx512_over_this_{rate}"] = out["avx512"][rate] / r[rate]
    return out


def isa_table(res: dict) -> list[str]:
    threads = res["settings"]["cpu_threads"]
    lines = [f"forced ISA levels (KT_PACK_ISA; target: per core within {ISA_TARGET}x of avx512, conversion <= "
             f"{ISA_TARGET}x the copy floor on {threads} cores); M weights/s, (x) = avx512's rate / this one:",
             f"  {'ISA':<10}{'pack, one core':>22}{'conversion, per core':>26}{'conversion, per CPU-s':>26}"
             f"{'/ copy (warm)':>15}"]
    for isa, r in res["isa_levels"].items():
        cells = []
        for rate in RATES:
            ratio = r.get(f"avx512_over_this_{rate}")
            cells.append(f"{r[rate] / 1e6:.0f}" + ("" if ratio is None else f" ({ratio:.2f}x)"))
        lines.append(f"  {isa:<10}{cells[0]:>22}{cells[1]:>26}{cells[2]:>26}{r['conversion_over_copy_warm']:>15.2f}")
    return lines


def main() -> None:
    from kt_convert.kt_runtime.format.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=["cpu"], type=parse_devices,
                    help="the converter's --device, or several: cpu, cuda, cuda,cpu (default cpu); cuda adds "
                         "the kernel alone and PCIe; cuda,cpu adds GPU == CPU")
    ap.add_argument("--workdir", "--work", type=Path, default=Path(tempfile.gettempdir()) / "kt_bench_convert",
                    help="checkpoint (kept and reused) and outputs (removed), on the disk the output is "
                         "meant for (default: %(default)s)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer (default 32)")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers (default 2)")
    ap.add_argument("--quant-method", "--method", default="int4", choices=list(METHODS))
    ap.add_argument("--threadpool-count", "--numa", type=int, default=2, help="NUMA split T (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="CPU packing threads (0: all cores)")
    ap.add_argument("--isa", type=parse_isas, default=None,
                    help="the C++ packer's ISA levels to compare, e.g. avx512,avx2,portable: a CPU conversion "
                         "(KT_PACK_ISA) and the packer's rate on one core for each, against avx512's and the "
                         "copy floor (default: the best level this CPU has, once)")
    ap.add_argument("--repeat", type=int, default=2, help="page-cache conversions per device; the best is "
                                                          "reported (default 2)")
    ap.add_argument("--skip-cold", action="store_true", help="no cold (or not-cold first-touch) measurements")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache (root) before each cold measurement; never done otherwise, as it "
                         "slows every job on the host; without it the cold rows are labelled not cold")
    ap.add_argument("--cores", type=parse_cores, default=[],
                    help="also convert on each --device with the CPU limited to these many cores (the converter's "
                         "affinity, and --cpuinfer-threads n), e.g. 2,4; warm and (unless --skip-cold) cold")
    ap.add_argument("--auto", action="store_true",
                    help="also ask what --device auto chooses (without converting) on every core and on each --cores "
                         "setting, against the path measured faster there")
    ap.add_argument("--json", type=Path, default=None, help="write the JSON report here (else it is printed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return

    devices = a.device
    gpu = "cuda" in devices
    if a.isa and "cpu" not in devices:
        sys.exit("--isa: the packer's ISA levels are measured on --device cpu; add cpu to --device")
    if a.isa:
        from kt_convert import kt_kernels

        try:
            for isa in a.isa:
                kt_kernels.resolve_isa(isa)
        except ValueError as e:
            sys.exit(f"--isa: {e}")
    # one conversion setting per run: the GPU, the CPU at the best ISA level, or at each --isa level
    runs = [d for d in devices if d != "cpu"] + ([f"cpu-{i}" for i in a.isa] if a.isa else
                                                 ["cpu"] if "cpu" in devices else [])
    if gpu:
        from kt_convert.quant.gpu import gpu_unavailable_reason  # imports neither triton nor the kernels

        if why := gpu_unavailable_reason():
            print(f"--device cuda: {why}; run with --device cpu for the CPU path", file=sys.stderr)
            sys.exit(2)
    notes: list[str] = []
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    threads = a.threads or os.cpu_count()
    res: dict = {"machine": machine_info("cuda" if gpu else "cpu"),
                 "settings": {"devices": devices, "isa": a.isa, "quant_method": a.quant_method,
                              "drop_caches": a.drop_caches,
                              "threadpool_count": a.threadpool_count, "cpu_threads": threads, "repeat": a.repeat}}
    m = res["machine"]
    show("machine", f"{m['cpu']}, {m['cores']} cores, {m['isa']}, {m['memory_gb']} GB; python {m['python']}, "
         f"torch {m['torch']}, triton {m['triton']}" + (f"; {m['gpu']}" if gpu else ""))

    ckpt = work / f"v4-flash-layer-e{a.experts}-l{a.layers}"
    made_s = None
    if not (ckpt / "config.json").exists():
        from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

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

    def show_reads(r: dict) -> None:
        show(f"read, {r['cache']} (cat / 1 stream / {READ_THREADS} threads)",
             f"{r['cat_s']:.2f} / {r['seq_s']:.2f} / {r['par_s']:.2f} s = "
             f"{file_bytes / r['cat_s'] / GB:.2f} / {file_bytes / r['seq_s'] / GB:.2f} / "
             f"{file_bytes / r['par_s'] / GB:.2f} GB/s")

    def show_copy(r: dict, of: int = 1) -> None:
        show(f"copy floor, {r['cache']} (cp + sync" + (f", best of {of})" if of > 1 else ")"),
             f"{r['seconds']:.2f} s (cp {r['cp_s']:.2f} + sync "
             f"{r['sync_s']:.2f}) = {r['bytes'] / r['seconds'] / GB:.2f} GB/s")

    res["read_warm"] = rw = time_reads(files, cold=False)
    show_reads(rw)
    res["writer_floor"] = w = writer_floor(work)
    show("one thread: sha256 / write / write+fsync", f"{w['sha256_gb_s']:.2f} / {w['write_gb_s']:.2f} / "
         f"{w['write_fsync_gb_s']:.2f} GB/s")
    copies = [copy_floor(files, work / "copy", cold=False, drop=False) for _ in range(max(1, a.repeat))]
    res["copy_warm"] = min(copies, key=lambda r: r["seconds"])
    res["copy_warm"]["all_seconds"] = [r["seconds"] for r in copies]
    show_copy(res["copy_warm"], len(copies))
    res["pack_split"] = {}
    for run in (r for r in runs if run_device(r) == "cpu"):
        res["pack_split"][run] = ps = pack_split(a.quant_method, a.threadpool_count, threads, run_isa(run) or "auto")
        show(f"C++ pack of {ps['experts']} experts ({run_isa(run) or 'best ISA'}): from MXFP4 / from bf16",
             f"{ps['mxfp4_s']:.3f} / {ps['bf16_s']:.3f} s on {threads} threads (same bytes: {ps['same_bytes']}; "
             f"decode about {100 * ps['decode_share']:.0f}% of packing); one core: "
             f"{ps['mxfp4_weights_per_core_s'] / 1e6:.0f} / {ps['bf16_weights_per_core_s'] / 1e6:.0f} M weights/s")
    if gpu:
        res["kernel"] = k = kernel_throughput(a.quant_method, a.threadpool_count)
        show("kernel: source GB/s, weights/s", f"{k['kernel_input_gb_s']:.0f} GB/s, "
             f"{k['kernel_weights_per_s'] / 1e9:.0f} G/s")
        show("PCIe H2D / D2H", f"{k['h2d_gb_s']:.1f} / {k['d2h_gb_s']:.1f} GB/s")
    else:
        notes.append("no cuda in --device: GPU kernel throughput, PCIe H2D/D2H and the GPU == CPU check were skipped")

    def add_rates(r: dict, run: str, cache: str) -> dict:
        r["cache"] = cache
        r["input_gb_s"] = r["report"]["input_bytes"] / r["process_s"] / GB
        r["g_params_s"] = params / r["process_s"] / 1e9
        if run_device(run) == "cpu":
            r["g_params_s_per_core"] = r["g_params_s"] / threads
        return r

    def show_run(name: str, r: dict) -> None:
        per_core = f", {r['g_params_s_per_core']:.3f} G params/s per core" if "g_params_s_per_core" in r else ""
        show(name, f"{r['process_s']:.2f} s ({r['wall_s']:.2f} s in convert()), {r['input_gb_s']:.2f} GB/s in, "
             f"{r['g_params_s']:.2f} G params/s{per_core}, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, "
             f"packer ISA {r['pack_isa']}")
        t = r["report"]["timings"]
        show("  read / pack / write / digest / commit (busy s)", " / ".join(
            f"{t.get(k, 0):.2f}" for k in ("read_s", "pack_s", "write_s", "digest_s", "commit_s")))
        if "device_init_s" in t:
            show("  GPU start-up (background) / waited / CPU batches",
                 f"{t['device_init_s']:.2f} / {t.get('device_init_wait_s', 0):.2f} s / "
                 f"{t.get('cpu_batches_while_device_starts', 0):.0f}")
        show("  peak RSS after each layer (GiB)", " / ".join(f"{b / GIB:.2f}" for b in r["rss_after_each_layer"]))

    def convert_on(run: str, cold: bool) -> dict:
        cache = cache_state(cold, a.drop_caches)
        return add_rates(run_child(ckpt, work / f"out-{run}", run_device(run), a.quant_method, a.threadpool_count,
                                   a.threads, run_isa(run)), run, cache)

    sums = {}
    for run in runs:
        tries = [convert_on(run, cold=False) for _ in range(max(1, a.repeat))]
        res[f"{run}_warm"] = best = min(tries, key=lambda r: r["process_s"])
        best["all_process_s"] = [r["process_s"] for r in tries]
        show_run(f"{label(run)} conversion, page cache (best of {len(tries)})", best)
        if run_device(run) == "cpu" and best["imported"]["triton"]:
            notes.append("warning: the CPU conversion imported triton")
        sums[run] = layer_checksums(work / f"out-{run}")
        shutil.rmtree(work / f"out-{run}")
    if len(sums) > 1:
        res["same_output"] = len({json.dumps(v) for v in sums.values()}) == 1
        show(f"same output from {', '.join(label(r) for r in sums)} (per-layer sha256)", res["same_output"])

    limited_phase(res, a, devices, ckpt, work, cold=False)
    if a.skip_cold:
        notes.append("--skip-cold: no cold measurements")
    else:
        res["read_cold"] = rc = time_reads(files, cold=True, drop=a.drop_caches)
        show_reads(rc)
        res["copy_cold"] = copy_floor(files, work / "copy", cold=True, drop=a.drop_caches)
        show_copy(res["copy_cold"])
        for run in runs:
            res[f"{run}_cold"] = r = convert_on(run, cold=True)
            show_run(f"{label(run)} conversion, {r['cache']}", r)
            shutil.rmtree(work / f"out-{run}")
        if not a.drop_caches:
            notes.append(f"the cold rows are {NOT_COLD}: pass --drop-caches (root) for cold numbers")
        limited_phase(res, a, devices, ckpt, work, cold=True)

    ratios = {}
    for run in runs:
        for when in ("warm", "cold"):
            if f"{run}_{when}" in res:
                ratios[f"{run}_{when}_over_copy_{when}"] = res[f"{run}_{when}"]["process_s"] / res[f"copy_{when}"]["seconds"]
        ratios[f"{run}_warm_over_read_warm"] = res[f"{run}_warm"]["process_s"] / rw["fastest_s"]
        peaks = res[f"{run}_warm"]["rss_after_each_layer"]
        if peaks:
            ratios[f"{run}_peak_rss_last_over_first_layer"] = peaks[-1] / peaks[0]
    if "cuda_warm" in res and "cpu_warm" in res:
        ratios["cpu_warm_over_gpu_warm"] = res["cpu_warm"]["process_s"] / res["cuda_warm"]["process_s"]
    if a.isa:
        res["isa_levels"] = isa_levels(res, runs)
    res["ratios"] = ratios
    res["notes"] = notes
    for name, value in ratios.items():
        show(name, f"{value:.3f}")
    for note in notes:
        print(f"note: {note}", flush=True)
    print()
    print(summary_table(res, runs, threads), flush=True)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
        print(f"JSON report: {a.json}")
    else:
        print(text)
    if "limited" in res:
        print(limited_table(res), flush=True)


if __name__ == "__main__":
    main()
