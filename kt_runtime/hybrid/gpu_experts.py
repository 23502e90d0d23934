"""The GPU-resident experts of one layer and their eager computation.

Slot s holds one expert as [gate | up] [2I, H] and down [H, I] in `dtype` on `device`, dequantized from
the packed file (and, with biases, [gate | up] [2I] and down [H] biases), so the GPU part differs from the
CPU engine only by the engine's int8 activations (and the bf16 rounding). `expert_forward` is the one definition of an expert on the GPU: the eager path and
the decode graphs both run it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..expert_activation import Activation, ExpertBiases
from .routing import GpuPart


def clamp_bounds(swiglu_limit: float | None, intermediate_size: int, device, dtype):
    """(lo, hi) [2I] bounds of one in-place clamp of [gate | up]: gate <= L, -L <= up <= L (in dtype, as a
    scalar clamp); (None, None) without a limit."""
    if swiglu_limit is None:
        return None, None
    L, I = swiglu_limit, intermediate_size
    lo = torch.cat([torch.full((I,), float("-inf")), torch.full((I,), -L)]).to(device=device, dtype=dtype)
    return lo, torch.full((2 * I,), L).to(device=device, dtype=dtype)


def gated_activation(h: torch.Tensor, clamp_lo, clamp_hi, act: Activation, intermediate_size: int) -> torch.Tensor:
    """act(clamp(gate), clamp(up)) of h = [gate | up] [m, 2I] (clamped in place)."""
    if clamp_lo is not None:
        h.clamp_(clamp_lo, clamp_hi)
    I = intermediate_size
    return act.apply(h[:, :I], h[:, I:])


class GpuExperts:
    def __init__(self, weights, layer: int, num_slots: int, hidden_size: int, intermediate_size: int,
                 device: torch.device, dtype: torch.dtype, swiglu_limit: float | None,
                 activation: Activation | None = None, biases: ExpertBiases | None = None):
        self.weights, self.layer, self.device, self.dtype = weights, layer, device, dtype
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act = activation if activation is not None else Activation()
        self.biases = biases if biases is not None and biases.any() else None
        G, H, I = num_slots, hidden_size, intermediate_size
        self.w13 = torch.empty((G, 2 * I, H), dtype=dtype, device=device)
        self.w2 = torch.empty((G, H, I), dtype=dtype, device=device)
        # biases in `dtype` (as the model's own bf16 experts add them); zeros where a part has none
        self.b13 = torch.zeros((G, 2 * I), dtype=dtype, device=device) if self.biases is not None else None
        self.b2 = torch.zeros((G, H), dtype=dtype, device=device) if self.biases is not None else None
        # one in-place clamp of [gate | up]: gate <= L, -L <= up <= L (bounds in dtype, as a scalar clamp)
        self.clamp_lo, self.clamp_hi = clamp_bounds(swiglu_limit if G else None, I, device, dtype)

    def load(self, slot: int, expert: int) -> None:
        """Dequantize `expert` of the packed weights into `slot` (in place: graphs keep their pointers)."""
        w = self.weights
        gate = w.dequantize(self.layer, expert, "gate")
        up = w.dequantize(self.layer, expert, "up")
        down = w.dequantize(self.layer, expert, "down")
        self.w13[slot].copy_(torch.cat([gate, up], 0).to(self.dtype))
        self.w2[slot].copy_(down.to(self.dtype))
        b = self.biases
        if b is not None:
            I, H = self.intermediate_size, self.hidden_size
            zeros = torch.zeros
            self.b13[slot].copy_(torch.cat([b.gate[expert] if b.gate is not None else zeros(I),
                                            b.up[expert] if b.up is not None else zeros(I)]).to(self.dtype))
            self.b2[slot].copy_((b.down[expert] if b.down is not None else zeros(H)).to(self.dtype))

    def expert_forward(self, xs: torch.Tensor, slot: int) -> torch.Tensor:
        """down(act(clamp(gate xs + bg), clamp(up xs + bu))) + bd of the expert in `slot`, xs [m, H] in `dtype`
        (act: silu(g) * u, or gpt-oss's g * sigmoid(alpha g) * (u + 1); biases when the layer has them)."""
        h = F.linear(xs, self.w13[slot], None if self.b13 is None else self.b13[slot])
        h = gated_activation(h, self.clamp_lo, self.clamp_hi, self.act, self.intermediate_size)
        return F.linear(h, self.w2[slot], None if self.b2 is None else self.b2[slot])

    def compute(self, x_dev: torch.Tensor, gpu_part: GpuPart, out: torch.Tensor) -> torch.Tensor:
        """Adds the GPU experts' weighted outputs into `out` (float32 [T,H] on the device).

        A slot hit by one token (decode) reads that token's row as a view and adds into its output row with
        one addcmul (no index tensors, no gather / scatter kernels): 5 kernels per hit (6 with the clamp)."""
        tok, gw, groups = gpu_part
        dev = self.device
        tok_l = tok.tolist()
        gw_d = gw.to(dev, non_blocking=True)
        tok_d = None
        xg = x_dev if x_dev.dtype == self.dtype else x_dev.to(self.dtype)
        for sl, a, b in groups:
            if b - a == 1:
                t = tok_l[a]
                xs = xg[t:t + 1]
            else:
                if tok_d is None:
                    tok_d = tok.to(dev, non_blocking=True)
                t = tok_d[a:b]
                xs = xg.index_select(0, t)
            o = self.expert_forward(xs, sl)
            if b - a == 1:
                out[t:t + 1].addcmul_(o, gw_d[a:a + 1, None])
            else:
                out.index_add_(0, t, o.float() * gw_d[a:b, None])
        return out

    def run(self, x: torch.Tensor, gpu_part: GpuPart, stream) -> torch.Tensor:
        """The GPU part as the launcher thread runs it: on `stream` (the caller's), into a fresh float32 [T,H]."""
        if stream is not None:
            with torch.cuda.stream(stream):
                return self.run(x, gpu_part, None)
        out = torch.zeros((x.shape[0], self.hidden_size), dtype=torch.float32, device=self.device)
        return self.compute(x.to(self.device, non_blocking=True), gpu_part, out)

    def dense_forward(self, x: torch.Tensor, slot: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The GPU part without the routing on the host (capturable: fixed shapes, no sync): every slot's
        expert on every token, weighted by the token's routing weight of that slot (0 where not routed).
        x [T,H], slot int64 [T,k] (-1: not a GPU expert), w [T,k] -> float32 [T,H]. Reads all G slots' weights
        each call: for decode steps (T small) that is the cost of the GPU part."""
        G, I = self.w13.shape[0], self.intermediate_size
        T = x.shape[0]
        gw = torch.zeros((T, G + 1), dtype=torch.float32, device=x.device)
        gw.scatter_add_(1, torch.where(slot >= 0, slot, G), w.to(torch.float32))  # column G: the CPU slots
        h = torch.matmul(x.to(self.dtype).unsqueeze(0), self.w13.transpose(1, 2))  # [G, T, 2I]
        if self.b13 is not None:
            h = h + self.b13[:, None, :]
        if self.clamp_lo is not None:
            h = torch.minimum(torch.maximum(h, self.clamp_lo), self.clamp_hi)
        a = self.act.apply(h[..., :I], h[..., I:])
        o = torch.matmul(a, self.w2.transpose(1, 2))  # [G, T, H]
        if self.b2 is not None:
            o = o + self.b2[:, None, :]
        return (o.float() * gw[:, :G].T[:, :, None]).sum(0)
