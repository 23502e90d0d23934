"""--shard I/N: which MoE layers one process of an array job converts, and where I and N come from
(the flag, or the scheduler's array environment: SLURM job arrays, Kubernetes Indexed Jobs).

Shards are numbered from 1, as test runners number theirs (`--shard 1/2`, `--shard 2/2`); the
schedulers' own task numbers are mapped onto them (SLURM relative to the array's first task, a Kubernetes
completion index from 0). Pure functions: the environment is passed in, nothing is read or written here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .errors import UserError

MAX_SHARDS = 1 << 16


@dataclass(frozen=True)
class TaskIds:
    """How a scheduler numbers the tasks of an array: shard i (0-based) is task first + i * step."""

    name: str  # "SLURM array task", "JOB_COMPLETION_INDEX"
    first: int
    step: int = 1

    def of(self, indices: list[int]) -> str:
        return f"{self.name} {', '.join(str(self.first + i * self.step) for i in indices)}"


@dataclass(frozen=True)
class ShardSpec:
    index: int  # 0-based: this is shard index + 1 of count
    count: int
    origin: str = "--shard"  # where index and count came from (for messages)
    tasks: TaskIds | None = None  # the scheduler's numbers of the shards (None: --shard)

    @property
    def number(self) -> int:
        return self.index + 1

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


def _check_count(count: int, origin: str) -> None:
    if not 1 <= count <= MAX_SHARDS:
        raise UserError(f"{origin}: the shard count must be between 1 and {MAX_SHARDS}, got {count}")


def parse_shard(text: str) -> ShardSpec:
    """'I/N' with 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text)
    if m is None:
        raise UserError(f"--shard {text!r}: write NUMBER/COUNT with NUMBER counted from 1, e.g. --shard 1/4 "
                        "... --shard 4/4")
    number, count = int(m[1]), int(m[2])
    _check_count(count, f"--shard {text.strip()}")
    if number == 0:
        raise UserError(f"--shard {text.strip()}: shards are numbered from 1: the first of {count} is --shard "
                        f"1/{count}, the last --shard {count}/{count}")
    if number > count:
        raise UserError(f"--shard {text.strip()}: there are {count} shards, numbered 1 to {count}")
    return ShardSpec(number - 1, count)


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    if not re.fullmatch(r"\d{1,9}", value):
        raise UserError(f"environment variable {name}={env[name]!r} is not a non-negative integer")
    return int(value)


def shard_from_env(env: Mapping[str, str], shard_count: int | None) -> ShardSpec | None:
    """The shard of this process of an array job, or None outside one.

    SLURM (sbatch --array=MIN-MAX[:STEP]): shard (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / STEP + 1 of
    SLURM_ARRAY_TASK_COUNT (--shard-count, when given, must agree). Kubernetes Indexed Job: shard
    JOB_COMPLETION_INDEX + 1 of --shard-count (the Job's completions; the pod does not see it)."""
    if "SLURM_ARRAY_TASK_ID" in env:
        missing = [n for n in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT") if n not in env]
        if missing:
            raise UserError(f"SLURM_ARRAY_TASK_ID is set but {' and '.join(missing)} not: pass --shard NUMBER/COUNT")
        task, low, count = (_env_int(env, n) for n in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                                        "SLURM_ARRAY_TASK_COUNT"))
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1 or task < low or (task - low) % step:
            raise UserError(f"SLURM array task {task} is not MIN {low} plus a multiple of STEP {step}: "
                            "use a plain range (--array=1-N) or pass --shard NUMBER/COUNT")
        if shard_count is not None and shard_count != count:
            raise UserError(f"--shard-count {shard_count} contradicts SLURM_ARRAY_TASK_COUNT={count}: drop "
                            "--shard-count (SLURM says how many tasks the array has)")
        origin = f"SLURM_ARRAY_TASK_ID {task} of the array {low}..{low + (count - 1) * step}"
        _check_count(count, origin)
        index = (task - low) // step
        if index >= count:
            raise UserError(f"{origin}: the task is outside the array (SLURM_ARRAY_TASK_COUNT={count}); pass "
                            "--shard NUMBER/COUNT")
        return ShardSpec(index, count, origin, TaskIds("SLURM array task", low, step))
    if "JOB_COMPLETION_INDEX" in env:
        if shard_count is None:
            raise UserError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the shard count is not: "
                            "pass --shard-count with the Job's completions")
        index = _env_int(env, "JOB_COMPLETION_INDEX")
        _check_count(shard_count, "--shard-count")
        if index >= shard_count:
            raise UserError(f"JOB_COMPLETION_INDEX {index} is outside 0..{shard_count - 1} (--shard-count "
                            f"{shard_count}): pass the Job's completions as --shard-count")
        return ShardSpec(index, shard_count, f"JOB_COMPLETION_INDEX {index}", TaskIds("JOB_COMPLETION_INDEX", 0))
    return None


def resolve_shard(flag: str | None, shard_count: int | None, env: Mapping[str, str]) -> ShardSpec | None:
    """--shard wins over the environment; --shard-count alone needs an array environment."""
    if flag is not None:
        spec = parse_shard(flag)
        if shard_count is not None and shard_count != spec.count:
            raise UserError(f"--shard {flag} and --shard-count {shard_count} disagree: pass one of them")
        return spec
    spec = shard_from_env(env, shard_count)
    if spec is None and shard_count is not None:
        raise UserError("--shard-count is given but no array index is set (SLURM_ARRAY_TASK_ID or "
                        "JOB_COMPLETION_INDEX): pass --shard NUMBER/COUNT")
    return spec


def shard_layers(layers: list[int], spec: ShardSpec) -> list[int]:
    """The layers of shard spec: contiguous runs of the plan's order (consecutive layers mostly live in the
    same source files, so each process reads its own files), the first len % N shards one longer."""
    base, extra = divmod(len(layers), spec.count)
    start = spec.index * base + min(spec.index, extra)
    return layers[start:start + base + (1 if spec.index < extra else 0)]


def shards_holding(layers: list[int], wanted: set[int] | list[int], count: int) -> list[int]:
    """The 0-based indices of the shards of `count` whose layers include any of `wanted`."""
    wanted = set(wanted)
    return [i for i in range(count) if wanted.intersection(shard_layers(layers, ShardSpec(i, count)))]
