"""The GPU prefill's decisions, as pure functions: when a call takes it, how its transfers fit a memory budget,
and which staging a layer runs (check_staging, staging_after_registration).

A call of T tokens (one forward call, after the caller's chunking) takes the GPU prefill when T is at or above
`gpu_prefill_token_threshold` (kt's `--kt-gpu-prefill-token-threshold`; None or 0: never). Then the CPU-resident
experts the chunk routes to are streamed to the GPU in transfer groups of consecutive experts; the GPU memory
budget (`gpu_prefill_memory`) bounds everything the path allocates on the device:

    budget >= reserve (routing tables of one call) + biases
              + slots x slot_bytes                  (device staging: packed bytes of one group, per slot)
              + group_experts x dequant_bytes       (one group dequantized, in the GPU dtype)
              + pair_block x pair_bytes             (activations of the (token, expert) pairs computed at once)

The layer's own input (in the GPU dtype) and its float32 output [T, H] are outside the budget. Pinned host
memory: slots x slot_bytes with the gather staging; with the registered staging none (beyond each group's job
table), the layer's packed bytes being page-locked in place instead (host_registration.py). A quarter of what
the fixed parts leave goes to activations, the rest to groups; a group holds at most `max_group_bytes` of packed
weights, so that the first group (the transfer nothing overlaps) stays short.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MEMORY = 2 << 30  # gpu_prefill_memory when not given
DEFAULT_GROUP_BYTES = 128 << 20  # packed bytes of one transfer group, at most
DEFAULT_SLOTS = 2  # staging slots: one group copied while the previous one is computed
ALIGN = 64  # staged tensors keep their file offset modulo this (typed loads stay aligned)
MIN_PAIR_BLOCK = 128  # fewer pairs per GEMM would leave the GPU idle
ACTIVATION_SHARE = 4  # activations get 1 / ACTIVATION_SHARE of what the fixed parts leave
TABLE_SHARE = 32  # routing tables of one call: at most budget / TABLE_SHARE
TABLE_BYTES_PER_PAIR = 8 + 4 + 8  # token (int64), weight (float32), expert (int64)
STAGINGS = ("auto", "registered", "gather")  # gpu_prefill_staging


def check_threshold(value) -> int | None:
    """gpu_prefill_token_threshold as given -> int > 0, or None (off: None or 0). ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"gpu_prefill_token_threshold must be None or an int >= 0 (0: off), got {value!r}")
    return int(value) or None


def prefill_applies(tokens: int, threshold: int | None) -> bool:
    """Whether a call of `tokens` tokens takes the GPU prefill (kt's rule: tokens >= threshold)."""
    return threshold is not None and threshold > 0 and tokens >= threshold


def check_memory(value) -> int:
    """gpu_prefill_memory as given (bytes; None: DEFAULT_MEMORY) -> int. ValueError otherwise."""
    if value is None:
        return DEFAULT_MEMORY
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"gpu_prefill_memory must be a positive number of bytes, got {value!r}")
    return int(value)


def check_staging(value) -> str:
    """gpu_prefill_staging as given (None: "auto") -> one of STAGINGS. ValueError otherwise.

    "registered": the layer's mapped packed bytes are registered with CUDA (page-locked, read-only) once, and each
    transfer group is copied to the device straight from the mapping; "gather": copy threads gather each group
    into a pinned slot first, then it is uploaded; "auto": registered where the registration succeeds, gather
    otherwise (with one warning saying why)."""
    if value is None:
        return "auto"
    if value not in STAGINGS:
        raise ValueError(f"gpu_prefill_staging must be one of {', '.join(STAGINGS)}, got {value!r}")
    return value


def staging_after_registration(requested: str, error: str | None) -> str:
    """The staging a layer runs once its registration was tried (error: why it failed; None: it succeeded).
    "registered" refuses to run without it: ValueError naming the reason and the fix."""
    if requested == "gather":
        return "gather"
    if error is None:
        return "registered"
    if requested == "auto":
        return "gather"
    raise ValueError(f"gpu_prefill_staging='registered': the layer's packed bytes cannot be registered with CUDA "
                     f"({error}); use gpu_prefill_staging='gather' (or 'auto', which falls back to it)")


def pair_activation_bytes(hidden_size: int, intermediate_size: int, itemsize: int) -> int:
    """Device bytes one (token, expert) pair holds while its GEMMs run: its row of x, [gate | up], a bias
    gather of the same size, the activation and its temporary, the expert's output in the GPU dtype and
    weighted in float32."""
    H, I = hidden_size, intermediate_size
    return itemsize * (2 * H + 3 * 2 * I + 2 * I) + 4 * 2 * H


@dataclass(frozen=True)
class ExpertSizes:
    """What one expert of a layer costs the prefill path."""

    staged_bytes: int  # its packed tensors and dequantization jobs in a staging slot, alignment included
    dequant_bytes: int  # its three matrices in the GPU dtype
    pair_bytes: int  # device bytes per (token, expert) pair in flight (pair_activation_bytes)


@dataclass(frozen=True)
class BudgetPlan:
    """How a budget is cut, for one layer shape: the buffers a workspace allocates."""

    budget: int
    group_experts: int  # experts per transfer group, at most
    pair_block: int  # pairs per GEMM, at most
    slots: int
    slot_bytes: int  # staging bytes per slot (pinned and on the device)
    table_bytes: int  # routing tables of one call, at most
    fixed_bytes: int  # biases and other per-layer device tensors

    def device_bytes(self, sizes: ExpertSizes) -> int:
        """The most device memory the prefill path allocates under this plan."""
        return (self.table_bytes + self.fixed_bytes + self.slots * self.slot_bytes
                + self.group_experts * sizes.dequant_bytes + self.pair_block * sizes.pair_bytes)


def plan_budget(sizes: ExpertSizes, budget: int, fixed_bytes: int = 0, slots: int = DEFAULT_SLOTS,
                max_group_bytes: int = DEFAULT_GROUP_BYTES, max_pairs: int | None = None) -> BudgetPlan:
    """The budget cut for experts of `sizes`: ValueError naming gpu_prefill_memory and the least that works
    when not even one expert fits. max_pairs: no call has more pairs (pair_block is not made larger)."""
    if slots < 1:
        raise ValueError(f"staging slots must be >= 1, got {slots}")
    table = budget // TABLE_SHARE
    avail = budget - table - fixed_bytes
    per_expert = slots * sizes.staged_bytes + sizes.dequant_bytes
    pair_block = max(MIN_PAIR_BLOCK, avail // ACTIVATION_SHARE // max(1, sizes.pair_bytes))
    if max_pairs is not None:
        pair_block = max(1, min(pair_block, max_pairs))
    rest = avail - pair_block * sizes.pair_bytes
    by_budget = rest // per_expert if rest > 0 else 0
    by_group = max(1, max_group_bytes // max(1, sizes.staged_bytes))
    group = int(min(by_budget, by_group))
    if group < 1:
        least = per_expert + MIN_PAIR_BLOCK * sizes.pair_bytes + fixed_bytes
        least = -(-least * TABLE_SHARE // (TABLE_SHARE - 1))
        raise ValueError(f"gpu_prefill_memory={budget} bytes cannot hold one expert of this layer in the GPU "
                         f"prefill ({slots} staging slots of {sizes.staged_bytes} bytes, {sizes.dequant_bytes} "
                         f"dequantized, activations of {MIN_PAIR_BLOCK} pairs, {fixed_bytes} of biases): give at "
                         f"least {least} bytes ({least / 2**20:.0f} MiB)")
    return BudgetPlan(budget, group, int(pair_block), slots, group * sizes.staged_bytes, table, fixed_bytes)


def check_tables(pairs: int, plan: BudgetPlan) -> None:
    """ValueError when one call's routing tables exceed the plan's reserve (a chunk far larger than the budget
    was made for)."""
    need = pairs * TABLE_BYTES_PER_PAIR
    if need > plan.table_bytes:
        raise ValueError(f"a call of {pairs} (token, expert) pairs needs {need} bytes of routing tables on the GPU, "
                         f"more than gpu_prefill_memory / {TABLE_SHARE} = {plan.table_bytes}: chunk the prefill "
                         f"smaller or raise gpu_prefill_memory")


def transfer_groups(experts, group_experts: int) -> list[tuple[int, ...]]:
    """The experts a call touches (ascending), cut into transfer groups of at most `group_experts`
    consecutive ones, of even sizes (the groups differ by at most one expert)."""
    ids = [int(e) for e in experts]
    if group_experts < 1:
        raise ValueError(f"group_experts must be >= 1, got {group_experts}")
    if not ids:
        return []
    count = -(-len(ids) // group_experts)
    base, extra = divmod(len(ids), count)
    out, at = [], 0
    for g in range(count):
        size = base + (1 if g < extra else 0)
        out.append(tuple(ids[at:at + size]))
        at += size
    return out


@dataclass(frozen=True)
class PairSlice:
    """Pairs [start, end) of a call (grouped by expert) computed by one pair of grouped GEMMs; `ends[j]`: the
    end, relative to start, of the pairs of the group's expert j (so expert j has [ends[j-1], ends[j]))."""

    start: int
    end: int
    ends: tuple[int, ...]


def pair_slices(offsets, first: int, count: int, pair_block: int) -> list[PairSlice]:
    """The GEMM slices of a transfer group: experts first .. first+count-1 of a call whose expert i has pairs
    [offsets[i], offsets[i+1]), cut into slices of at most pair_block pairs (an expert may span two)."""
    if pair_block < 1:
        raise ValueError(f"pair_block must be >= 1, got {pair_block}")
    bounds = [int(offsets[first + j + 1]) for j in range(count)]
    lo, hi = int(offsets[first]), bounds[-1] if bounds else int(offsets[first])
    out = []
    for s in range(lo, hi, pair_block):
        e = min(hi, s + pair_block)
        out.append(PairSlice(s, e, tuple(min(max(b, s), e) - s for b in bounds)))
    return out
