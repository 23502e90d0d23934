#!/usr/bin/env python3
"""Conversion throughput against the speed of reading the same files, measured in the same run.

    python scripts/bench_convert.py [--experts 32] [--layers 2] [--quant-method int4] [--json OUT.json]

Makes a v4-flash-layer checkpoint (DeepSeek-V4-Flash expert shapes, H=4096, I=2048, MXFP4) once
in --workdir, times `cat` of its files to /dev/null (page cache: read twice, the second timed;
cold too when the page cache can be dropped), then times the converter (a subprocess, so its peak
RSS is its own) on the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine_info() -> dict:
    import kt_kernels
    import torch

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
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": kt_kernels.best_isa(), "memory_gb": round(mem / 1e9, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_cat(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def time_convert(ckpt: Path, out: Path, args) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    report_path = out.parent / "bench_report.json"
    cmd = [sys.executable, "-m", "convert", "-i", str(ckpt), "-o", str(out), "--quant-method", args.quant_method,
           "--threadpool-count", str(args.threadpool_count), "--cpuinfer-threads", str(args.threads),
           "--device", args.device, "--no-progress", "--json", str(report_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"conversion failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, json.loads(report_path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kt_bench_convert")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--quant-method", default="int4", choices=["int4", "int8"])
    p.add_argument("--threadpool-count", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="packing threads (0: all cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=2, help="timed conversions (best is reported)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from convert.synthetic import make_v4_flash_checkpoint

    ckpt = args.workdir / f"v4-flash-layer-e{args.experts}-l{args.layers}"
    if not (ckpt / "config.json").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        make_v4_flash_checkpoint(ckpt, "v4-flash-layer", num_experts=args.experts, num_layers=args.layers,
                                 include_non_expert=False)
    files = sorted(ckpt.glob("*.safetensors"))
    file_bytes = sum(f.stat().st_size for f in files)
    cold = {}
    if drop_caches():
        cold["read_s"] = time_cat(files)
        drop_caches()
        cold["convert_s"], _ = time_convert(ckpt, args.workdir / "out", args)
        cold["ratio"] = cold["convert_s"] / cold["read_s"]
    time_cat(files)
    read_s = min(time_cat(files) for _ in range(2))
    runs = [time_convert(ckpt, args.workdir / "out", args) for _ in range(max(1, args.repeat))]
    convert_s, report = min(runs, key=lambda r: r[0])
    threads = args.threads or os.cpu_count()
    params = 3 * 4096 * 2048 * args.experts * args.layers
    result = {
        "machine": machine_info(),
        "checkpoint": {"experts": args.experts, "layers": args.layers, "file_gb": round(file_bytes / 1e9, 3),
                       "expert_gb": round(report["input_bytes"] / 1e9, 3), "params_g": round(params / 1e9, 3)},
        "settings": {"quant_method": args.quant_method, "threadpool_count": args.threadpool_count,
                     "threads": threads, "device": args.device},
        "page_cache": {
            "read_s": round(read_s, 3), "read_gb_per_s": round(file_bytes / read_s / 1e9, 2),
            "convert_s": round(convert_s, 3), "convert_process_s": round(report["seconds"], 3),
            "input_gb_per_s": round(report["input_bytes"] / convert_s / 1e9, 3),
            "g_params_per_s": round(params / convert_s / 1e9, 3),
            "g_params_per_s_per_core": round(params / convert_s / 1e9 / threads, 3),
            "convert_over_read": round(convert_s / read_s, 2),
        },
        "cold": {k: round(v, 3) for k, v in cold.items()} or "page cache could not be dropped (needs root)",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
