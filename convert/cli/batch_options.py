"""The conversion command's batch options: several outputs from one read (--output-template with comma
lists of --quant-method and --threadpool-count, or --job-file) and array jobs (--shard, --shard-count).
Every output is an OutputSpec (convert.options): the command line's per-output options, then what the
template or the job file's entry sets."""
from __future__ import annotations

import os
import re
import string
from pathlib import Path

import click

from kt_convert.kt_runtime.format import files
from kt_convert.kt_runtime.format.errors import FixableError
from kt_convert.kt_runtime.format.methods import CHOICES, method_for

from ..errors import UserError
from ..options import OUTPUT_FIELDS, OutputSpec, field_problem
from ..shards import ShardSpec, resolve_shard
from .option_types import PATH, user_path

TEMPLATE_FIELDS = ("method", "kt_method", "threadpool_count")
FORMAT_SPEC = re.compile(r"^((.?[<>=^])?0?\d{0,2}[sd]?)?$")  # a field's format: fill, alignment, width < 100
JOB_FILE_MAX_BYTES = 1 << 20
JOB_EXAMPLE = ("output", "quant_method", "threadpool_count")  # the fields --job-file's help shows in its example


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
                          "[{\"output\": DIR, \"quant_method\": \"int4\", \"threadpool_count\": 2}, ...]}; an "
                          "output's other fields: " + ", ".join(f for f in OUTPUT_FIELDS if f not in JOB_EXAMPLE)
                          + " (docs/BATCH.md), each defaulting to the command line's option. Instead of --output."),
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


def read_job_file(path: Path, base: dict) -> list[OutputSpec]:
    """The outputs a job file lists: an entry's fields (OutputSpec's) over `base`, the command line's per-output
    options (relative output paths are relative to the job file's folder)."""
    try:
        d = files.read_json(path, files.USER, what="job file", max_bytes=JOB_FILE_MAX_BYTES)
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist", param_hint="--job-file") from None
    outputs = d.get("outputs") if isinstance(d, dict) else None
    if not isinstance(outputs, list) or not outputs or set(d) != {"outputs"}:
        raise UserError(f"{path}: expected {{\"outputs\": [{{\"output\": DIR, \"quant_method\": ..., "
                        "\"threadpool_count\": ...}, ...]} and nothing else")
    return [_job_entry(f"{path}: outputs[{i}]", o, path.parent, base) for i, o in enumerate(outputs)]


def _job_entry(where: str, entry, folder: Path, base: dict) -> OutputSpec:
    names = ", ".join(OUTPUT_FIELDS)
    if not isinstance(entry, dict):
        raise UserError(f"{where}: an object with an output and any of its other fields ({names})")
    unknown = sorted(set(entry) - set(OUTPUT_FIELDS))
    if unknown:
        raise UserError(f"{where}: {unknown[0]!r} is not a field of an output; its fields are {names}")
    out = entry.get("output")
    if not isinstance(out, str) or not out:
        raise UserError(f"{where}: output must be a directory path")
    try:
        out_path = user_path(out)
    except ValueError as e:
        raise UserError(f"{where}: output {out!r} {e}") from None
    for name, value in entry.items():
        problem = field_problem(name, value) if name != "output" else None
        if problem:
            raise UserError(f"{where}: {name} {value!r} {problem}")
    spec = OutputSpec(**{**base, **entry, "output": folder / out_path})
    try:
        method_for(spec.quant_method, spec.group_size)
    except FixableError as e:  # the entry's (or the command line's) group size for its method
        raise UserError(f"{where}: quant_method {spec.quant_method!r}, group_size {spec.group_size}: {e}") from None
    return spec


def expand_outputs(output: Path | None, template: str | None, methods: list[str], counts: list[int],
                   job_file: Path | None, base: dict) -> list[OutputSpec]:
    """Every output the command line asks for. base: the per-output options of the command line other than
    the output, its quant method and threadpool count."""
    if sum(x is not None for x in (output, template, job_file)) != 1:
        raise click.UsageError("pass either --output (one output), --output-template (one per method and "
                               "threadpool count) or --job-file")
    if template is None and (len(methods) > 1 or len(counts) > 1):
        raise click.UsageError("several --quant-method or --threadpool-count values make several outputs: "
                               "name them with --output-template, e.g. 'out/{method}-T{threadpool_count}'"
                               + (" (or give each output of the job file its own)" if job_file is not None else ""))
    if job_file is not None:
        return read_job_file(job_file, {**base, "quant_method": methods[0], "threadpool_count": counts[0]})
    if output is not None:
        return [OutputSpec(output=output, quant_method=methods[0], threadpool_count=counts[0], **base)]
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
            outs.append(OutputSpec(output=path, quant_method=method, threadpool_count=count, **base))
    if len({o.output for o in outs}) != len(outs):
        raise click.BadParameter(f"{template!r} gives several outputs the same directory: use "
                                 + " and ".join(f"{{{f}}}" for f, vals in (("method", methods),
                                                                           ("threadpool_count", counts))
                                                if len(vals) > 1), param_hint="--output-template")
    return outs


def shard_spec(flag: str | None, shard_count: int | None) -> ShardSpec | None:
    return resolve_shard(flag, shard_count, os.environ)  # a UserError names the flag or variable: exit 2
