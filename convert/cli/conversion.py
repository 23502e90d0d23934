"""The conversion command: kt-kernel's convert_cpu_weights.py flags plus our own (the group's default)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from kt_runtime.format.fsio import atomic_write_text
from kt_runtime.format.methods import CHOICES, DEFAULT_GROUP_SIZE, METHODS
from quant.source_formats import INPUT_TYPES

from .. import __version__
from ..pipeline import ConvertOptions, convert, max_cpu_threads
from ..plan import parse_layer_spec


@click.command("convert", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--input-path", "-i", required=True,
              help="Checkpoint: a directory, a .safetensors file, or a hub id ORG/NAME[@REV] from the Hugging Face cache.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--input-type", default="auto", show_default=True,
              type=click.Choice(["auto", *INPUT_TYPES]),
              help="Source expert format; auto detects it from config.json and the tensor dtypes.")
@click.option("--quant-method", default="int4", show_default=True, type=click.Choice(list(CHOICES)),
              help=", ".join(f"{name} = {'SGLang-KT --kt-method ' if i == 0 else ''}"
                             f"{next(m.kt_method for m in METHODS.values() if m.choice == name)}"
                             f"{' (group-wise, --group-size)' if CHOICES[name] else ''}"
                             for i, name in enumerate(CHOICES)) + ".")
@click.option("--group-size", type=click.Choice(sorted({str(g) for gs in CHOICES.values() for g in gs}, key=int)),
              default=None, help=f"K elements per scale of a group-wise method (default {DEFAULT_GROUP_SIZE}).")
@click.option("--threadpool-count", default=2, show_default=True, type=int,
              help="NUMA thread pools the output is split for; must equal --kt-threadpool-count when serving.")
@click.option("--cpuinfer-threads", default=0, show_default=True, type=int,
              help=f"CPU threads for packing (0: all cores; at most {max_cpu_threads()} here).")
@click.option("--no-merge-safetensor", "no_merge", is_flag=True,
              help="Write kt's _layer_L/_numa_t/*.kt folders instead of one safetensors shard per layer.")
@click.option("--resume-layer", type=int, default=None,
              help="Accepted for kt compatibility; completed layers are resumed automatically.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to dequantize and pack.")
@click.option("--gpu", "legacy_gpu", is_flag=True, hidden=True, help="kt compatibility: same as --device auto.")
@click.option("--include-non-expert", is_flag=True, help="Also copy the non-expert tensors into a last shard (as kt does).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output made with other settings.")
@click.option("--layers", "layers_spec", default=None, metavar="SPEC",
              help="Convert only these MoE layers, e.g. 0-3,7; the output is marked partial (default: every MoE layer).")
@click.option("--allow-nonfinite", is_flag=True, help="Pack NaN/Inf source weights as 0 instead of stopping (listed in the report).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, allow_dash=True), default=None,
              help="Write the final report as JSON here (-: standard output).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal only).")
@click.version_option(__version__, prog_name="convert-cpu-weights")
def convert_command(input_path, output, input_type, quant_method, group_size, threadpool_count, cpuinfer_threads, no_merge, resume_layer,
        device, legacy_gpu, include_non_expert, overwrite, layers_spec, allow_nonfinite, json_path, progress):
    """Convert the routed experts of a MoE checkpoint into kt-kernel AMXINT4/AMXINT8 CPU weights.

    The output loads unchanged in SGLang-KT (--kt-method AMXINT4|AMXINT8 --kt-weight-path OUTPUT
    --kt-threadpool-count T) and in kt_runtime.load_experts. Re-running the same command resumes.
    """
    layers = None
    if layers_spec is not None:
        try:
            layers = parse_layer_spec(layers_spec)
        except ValueError as e:
            raise click.BadParameter(f"{e} (write layer numbers and ranges, e.g. 0-3,7)", param_hint="--layers")
    opts = ConvertOptions(input_path=input_path, output=output, input_type=input_type, quant_method=quant_method,
                          group_size=None if group_size is None else int(group_size),
                          threadpool_count=threadpool_count, cpuinfer_threads=cpuinfer_threads, merge=not no_merge,
                          device=device, include_non_expert=include_non_expert, overwrite=overwrite,
                          allow_nonfinite=allow_nonfinite, progress=progress, resume_layer=resume_layer, layers=layers)
    report = convert(opts)
    click.echo(report.summary(), err=True)
    if report.nonfinite:
        click.echo(f"warning: {sum(report.nonfinite.values())} NaN/Inf source values packed as 0 "
                   f"in {len(report.nonfinite)} tensors (see the JSON report)", err=True)
    if json_path is not None:
        text = json.dumps(report.to_dict(), indent=2) + "\n"
        if str(json_path) == "-":
            click.echo(text, nl=False)
        else:  # a new file renamed into place: never written through a link
            atomic_write_text(Path(json_path), text)
