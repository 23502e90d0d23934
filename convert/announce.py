"""The first lines of a run: what was detected (family, source format, layers, experts) and what
will be written, before any weight is read, so a wrong guess is seen at once, not at the end."""
from __future__ import annotations

from pathlib import Path

from kt_convert.kt_runtime.format.kt_sft_manifest import KT_BYTE_ORDER
from kt_convert.kt_runtime.format.methods import working_threadpool_counts
from kt_convert.kt_runtime.format.names import KT_SFT_MANIFEST_FILE
from kt_convert.quant.source_formats import SOURCE_FORMATS

from .units import plural

_FORMAT_NAMES = {f.input_type: f.description for f in SOURCE_FORMATS.values() if f.input_type}
# the kt methods whose wrapper takes a SwiGLU clamp: kt-kernel 95009ea experts.py raises for any other method
# with swiglu_limit != 0, and for every method in its SFT mode
KT_CLAMP_METHODS = ("MXFP4", "MXFP8")


def layer_ranges(layers) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7' (the --layers syntax)."""
    out, run = [], []
    for layer in sorted(layers):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def clamp_note(plan, kt_sft: bool = False) -> str | None:
    """Which runtimes apply the SwiGLU clamp of a clamped model (GLM-5.3-Flash, DeepSeek-V4, gpt-oss) to this
    output; None for a model without one."""
    if plan.swiglu_limit is None:
        return None
    limit = f"{plan.swiglu_limit:g}"
    return (f"note: this model clamps its SwiGLU (swiglu_limit {limit}: gate <= {limit}, |up| <= {limit}), recorded "
            f"in kt_manifest.json and applied by kt_runtime (CPUMoE, HybridMoE); kt-kernel 95009ea takes a clamp only "
            f"with --kt-method {' or '.join(KT_CLAMP_METHODS)} and refuses it with {plan.method.kt_method}: serve "
            "this output with kt_runtime, or the checkpoint's own experts with a kt method that takes the clamp"
            + ("; kt-kernel's SFT mode takes no clamp with any method" if kt_sft else ""))


def plan_lines(plan, source: Path, out: Path, device: str, records: Path | None = None,
               default_group: bool = False, reason: str = "") -> list[str]:
    """plan: convert.plan.ConversionPlan. records: where this converter's files go when that is not `out`
    (--kt-sft-manifest); default_group: a group-wise method's group size is the default; reason: why
    --device auto chose the device (convert.device_choice)."""
    fmt = _FORMAT_NAMES.get(plan.input_type, plan.input_type)
    layers = [lp.layer for lp in plan.layers]
    scope = (f"{plural(len(layers), 'MoE layer')} ({layer_ranges(layers)})" if not plan.partial else
             f"{plural(len(layers), 'MoE layer')} ({layer_ranges(layers)}) of the model's {len(plan.model_layers)}")
    lines = []
    if plan.family_note:
        lines.append(f"note: {plan.family_note}")
    lines.append(f"source: {source}: family {plan.family}, {fmt} routed experts")
    lines.append(f"model: {scope}, {plural(plan.num_experts, 'expert')} each (top-{plan.num_experts_per_tok}), "
                 f"hidden {plan.hidden_size}, expert intermediate {plan.moe_intermediate_size}"
                 + (f"; {plan.skipped_mtp_keys} MTP expert tensors skipped (not routed experts of the main model)" if plan.skipped_mtp_keys else ""))
    layout = "one safetensors shard per layer" if plan.layout == "merged" else "kt's _layer_L/_numa_T .kt folders"
    lines += _output_lines(plan, out, device + (f" ({reason})" if reason else ""), layout, default_group)
    if records is not None:
        lines.append(kt_sft_line(out, records))
    note = clamp_note(plan, records is not None)
    if note:
        lines.append(note)
    return lines


def _output_lines(plan, out: Path, device: str, layout: str, default_group: bool) -> list[str]:
    """What will be written: the method and its NUMA pools, or, for a whole-matrix (group-wise) method, its
    group size and the pool counts it serves."""
    method = plan.method
    if method.byte_order.numa_split:
        return [f"output: {method.kt_method} for {plural(plan.threadpool_count, 'NUMA pool')} "
                f"(--kt-threadpool-count {plan.threadpool_count}), {layout}, packed on the {device} -> {out}"]
    serve = plan.serve_threadpool_count or plan.threadpool_count
    others = [t for t in working_threadpool_counts(method, plan.hidden_size, plan.moe_intermediate_size) if t != serve]
    why = " (the default: every kt-kernel RAWINT4 kernel computes it)" if default_group else ""
    return [f"output: {method.kt_method} group size {method.group_size}{why}, {layout}, packed on the {device} -> {out}",
            f"output: no NUMA split: kt splits the whole matrices per pool when it loads them, so these files "
            f"serve any pool count; serve with --kt-threadpool-count {serve} (checked"
            + (f"; {', '.join(map(str, others))} {'also work' if len(others) > 1 else 'also works'}" if others else "")
            + ")"]


def kt_sft_line(out: Path, records: Path) -> str:
    return (f"kt-kernel SFT: {out}/{KT_SFT_MANIFEST_FILE} (schema 2, layout {KT_BYTE_ORDER}) is written once every "
            f"layer is; this converter's manifest and records go to {records}")


def resume_line(done: list[int], total: int) -> str | None:
    if not done:
        return None
    if len(done) == total:
        return f"already complete: {plural(total, 'layer')} converted by an earlier run ({layer_ranges(done)})"
    return (f"resuming: {len(done)} of {plural(total, 'layer')} already done ({layer_ranges(done)}); "
            f"converting the other {total - len(done)}")
