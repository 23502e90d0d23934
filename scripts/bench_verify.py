#!/usr/bin/env python3
"""Benchmark `verify` against read speed, in one run on one synthetic checkpoint.

A synthetic BF16 checkpoint (qwen3_moe family, --hidden x --inter, --experts per layer, --layers) is
converted with --method; then, each --reps times (median reported):
  read      : every byte verify reads (source shards and packed shards), read from the page cache in 16 MiB
              pieces on as many threads as verify uses: the speed verify is compared with
  integrity : verify without --source (manifest, sizes, sha256 of every layer file)
  compare   : verify with --source (integrity, then every tensor decoded, dequantized and compared)
Each round times all three in turn; ratios are medians over rounds of (read time / verify time) for the same
bytes: compare against reading source + packed, integrity against reading the packed shards.

  python scripts/bench_verify.py                         # small, a few seconds
The checkpoint and output go to a new temporary folder (or --workdir) and are removed at the end, unless --keep.
  python scripts/bench_verify.py --hidden 4096 --inter 1536 --experts 32 --layers 4 --method rawint4-g128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

PIECE = 16 << 20


def read_files(paths: list[Path], threads: int) -> int:
    """Reads every byte of paths (pieces spread over threads); returns the bytes read."""
    pieces = [(p, off) for p in paths for off in range(0, p.stat().st_size, PIECE)]

    def one(job):
        p, off = job
        with open(p, "rb", buffering=0) as f:
            f.seek(off)
            return len(f.read(PIECE))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(one, pieces))


def timed(fn, reps: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), ts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--method", default="int4", help="int4, int8, rawint4-g32/-g64/-g128")
    ap.add_argument("--threads", type=int, default=0, help="verify threads (0: every core)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and output go (default: a new temporary "
                    "folder); they are removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and output (their folder is printed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from kt_convert.kt_runtime.format.methods import get_method
    from kt_convert.synthetic.scratch import Scratch

    method = get_method(args.method)
    with Scratch(args.workdir, "bench_verify_", keep=args.keep) as scratch:
        return run(args, method, scratch.new("ck"), scratch.new("out"))


def run(args, method, ck_dir: Path, out: Path) -> int:
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.convert.verify import verify
    from kt_convert.synthetic.families import make_family_checkpoint

    threads = args.threads or len(os.sched_getaffinity(0))
    ck = make_family_checkpoint(ck_dir, "qwen3_moe_bf16", hidden_size=args.hidden, intermediate_size=args.inter,
                                num_experts=args.experts, num_layers=args.layers, num_shards=args.layers)
    choice, group = (method.choice, method.group_size) if method.group_size else (method.name, None)
    convert(ConvertOptions(input_path=str(ck.path), output=out, quant_method=choice, group_size=group,
                           threadpool_count=method.byte_order.stored_pools(2), overwrite=True, progress=False))
    src_files = sorted(ck.path.glob("*.safetensors"))
    out_files = sorted(out.glob("*.safetensors"))
    src_bytes = sum(p.stat().st_size for p in src_files)
    out_bytes = sum(p.stat().st_size for p in out_files)
    read_files(src_files + out_files, threads)  # into the page cache

    # rounds: each times the reads, integrity and compare in turn, so that the ratios compare runs of the same
    # minute (shared machines); medians over rounds
    rounds = {"read": [], "read_packed": [], "integrity": [], "compare": []}
    reports = []
    for _ in range(args.reps):
        rounds["read"].append(timed(lambda: read_files(src_files + out_files, threads), 1)[0])
        rounds["read_packed"].append(timed(lambda: read_files(out_files, threads), 1)[0])
        rounds["integrity"].append(timed(lambda: verify(out, threads=threads), 1)[0])
        rounds["compare"].append(timed(lambda: reports.append(verify(out, str(ck.path), threads=threads)), 1)[0])
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    read_t, read_out_t, integ_t, cmp_t = med["read"], med["read_packed"], med["integrity"], med["compare"]
    r = reports[-1]
    res = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                    "python": platform.python_version()},
        "shape": {"hidden": args.hidden, "inter": args.inter, "experts": args.experts, "layers": args.layers,
                  "method": method.name, "threads": threads},
        "source_GB": src_bytes / 1e9, "packed_GB": out_bytes / 1e9,
        "read_s": read_t, "read_GBps": (src_bytes + out_bytes) / read_t / 1e9,
        "integrity_s": integ_t, "integrity_GBps": out_bytes / integ_t / 1e9,
        "integrity_vs_read": float(np.median(np.array(rounds["read_packed"]) / np.array(rounds["integrity"]))),
        "compare_s": cmp_t, "compare_GBps": (src_bytes + out_bytes) / cmp_t / 1e9,
        "compare_vs_read": float(np.median(np.array(rounds["read"]) / np.array(rounds["compare"]))),
        "model_rel_rms": r.model.rel_rms, "rounds": rounds,
        "load_average": os.getloadavg(),
    }
    print(f"{res['machine']['cpu']}, {res['machine']['cores']} cores (load average {os.getloadavg()[0]:.1f}), {threads} threads; "
          f"{method.name} H={args.hidden} I={args.inter} E={args.experts} L={args.layers}: "
          f"source {res['source_GB']:.3f} GB, packed {res['packed_GB']:.3f} GB")
    print(f"read (page cache)    : {read_t:.2f} s, {res['read_GBps']:.2f} GB/s")
    print(f"verify (integrity)   : {integ_t:.2f} s, {res['integrity_GBps']:.2f} GB/s of packed bytes = "
          f"{res['integrity_vs_read']:.2f} of their read")
    print(f"verify --source      : {cmp_t:.2f} s, {res['compare_GBps']:.2f} GB/s of source + packed bytes = "
          f"{res['compare_vs_read']:.2f} of their read; model rel RMS {100 * r.model.rel_rms:.3f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
