#!/usr/bin/env python3
"""sha256 of every file a set of conversions writes: a fingerprint of the converter's bytes.

    python scripts/output_digests.py OUT.json [--workdir DIR]
    python scripts/output_digests.py NEW.json --compare OLD.json
    python scripts/output_digests.py --one [--device cpu|cuda] [--workdir PARENT]

--one: one fixed conversion (the synthetic DeepSeek-V4-Flash MXFP4 checkpoint, int4, threadpool count 2,
with the non-expert shard), its source files left with the times and path they get here; prints the
sha256 of every source file and of every output file a user publishes or loads (all but kt_manifest.json
and dot-files, docs/FORMAT.md §5 Reproducibility), then one sha256 over the output lines. The same
converter gives the same lines on every machine, device, path and thread count.

Converts the synthetic checkpoint of every family variant and the DeepSeek-V4-Flash MXFP4 one (I8 / U8 / F4
storage, three key styles) to int4 and int8, threadpool count 1 and 2, merged and kt folders (and a few runs
with --include-non-expert and --layers), and to rawint4 with groups 32 and 128 (a refusal, as a model that
clamps its SwiGLU gets, is recorded as its message), on the CPU. Source files get a fixed modification time
and live at fixed paths under --workdir, so the manifests and the shards' __metadata__ are reproducible too:
two runs of the same converter give the same JSON, and a refactor that changes no byte keeps it. Exit 1 on a
difference with --compare. The script makes --workdir/src and --workdir/out and removes them at the end
(refusing to start where either exists); nothing else in --workdir is touched.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")

FIXED_MTIME_NS = 1_700_000_000 * 10**9


def tree_digests(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name not in (".kt_convert.lock", ".kt_verified.json"):
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _pin_mtimes(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))


def checkpoints(src: Path) -> dict[str, Path]:
    from kt_convert.synthetic import VARIANTS, make_family_checkpoint, make_v4_flash_checkpoint

    out = {}
    for name in sorted(VARIANTS):
        out[name] = make_family_checkpoint(src / name, name).path
    for storage, style in (("I8", "official"), ("U8", "model"), ("F4", "hf_alias")):
        name = f"v4_flash_{storage}_{style}"
        out[name] = make_v4_flash_checkpoint(src / name, "v4-flash-tiny", storage=storage, key_style=style,
                                             mtp_layers=1, num_shards=3).path
    for path in out.values():
        _pin_mtimes(path)
    return out


def runs(sources: dict[str, Path]):
    for name, src in sources.items():
        for method in ("int4", "int8"):
            for t in (1, 2):
                for merge in (True, False):
                    yield f"{name}/{method}-T{t}-{'merged' if merge else 'kt'}", src, dict(
                        quant_method=method, threadpool_count=t, merge=merge)
    v4 = sources["v4_flash_I8_official"]
    yield "v4_flash_I8_official/int4-T2-merged-non-expert", v4, dict(quant_method="int4", threadpool_count=2,
                                                                      include_non_expert=True)
    yield "v4_flash_I8_official/int8-T1-merged-layer1", v4, dict(quant_method="int8", threadpool_count=1, layers=[1])
    yield "deepseek_v3_fp8/int4-T2-merged-non-expert", sources["deepseek_v3_fp8"], dict(
        quant_method="int4", threadpool_count=2, include_non_expert=True)
    for name, src in sources.items():  # the group-wise method: one pool, safetensors only (refused with a clamp)
        for group in (32, 128):
            yield f"{name}/rawint4-g{group}", src, dict(quant_method="rawint4", group_size=group, threadpool_count=1)


def one_conversion(parent: Path | None, device: str) -> int:
    """--one, in a new folder under `parent` (default: the temporary directory), removed at the end."""
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.kt_runtime.format.names import is_published
    from kt_convert.synthetic import make_v4_flash_checkpoint

    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kt-output-digests-", dir=parent))
    src = work / "src" / "v4-flash-tiny"
    make_v4_flash_checkpoint(src, "v4-flash-tiny", num_experts=8, mtp_layers=1, num_shards=3)
    out = work / "out"
    try:
        report = convert(ConvertOptions(input_path=str(src), output=out, device=device, quant_method="int4",
                                        threadpool_count=2, include_non_expert=True, progress=False))
        lines = [f"{digest}  source/{name}" for name, digest in tree_digests(src).items()]
        output = [f"{digest}  {name}" for name, digest in tree_digests(out).items() if is_published(name)]
    finally:
        shutil.rmtree(work)
    print("\n".join(lines + output))
    print(f"{hashlib.sha256(chr(10).join(output).encode()).hexdigest()}  (all {len(output)} output files, "
          f"converted on {report.device}; kt_manifest.json and dot-files excepted)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", help="write the digests here (JSON)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="a fixed folder (manifests record the source path; default /tmp/kt-output-digests): its "
                         "src/ and out/ are made and removed; with --one: a new folder inside it (default the "
                         "temporary directory)")
    ap.add_argument("--compare", type=Path, help="a JSON written earlier: report every difference")
    ap.add_argument("--one", action="store_true", help="print the sha256 of one fixed conversion's files")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for --one (default cpu)")
    args = ap.parse_args(argv)
    if args.one:
        return one_conversion(args.workdir, args.device)
    if args.out is None:
        ap.error("give OUT.json, or --one")
    args.workdir = args.workdir or Path("/tmp/kt-output-digests")

    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.kt_runtime.format.errors import FixableError
    from kt_convert.synthetic.scratch import Scratch

    with Scratch(args.workdir, "kt-output-digests") as scratch:
        src, out_root = scratch.new("src"), scratch.new("out")
        sources = checkpoints(src)
        digests = {}
        for run, source, kw in runs(sources):
            out = out_root / run
            try:
                convert(ConvertOptions(input_path=str(source), output=out, device="cpu", progress=False, **kw))
            except FixableError as e:  # a refusal is a result too
                digests[run] = {"refused": str(e).replace(str(args.workdir), "WORKDIR")}
            else:
                digests[run] = tree_digests(out)
            if out.exists():
                shutil.rmtree(out)
    args.out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    files = sum(len(v) for v in digests.values())
    print(f"{len(digests)} conversions, {files} files -> {args.out}")
    if args.compare is None:
        return 0
    old = json.loads(args.compare.read_text())
    diff = [r for r in sorted(old.keys() | digests.keys()) if old.get(r) != digests.get(r)]
    for r in diff[:20]:
        a, b = old.get(r) or {}, digests.get(r) or {}
        files = [f for f in sorted(a.keys() | b.keys()) if a.get(f) != b.get(f)]
        print(f"DIFFERENT {r}: {', '.join(files[:5])}")
    print(f"{len(digests) - len(diff)} of {len(digests)} conversions byte-identical to {args.compare}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
