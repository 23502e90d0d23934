"""NUMA sharding of one expert's matrices (research kt_format.md §3).

With T thread pools and I_l = I / T: gate/up shard t holds rows [t*I_l, (t+1)*I_l) of [I, H];
down shard t holds columns [t*I_l, (t+1)*I_l) of [H, I] with its own per-row scales.
"""
from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class ShardSlice:
    """Rows [row0, row0+n) and columns [col0, col0+k) of the source matrix."""

    row0: int
    n: int
    col0: int
    k: int


def shard_slice(proj: str, hidden_size: int, intermediate_size: int, numa_count: int, t: int) -> ShardSlice:
    if intermediate_size % numa_count:
        raise ValueError(f"moe_intermediate_size {intermediate_size} is not divisible by threadpool count {numa_count}")
    i_l = intermediate_size // numa_count
    if proj in ("gate", "up"):
        return ShardSlice(row0=t * i_l, n=i_l, col0=0, k=hidden_size)
    if proj == "down":
        return ShardSlice(row0=0, n=hidden_size, col0=t * i_l, k=i_l)
    raise ValueError(f"unknown projection {proj!r}; expected one of {PROJECTIONS}")


def full_shape(proj: str, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
    return (hidden_size, intermediate_size) if proj == "down" else (intermediate_size, hidden_size)
