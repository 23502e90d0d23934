"""`convert-cpu-weights finalize OUT`: completes an output that --shard processes wrote (what the last shard
does by itself), for a job that runs after every shard: exit 0 when the output is complete (now or
already), 2 naming the layers still missing and the shards to re-run."""
from __future__ import annotations

from pathlib import Path

import click

from kt_runtime.format.errors import ManifestError
from kt_runtime.format.manifest import read_manifest

from ..errors import UserError
from ..pipeline import ConvertOptions, finalize_shared, plan_output
from ..shared_output import missing_layers_message, read_splits
from ..source import open_checkpoint


@click.command("finalize", short_help="Complete an output that --shard processes wrote.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
def finalize_command(output: Path):
    """Complete OUTPUT once every shard's layers are converted (index, copied files, complete manifest).

    Idempotent: an output already complete is left as it is. The source checkpoint named in the manifest
    must be readable (its model files are copied and its fingerprint checked)."""
    out = output.expanduser().resolve()
    try:
        manifest = read_manifest(out) if out.is_dir() else None
    except ManifestError as e:
        raise UserError(str(e)) from None
    if manifest is None:
        raise UserError(f"{out}: no kt_manifest.json; this is not a conversion output (start the shards first)")
    opts = ConvertOptions(input_path=str(manifest.source.get("path", "")), output=out, quant_method=manifest.method,
                          threadpool_count=manifest.threadpool_count, merge=manifest.layout == "merged",
                          include_non_expert=bool(manifest.options.get("include_non_expert")),
                          layers=list(manifest.layers) if manifest.partial else None)
    ckpt = open_checkpoint(opts.input_path)
    try:
        job = plan_output(ckpt, opts)
        job.out = out
        missing = finalize_shared(ckpt, job)
    finally:
        ckpt.close()
    if missing:
        raise UserError(missing_layers_message(out, missing, list(manifest.layers), read_splits(out)))
    click.echo(f"{out} is complete", err=True)
