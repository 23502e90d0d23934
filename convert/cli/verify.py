"""`convert-cpu-weights verify OUT [--source SRC]`: integrity of a packed output and, with the source, its
error against the source weights (convert/verify.py). Exit 0 when intact (and within --max-rel-error),
2 when damaged, not matching the source, or above the threshold."""
from __future__ import annotations

import click

from ..errors import UserError
from .conversion import layers_option
from .json_out import to_stdout, write_json
from .option_types import NON_NEGATIVE, PATH, REPORT, SOURCE
from .report_paths import check_report_paths, write_report


@click.command("verify", short_help="Check a packed output; with --source, its error against the source.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("output", type=PATH)
@click.option("--source", "-s", default=None, type=SOURCE,
              help="The checkpoint it was converted from (directory, .safetensors file or hub id): compare every "
                   "layer, expert and projection with it. Without it: integrity only (manifest, sizes, digests).")
@click.option("--max-rel-error", type=NON_NEGATIVE, default=None, metavar="X",
              help="Exit 2 when a tensor's relative RMS error exceeds X (e.g. 0.1), naming the tensors.")
@click.option("--json", "json_path", type=REPORT, default=None,
              help="Write the report as JSON here (-: standard output), every tensor's measures included.")
@click.option("--html", "html_path", type=PATH, default=None,
              help="Write a self-contained HTML page with a heat map of the error by layer x projection.")
@click.option("--layers", "layers_spec", default=None, metavar="SPEC", help="Only these layers, e.g. 0-3,7.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 4096),
              help="Threads comparing tensors (0: every core).")
@click.option("--no-digests", is_flag=True, help="Skip the sha256 of the layer files (sizes are still checked).")
def verify_command(output, source, max_rel_error, json_path, html_path, layers_spec, threads, no_digests):
    """Check a packed output: intact, and (with --source) how close to the source weights it is."""
    from ..verify import html_report, verify

    if html_path is not None and source is None:
        raise click.BadParameter("the picture needs --source (it shows the error against the source)",
                                 param_hint="--html")
    layers = layers_option(layers_spec)
    check_report_paths({"--json": json_path, "--html": html_path}, inputs=(source,) if source else (),
                       outputs=(output,))
    report = verify(output, source, layers=layers, threads=threads, max_rel_error=max_rel_error,
                    digests=not no_digests)
    click.echo(report.table(), err=to_stdout(json_path))
    if json_path is not None:
        write_json(json_path, report.to_dict(), indent=1)
    if html_path is not None:
        write_report(html_path, html_report(report))
    if not report.ok:
        raise UserError(report.exceeding_problem())
