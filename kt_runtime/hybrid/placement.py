"""Which routed experts of a layer live on the GPU: placement strategies, routing statistics, the slot
table of a HybridMoE and the counts that move experts between the slots and the CPU.

    stats = ExpertStats(num_experts=256)
    stats.record(layer, topk_ids)               # during a calibration pass (or kt_runtime.record_routing)
    stats.save("routing_stats.json"); stats = ExpertStats.load("routing_stats.json")
    mask = gpu_expert_mask(256, 16, "frequency", counts=stats.counts(layer))   # bool [256]

Strategies: "uniform" (experts 0..N-1), "frequency" (the N most often routed, ties to the lower id),
or an explicit bool mask / list of expert ids. Dynamic placement: every `update_interval` calls, the
hottest CPU experts by a decayed window of counts replace the coldest GPU ones (RoutingCounts.promotions).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..format.errors import FieldError
from ..format.files import USER, read_json
from ..format.fsio import atomic_write_text
from ..format.json_fields import describe, get_dict, get_int, get_int_list

STATS_FORMAT = "kt-expert-routing-stats"
STATS_VERSION = 1
STATS_MAX_BYTES = 256 << 20  # 1,000 layers x 1,024 experts of 20-digit counts: ~25 MB
MAX_EXPERTS = 1 << 20
MAX_COUNT = (1 << 63) - 1  # int64
LAYER_KEY = re.compile(r"^(0|[1-9][0-9]{0,8})$")
STRATEGIES = ("uniform", "frequency")


class ExpertStats:
    """Per-layer routing counts: how many (token, top-k slot) pairs chose each expert."""

    def __init__(self, num_experts: int, counts: Mapping[int, object] | None = None):
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = num_experts
        self._counts: dict[int, torch.Tensor] = {}
        for layer, c in (counts or {}).items():
            c = torch.as_tensor(c, dtype=torch.int64).reshape(-1)
            if c.numel() != num_experts:
                raise ValueError(f"layer {layer}: {c.numel()} counts for {num_experts} experts")
            if (c < 0).any():
                raise ValueError(f"layer {layer}: negative routing counts")
            self._counts[int(layer)] = c.clone()

    @property
    def layers(self) -> list[int]:
        return sorted(self._counts)

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        ids = torch.as_tensor(topk_ids).detach().reshape(-1).to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"layer {layer}: expert ids outside [0, {self.num_experts})")
        c = torch.bincount(ids, minlength=self.num_experts)
        layer = int(layer)
        if layer in self._counts:
            self._counts[layer] += c
        else:
            self._counts[layer] = c

    def counts(self, layer: int) -> torch.Tensor:
        """int64 [num_experts] (a copy); KeyError when the layer was never recorded."""
        if int(layer) not in self._counts:
            raise KeyError(f"no routing statistics for layer {layer} (layers with statistics: {self.layers})")
        return self._counts[int(layer)].clone()

    def merge(self, other: "ExpertStats") -> "ExpertStats":
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge statistics of {other.num_experts} experts into {self.num_experts}")
        for layer in other.layers:
            self._counts[layer] = self._counts.get(layer, torch.zeros(self.num_experts, dtype=torch.int64)) + \
                other.counts(layer)
        return self

    def to_dict(self) -> dict:
        return {"format": STATS_FORMAT, "version": STATS_VERSION, "num_experts": self.num_experts,
                "layers": {str(layer): self._counts[layer].tolist() for layer in self.layers}}

    @classmethod
    def from_dict(cls, d: dict, where: str = "routing statistics") -> "ExpertStats":
        """From to_dict()'s object, every field checked (FieldError, a ValueError naming `where` and the
        field): counts are integers from 0 to 2^63 - 1, one per expert, under integer layer keys."""
        if not isinstance(d, dict) or d.get("format") != STATS_FORMAT:
            raise FieldError(f"{where}: not a routing statistics object (expected format {STATS_FORMAT!r})")
        if d.get("version") != STATS_VERSION:
            raise FieldError(f"{where}: unsupported routing statistics version {describe(d.get('version'))}")
        num_experts = get_int(d, "num_experts", where, lo=1, hi=MAX_EXPERTS)
        layers = {}
        for key, counts in get_dict(d, "layers", where).items():
            if not LAYER_KEY.match(key):
                raise FieldError(f"{where}: layers has the key {describe(key)}, not a layer number")
            layers[int(key)] = get_int_list({key: counts}, key, where, lo=0, hi=MAX_COUNT, length=num_experts,
                                            path="layers.")
        return cls(num_experts, layers)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "ExpertStats":
        """A statistics file written by save(): InputFileError / FieldError (ValueErrors) naming the file."""
        d = read_json(Path(path), USER, what="routing statistics", max_bytes=STATS_MAX_BYTES)
        return cls.from_dict(d, str(path))

    def __repr__(self) -> str:
        return f"ExpertStats(num_experts={self.num_experts}, layers={self.layers})"


def resolve_stats(stats, num_experts: int) -> ExpertStats | None:
    """None | ExpertStats | path of a stats file | {layer: counts} -> ExpertStats (or None)."""
    if stats is None or isinstance(stats, ExpertStats):
        out = stats
    elif isinstance(stats, (str, Path)):
        out = ExpertStats.load(stats)
    elif isinstance(stats, Mapping):
        out = ExpertStats(num_experts, stats)
    else:
        raise ValueError(f"stats must be an ExpertStats, a stats file path or {{layer: counts}}, got {type(stats).__name__}")
    if out is not None and out.num_experts != num_experts:
        raise ValueError(f"routing statistics are for {out.num_experts} experts, these weights have {num_experts}")
    return out


def _as_mask(spec, num_experts: int) -> torch.Tensor | None:
    """A bool mask [E] from a bool sequence/tensor or a list of expert ids; None if spec is neither."""
    if isinstance(spec, (str, int)) or spec is None:
        return None
    t = torch.as_tensor(spec)
    if t.dtype == torch.bool:
        if t.dim() != 1 or t.numel() != num_experts:
            raise ValueError(f"a GPU expert mask must be a bool vector of {num_experts} entries, got shape {tuple(t.shape)}")
        return t.clone().cpu()
    if t.dtype.is_floating_point or t.dim() != 1:
        raise ValueError("a GPU expert selection must be a bool mask or a 1-D list of expert ids")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_experts):
        raise ValueError(f"GPU expert ids must be in [0, {num_experts}), got {t.tolist()}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"GPU expert ids must not repeat, got {t.tolist()}")
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[t] = True
    return mask


def gpu_expert_mask(num_experts: int, num_gpu_experts=0, placement="uniform", counts=None) -> torch.Tensor:
    """bool [num_experts]: True for the experts kept on the GPU.

    num_gpu_experts: an int N, or itself a mask / list of ids (then placement is ignored).
    placement: "uniform" | "frequency" (needs counts, int [E]) | a mask / list of ids.
    """
    mask = _as_mask(num_gpu_experts, num_experts)
    if mask is not None:
        return mask
    if isinstance(num_gpu_experts, bool) or not isinstance(num_gpu_experts, int):
        raise ValueError(f"num_gpu_experts must be an int, a bool mask or a list of expert ids, got {num_gpu_experts!r}")
    n = num_gpu_experts
    if not 0 <= n <= num_experts:
        raise ValueError(f"num_gpu_experts must be in [0, {num_experts}], got {n}")
    mask = _as_mask(placement, num_experts)
    if mask is not None:
        if int(mask.sum()) != n:
            raise ValueError(f"placement selects {int(mask.sum())} experts but num_gpu_experts is {n}")
        return mask
    if placement == "uniform":
        mask = torch.zeros(num_experts, dtype=torch.bool)
        mask[:n] = True
        return mask
    if placement == "frequency":
        if counts is None:
            raise ValueError("placement='frequency' needs routing statistics (stats=...)")
        c = torch.as_tensor(counts).reshape(-1).to(torch.float64)
        if c.numel() != num_experts:
            raise ValueError(f"routing statistics have {c.numel()} experts, the layer has {num_experts}")
        return mask_of_top(c, n)
    raise ValueError(f"unknown placement {placement!r} (expected {', '.join(STRATEGIES)} or a mask / list of ids)")


def mask_of_top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n highest scores (ties to the lower index) as a bool mask."""
    e = scores.numel()
    # stable descending sort: ties keep ascending expert order
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    mask = torch.zeros(e, dtype=torch.bool)
    mask[order[:n]] = True
    return mask


class SlotTable:
    """Which expert sits in which GPU slot. slot_of[e] is e's slot or -1 (a CPU expert), kept as a torch
    tensor, a numpy view of the same memory (the batch split) and a list (one-token calls)."""

    def __init__(self, mask: torch.Tensor):
        self.experts = mask.nonzero().flatten().tolist()  # slot -> expert
        self.slot_of = torch.full((mask.numel(),), -1, dtype=torch.int64)
        self.slot_np = self.slot_of.numpy()
        for s, e in enumerate(self.experts):
            self.slot_of[e] = s
        self.slot_list = self.slot_np.tolist()

    @property
    def mask(self) -> torch.Tensor:
        """bool [E]: the experts in a slot."""
        return self.slot_of >= 0

    def move(self, promote: int, demote: int) -> int:
        """Gives `demote`'s slot to `promote` (the caller reloads it) and returns it."""
        slot = int(self.slot_of[demote])
        self.slot_of[demote] = -1
        self.slot_of[promote] = slot
        self.slot_list[demote] = -1
        self.slot_list[promote] = slot
        self.experts[slot] = promote
        return slot


class RoutingCounts:
    """How often each expert was routed to: `counts` since construction, `window` decayed at every
    rebalance; the window picks the experts to promote (dynamic placement)."""

    def __init__(self, num_experts: int):
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.window = torch.zeros(num_experts, dtype=torch.float64)
        self.counts_np, self.window_np = self.counts.numpy(), self.window.numpy()

    def observe(self, topk_ids: np.ndarray) -> None:
        c = np.bincount(topk_ids.reshape(-1), minlength=self.counts_np.size)
        self.counts_np += c
        self.window_np += c

    def observe_list(self, ids: list[int]) -> None:
        """observe() for one token's few ids, without numpy's fixed costs."""
        cn, wn = self.counts_np, self.window_np
        for e in ids:
            cn[e] += 1
            wn[e] += 1

    def promotions(self, on_gpu: torch.Tensor, limit: int, hysteresis: float) -> list[tuple[int, int]]:
        """(CPU expert, GPU expert) pairs, hottest CPU against coldest GPU expert by the window, while the
        CPU one is hotter by the factor 1 + hysteresis; at most `limit`."""
        score = self.window
        cpu_ids = (~on_gpu).nonzero().flatten()
        gpu_ids = on_gpu.nonzero().flatten()
        hot = cpu_ids[torch.sort(-score[cpu_ids], stable=True).indices].tolist()
        cold = gpu_ids[torch.sort(score[gpu_ids], stable=True).indices].tolist()
        pairs = []
        for a, b in zip(hot, cold):
            if len(pairs) >= limit or not score[a] > score[b] * (1.0 + hysteresis):
                break
            pairs.append((a, b))
        return pairs

    def decay(self, factor: float) -> None:
        self.window *= factor
