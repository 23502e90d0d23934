"""The teacher-forced passes of `eval`: one transformers model, two sets of routed-experts modules swapped in
window by window (kt_runtime.integrations.swap_experts), the candidate's next-token distributions scored
against the reference's (convert.eval.divergence), and per MoE layer how the two sets differ."""
from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from kt_convert.kt_runtime.integrations import find_expert_modules, swap_experts

from .divergence import Scores
from ..progress import MIN_BAR_COLUMNS, terminal_columns


@dataclass
class LayerStats:
    """One MoE layer over a run: the candidate experts' output against the reference experts' on the same input
    (when measured), and how often the two passes route a token to the same experts."""

    layer: int
    err2: float = 0.0  # sum (candidate output - reference output)^2
    ref2: float = 0.0  # sum (reference output)^2
    measured: bool = False
    same_routes: int = 0  # tokens routed to the same set of experts in both passes
    tokens: int = 0

    @property
    def rel_error(self) -> float | None:
        if not self.measured:
            return None
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else (0.0 if self.err2 == 0 else math.inf)

    @property
    def route_agreement(self) -> float:
        return self.same_routes / self.tokens if self.tokens else math.nan


class ExpertsProbe(nn.Module):
    """Stands in for one layer's experts module: calls it, keeps the top-k ids it was given and, with a
    `compare` module, also runs that on the same input and adds the squared difference to `stats`."""

    def __init__(self, inner: nn.Module, compare: nn.Module | None = None, stats: LayerStats | None = None):
        super().__init__()
        self.inner = inner
        self.routes: list[torch.Tensor] = []
        self.compare = compare
        self.stats = stats

    def forward(self, hidden_states, top_k_index, top_k_weights, **kwargs):
        out = self.inner(hidden_states, top_k_index, top_k_weights, **kwargs)
        self.routes.append(top_k_index.detach().reshape(-1, top_k_index.shape[-1]).cpu())
        if self.compare is not None:
            ref = self.compare(hidden_states, top_k_index, top_k_weights, **kwargs).float()
            self.stats.err2 += float(torch.sum((out.float() - ref) ** 2))
            self.stats.ref2 += float(torch.sum(ref ** 2))
            self.stats.measured = True
        return out

    def take_routes(self) -> torch.Tensor:
        """The [tokens, k] top-k ids seen since the last call, each row sorted."""
        routes, self.routes = self.routes, []
        return torch.cat(routes).sort(-1).values


def compare_on_windows(net: nn.Module, windows: list[list[int]], reference: dict[str, nn.Module],
                       candidate: dict[str, nn.Module], *, per_layer: bool = True, progress: bool | None = None,
                       stream=None) -> tuple[Scores, list[LayerStats]]:
    """Run each window (a list of ctx token ids) with the `reference` experts modules, then with the `candidate`
    ones ({qualified name: module}, every routed-experts module of `net`), and score the candidate's predictions
    for the window's second half against the reference's. per_layer: also run the reference experts on the
    candidate pass's inputs (their output error per layer). `net` holds `reference` again afterwards."""
    layer_of = {name: layer for layer, (name, _) in find_expert_modules(net).items()}
    if set(reference) != set(layer_of) or set(candidate) != set(layer_of):
        raise ValueError(f"the reference and candidate modules must name every experts module of the model "
                         f"({sorted(layer_of)}); got {sorted(reference)} and {sorted(candidate)}")
    lengths = {len(w) for w in windows}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"windows must all have one length of at least 2 tokens, got {sorted(lengths)}")
    stats = {name: LayerStats(layer) for name, layer in layer_of.items()}
    ref_probes = {name: ExpertsProbe(m) for name, m in reference.items()}
    cand_probes = {name: ExpertsProbe(m, reference[name] if per_layer else None, stats[name])
                   for name, m in candidate.items()}
    ctx = lengths.pop()
    first = ctx // 2  # predictions for tokens first..ctx-1, from the logits of positions first-1..ctx-2
    device = next(net.parameters()).device
    scores = Scores()
    bar = WindowProgress(len(windows), progress, stream)
    try:
        with torch.no_grad():
            for w in windows:
                ids = torch.tensor([w], dtype=torch.long, device=device)
                swap_experts(net, ref_probes)
                ref_logits = _logits(net, ids, ctx - first + 1)
                swap_experts(net, cand_probes)
                cand_logits = _logits(net, ids, ctx - first + 1)
                scores.add(ref_logits, cand_logits, ids[0, first:])
                for name, s in stats.items():
                    same = (ref_probes[name].take_routes() == cand_probes[name].take_routes()).all(-1)
                    s.same_routes += int(same.sum())
                    s.tokens += int(same.numel())
                bar.advance()
    finally:
        swap_experts(net, reference)
        bar.close()
    return scores, sorted(stats.values(), key=lambda s: s.layer)


def _logits(net: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """[keep - 1, V] float32 logits of the positions len-keep .. len-2 (the last one predicts nothing scored);
    only those go through the output head where the model takes logits_to_keep."""
    if "logits_to_keep" in inspect.signature(net.forward).parameters:
        out = net(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0]
    else:
        out = net(input_ids=ids, use_cache=False).logits[0]
    return out[-keep:-1].float()


class WindowProgress:
    """A tqdm bar over the windows on a terminal; otherwise a plain line about every tenth of the run."""

    def __init__(self, total: int, enabled: bool | None, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.quiet = enabled is False
        self.bar = None
        tty = _isatty(self.stream) if enabled is None else enabled
        if tty and terminal_columns(self.stream) >= MIN_BAR_COLUMNS:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="window", file=self.stream, dynamic_ncols=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif not self.quiet and (self.done == self.total or self.done % max(1, self.total // 10) == 0):
            print(f"window {self.done}/{self.total} ({time.perf_counter() - self.start:.1f} s)", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
