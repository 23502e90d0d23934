#!/usr/bin/env python3
"""Download benchmark: converting while downloading against downloading first, then converting, in the
same run, from a synthetic repository served on 127.0.0.1 (synthetic.hub_server, huggingface_hub's
own download code on the client side).

    python scripts/bench_download.py [--layers 8] [--experts 32] [--bandwidth-mb 200] [--json OUT.json]

Makes a v4-flash-layer checkpoint (H=4096, I=2048, MXFP4; 32 experts x 8 layers is about 3.4 GB in
8 shards) under --workdir unless one is there, serves it (throttled to --bandwidth-mb MB/s in all,
one shared link, when given; loopback alone is not a network), then measures, each with a fresh
cache and output and wall time from the first request to the complete output:

  1. download then convert: huggingface_hub's snapshot_download of the files the conversion needs
     (what `hf download` does), then the conversion of the cached model;
  2. --download: conversion while downloading, the cache keeping the shards (four shards at once,
     the default);
  3. --download --download-workers 1: one shard at a time;
  4. --download --max-source-disk CAP: shards removed once converted (CAP: --cap-gb, default two
     shards).

Peak disk is sampled every 20 ms over the cache and the output (allocated blocks). Prints one line
per measurement, the ratios against (1), and the JSON report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from kt_convert.synthetic import make_v4_flash_checkpoint  # noqa: E402
from kt_convert.synthetic.hub_server import LocalHub  # noqa: E402

REPO = "bench/v4-flash-layer"


def disk_usage(paths) -> int:
    total = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                total += st.st_blocks * 512
    return total


class DiskSampler:
    def __init__(self, paths, every=0.02):
        self.paths, self.every, self.peak = paths, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_usage(self.paths))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_usage(self.paths))


def env_for(endpoint: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT))
    return env


def run(cmd, env) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def convert_cmd(out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "kt_convert", "-i", REPO, "-o", str(out), "--no-progress", *extra]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kt-bench-download"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--bandwidth-mb", type=float, default=None, help="serve at this many MB/s (default: unthrottled)")
    ap.add_argument("--cap-gb", type=float, default=None, help="--max-source-disk for run 3 (default: two shards)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    src = args.workdir / f"src-L{args.layers}-E{args.experts}-S{args.shards}"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        make_v4_flash_checkpoint(src, "v4-flash-layer", num_layers=args.layers, num_experts=args.experts,
                                 num_shards=args.shards, include_non_expert=False)
        print(f"made {src} in {time.perf_counter() - t:.1f} s", flush=True)
    source_bytes = sum(p.stat().st_size for p in src.iterdir())
    shard_sizes = sorted(p.stat().st_size for p in src.glob("*.safetensors"))
    cap = int(args.cap_gb * 1e9) if args.cap_gb else 2 * shard_sizes[-1] + 1
    hub = LocalHub(REPO, src, bytes_per_s=args.bandwidth_mb * 1e6 if args.bandwidth_mb else None)
    hub.start()
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()},
              "source_bytes": source_bytes, "shards": len(shard_sizes), "bandwidth_mb_s": args.bandwidth_mb,
              "runs": {}}
    print(f"source {source_bytes / 1e9:.2f} GB in {len(shard_sizes)} shards, served at "
          f"{f'{args.bandwidth_mb:.0f} MB/s' if args.bandwidth_mb else 'loopback speed'}; {os.cpu_count()} CPUs",
          flush=True)
    try:
        def fresh(name):
            cache, out = args.workdir / f"{name}-cache", args.workdir / f"{name}-out"
            for p in (cache, out):
                shutil.rmtree(p, ignore_errors=True)
            cache.mkdir(parents=True)
            out.mkdir(parents=True)
            return cache, out, env_for(hub.endpoint, cache)

        # 1. download (as `hf download` does), then convert
        cache, out, env = fresh("two-step")
        with DiskSampler([cache, out]) as disk:
            t_dl = run([sys.executable, "-c", f"from huggingface_hub import snapshot_download; "
                        f"snapshot_download({REPO!r})"], env)
            t_cv = run(convert_cmd(out), dict(env, HF_HUB_OFFLINE="1"))
        report["runs"]["download_then_convert"] = {"download_s": t_dl, "convert_s": t_cv, "wall_s": t_dl + t_cv,
                                                    "peak_disk_bytes": disk.peak}
        print(f"download then convert: {t_dl:.1f} s + {t_cv:.1f} s = {t_dl + t_cv:.1f} s, "
              f"peak disk {disk.peak / 1e9:.2f} GB", flush=True)
        ref_out = out

        # 2. convert while downloading, the cache keeps the shards
        cache, out, env = fresh("overlap")
        with DiskSampler([cache, out]) as disk:
            t = run(convert_cmd(out, "--download"), env)
        report["runs"]["download_while_converting"] = {"wall_s": t, "peak_disk_bytes": disk.peak}
        print(f"--download: {t:.1f} s, peak disk {disk.peak / 1e9:.2f} GB", flush=True)
        same = _same_layers(ref_out, out)

        # 3. one shard at a time
        cache, out, env = fresh("overlap1")
        with DiskSampler([cache, out]) as disk:
            t = run(convert_cmd(out, "--download", "--download-workers", "1"), env)
        report["runs"]["download_while_converting_1_worker"] = {"wall_s": t, "peak_disk_bytes": disk.peak}
        print(f"--download --download-workers 1: {t:.1f} s, peak disk {disk.peak / 1e9:.2f} GB", flush=True)
        same = same and _same_layers(ref_out, out)

        # 4. convert while downloading under a disk cap, shards removed after use
        cache, out, env = fresh("capped")
        with DiskSampler([cache, out]) as disk:
            t = run(convert_cmd(out, "--download", "--max-source-disk", f"{cap / 1e9:.3f}"), env)
        report["runs"]["download_capped"] = {"wall_s": t, "peak_disk_bytes": disk.peak, "cap_bytes": cap,
                                             "output_bytes": disk_usage([out])}
        print(f"--download --max-source-disk {cap / 1e9:.2f}: {t:.1f} s, peak disk {disk.peak / 1e9:.2f} GB",
              flush=True)
        same = same and _same_layers(ref_out, out)
    finally:
        hub.stop()
    base = report["runs"]["download_then_convert"]
    report["ratios"] = {name: {"wall": r["wall_s"] / base["wall_s"], "peak_disk": r["peak_disk_bytes"] / base["peak_disk_bytes"]}
                        for name, r in report["runs"].items()}
    report["outputs_identical"] = same
    for name, r in report["ratios"].items():
        print(f"{name}: wall x{r['wall']:.2f}, peak disk x{r['peak_disk']:.2f} of download-then-convert")
    print(f"packed layers identical across the runs: {same}")
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


def _same_layers(a: Path, b: Path) -> bool:
    """Two outputs hold the same packed tensors (their shards' metadata name different sources)."""
    import numpy as np

    from kt_convert import kt_runtime

    x, y = kt_runtime.load_experts(a), kt_runtime.load_experts(b)
    return x._tensors.keys() == y._tensors.keys() and all(
        np.array_equal(x._tensors[k][0], y._tensors[k][0]) for k in x._tensors)


if __name__ == "__main__":
    sys.exit(main())
