"""Where one layer's packed experts lie in the mapped files, and how a transfer group of them is laid out in a
staging buffer (the GPU prefill's pinned and device slots).

`LayerSources` finds, once per layer, each expert's tensors (every projection, NUMA shard, weight and scale)
as byte ranges of the mappings the loader made (no copy). `stage_group` lays a group out: tensors that are
adjacent in a file stay adjacent, so a group of consecutive experts of a merged shard is one or a few
copies; each copy keeps its file offset modulo ALIGN (typed loads stay aligned); the group's dequantization
jobs (quant/staged_dequant.py) follow, so that one host-to-device copy moves both. `copy_tasks` shares the
copies out among the copy threads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from ..format.names import PROJECTIONS
from .prefill_plan import ALIGN

MIN_TASK_BYTES = 1 << 20  # a copy thread's share of a group, at least (smaller ones cost more than they save)


class Piece(NamedTuple):
    """One packed tensor of an expert: bytes [offset, offset + nbytes) of mapped region `region`."""

    proj: str
    numa: int
    part: str  # "weight" | "scale"
    region: int
    offset: int
    nbytes: int


class CopyRun(NamedTuple):
    """Bytes [src, src + nbytes) of region `region` go to staging offset dst."""

    region: int
    src: int
    nbytes: int
    dst: int


@dataclass(frozen=True)
class StagedGroup:
    experts: tuple[int, ...]
    runs: tuple[CopyRun, ...]
    offsets: dict  # (slot j, proj, numa, part) -> staging offset
    jobs: np.ndarray  # int64 [J, 6] dequantization jobs
    jobs_offset: int  # staging offset of the job table (8-byte aligned)
    nbytes: int  # staged bytes, job table included

    @property
    def weight_bytes(self) -> int:
        """Packed bytes copied from the files (what crosses PCIe, besides the job table and alignment)."""
        return sum(r.nbytes for r in self.runs)


def _region(a: np.ndarray, roots: dict, regions: list) -> tuple[int, int]:
    """(region index, byte offset) of array `a`: the mapping (or owning array) under its .base chain."""
    root = a
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if isinstance(root, memoryview) and root.obj is not None:
        root = root.obj  # np.frombuffer wraps the mapping in a new memoryview each time
    index = roots.get(id(root))
    if index is None:
        view = root.reshape(-1).view(np.uint8) if isinstance(root, np.ndarray) else np.frombuffer(root, np.uint8)
    else:
        view = regions[index][1]
    offset = a.__array_interface__["data"][0] - view.__array_interface__["data"][0]
    if not a.flags.c_contiguous or offset < 0 or offset + a.nbytes > view.nbytes:
        # not a plain range of its root (a strided view): a region of its own, a copy of its bytes
        regions.append((a, np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        return len(regions) - 1, 0
    if index is None:
        index = roots[id(root)] = len(regions)
        regions.append((root, view))
    return index, offset


class LayerSources:
    """The byte ranges of one layer's packed experts in the mapped files: `pieces[e]` lists expert e's tensors
    (projection by projection, NUMA shard by shard, weight then scale), `regions[i]` is a uint8 view of a
    whole mapping."""

    def __init__(self, weights, layer: int):
        roots: dict = {}
        found: list = []
        self.pieces: list[tuple[Piece, ...]] = []
        T = int(weights.threadpool_count)
        for e in range(int(weights.num_experts)):
            row = []
            for proj in PROJECTIONS:
                for t in range(T):
                    for part, a in zip(("weight", "scale"), weights.expert_tensors(layer, e, proj, t)):
                        a = np.asarray(a)
                        region, offset = _region(a, roots, found)
                        row.append(Piece(proj, t, part, region, offset, int(a.nbytes)))
            self.pieces.append(tuple(row))
        self._roots = [r for r, _ in found]  # the mappings stay alive while the views are used
        self.regions = [v for _, v in found]

    def expert_bound(self, job_bytes: int) -> int:
        """Staging bytes one expert can take: its tensors, their alignment and its job rows."""
        return max(sum(p.nbytes + ALIGN - 1 for p in ps) for ps in self.pieces) + job_bytes

    def packed_bytes(self, experts) -> int:
        """Packed bytes of these experts (the tensors only)."""
        return sum(p.nbytes for e in experts for p in self.pieces[int(e)])


def stage_group(experts: Sequence[int], pieces: Sequence[Sequence[Piece]], make_jobs) -> StagedGroup:
    """Where a transfer group is staged: experts[j]'s pieces are pieces[j]; make_jobs(j, offset_of)
    -> int64 [*, 6] job rows of slot j, offset_of(proj, numa) -> (weight offset, scale offset)."""
    runs: list[list[int]] = []  # [region, src, nbytes, dst]
    offsets: dict = {}
    pos = 0
    for j, ps in enumerate(pieces):
        for p in ps:
            last = runs[-1] if runs else None
            if last is not None and last[0] == p.region and last[1] + last[2] == p.offset:
                last[2] += p.nbytes
            else:
                dst = pos + (p.offset - pos) % ALIGN
                runs.append([p.region, p.offset, p.nbytes, dst])
                last = runs[-1]
            offsets[(j, p.proj, p.numa, p.part)] = last[3] + (p.offset - last[1])
            pos = last[3] + last[2]
    tables = [make_jobs(j, lambda proj, t, j=j: (offsets[(j, proj, t, "weight")], offsets[(j, proj, t, "scale")]))
              for j in range(len(pieces))]
    jobs = np.concatenate(tables) if tables else np.zeros((0, 6), np.int64)
    jobs_offset = -(-pos // 8) * 8
    return StagedGroup(tuple(int(e) for e in experts), tuple(CopyRun(*r) for r in runs), offsets,
                       np.ascontiguousarray(jobs, dtype=np.int64), jobs_offset, jobs_offset + jobs.nbytes)


def copy_tasks(group: StagedGroup, regions: Sequence[np.ndarray], tasks: int,
               min_bytes: int = MIN_TASK_BYTES) -> list[list[tuple[np.ndarray, int]]]:
    """The copies that fill a slot with the group, as (source uint8 array, staging offset) pieces, cut into at
    most `tasks` lists of about equal bytes (each at least min_bytes), one per copy thread."""
    copies = [(regions[r.region][r.src:r.src + r.nbytes], r.dst) for r in group.runs]
    copies.append((group.jobs.reshape(-1).view(np.uint8), group.jobs_offset))
    total = sum(a.size for a, _ in copies)
    count = max(1, min(tasks, total // max(1, min_bytes)))
    share = -(-total // count)
    out: list[list[tuple[np.ndarray, int]]] = [[]]
    room = share
    for a, off in copies:
        at = 0
        while at < a.size:
            if room == 0:
                out.append([])
                room = share
            n = min(room, a.size - at)
            out[-1].append((a[at:at + n], off + at))
            at += n
            room -= n
    return out
