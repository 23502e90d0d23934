"""The conversion command's batch options: several outputs from one read (--output-template with comma
lists of --quant-method and --threadpool-count, or --job-file) and array jobs (--shard, --shard-count)."""
from __future__ import annotations

import os
import re
import string
from pathlib import Path

import click

from kt_runtime.format import files
from kt_runtime.format.methods import CHOICES, method_for

from ..errors import UserError
from ..shards import ShardSpec, resolve_shard
from .option_types import PATH, user_path

TEMPLATE_FIELDS = ("method", "kt_method", "threadpool_count")
FORMAT_SPEC = re.compile(r"^((.?[<>=^])?0?\d{0,2}[sd]?)?$")  # a field's format: fill, alignment, width < 100
JOB_FILE_MAX_BYTES = 1 << 20


class CommaList(click.ParamType):
    """A comma-separated list of `item` values (a single value is a list of one), without repeats."""

    def __init__(self, item: click.ParamType, name: str):
        self.item, self.name = item, name
        self.choices = getattr(item, "choices", None)  # a list of choices still names them (help, tests)

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if not all(parts):
            self.fail(f"{value!r}: an empty item in the list", param, ctx)
        items = [self.item.convert(p, param, ctx) for p in parts]
        if len(set(items)) != len(items):
            self.fail(f"{value!r} names a value twice", param, ctx)
        return items

    def get_metavar(self, param, ctx=None):
        return f"{self.name}[,{self.name}...]"


METHOD_LIST = CommaList(click.Choice(list(CHOICES)), "|".join(CHOICES))
INT_LIST = CommaList(click.INT, "N")


def batch_options(command):
    for option in reversed([
        click.option("--output-template", default=None, metavar="TEMPLATE",
                     help="One output per --quant-method x --threadpool-count (comma lists), all from one read "
                          "of the source: e.g. 'out/{method}-T{threadpool_count}' (also {kt_method}). "
                          "Instead of --output."),
        click.option("--job-file", type=PATH, default=None,
                     help="A JSON file listing the outputs, all from one read of the source: {\"outputs\": "
                          "[{\"output\": DIR, \"quant_method\": \"int4\", \"threadpool_count\": 2}, ...]}. "
                          "Instead of --output."),
        click.option("--shard", "shard_flag", default=None, metavar="I/N",
                     help="Convert shard I of N (I from 1: --shard 1/2, --shard 2/2) of the layers into the shared "
                          "output beside the other shards' processes; the last to finish completes the output. "
                          "Default: from SLURM_ARRAY_TASK_ID/_MIN/_COUNT or JOB_COMPLETION_INDEX (with --shard-count)."),
        click.option("--shard-count", type=click.IntRange(min=1), default=None,
                     help="The shard count of a Kubernetes Indexed Job (its completions): the index comes "
                          "from JOB_COMPLETION_INDEX."),
    ]):
        command = option(command)
    return command


def read_job_file(path: Path) -> list[tuple[Path, str, int]]:
    """The outputs a job file lists (relative output paths are relative to the job file's folder)."""
    try:
        d = files.read_json(path, files.USER, what="job file", max_bytes=JOB_FILE_MAX_BYTES)
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist", param_hint="--job-file") from None
    outputs = d.get("outputs") if isinstance(d, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise UserError(f"{path}: expected {{\"outputs\": [{{\"output\": DIR, \"quant_method\": ..., "
                        "\"threadpool_count\": ...}, ...]}")
    found = []
    for i, o in enumerate(outputs):
        where = f"{path}: outputs[{i}]"
        if not isinstance(o, dict) or set(o) - {"output", "quant_method", "threadpool_count"}:
            raise UserError(f"{where}: an object with output, quant_method and threadpool_count only")
        out, method, count = o.get("output"), o.get("quant_method", "int4"), o.get("threadpool_count", 2)
        if not isinstance(out, str) or not out:
            raise UserError(f"{where}: output must be a directory path")
        try:
            out_path = user_path(out)
        except ValueError as e:
            raise UserError(f"{where}: output {out!r} {e}") from None
        if method not in CHOICES:
            raise UserError(f"{where}: quant_method {method!r} is not one of {', '.join(CHOICES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise UserError(f"{where}: threadpool_count must be a positive integer, got {count!r}")
        found.append((path.parent / out_path, method, count))
    return found


def expand_outputs(output: Path | None, template: str | None, methods: list[str],
                   counts: list[int], job_file: Path | None = None) -> list[tuple[Path, str, int]]:
    """(output directory, method, threadpool count) of every output the command line asks for."""
    if sum(x is not None for x in (output, template, job_file)) != 1:
        raise click.UsageError("pass either --output (one output), --output-template (one per method and "
                               "threadpool count) or --job-file")
    if job_file is not None:
        return read_job_file(job_file)
    if output is not None:
        if len(methods) > 1 or len(counts) > 1:
            raise click.UsageError("several --quant-method or --threadpool-count values make several outputs: "
                                   "name them with --output-template, e.g. 'out/{method}-T{threadpool_count}'")
        return [(output, methods[0], counts[0])]
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise click.BadParameter(f"{template!r}: {e}", param_hint="--output-template") from None
    unknown = sorted(used - set(TEMPLATE_FIELDS))
    if unknown:
        raise click.BadParameter(f"{template!r}: unknown field {{{unknown[0]}}}; the fields are "
                                 + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS), param_hint="--output-template")
    for _, f, spec, conversion in string.Formatter().parse(template):
        if f is not None and (conversion is not None or not FORMAT_SPEC.match(spec or "")):
            raise click.BadParameter(f"{template!r}: {{{f}}} may take a short width (e.g. {{{f}:>3}}), nothing "
                                     "else", param_hint="--output-template")
    outs = []
    for method in methods:
        for count in counts:
            try:
                path = user_path(template.format(method=method, kt_method=method_for(method).kt_method,
                                                 threadpool_count=count))
            except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError) as e:
                raise click.BadParameter(f"{template!r}: {e}", param_hint="--output-template") from None
            outs.append((path, method, count))
    if len({p for p, _, _ in outs}) != len(outs):
        raise click.BadParameter(f"{template!r} gives several outputs the same directory: use "
                                 + " and ".join(f"{{{f}}}" for f, vals in (("method", methods),
                                                                           ("threadpool_count", counts))
                                                if len(vals) > 1), param_hint="--output-template")
    return outs


def shard_spec(flag: str | None, shard_count: int | None) -> ShardSpec | None:
    return resolve_shard(flag, shard_count, os.environ)  # a UserError names the flag or variable: exit 2
