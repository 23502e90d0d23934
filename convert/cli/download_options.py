"""The conversion command's options for hub inputs and planning: --download, --max-source-disk,
--delete-source-after-use, --dry-run, --list-families (applied to the command by `download_options`)."""
from __future__ import annotations

import click

from ..options import RunOptions, default
from .families import list_families_callback
from .option_types import POSITIVE


def download_options(command):
    options = [
        click.option("--download", is_flag=True,
                     help="With -i ORG/NAME[@REV]: fetch the shards that hold routed experts through huggingface_hub "
                          "(HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE apply) and convert each layer as soon as its shards "
                          "are present. Re-running resumes downloads and layers."),
        click.option("--max-source-disk", type=POSITIVE, default=None, metavar="GB",
                     help="With --download: at most this many GB of downloaded shards on disk at once (implies "
                          "--delete-source-after-use); refused early if a layer needs more."),
        click.option("--delete-source-after-use", is_flag=True,
                     help="With --download: remove each shard this run downloaded from the cache once every layer "
                          "reading it is converted (files already in the cache are never removed)."),
        click.option("--download-workers", type=click.IntRange(1, 64), default=default(RunOptions, "download_workers"),
                     show_default=True,
                     help="With --download: shards downloaded at once (in layer order, within the disk cap)."),
        click.option("--dry-run", is_flag=True,
                     help="Print the plan (family, format, layers, sizes, peak memory and disk, files to download) "
                          "and exit without writing anything."),
        click.option("--list-families", is_flag=True, expose_value=False, is_eager=True,
                     callback=list_families_callback, help="List the supported checkpoint families and exit."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def download_kwargs(download, max_source_disk, delete_source_after_use, download_workers, dry_run) -> dict:
    """RunOptions fields from the options (GB -> bytes)."""
    if max_source_disk is not None and max_source_disk <= 0:
        raise click.BadParameter("must be a positive number of GB", param_hint="--max-source-disk")
    if (max_source_disk is not None or delete_source_after_use) and not download:
        raise click.BadParameter("applies only with --download", param_hint="--max-source-disk/--delete-source-after-use")
    return dict(download=download, dry_run=dry_run, delete_source_after_use=delete_source_after_use,
                download_workers=download_workers,
                max_source_disk=None if max_source_disk is None else int(max_source_disk * 1e9))
