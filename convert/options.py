"""What a conversion is asked to do: the options one run shares (RunOptions: the source, the device, the
threads, the layers, the download) and each output's (OutputSpec: where it goes, how it is packed and laid
out). Every default is written here, once: the command line's options and the job file's fields take theirs
from these classes (`default`). ConvertOptions is one run with one output, for convert()."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from kt_convert.kt_runtime.format.methods import CHOICES

from .errors import UserError

GROUP_SIZES = tuple(sorted({g for sizes in CHOICES.values() for g in sizes}))  # of the group-wise methods


def _one_of(values):
    names = ", ".join(map(str, values))
    return lambda v: None if isinstance(v, (str, int)) and not isinstance(v, bool) and v in values \
        else f"is not one of {names}"


def _boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _count(least: int, what: str):
    def check(v) -> str | None:
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= least else f"must be {what}"
    return check


def _or_null(check):
    return lambda v: None if v is None else check(v)


def _option(default, check):
    """An output field: its default and the check of a value given in a job file (a problem, or None)."""
    return field(default=default, metadata={"check": check})


@dataclass(kw_only=True)
class RunOptions:
    """What every output of one run shares: they are made from one read of the source."""

    input_path: str
    input_type: str = "auto"
    device: str = "auto"
    cpuinfer_threads: int = 0  # 0: every core
    allow_nonfinite: bool = False
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise
    layers: list[int] | None = None  # --layers: convert only these MoE layers (the output says it is partial)
    # a hub id not (fully) in the cache: convert while downloading (convert.download)
    download: bool = False
    delete_source_after_use: bool = False  # remove shards this run downloaded once converted
    max_source_disk: int | None = None  # bytes of downloaded source on disk at once (implies deletion)
    dry_run: bool = False  # plan only: print it, write nothing
    # shards downloaded at once, in layer order (`hf download` runs 8 files at once). One stream alone did not
    # fill a 100 MB/s link beside the packer on 2 busy cores; four did (docs/BENCHMARKS.md). The first layer
    # then waits for its shard's share of the link; the disk cap bounds the shards in flight together.
    download_workers: int = 4


@dataclass(kw_only=True)
class OutputSpec:
    """One output of a run: its directory and everything that decides its bytes and files."""

    output: Path
    quant_method: str = _option("int4", _one_of(tuple(CHOICES)))
    group_size: int | None = _option(None, _or_null(_one_of(GROUP_SIZES)))  # of a group-wise method (None: default)
    threadpool_count: int = _option(2, _count(1, "a positive integer"))
    merge: bool = _option(True, _boolean)  # False: kt's _layer_L/_numa_t .kt folders (--no-merge-safetensor)
    include_non_expert: bool = _option(False, _boolean)
    kt_sft_manifest: bool = _option(False, _boolean)  # kt's SFT input: kt-weight-manifest.json, ours in OUT.kt-convert
    overwrite: bool = _option(False, _boolean)
    resume_layer: int | None = _option(None, _or_null(_count(0, "a layer number (0 or more)")))  # convert.kt_resume


@dataclass(kw_only=True)
class ConvertOptions(OutputSpec, RunOptions):
    """One run with one output: every field of RunOptions and OutputSpec (convert.pipeline.convert)."""

    @property
    def run(self) -> RunOptions:
        return RunOptions(**{f.name: getattr(self, f.name) for f in fields(RunOptions)})

    @property
    def spec(self) -> OutputSpec:
        return OutputSpec(**{f.name: getattr(self, f.name) for f in fields(OutputSpec)})


def default(cls, name: str):
    """The default of field `name` of RunOptions or OutputSpec (for the command line's options)."""
    return next(f.default for f in fields(cls) if f.name == name)


OUTPUT_FIELDS = tuple(f.name for f in fields(OutputSpec))  # a job file's output entry: these names


def field_problem(name: str, value) -> str | None:
    """Why `value` (decoded JSON) cannot be OutputSpec field `name` (None: it can); not for `output`, a path."""
    return next(f for f in fields(OutputSpec) if f.name == name).metadata["check"](value)


def max_cpu_threads() -> int:
    """The most packing threads accepted: more than 4 per CPU only adds switching (and memory)."""
    return max(256, 4 * (os.cpu_count() or 1))


def check_cpu_threads(n) -> int:
    limit = max_cpu_threads()
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
        raise UserError(f"--cpuinfer-threads must be between 0 (every core) and {limit} (4 per CPU here), got {n!r}")
    return n
