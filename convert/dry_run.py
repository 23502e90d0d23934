"""--dry-run: the plan of a conversion, printed (or as a JSON object), nothing written (for a hub input
the small files are fetched into a temporary cache and the shard headers read with range requests)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kt_convert.kt_runtime.format.names import state_dir
from kt_convert.kt_runtime.format.methods import working_threadpool_counts

from . import preflight
from .announce import clamp_note, kt_sft_line
from .layer_pack import experts_per_batch
from .options import OutputSpec, RunOptions
from .output_job import plan_output
from .pipeline import open_source
from .plan import layer_spec
from .units import memory, size


@dataclass
class PlanSummary:
    """What a conversion would do: the source, the model as found, the output, the bytes."""

    source: str
    family: str
    source_format: str
    layers: list[int]  # the MoE layers to convert
    model_layers: list[int]  # every MoE layer of the model
    partial: bool
    mtp_tensors_skipped: int
    mtp_layers: list[str]
    num_experts: int
    num_experts_per_tok: int
    hidden_size: int
    moe_intermediate_size: int
    method: str
    kt_method: str
    threadpool_count: int
    layout: str
    working_threadpool_counts: list[int]
    input_bytes: int
    output_bytes: int
    peak_memory_bytes: int
    peak_disk_bytes: int
    peak_source_bytes: int | None = None  # --download: downloaded shards in the cache at once
    delete_source_after_use: bool = False
    download: dict | None = None  # --download: convert.download.DownloadPlan.to_dict()
    download_text: str = ""
    notes: list[str] = field(default_factory=list)  # what the output means for kt's runtimes (SFT folder, clamp)

    def to_dict(self) -> dict:
        d = {"dry_run": True, **asdict(self)}
        del d["download_text"]
        return d

    def text(self) -> str:
        lines = [
            "dry run: nothing is written",
            f"source        {self.source}",
            f"family        {self.family}",
            f"source format {self.source_format}",
            f"layers        {len(self.layers)} MoE layers ({layer_spec(self.layers)})"
            + (f" of the model's {len(self.model_layers)}" if self.partial else ""),
            f"MTP           {self.mtp_tensors_skipped} expert tensors skipped"
            + (f" (layers {', '.join(self.mtp_layers)})" if self.mtp_layers else ""),
            f"experts       {self.num_experts} per layer, {self.num_experts_per_tok} per token",
            f"H / I         {self.hidden_size} / {self.moe_intermediate_size}",
            f"output        {self.method} ({self.kt_method}), threadpool count T={self.threadpool_count}, {self.layout}",
            f"T that work   {', '.join(map(str, self.working_threadpool_counts))}",
            f"input         {size(self.input_bytes)} of routed experts",
            f"output        {size(self.output_bytes)}",
            f"peak memory   about {memory(self.peak_memory_bytes)}",
            f"peak disk     {size(self.peak_disk_bytes)} for the output",
        ]
        lines += self.notes
        if self.peak_source_bytes is not None:
            lines.append(f"peak source   {size(self.peak_source_bytes)} of downloaded shards in the cache"
                         + (" (removed after use)" if self.delete_source_after_use else ""))
        if self.download_text:
            lines.append(self.download_text)
        return "\n".join(lines)


def plan_summary(run: RunOptions, spec: OutputSpec) -> PlanSummary:
    ckpt, downloads = open_source(run, spec.include_non_expert, note=lambda m: None)
    try:
        plan, non_expert = plan_output(ckpt, run, spec)
        est = preflight.estimate(plan, plan.layers, experts_per_batch(plan), run.cpuinfer_threads,
                                 preflight.non_expert_bytes(ckpt, non_expert))
        layer_files = ckpt.layer_files(plan.layers)
        ckpt.gate.check_cap(layer_files)
        summary = PlanSummary(
            source="hub " + downloads.repo.spec if downloads is not None else str(ckpt.root),
            family=plan.family, source_format=plan.input_type, layers=[lp.layer for lp in plan.layers],
            model_layers=list(plan.model_layers), partial=plan.partial, mtp_tensors_skipped=plan.skipped_mtp_keys,
            mtp_layers=list(plan.skipped_mtp_layers), num_experts=plan.num_experts,
            num_experts_per_tok=plan.num_experts_per_tok, hidden_size=plan.hidden_size,
            moe_intermediate_size=plan.moe_intermediate_size, method=plan.method.name,
            kt_method=plan.method.kt_method, threadpool_count=plan.threadpool_count, layout=plan.layout,
            working_threadpool_counts=working_threadpool_counts(plan.method, plan.hidden_size,
                                                                plan.moe_intermediate_size),
            input_bytes=plan.input_bytes, output_bytes=est.output_bytes, peak_memory_bytes=est.peak_memory_bytes,
            peak_disk_bytes=est.disk_bytes, **ckpt.gate.plan_facts(layer_files))
        if spec.kt_sft_manifest:
            summary.notes.append(kt_sft_line(spec.output, state_dir(spec.output)))
        note = clamp_note(plan, spec.kt_sft_manifest)
        if note:
            summary.notes.append(note)
        return summary
    finally:
        ckpt.close()
