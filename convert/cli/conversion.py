"""The conversion command: kt-kernel's convert_cpu_weights.py flags plus our own (the group's default)."""
from __future__ import annotations

import click

from kt_convert.kt_runtime.format.methods import CHOICES, DEFAULT_GROUP_SIZE, METHODS
from kt_convert.quant.source_formats import INPUT_TYPES

from .. import __version__
from ..options import GROUP_SIZES, OutputSpec, RunOptions, default, max_cpu_threads
from ..pipeline import convert_outputs
from ..plan import parse_layer_spec
from ..timings import describe as describe_timings
from .download_options import download_kwargs, download_options
from .json_out import to_stdout, write_json
from .kt_flags import GPU_NOTE
from .option_types import PATH, REPORT, SOURCE
from .report_paths import check_report_paths
from .verbs import DefaultCommand
from .batch_options import INT_LIST, METHOD_LIST, batch_options, expand_outputs, shard_spec


def layers_option(spec: str | None) -> list[int] | None:
    """--layers SPEC (e.g. 0-3,7) as layer numbers; None: every layer."""
    if spec is None:
        return None
    try:
        return parse_layer_spec(spec)
    except ValueError as e:
        raise click.BadParameter(f"{e} (write layer numbers and ranges, e.g. 0-3,7)", param_hint="--layers") from None


KT_EPILOG = ("kt-kernel's convert_cpu_weights.py / convert_cpu_weights_ds4.py arguments work unchanged (--gpu "
             "too). Not supported, each with a message saying what to use instead: --profile, "
             "--save-backward-weights, --input-type awq, --quant-method awq|moe_int4|moe_int8.")


@click.command("convert", cls=DefaultCommand, epilog=KT_EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--input-path", "-i", required=True, type=SOURCE,
              help="Checkpoint: a directory, a .safetensors file, or a hub id ORG/NAME[@REV] from the Hugging Face cache.")
@click.option("--output", "-o", default=None, type=PATH,
              help="Output directory (or --output-template).")
@click.option("--input-type", default=default(RunOptions, "input_type"), show_default=True,
              type=click.Choice(["auto", *INPUT_TYPES]),
              help="Source expert format; auto detects it from config.json and the tensor dtypes.")
@click.option("--quant-method", default=default(OutputSpec, "quant_method"), show_default=True, type=METHOD_LIST,
              help=", ".join(f"{name} = {'SGLang-KT --kt-method ' if i == 0 else ''}"
                             f"{next(m.kt_method for m in METHODS.values() if m.choice == name)}"
                             f"{' (group-wise, --group-size)' if CHOICES[name] else ''}"
                             for i, name in enumerate(CHOICES)) + ".")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default=default(OutputSpec, "group_size"),
              help=f"K elements per scale of a group-wise method (default {DEFAULT_GROUP_SIZE}).")
@click.option("--threadpool-count", default=str(default(OutputSpec, "threadpool_count")), show_default=True,
              type=INT_LIST,
              help="NUMA thread pools the output is split for; must equal --kt-threadpool-count when serving.")
@click.option("--cpuinfer-threads", default=default(RunOptions, "cpuinfer_threads"), show_default=True, type=int,
              help=f"CPU threads for packing (0: all cores; at most {max_cpu_threads()} here).")
@click.option("--no-merge-safetensor", "no_merge", is_flag=True,
              help="Write kt's _layer_L/_numa_t/*.kt folders instead of one safetensors shard per layer.")
@click.option("--kt-sft-manifest", is_flag=True,
              help="With --quant-method int8 --no-merge-safetensor: also write kt-weight-manifest.json, which "
                   "kt-kernel's SFT path requires; this converter's own files then go to OUTPUT.kt-convert.")
@click.option("--resume-layer", type=int, default=default(OutputSpec, "resume_layer"), metavar="L",
              help="Not needed here: completed layers are resumed automatically. On an output of kt's own script "
                   "(with --no-merge-safetensor), keeps its layers before L if they match a fresh conversion.")
@click.option("--device", default=default(RunOptions, "device"), show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to dequantize and pack (the same bytes): auto packs on the GPU only where this machine's "
                   "cores cannot keep up with its disk, and the first lines say why.")
@click.option("--gpu", "legacy_gpu", is_flag=True, hidden=True, help="kt compatibility: same as --device auto.")
@click.option("--include-non-expert", is_flag=True, help="Also copy the non-expert tensors into a last shard (as kt does).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output made with other settings.")
@click.option("--layers", "layers_spec", default=None, metavar="SPEC",
              help="Convert only these MoE layers, e.g. 0-3,7; the output is marked partial (default: every MoE layer).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Pack NaN/Inf source weights as 0 instead of stopping (listed at the end and in kt_manifest.json).")
@click.option("--json", "json_path", type=REPORT, default=None,
              help="Write the final report (with --dry-run: the plan) as JSON here (-: standard output).")
@click.option("--progress/--no-progress", default=default(RunOptions, "progress"),
              help="Progress bar (default: on a terminal only).")
@click.option("--timings", "show_timings", is_flag=True,
              help="Print where the time went, stage by stage (always in the --json report).")
@batch_options
@download_options
@click.version_option(__version__, prog_name="convert-cpu-weights")
def convert_command(input_path, output, input_type, quant_method, group_size, threadpool_count, cpuinfer_threads, no_merge,
        kt_sft_manifest, resume_layer,
        device, legacy_gpu, include_non_expert, overwrite, layers_spec, allow_nonfinite, json_path, progress,
        show_timings, output_template, job_file, shard_flag, shard_count, **hub):
    """Convert the routed experts of a MoE checkpoint into kt-kernel AMXINT4/AMXINT8/RAWINT4 CPU weights.

    \b
      convert-cpu-weights -i /models/DeepSeek-V4-Flash -o /models/V4-Flash-AMXINT4 --threadpool-count 2

    The family (DeepSeek-V4/V4.1/V3/R1, Kimi-K2/K3, GLM-4.5+/5, Qwen2/3-MoE, Qwen3.5, Qwen3.8-Next,
    Mixtral, MiniMax, gpt-oss; `families` lists them) and the source format (MXFP4, NVFP4, MXFP8, FP8,
    BF16, FP16, INT4) are detected; the first lines of the run say what was found. The output loads
    unchanged in SGLang-KT (--kt-method AMXINT4|AMXINT8|RAWINT4 --kt-weight-path OUTPUT
    --kt-threadpool-count T) and in kt_runtime.load_experts. Re-running the same command resumes.
    """
    if legacy_gpu:
        click.echo(GPU_NOTE, err=True)
    layers = layers_option(layers_spec)
    outputs = expand_outputs(output, output_template, quant_method, threadpool_count, job_file, dict(
        group_size=None if group_size is None else int(group_size), merge=not no_merge,
        include_non_expert=include_non_expert, kt_sft_manifest=kt_sft_manifest, overwrite=overwrite,
        resume_layer=resume_layer))
    check_report_paths({"--json": json_path}, inputs=(input_path,), outputs=[spec.output for spec in outputs],
                       kt_tree=any(spec.kt_sft_manifest for spec in outputs), user_files={"the job file": job_file})
    shard = shard_spec(shard_flag, shard_count)
    run = RunOptions(input_path=input_path, input_type=input_type, cpuinfer_threads=cpuinfer_threads, device=device,
                     allow_nonfinite=allow_nonfinite, progress=progress, layers=layers, **download_kwargs(**hub))
    if run.dry_run:  # the plan of each output: as text, or as JSON objects with --json
        from ..dry_run import plan_summary

        plans = [plan_summary(run, spec) for spec in outputs]
        for plan in plans:
            click.echo(plan.text(), err=to_stdout(json_path))
        if json_path is not None:
            write_json(json_path, plans[0].to_dict() if len(plans) == 1 else [p.to_dict() for p in plans])
        return
    reports = convert_outputs(run, outputs, shard)
    for report in reports:
        click.echo(report.summary(), err=True)
    if show_timings:  # one run: the stages are shared by its outputs
        click.echo(describe_timings(reports[0].timings, reports[0].seconds), err=True)
    report = reports[0]  # every output packs the same source values
    if report.nonfinite:
        click.echo(report.nonfinite_warning(), err=True)
    if json_path is not None:  # one output: its report; several: a list of them
        write_json(json_path, report.to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
