"""--shard i/N: which MoE layers one process of an array job converts, and where i and N come from
(the flag, or the scheduler's array environment: SLURM job arrays, Kubernetes Indexed Jobs).

Pure functions: the environment is passed in, nothing is read or written here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .errors import UserError

MAX_SHARDS = 1 << 16


@dataclass(frozen=True)
class ShardSpec:
    index: int  # 0-based
    count: int
    origin: str = "--shard"  # where index and count came from (for messages)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _check(index: int, count: int, origin: str) -> ShardSpec:
    if not 1 <= count <= MAX_SHARDS:
        raise UserError(f"{origin}: the shard count must be between 1 and {MAX_SHARDS}, got {count}")
    if not 0 <= index < count:
        raise UserError(f"{origin}: shard index {index} is outside 0..{count - 1} (indices count from 0)")
    return ShardSpec(index, count, origin)


def parse_shard(text: str) -> ShardSpec:
    """'i/N' with 0 <= i < N."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text)
    if m is None:
        raise UserError(f"--shard {text!r}: write INDEX/COUNT with INDEX counted from 0, e.g. --shard 0/4")
    return _check(int(m[1]), int(m[2]), "--shard")


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    if not re.fullmatch(r"\d{1,9}", value):
        raise UserError(f"environment variable {name}={env[name]!r} is not a non-negative integer")
    return int(value)


def shard_from_env(env: Mapping[str, str], shard_count: int | None) -> ShardSpec | None:
    """The shard of this process of an array job, or None outside one.

    SLURM (sbatch --array=MIN-MAX[:STEP]): index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / STEP,
    count = SLURM_ARRAY_TASK_COUNT (--shard-count, when given, must agree). Kubernetes Indexed Job:
    index = JOB_COMPLETION_INDEX, count = --shard-count (the Job's completions; the pod does not see it)."""
    if "SLURM_ARRAY_TASK_ID" in env:
        origin = "SLURM_ARRAY_TASK_ID"
        missing = [n for n in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT") if n not in env]
        if missing:
            raise UserError(f"SLURM_ARRAY_TASK_ID is set but {' and '.join(missing)} not: pass --shard INDEX/COUNT")
        task, low, count = (_env_int(env, n) for n in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                                        "SLURM_ARRAY_TASK_COUNT"))
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1 or task < low or (task - low) % step:
            raise UserError(f"SLURM array task {task} is not MIN {low} plus a multiple of STEP {step}: "
                            "use a plain range (--array=0-N) or pass --shard INDEX/COUNT")
        if shard_count is not None and shard_count != count:
            raise UserError(f"--shard-count {shard_count} contradicts SLURM_ARRAY_TASK_COUNT={count}: drop "
                            "--shard-count (SLURM says how many tasks the array has)")
        return _check((task - low) // step, count,
                      f"{origin} {task} of the array {low}..{low + (count - 1) * step}")
    if "JOB_COMPLETION_INDEX" in env:
        if shard_count is None:
            raise UserError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the shard count is not: "
                            "pass --shard-count with the Job's completions")
        return _check(_env_int(env, "JOB_COMPLETION_INDEX"), shard_count, "JOB_COMPLETION_INDEX")
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
                        "JOB_COMPLETION_INDEX): pass --shard INDEX/COUNT")
    return spec


def shard_layers(layers: list[int], spec: ShardSpec) -> list[int]:
    """The layers of shard spec.index: contiguous runs of the plan's order (consecutive layers mostly live
    in the same source files, so each process reads its own files), the first len % N shards one longer."""
    base, extra = divmod(len(layers), spec.count)
    start = spec.index * base + min(spec.index, extra)
    return layers[start:start + base + (1 if spec.index < extra else 0)]
