"""--json PATH of every command: the document to a file (a new file renamed into place, never written
through a link) or, for `-`, to standard output (the command's words then go to standard error). The
command checks the path first (report_paths.check_report_paths)."""
from __future__ import annotations

import json
import click

from .report_paths import write_report


def to_stdout(path) -> bool:
    return path is not None and str(path) == "-"


def write_json(path, body, indent: int = 2) -> None:
    text = json.dumps(body, indent=indent) + "\n"
    if to_stdout(path):
        click.echo(text, nl=False)
    else:
        write_report(path, text)
