"""The float reference MoE: what CPUMoE and HybridMoE approximate, computed plainly in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .format.layout import PROJECTIONS


def moe_reference(weights, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """Σ_j w[t,j] · down(silu(clamp(gate x)) · clamp(up x)) over each token's top-k experts, on the
    dequantized packed weights (weights.dequantize), in float64; returned as float32 [T, H]. The clamp
    is the weights' swiglu_limit L (gate <= L, -L <= up <= L), none when it is None."""
    L = weights.swiglu_limit
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in topk_ids.unique().tolist():
        g, u, d = (weights.dequantize(layer, e, p).double() for p in PROJECTIONS)
        t, j = (topk_ids == e).nonzero(as_tuple=True)
        xs = x[t].double()
        gate, up = xs @ g.T, xs @ u.T
        if L is not None:
            gate, up = gate.clamp(max=L), up.clamp(-L, L)
        out.index_add_(0, t, (F.silu(gate) * up) @ d.T * topk_weights[t, j, None].double())
    return out.float()
