"""`convert-cpu-weights finalize OUT`: completes an output that --shard processes wrote (what the last shard
does by itself), for a job that runs after every shard: exit 0 when the output is complete (now or
already), 2 naming the layers still missing and the shards to re-run."""
from __future__ import annotations

import os
from pathlib import Path

import click

from kt_convert.kt_runtime.format.names import MANIFEST_FILE
from kt_convert.kt_runtime.format.manifest import read_manifest

from ..errors import UserError
from ..options import OutputSpec, RunOptions
from ..output_job import OutputJob
from ..shared_output import missing_layers_message, read_splits
from ..source import open_checkpoint
from .option_types import PATH, path_problem


@click.command("finalize", short_help="Complete an output that --shard processes wrote.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("output", type=PATH)
def finalize_command(output: Path):
    """Complete OUTPUT once every shard's layers are converted (index, copied files, complete manifest).

    Idempotent: an output already complete is left as it is. The source checkpoint named in the manifest
    must be readable (its model files are copied and its fingerprint checked)."""
    out = output.expanduser().resolve()
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None:
        raise UserError(f"{out}: no kt_manifest.json; this is not a conversion output (start the shards first)")
    source = manifest.source.get("path")
    if not isinstance(source, str) or not source or path_problem(source) is not None:
        raise UserError(f"{out / MANIFEST_FILE} records no usable source path ({source!r}); finish the output by "
                        "re-running one shard's convert command (it names the source)")
    if not os.path.exists(os.path.expanduser(source)):
        raise UserError(f"the source checkpoint {source}, as recorded in {out / MANIFEST_FILE}, does not exist (moved "
                        "or deleted?): put it back at that path, or re-run one shard's convert command with its "
                        "new path, which finalizes the output too")
    run = RunOptions(input_path=source, layers=list(manifest.layers) if manifest.partial else None)
    spec = OutputSpec(output=out, quant_method=manifest.method, threadpool_count=manifest.threadpool_count,
                      merge=manifest.layout == "merged",
                      include_non_expert=bool(manifest.options.get("include_non_expert")))
    ckpt = open_checkpoint(run.input_path)
    try:
        missing = OutputJob.planned(ckpt, run, spec).finalize()
    finally:
        ckpt.close()
    if missing:
        raise UserError(missing_layers_message(out, missing, list(manifest.layers), read_splits(out)))
    click.echo(f"{out} is complete", err=True)
