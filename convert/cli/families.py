"""`convert-cpu-weights families` (and `--list-families`): the supported checkpoint families."""
from __future__ import annotations

import click

from kt_convert.quant.source_formats import SOURCE_FORMATS, SUPPORTED

from ..families import FAMILIES
from .json_out import write_json
from .option_types import REPORT
from .report_paths import check_report_paths


def families_table() -> str:
    rows = [("family", "model_type", "expert arrangement", "notes")]
    rows += [(f.name, "/".join(f.model_types), f.arrangement, f.note) for f in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines) + f"\nsource formats: {SUPPORTED}"


@click.command("families", short_help="List the supported checkpoint families and source formats.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "json_path", type=REPORT, default=None,
              help="Write the list as JSON here (-: standard output) instead of the table.")
def families_command(json_path):
    """List the supported MoE checkpoint families and source formats."""
    if json_path is None:
        click.echo(families_table())
    else:
        check_report_paths({"--json": json_path})
        write_json(json_path, families_document())


def families_document() -> dict:
    """The --json document ("layout": a family's arrangement, the key this document has always used)."""
    return {"families": [{"name": f.name, "model_types": list(f.model_types), "layout": f.arrangement,
                          "note": f.note} for f in FAMILIES],
            "source_formats": [{"input_type": f.input_type, "kind": f.kind, "description": f.description}
                               for f in SOURCE_FORMATS.values() if f.input_type]}


def list_families_callback(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(families_table())
        ctx.exit(0)
