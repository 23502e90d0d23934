"""The routing split of one HybridMoE call: which (token, expert) pairs the CPU engine computes and which
the GPU experts do, from a slot table (slot_of[e]: the GPU slot of expert e, -1 on the CPU).

One rule, `split_token`, under the entry points: `decode_hits` (one token: the decode path), and
`split` for any batch, which takes `split_python` for a few pairs (fewer fixed costs) and `split_numpy`
for many; the two give the same parts. `split_prefill`: a call on the GPU prefill path, where the CPU
experts' pairs go to the GPU too, grouped by expert (PrefillPart).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

SMALL = 64  # up to this many (token, slot) pairs, split in plain Python


class CpuPart(NamedTuple):
    """Rows for CPUMoE: tokens with at least one CPU expert and their CPU experts. Padding slots repeat a
    CPU expert of the same token with weight 0, so they cost no extra weight reads."""

    rows: torch.Tensor  # int64 [Tc] token indexes
    ids: torch.Tensor  # int64 [Tc, kc]
    weights: torch.Tensor  # float32 [Tc, kc]


class GpuPart(NamedTuple):
    """The (token, slot) pairs of the GPU experts, grouped by slot in slot order."""

    tokens: torch.Tensor  # int64 [P]
    weights: torch.Tensor  # float32 [P]
    groups: list[tuple[int, int, int]]  # (slot, start, end) into tokens / weights


class PrefillPart(NamedTuple):
    """The (token, expert) pairs of the CPU-resident experts a call routes to, for the GPU prefill: grouped by
    expert in ascending expert order, tokens ascending within an expert. Host numpy arrays."""

    experts: np.ndarray  # int64 [n]: the CPU-resident experts the call touches, ascending
    offsets: np.ndarray  # int64 [n + 1]: expert i's pairs are [offsets[i], offsets[i + 1])
    tokens: np.ndarray  # int64 [P]
    weights: np.ndarray  # float32 [P]


def split_token(ids_row: list[int], w_row: list[float], slot_of: list[int]):
    """One token's routing -> (CPU expert ids, their weights, [(slot, weight)] of its GPU experts), each in
    routing order."""
    cid, cw, hits = [], [], []
    for e, wt in zip(ids_row, w_row):
        s = slot_of[e]
        if s < 0:
            cid.append(e)
            cw.append(wt)
        else:
            hits.append((s, wt))
    return cid, cw, hits


def decode_hits(ids_row, w_row, slot_of: list[int]):
    """One token's routing -> (cpu ids, cpu weights, [(slot, weight)] sorted by slot), or None where the decode
    path does not apply (no GPU hit, or a GPU expert twice)."""
    ids_row = ids_row.tolist() if hasattr(ids_row, "tolist") else list(ids_row)
    cid, cw, hits = split_token(ids_row, w_row, slot_of)
    if not hits:
        return None
    if len(hits) > 1:
        hits.sort()
        if len({s for s, _ in hits}) != len(hits):
            return None
    return cid, cw, hits


def split(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of: np.ndarray):
    """topk_ids int64 / topk_weights float32 [T, k] on the CPU, slot_of int64 [E] -> (CpuPart or None,
    GpuPart or None)."""
    if topk_ids.numel() <= SMALL:
        return split_python(topk_ids, topk_weights, slot_of.tolist())
    return split_numpy(topk_ids, topk_weights, slot_of)


def split_numpy(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of: np.ndarray):
    ids, w = topk_ids.numpy(), topk_weights.numpy()
    slot = slot_of[ids]  # [T,k]
    on_gpu = slot >= 0
    cpu_part = None
    n_cpu = ids.shape[1] - on_gpu.sum(1)
    rows = np.flatnonzero(n_cpu > 0)
    if rows.size:
        if not on_gpu.any():
            cpu_part = CpuPart(torch.from_numpy(rows), topk_ids, topk_weights)
        else:
            kc = int(n_cpu.max())
            og = on_gpu[rows]
            order = np.argsort(og, axis=1, kind="stable")[:, :kc]
            cid = np.take_along_axis(ids[rows], order, 1)
            cw = np.take_along_axis(w[rows], order, 1)
            pad = np.take_along_axis(og, order, 1)
            if pad.any():
                cid = np.where(pad, cid[:, :1], cid)
                cw = np.where(pad, np.float32(0), cw)
            cpu_part = CpuPart(torch.from_numpy(rows), torch.from_numpy(np.ascontiguousarray(cid, dtype=np.int64)),
                               torch.from_numpy(np.ascontiguousarray(cw, dtype=np.float32)))
    return cpu_part, _gpu_part(w, slot, on_gpu)


def group_by_key(keys: np.ndarray, bound: int):
    """keys: ints in [0, bound) -> (order, values, counts): a stable order that sorts them, the distinct keys
    ascending and how many of each. Keys that fit 16 bits are sorted as such: numpy sorts those by radix, ten times
    faster than int64 at prefill sizes (a 4096-token chunk, top-6)."""
    narrow = keys.astype(np.int16) if bound <= 1 << 15 else keys
    order = np.argsort(narrow, kind="stable")
    counts = np.bincount(keys, minlength=bound)
    values = np.flatnonzero(counts)
    return order, values, counts[values]


def _gpu_part(w: np.ndarray, slot: np.ndarray, on_gpu: np.ndarray):
    """The GpuPart of routing weights w [T, k] whose slots are `slot` (on_gpu: slot >= 0), or None."""
    if not on_gpu.any():
        return None
    tok, pos = np.nonzero(on_gpu)
    s = slot[tok, pos]
    order, uniq, cnt = group_by_key(s, int(s.max()) + 1)
    tok, pos = tok[order], pos[order]
    ends = np.cumsum(cnt)
    groups = [(int(u), int(e - c), int(e)) for u, c, e in zip(uniq, cnt, ends)]
    return GpuPart(torch.from_numpy(tok.astype(np.int64)), torch.from_numpy(w[tok, pos].astype(np.float32)), groups)


def split_prefill(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of: np.ndarray):
    """topk_ids int64 / topk_weights float32 [T, k] on the CPU, slot_of int64 [E] -> (PrefillPart or None,
    GpuPart or None): the GPU-resident experts' pairs as `split` gives them, every other pair for the GPU
    prefill."""
    ids, w = topk_ids.numpy(), topk_weights.numpy()
    slot = slot_of[ids]
    on_gpu = slot >= 0
    part = None
    tok, pos = np.nonzero(~on_gpu)  # row-major: tokens ascending
    if tok.size:
        order, experts, counts = group_by_key(ids[tok, pos], slot_of.size)
        tok, pos = tok[order], pos[order]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        part = PrefillPart(experts.astype(np.int64), offsets, tok.astype(np.int64),
                           np.ascontiguousarray(w[tok, pos], dtype=np.float32))
    return part, _gpu_part(w, slot, on_gpu)


def split_python(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of: list[int]):
    rows, cid, cw, gpu = [], [], [], []
    for t, (ri, rw) in enumerate(zip(topk_ids.tolist(), topk_weights.tolist())):
        ci, cwt, hits = split_token(ri, rw, slot_of)
        gpu.extend((s, t, wt) for s, wt in hits)
        if ci:
            rows.append(t)
            cid.append(ci)
            cw.append(cwt)
    cpu_part = gpu_part = None
    if rows:
        if not gpu:
            cpu_part = CpuPart(torch.arange(len(rows)), topk_ids, topk_weights)
        else:
            kc = max(len(c) for c in cid)
            for ci, cwt in zip(cid, cw):
                pad = kc - len(ci)
                ci.extend([ci[0]] * pad)
                cwt.extend([0.0] * pad)
            cpu_part = CpuPart(torch.tensor(rows, dtype=torch.int64), torch.tensor(cid, dtype=torch.int64),
                               torch.tensor(cw, dtype=torch.float32))
    if gpu:
        gpu.sort(key=lambda r: r[0])
        groups, start = [], 0
        for i in range(1, len(gpu) + 1):
            if i == len(gpu) or gpu[i][0] != gpu[start][0]:
                groups.append((gpu[start][0], start, i))
                start = i
        gpu_part = GpuPart(torch.tensor([g[1] for g in gpu], dtype=torch.int64),
                           torch.tensor([g[2] for g in gpu], dtype=torch.float32), groups)
    return cpu_part, gpu_part


def cpu_rows(x_host: torch.Tensor, cpu_part: CpuPart) -> torch.Tensor:
    """The rows of x the CPU part computes (x itself when that is every row)."""
    rows = cpu_part.rows
    return x_host if rows.numel() == x_host.shape[0] else x_host.index_select(0, rows)
