"""--dry-run: the plan of a conversion, printed, nothing written (for a hub input the small files are
fetched into a temporary cache and the shard headers read with range requests)."""
from __future__ import annotations

from kt_runtime.format.methods import working_threadpool_counts

from kt_runtime.format.layout import state_dir

from . import preflight
from .announce import clamp_note, kt_sft_line
from .pipeline import ConvertOptions, experts_per_batch, open_source, plan_conversion
from .plan import layer_spec


def describe_plan(opts: ConvertOptions) -> str:
    ckpt, downloads = open_source(opts, note=lambda m: None)
    try:
        plan, non_expert = plan_conversion(ckpt, opts)
        est = preflight.estimate(plan, plan.layers, experts_per_batch(plan), opts.cpuinfer_threads,
                                 preflight.non_expert_bytes(ckpt, non_expert))
        source = "hub " + downloads.repo.spec if downloads is not None else str(ckpt.root)
        lines = [
            f"dry run: nothing is written",
            f"source        {source}",
            f"family        {plan.family}",
            f"source format {plan.input_type}",
            f"layers        {len(plan.layers)} MoE layers ({layer_spec([lp.layer for lp in plan.layers])})"
            + (f" of the model's {len(plan.model_layers)}" if plan.partial else ""),
            f"MTP           {plan.skipped_mtp_keys} expert tensors skipped"
            + (f" (layers {', '.join(map(str, plan.skipped_mtp_layers))})" if plan.skipped_mtp_layers else ""),
            f"experts       {plan.num_experts} per layer, {plan.num_experts_per_tok} per token",
            f"H / I         {plan.hidden_size} / {plan.moe_intermediate_size}",
            f"output        {plan.method.name} ({plan.method.kt_method}), threadpool count T={plan.threadpool_count}, "
            f"{plan.layout}",
            f"T that work   {', '.join(map(str, working_threadpool_counts(plan.method, plan.hidden_size, plan.moe_intermediate_size)))}",
            f"input         {plan.input_bytes / 1e9:.3f} GB of routed experts",
            f"output        {est.output_bytes / 1e9:.3f} GB",
            f"peak memory   about {est.peak_memory_bytes / 2**20:.0f} MiB",
            f"peak disk     {est.disk_bytes / 1e9:.3f} GB for the output",
        ]
        if opts.kt_sft_manifest:
            lines.append(kt_sft_line(opts.output, state_dir(opts.output)))
        note = clamp_note(plan, opts.kt_sft_manifest)
        if note:
            lines.append(note)
        if downloads is not None and ckpt.gate is not None:
            gate = ckpt.gate
            layer_files = ckpt.layer_files(plan.layers)
            gate.check_cap(layer_files)
            src = gate.peak_source_bytes(layer_files)
            lines.append(f"peak source   {src / 1e9:.3f} GB of downloaded shards in the cache"
                         + (" (removed after use)" if gate.delete_after_use else ""))
            lines.append(downloads.describe())
        return "\n".join(lines)
    finally:
        ckpt.close()
