"""The float reference MoE: what CPUMoE and HybridMoE approximate, computed plainly in float64."""
from __future__ import annotations

import torch

from .expert_activation import Activation, ExpertBiases
from .format.names import PROJECTIONS


def moe_reference(weights, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, biases: ExpertBiases | None = None,
                  activation: Activation | None = None) -> torch.Tensor:
    """Σ_j w[t,j] · (down(act(clamp(gate x + bg), clamp(up x + bu))) + bd) over each token's top-k experts, on
    the dequantized packed weights (weights.dequantize), in float64; returned as float32 [T, H]. The clamp is
    the weights' swiglu_limit L (gate <= L, -L <= up <= L), none when it is None; act is the weights'
    activation (Activation.of: silu, or gpt-oss's g*sigmoid(1.702 g)*(u+1)); biases none unless given."""
    L = weights.swiglu_limit
    act = activation if activation is not None else Activation.of(weights)
    b = biases if biases is not None else ExpertBiases()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in topk_ids.unique().tolist():
        g, u, d = (weights.dequantize(layer, e, p).double() for p in PROJECTIONS)
        t, j = (topk_ids == e).nonzero(as_tuple=True)
        xs = x[t].double()
        gate, up = xs @ g.T, xs @ u.T
        if b.gate is not None:
            gate = gate + b.gate[e].double()
        if b.up is not None:
            up = up + b.up[e].double()
        if L is not None:
            gate, up = gate.clamp(max=L), up.clamp(-L, L)
        y = act.apply(gate, up) @ d.T
        if b.down is not None:
            y = y + b.down[e].double()
        out.index_add_(0, t, y * topk_weights[t, j, None].double())
    return out.float()
