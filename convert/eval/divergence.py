"""How far one model's next-token distributions are from another's, on the same tokens (pure torch).

For each scored position, with p the reference's distribution and q the candidate's (softmax of the
logits, in float64 so that identical logits give exactly 0):
    KL(p || q) = sum_v p_v (log p_v - log q_v)        (nats; llama-perplexity's --kl-divergence)
    top-1 agreement: argmax p == argmax q
    negative log-likelihood of the true next token under each, whose mean gives perplexity exp(mean NLL).
`token_scores` computes them for a block of positions; `Scores` gathers them over a run and `summary`
reports means (with their standard errors), percentiles and perplexities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
ROWS_PER_STEP = 64  # positions turned into float64 distributions at once: bounded memory for big vocabularies


def token_scores(ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of [S, V] logits (any float dtype) and [S] true next tokens: (KL(p||q), NLL under p,
    NLL under q, argmax agreement), the first three float64 [S], the last bool [S]."""
    if ref_logits.shape != cand_logits.shape or ref_logits.dim() != 2 or targets.shape != ref_logits.shape[:1]:
        raise ValueError(f"logits {tuple(ref_logits.shape)} / {tuple(cand_logits.shape)} and targets "
                         f"{tuple(targets.shape)} do not match ([S, V], [S, V], [S])")
    parts = []
    for lo in range(0, ref_logits.shape[0], ROWS_PER_STEP):
        r = torch.log_softmax(ref_logits[lo:lo + ROWS_PER_STEP].to(torch.float64), dim=-1)
        c = torch.log_softmax(cand_logits[lo:lo + ROWS_PER_STEP].to(torch.float64), dim=-1)
        t = targets[lo:lo + ROWS_PER_STEP].to(torch.long).unsqueeze(1)
        # p log p is 0 where p underflows to 0; the where() keeps 0 * (-inf) out
        kld = torch.where(r > -math.inf, r.exp() * (r - c), torch.zeros((), dtype=torch.float64)).sum(-1)
        parts.append((kld.clamp_min(0.0), -r.gather(1, t).squeeze(1), -c.gather(1, t).squeeze(1),
                      ref_logits[lo:lo + ROWS_PER_STEP].argmax(-1) == cand_logits[lo:lo + ROWS_PER_STEP].argmax(-1)))
    return tuple(torch.cat(x) for x in zip(*parts))


def _mean_and_error(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = float(x.mean())
    return mean, (float(x.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan)


@dataclass
class Scores:
    """The per-position measures of a run, gathered block by block (a few float64 per scored token)."""

    kld: list[torch.Tensor] = field(default_factory=list)
    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_cand: list[torch.Tensor] = field(default_factory=list)
    same_top1: list[torch.Tensor] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        for store, values in zip((self.kld, self.nll_ref, self.nll_cand, self.same_top1),
                                 token_scores(ref_logits, cand_logits, targets)):
            store.append(values.cpu())

    @property
    def count(self) -> int:
        return sum(x.numel() for x in self.kld)

    def summary(self) -> dict:
        """Means with standard errors, KL percentiles and maximum, perplexities (empty Scores: ValueError)."""
        if not self.count:
            raise ValueError("no positions were scored")
        kld, same = torch.cat(self.kld), torch.cat(self.same_top1).to(torch.float64)
        nll_ref, nll_cand = torch.cat(self.nll_ref), torch.cat(self.nll_cand)
        kld_mean, kld_err = _mean_and_error(kld)
        top1, top1_err = _mean_and_error(same)
        log_ratio, log_ratio_err = _mean_and_error(nll_cand - nll_ref)  # ln(PPL(cand) / PPL(ref))
        q = np.percentile(kld.numpy(), PERCENTILES)  # (torch.quantile refuses more than 2^24 values)
        return {
            "positions": int(kld.numel()),
            "kld_mean": kld_mean, "kld_mean_stderr": kld_err,
            "kld_percentiles": {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, q)},
            "kld_max": float(kld.max()),
            "top1_agreement": top1, "top1_agreement_stderr": top1_err,
            "perplexity_reference": math.exp(float(nll_ref.mean())),
            "perplexity_candidate": math.exp(float(nll_cand.mean())),
            "ln_perplexity_ratio": log_ratio, "ln_perplexity_ratio_stderr": log_ratio_err,
        }
