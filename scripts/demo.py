#!/usr/bin/env python
"""The README's main command: synthetic model -> convert -> load -> run, then a whole transformers model
with hybrid experts.

    python scripts/demo.py [--workdir DIR]

1. A tiny synthetic DeepSeek-V4-Flash checkpoint (MXFP4 routed experts, preset v4-flash-tiny) is
   converted to AMXINT4, loaded back (kt_runtime.load_experts) and one layer is run with CPUMoE on
   random tokens; its output is compared with a float MoE on the dequantized weights.
2. A tiny transformers DeepSeek-V4 model (random weights) is saved, converted (AMXINT8 and AMXINT4), its
   routed experts are replaced by HybridMoE (kt_runtime.inject: some experts on the GPU — or on the
   CPU through torch when there is no GPU — the rest on the CPU engine); it generates tokens and its
   agreement with the original model is printed: greedy tokens, teacher-forced top-1 match rate and
   logits error, next to the error of dropping the experts altogether, and against the model with the
   dequantized packed experts (which separates the runtime's own error from the quantization's: per-row
   INT4 of random Gaussian weights is lossy, so INT4 greedy text drifts from a random tiny model's).

Works offline, in well under a minute on 2 cores. Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILED.append(what)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def part1(work: Path) -> None:
    import torch

    from kt_convert import kt_kernels
    from kt_convert import kt_runtime
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.kt_runtime.reference import moe_reference
    from kt_convert.synthetic import make_v4_flash_checkpoint

    print("== 1. synthetic DeepSeek-V4-Flash (MXFP4) -> AMXINT4 -> CPUMoE")
    t0 = time.perf_counter()
    ckpt = make_v4_flash_checkpoint(work / "v4-flash-tiny", "v4-flash-tiny")
    cfg = ckpt.config
    print(f"  checkpoint {ckpt.path}: {cfg['num_hidden_layers']} layers, {cfg['n_routed_experts']} experts, "
          f"H={cfg['hidden_size']}, I={cfg['moe_intermediate_size']}, {len(ckpt.files)} file(s)")
    report = convert(ConvertOptions(input_path=str(ckpt.path), output=work / "v4-flash-tiny-AMXINT4",
                                    quant_method="int4", threadpool_count=2, progress=False))
    print(f"  converted {report.layers_converted} layers ({report.kt_method}, {report.threadpool_count} NUMA shards) "
          f"in {report.seconds:.2f} s")
    w = kt_runtime.load_experts(work / "v4-flash-tiny-AMXINT4")
    print(f"  loaded {w!r}")
    g = torch.Generator().manual_seed(0)
    T, k = 16, w.num_experts_per_tok
    x = torch.randn(T, w.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(w.num_experts, generator=g)[:k] for _ in range(T)])
    tw = torch.softmax(torch.randn(T, k, generator=g), -1)
    for layer in w.layers:
        moe = kt_runtime.CPUMoE(w, layer)
        y = moe.forward(x, ids, tw)
        e = rel(y, moe_reference(w, layer, x, ids, tw))
        check(bool(torch.isfinite(y).all()) and e < 0.08,
              f"layer {layer}: CPUMoE ({kt_kernels.best_isa()}) vs float MoE on the dequantized weights: "
              f"relative error {e:.4f} (< 0.08; int8 activations)")
    print(f"  part 1: {time.perf_counter() - t0:.1f} s")


def tiny_v4_model():
    import torch
    import transformers

    cfg = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2, o_groups=1,
        o_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=16, hc_mult=2,
        mlp_layer_types=["hash_moe", "moe", "moe"], num_nextn_predict_layers=0,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    torch.manual_seed(0)
    # weights rounded to bf16 so that the saved bf16 checkpoint is exactly this model
    return transformers.DeepseekV4ForCausalLM(cfg).to(torch.bfloat16).to(torch.float32).eval()


def part2(work: Path) -> None:
    import torch

    from kt_convert import kt_runtime
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.kt_runtime.integrations import find_expert_modules, hybrid_layers

    print("== 2. transformers DeepSeek-V4 -> AMXINT8 / AMXINT4 -> hybrid experts (kt_runtime.inject) -> generate")
    t0 = time.perf_counter()
    try:
        import transformers
    except ImportError:
        check(False, "transformers >= 5 is installed (pip install 'transformers>=5')")
        return
    model = tiny_v4_model()
    src = work / "tiny-deepseek-v4"
    model.to(torch.bfloat16).save_pretrained(src)
    model.to(torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    new, p0 = 16, prompt.shape[1]
    with torch.no_grad():
        ref_out = model.generate(prompt, max_new_tokens=new, do_sample=False)
    print(f"  transformers {transformers.__version__}: saved {src.name}; original model generates "
          f"{ref_out[0, p0:].tolist()}")
    pos = slice(p0 - 1, -1)  # the positions that predict the generated tokens
    zero = copy.deepcopy(model)
    for _, mod in find_expert_modules(zero).values():
        mod.down_proj.data.zero_()
    with torch.no_grad():
        lr = model(ref_out).logits
        lz = zero(ref_out).logits
    zerr = rel(lz, lr)
    zmatch = float((lz[0, pos].argmax(-1) == lr[0, pos].argmax(-1)).float().mean())
    print(f"  dropping the routed experts altogether: logits error {zerr:.3f}, top-1 match {zmatch:.0%}")
    for method, max_ratio in (("int8", 0.2), ("int4", 0.6)):
        out = work / f"tiny-deepseek-v4-AMX{method.upper()}"
        report = convert(ConvertOptions(input_path=str(src), output=out, quant_method=method, threadpool_count=1,
                                        progress=False))
        hybrid = copy.deepcopy(model)
        kt_runtime.inject(hybrid, out, num_gpu_experts=3, device=device)
        hs = hybrid_layers(hybrid)
        print(f"  {report.kt_method}: {report.layers_converted} layers converted and injected; "
              + placement_line(hs[1].gpu_experts, hs[1].num_experts, device, report.kt_method))
        with torch.no_grad():
            hyb_out = hybrid.generate(prompt, max_new_tokens=new, do_sample=False)
            lh = hybrid(ref_out).logits.float()
            # what the runtime should compute: the original model with the dequantized packed experts
            deq = copy.deepcopy(model)
            w = kt_runtime.load_experts(out)
            for layer, (_, mod) in find_expert_modules(deq).items():
                for e in range(w.num_experts):
                    mod.gate_up_proj[e].copy_(torch.cat([w.dequantize(layer, e, "gate"), w.dequantize(layer, e, "up")]))
                    mod.down_proj[e].copy_(w.dequantize(layer, e, "down"))
            ld = deq(ref_out).logits
        same = next((i for i in range(new) if ref_out[0, p0 + i] != hyb_out[0, p0 + i]), new)
        gap = moved = None
        if same < new:  # the same prefix up to there: the teacher-forced logits are the ones greedy decoding saw
            t = p0 - 1 + same
            gap = float(lr[0, t, ref_out[0, p0 + same]] - lr[0, t, hyb_out[0, p0 + same]])
            moved = float((lh[0, t] - lr[0, t]).abs().max())
        err, derr = rel(lh, lr), rel(lh, ld)
        match = float((lh[0, pos].argmax(-1) == lr[0, pos].argmax(-1)).float().mean())
        dmatch = float((lh[0, pos].argmax(-1) == ld[0, pos].argmax(-1)).float().mean())
        print(f"    hybrid generates {hyb_out[0, p0:].tolist()}: {same_prefix(same, new, gap, moved, method)}")
        check(hyb_out.shape == ref_out.shape and err < max_ratio * zerr,
              f"{method}: vs the original model: logits error {err:.3f} = {err / zerr:.2f} x dropping the experts "
              f"(< {max_ratio}), teacher-forced top-1 match {match:.0%}")
        check(derr < 0.25 * zerr and dmatch >= 0.8,
              f"{method}: vs the model with the dequantized packed experts (the runtime alone): logits error "
              f"{derr:.3f} = {derr / zerr:.2f} x (< 0.25), top-1 match {dmatch:.0%} (>= 80%)")
        if method == "int8":
            check(match >= 0.7, f"int8: top-1 match with the original {match:.0%} (>= 70%)")
    print(f"  part 2: {time.perf_counter() - t0:.1f} s")


def placement_line(gpu_experts: list[int], num_experts: int, device: str, kt_method: str) -> str:
    """Where each layer's experts run, said plainly on a machine without a GPU too."""
    rest = f"the other {num_experts - len(gpu_experts)} on the CPU engine (kt_kernels, {kt_method})"
    if device == "cuda":
        return f"experts {gpu_experts} of {num_experts} per layer on the GPU (bf16, torch), {rest}"
    return (f"no GPU here, so experts {gpu_experts} of {num_experts} per layer run where a GPU would run them "
            f"through torch (bf16) on the CPU; {rest}")


def same_prefix(same: int, new: int, gap: float | None = None, moved: float | None = None, method: str = "") -> str:
    """How long greedy generation stays on the original model's tokens, and why it leaves them: at the
    first token that differs, the original preferred its token by `gap` logits while the packed experts
    moved the logits by up to `moved`; every later token then continues another prefix, so the
    teacher-forced checks that follow (every position on the same tokens) are the measure."""
    if same == new:
        return f"all {new} tokens as the original model's"
    why = (f": there the original model preferred its token by only {gap:.3f} logits, and {method} moves the "
           f"logits by up to {moved:.3f} (a tiny random model's logits are nearly flat)" if gap is not None else "")
    return (f"token {same + 1} of {new} differs{why}; each later token continues another prefix, so the "
            "teacher-forced checks below, which compare every position on the same tokens, are the measure")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="keep the checkpoints and outputs here, in new folders (default: a "
                    "temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    from kt_convert.synthetic.scratch import Scratch

    with Scratch(args.workdir, "kt-demo-", keep=args.workdir is not None) as scratch:
        for name in ("v4-flash-tiny", "v4-flash-tiny-AMXINT4", "tiny-deepseek-v4", "tiny-deepseek-v4-AMXINT8",
                     "tiny-deepseek-v4-AMXINT4"):
            scratch.new(name)  # refused if there (an earlier run's: remove it, or choose another --workdir)
        part1(scratch.root)
        part2(scratch.root)
    print(f"== {'all checks passed' if not FAILED else f'{len(FAILED)} check(s) FAILED'} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
