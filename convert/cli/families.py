"""`convert-cpu-weights families` (and `--list-families`): the supported checkpoint families."""
from __future__ import annotations

import click

from quant.source_formats import SUPPORTED

from ..families import FAMILIES


def families_table() -> str:
    rows = [("family", "model_type", "expert layout", "notes")]
    rows += [(f.name, "/".join(f.model_types), f.layout, f.note) for f in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines) + f"\nsource formats: {SUPPORTED}"


@click.command("families", short_help="List the supported checkpoint families and source formats.",
               context_settings={"help_option_names": ["-h", "--help"]})
def families_command():
    """List the supported MoE checkpoint families and source formats."""
    click.echo(families_table())


def list_families_callback(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(families_table())
        ctx.exit(0)
