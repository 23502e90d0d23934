#!/usr/bin/env python3
"""Batch conversion benchmark: one read for many outputs, and shard processes on one output directory,
each against its baseline measured in the same run.

    python scripts/bench_batch.py [--experts 8] [--layers 4] [--shards 4] [--json OUT.json]

Makes a v4-flash-layer checkpoint (DeepSeek-V4-Flash expert shapes, H=4096, I=2048, MXFP4; 8 experts x
4 layers is about 0.43 GB) in a new temporary folder or --workdir (reusing one that an earlier --keep run left
there), then measures:

  1. multi-output: one process writing every output of --methods x --threadpool-counts
     (--output-template) against one process per output, run one after the other;
  2. sharded: --shards processes with --shard i/N on one output directory at once (each with
     cores / N packing threads) against one process converting it alone.

Every conversion runs as a child process (`python -m kt_convert`); its wall time is the process's, start-up
included. Before each child the source files' pages are dropped from the page cache
(posix_fadvise DONTNEED), so every run reads its source from the disk: `read_bytes` (from the child's
/proc/self/io: bytes the block layer read for it) is what it cost the disk, `rchar` what it asked the
kernel for. Outputs are compared file by file (sha256 of what a user loads: the shards, index, manifest
and copied files; not the lock or .kt_verified.json, the record of which files were hashed, keyed by inode
and mtime): multi-output vs the separate runs, sharded vs the single process. Prints one line per
measurement, the ratios, then the JSON report. Everything it made is removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

GB = 1e9

CHILD = ("import json, os, sys; from kt_convert.convert.cli import main; rc = main(sys.argv[2:]); "
         "io = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines()); t = os.times(); "
         "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'cpu_seconds': t.user + t.system, "
         "**{k: int(v) for k, v in io.items()}})); sys.exit(rc)")


def drop_source_pages(ckpt: Path) -> None:
    """Evicts the source files from the page cache (clean pages only; no root needed)."""
    for f in sorted(ckpt.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def start_child(ckpt: Path, work: Path, tag: str, conv_args: list[str]) -> tuple[subprocess.Popen, Path]:
    stats = work / f"io-{tag}.json"
    cmd = [sys.executable, "-c", CHILD, str(stats), "-i", str(ckpt), "--no-progress", "--device", "cpu", *conv_args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), stats


def finish_child(proc: subprocess.Popen, stats: Path) -> dict:
    err = proc.communicate()[1]
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed ({proc.returncode}):\n{err}")
    return json.loads(stats.read_text())


def run_one(ckpt: Path, work: Path, tag: str, conv_args: list[str]) -> dict:
    drop_source_pages(ckpt)
    t0 = time.perf_counter()
    io = finish_child(*start_child(ckpt, work, tag, conv_args))
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": io["cpu_seconds"], "read_bytes": io["read_bytes"],
            "rchar": io["rchar"], "write_bytes": io["write_bytes"]}


def best(runs: list[dict]) -> dict:
    """The run of least wall time (the machine is shared: the others were slowed by someone else)."""
    return min(runs, key=lambda r: r["seconds"])


def show(name: str, r: dict) -> None:
    print(f"{name:44s} {r['seconds']:7.2f} s  cpu {r['cpu_seconds']:7.2f} s  read_bytes {r['read_bytes'] / GB:6.3f} GB   "
          f"rchar {r['rchar'] / GB:6.3f} GB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="v4-flash-layer",
                    help="v4-flash-layer (MXFP4), or a synthetic family variant (e.g. deepseek_v3_fp8, qwen3_moe_bf16) "
                         "made with H=4096, I=2048")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--methods", default="int4,int8")
    ap.add_argument("--threadpool-counts", default="1,2")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint and outputs go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the checkpoint and outputs (named at the end); a later run with this --workdir reuses "
                         "the checkpoint")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved; the fastest counts")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from kt_convert.synthetic.scratch import Scratch

    with Scratch(a.workdir, "bench_batch_", keep=a.keep) as scratch:
        run(a, scratch)


def run(a, scratch) -> None:
    from bench_convert import machine_info
    from output_digests import tree_digests
    from kt_convert.synthetic.families import make_family_checkpoint
    from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

    name = f"{a.source}-E{a.experts}-L{a.layers}"
    ckpt = scratch.reused(name)
    if ckpt is not None and not (ckpt / "config.json").is_file():
        raise SystemExit(f"{ckpt} is not a checkpoint of an earlier --keep run: remove it or choose another --workdir")
    if ckpt is None:
        ckpt = scratch.new(name)
        if a.source == "v4-flash-layer":
            make_v4_flash_checkpoint(ckpt, "v4-flash-layer", num_experts=a.experts, num_layers=a.layers)
        else:  # dense-first families get one more layer: a.layers MoE layers either way
            make_family_checkpoint(ckpt, a.source, hidden_size=4096, intermediate_size=2048, num_experts=a.experts,
                                   num_layers=a.layers + 1, mtp_layers=0, num_shards=3)
    source = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    report = {"machine": machine_info("cpu"), "checkpoint": {"source": a.source, "experts": a.experts,
                                                              "layers": a.layers, "source_bytes": source}}
    print(json.dumps(report["machine"]), flush=True)
    print(f"source: {source / GB:.3f} GB ({a.source}, {a.experts} experts x {a.layers} layers, H=4096, I=2048)", flush=True)

    # 1. one read, many outputs
    methods, counts = a.methods.split(","), a.threadpool_counts.split(",")
    outs = scratch.new("runs")
    outs.mkdir()
    work = outs  # the children's I/O statistics go here too
    separate_runs: dict[str, list[dict]] = {}
    multi_runs = []
    for rep in range(a.repeat):  # interleaved, so that a busy spell of the machine hits both sides
        for m in methods:
            for t in counts:
                d = outs / "separate" / f"{m}-T{t}"
                shutil.rmtree(d, ignore_errors=True)
                r = run_one(ckpt, work, f"sep-{m}-{t}", ["-o", str(d), "--quant-method", m, "--threadpool-count", t])
                show(f"separate run {m} T={t}", r)
                separate_runs.setdefault(f"{m}-T{t}", []).append(r)
        shutil.rmtree(outs / "multi", ignore_errors=True)
        multi = run_one(ckpt, work, "multi", ["--output-template", str(outs / "multi" / "{method}-T{threadpool_count}"),
                                              "--quant-method", a.methods, "--threadpool-count", a.threadpool_counts])
        show(f"one pass, {len(separate_runs)} outputs", multi)
        multi_runs.append(multi)
    separate = [best(rs) for rs in separate_runs.values()]
    multi = best(multi_runs)
    identical = all(tree_digests(outs / "multi" / d.name) == tree_digests(d) for d in (outs / "separate").iterdir())
    total = {k: sum(r[k] for r in separate) for k in ("seconds", "cpu_seconds", "read_bytes", "rchar", "write_bytes")}
    report["multi_output"] = {"outputs": len(separate), "separate": separate, "separate_total": total, "one_pass": multi,
                              "identical": identical,
                              "wall_ratio": round(total["seconds"] / multi["seconds"], 3),
                              "cpu_ratio": round(total["cpu_seconds"] / multi["cpu_seconds"], 3),
                              "read_bytes_ratio": round(total["read_bytes"] / max(1, multi["read_bytes"]), 3),
                              "rchar_ratio": round(total["rchar"] / max(1, multi["rchar"]), 3)}
    print(f"multi-output: {len(separate)} separate runs / one pass: wall {report['multi_output']['wall_ratio']:.2f}x, "
          f"cpu {report['multi_output']['cpu_ratio']:.2f}x, disk reads {report['multi_output']['read_bytes_ratio']:.2f}x, read calls "
          f"{report['multi_output']['rchar_ratio']:.2f}x; outputs identical: {identical}", flush=True)

    # 2. shard processes on one output directory
    m, t = methods[0], counts[-1]
    single_runs, sharded_runs = [], []
    threads = max(1, (os.cpu_count() or 1) // a.shards)
    for rep in range(a.repeat):
        shutil.rmtree(outs / "single", ignore_errors=True)
        single_runs.append(run_one(ckpt, work, "single", ["-o", str(outs / "single"), "--quant-method", m,
                                                          "--threadpool-count", t]))
        show(f"single process ({m} T={t})", single_runs[-1])
        shutil.rmtree(outs / "sharded", ignore_errors=True)
        drop_source_pages(ckpt)
        t0 = time.perf_counter()
        procs = [start_child(ckpt, work, f"shard{i}", ["-o", str(outs / "sharded"), "--quant-method", m,
                                                       "--threadpool-count", t, "--shard", f"{i + 1}/{a.shards}",
                                                       "--cpuinfer-threads", str(threads)])
                 for i in range(a.shards)]
        ios = [finish_child(*p) for p in procs]
        sharded_runs.append({"seconds": time.perf_counter() - t0, **{k: sum(x[k] for x in ios) for k in
                             ("cpu_seconds", "read_bytes", "rchar", "write_bytes")}})
        show(f"{a.shards} shard processes at once", sharded_runs[-1])
    single, sharded = best(single_runs), best(sharded_runs)
    same = tree_digests(outs / "sharded") == tree_digests(outs / "single")
    report["sharded"] = {"shards": a.shards, "threads_per_shard": threads, "single": single, "sharded": sharded,
                         "identical": same, "wall_ratio": round(single["seconds"] / sharded["seconds"], 3)}
    print(f"sharded: single / {a.shards} shards: wall {report['sharded']['wall_ratio']:.2f}x "
          f"({os.cpu_count()} cores here); output identical: {same}", flush=True)
    text = json.dumps(report, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
