"""The first lines of a run: what was detected (family, source format, layers, experts) and what
will be written, before any weight is read, so a wrong guess is seen at once, not at the end."""
from __future__ import annotations

from pathlib import Path

from quant.source_formats import SOURCE_FORMATS

from .units import plural

_FORMAT_NAMES = {f.input_type: f.description for f in SOURCE_FORMATS.values() if f.input_type}


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


def plan_lines(plan, source: Path, out: Path, device: str, reason: str = "") -> list[str]:
    """plan: convert.plan.ConversionPlan; reason: why --device auto chose the device (convert.device_choice)."""
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
    lines.append(f"output: {plan.method.kt_method} for {plural(plan.threadpool_count, 'NUMA pool')} "
                 f"(--kt-threadpool-count {plan.threadpool_count}), {layout}, packed on the {device}"
                 + (f" ({reason})" if reason else "") + f" -> {out}")
    return lines


def resume_line(done: list[int], total: int) -> str | None:
    if not done:
        return None
    if len(done) == total:
        return f"already complete: {plural(total, 'layer')} converted by an earlier run ({layer_ranges(done)})"
    return (f"resuming: {len(done)} of {plural(total, 'layer')} already done ({layer_ranges(done)}); "
            f"converting the other {total - len(done)}")
