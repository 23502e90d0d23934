#!/usr/bin/env python3
"""End-to-end quality of every quant method on the tiny trained Qwen3-MoE: KL divergence, top-1 agreement
and perplexity against the original model (`convert-cpu-weights eval`), from BF16, FP8 and MXFP4 sources.

The model is tests/data/tiny-qwen3-moe (scripts/train_tiny_moe.py); the text a standard-library module its
training left out (difflib.py by default). The FP8 (blocks of 128 x 128) and MXFP4 sources are the same model
with its experts encoded by synthetic.encode; each is scored against its own decoded BF16 twin (the model
that checkpoint is), and a row per source gives that source's own cost against the BF16 original. Every
method is converted from every source (--threadpool-count 1) and evaluated with convert.eval.evaluate.evaluate.

  python scripts/bench_eval.py --json eval.json                       # CPU path
  python scripts/bench_eval.py --device cuda --gpu-experts 4          # hybrid path (4 of 8 experts on the GPU)

Writes only under --workdir (a new folder; default a temporary one, removed at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL = ROOT / "tests" / "data" / "tiny-qwen3-moe"
METHODS = ("int8", "rawint4-g32", "rawint4-g64", "rawint4-g128", "int4")
SOURCES = ("bf16", "fp8_block", "mxfp4")


def _convert(src: Path, out: Path, method: str) -> None:
    from kt_convert.convert.pipeline import ConvertOptions, convert

    choice, _, group = method.partition("-g")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the plan's lines
        convert(ConvertOptions(input_path=str(src), output=out, quant_method=choice,
                               group_size=int(group) if group else None, threadpool_count=1, progress=False))


def _source_cost(model: Path, decoded: Path, text: Path, args) -> dict:
    """The source format's own cost: the BF16 original against the model with the decoded experts (no packing)."""
    import torch
    import transformers

    from kt_convert.convert.eval.windows import compare_on_windows
    from kt_convert.convert.eval.evaluate import read_text, windows_of
    from kt_convert.kt_runtime.integrations import find_expert_modules

    device = "cuda" if args.device == "cuda" else "cpu"
    net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval().to(device)
    other = transformers.AutoModelForCausalLM.from_pretrained(decoded, dtype=torch.float32).eval().to(device)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = tok(read_text(text), add_special_tokens=False, verbose=False)["input_ids"]
    windows = windows_of(ids, args.ctx, args.max_tokens, None, str(text))
    ref = {name: m for name, m in find_expert_modules(net).values()}
    cand = {name: m for name, m in find_expert_modules(other).values()}
    scores, layers = compare_on_windows(net, windows, ref, cand, progress=False)
    return {"summary": scores.summary(), "max_layer_rel_error": max(x.rel_error for x in layers)}


def _row(source: str, method: str, summary: dict, max_layer_rel_error: float) -> str:
    s = summary
    return (f"| {source} | {method} | {s['kld_mean']:.5f} ± {s['kld_mean_stderr']:.5f} | "
            f"{s['kld_percentiles']['p99']:.4f} | {100 * s['top1_agreement']:.2f} % | {s['perplexity_reference']:.3f} | "
            f"{s['perplexity_candidate']:.3f} | {max_layer_rel_error:.4f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--text", type=Path, default=Path(sysconfig.get_paths()["stdlib"]) / "difflib.py")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpu-experts", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads and CPU engine threads (the model is tiny: one runs it fastest)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--workdir", type=Path, default=None, help="a new folder for the checkpoints and outputs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from kt_convert import kt_kernels
    import torch
    import transformers

    from kt_convert.convert.eval.evaluate import evaluate
    from kt_convert.kt_runtime.format.fsio import atomic_write_text
    from kt_convert.synthetic.encode import requantize_checkpoint

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True)  # refuses an existing folder: nothing of someone else's is touched
        work, temporary = args.workdir, False
    else:
        work, temporary = Path(tempfile.mkdtemp(prefix="bench_eval_")), True
    machine = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
               "isa": kt_kernels.best_isa(), "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "load_average": os.getloadavg()[0],
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    print(f"{machine}\ntext {args.text}, --ctx {args.ctx}, --max-tokens {args.max_tokens}, --device {args.device}, "
          f"--threads {args.threads}"
          + (f", --gpu-experts {args.gpu_experts}" if args.device == "cuda" else ""), flush=True)
    rows, results = [], []
    try:
        for source in args.sources.split(","):
            if source == "bf16":
                encoded = reference = args.model
            else:
                encoded, reference = work / source / "encoded", work / source / "decoded"
                requantize_checkpoint(args.model, encoded, reference, source)
                cost = _source_cost(args.model, reference, args.text, args)
                results.append({"source": source, "method": "(source itself, against BF16)", **cost})
                rows.append(_row(source, "(itself, against BF16)", cost["summary"], cost["max_layer_rel_error"]))
                print(rows[-1], flush=True)
            for method in args.methods.split(","):
                out = work / source / method
                start = time.perf_counter()
                _convert(encoded, out, method)
                r = evaluate(out, str(reference), args.text, ctx=args.ctx, max_tokens=args.max_tokens,
                             device=args.device, gpu_experts=args.gpu_experts, threads=args.threads, progress=False)
                worst = max(x.rel_error for x in r.layers)
                results.append({"source": source, "method": method, "summary": r.summary,
                                "max_layer_rel_error": worst, "layers": r.to_dict()["layers"],
                                "seconds": time.perf_counter() - start})
                rows.append(_row(source, method, r.summary, worst))
                print(rows[-1], flush=True)
    finally:
        if temporary:
            shutil.rmtree(work)
    print("\n| source | method | KLD mean | KLD p99 | top-1 agreement | PPL original | PPL packed | "
          "worst layer's expert-output error |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                                 "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
