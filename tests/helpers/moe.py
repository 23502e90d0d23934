"""Packed experts without files (FakeExperts: packed in memory with kt_kernels.pack) and the float MoE the
engine's results are judged against."""
from __future__ import annotations

import numpy as np
import torch

from kt_convert import kt_kernels
from kt_convert.kt_runtime.format.spec import PackedSpec
from kt_convert.quant.reference import dequantize_expert


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


class FakeExperts:
    """Stand-in for kt_runtime.load_experts(): same attributes and methods, packed with kt_kernels.pack."""

    def __init__(self, method="int4", hidden=256, inter=256, experts=4, threadpool_count=1, layers=(0,), topk=2,
                 swiglu_limit=None, seed=0):
        self.method, self.threadpool_count = method, threadpool_count
        self.hidden_size, self.moe_intermediate_size = hidden, inter
        self.num_experts, self.num_experts_per_tok = experts, topk
        self.layers, self.activation, self.swiglu_limit = list(layers), "silu", swiglu_limit
        self.spec = PackedSpec(method, threadpool_count, hidden, inter, experts, topk, tuple(layers), "silu",
                               swiglu_limit)
        g = torch.Generator().manual_seed(seed)
        il = inter // threadpool_count
        nbytes = 1 if method == "int8" else 2
        self._t = {}
        for layer in layers:
            for e in range(experts):
                mats = {"gate": torch.randn(inter, hidden, generator=g) / hidden ** 0.5,
                        "up": torch.randn(inter, hidden, generator=g) / hidden ** 0.5,
                        "down": torch.randn(hidden, inter, generator=g) / inter ** 0.5}
                jobs, keys = [], []
                for p, w in mats.items():
                    bits = _bf16_bits(w)
                    for t in range(threadpool_count):
                        if p == "down":
                            src, col0, n, k = bits, t * il, hidden, il
                        else:
                            src, col0, n, k = np.ascontiguousarray(bits[t * il:(t + 1) * il]), 0, il, hidden
                        ow = np.zeros(n * k // nbytes, np.uint8)
                        os_ = np.zeros(n, np.float32)
                        jobs.append(("bf16", src, None, col0, k, ow, os_))
                        keys.append((layer, e, p, t))
                kt_kernels.pack(method, jobs)
                for key, job in zip(keys, jobs):
                    job[5].setflags(write=False)
                    self._t[key] = (job[5], job[6])

    def expert_tensors(self, layer, expert, proj, numa):
        return self._t[(layer, expert, proj, numa)]

    def dequantize(self, layer, expert, proj):
        return dequantize_expert(self, layer, expert, proj)


def _quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """kt BufferA per row: d = amax/127, q = rne(x * fl32(1/d)); returns q*d in float64."""
    x32 = x.to(torch.float32)
    d = x32.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x32 * inv).clamp(-128, 127)
    return q.double() * d.double()


def float_moe(w, layer, x, ids, tw, limit=None, quant_act=False):
    x = x.double()
    out = torch.zeros_like(x)
    T = w.threadpool_count
    il = w.moe_intermediate_size // T
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        if quant_act:
            xe = _quant_dequant(xe)
        g = xe @ w.dequantize(layer, e, "gate").double().T
        u = xe @ w.dequantize(layer, e, "up").double().T
        if quant_act:  # the engine's gate/up come out in fp32
            g, u = g.float().double(), u.float().double()
        if limit is not None:
            g = g.clamp(max=limit)
            u = u.clamp(-limit, limit)
        a = torch.nn.functional.silu(g) * u
        if quant_act:
            a = torch.cat([_quant_dequant(a[:, t * il:(t + 1) * il].float()) for t in range(T)], dim=1)
        y = a @ w.dequantize(layer, e, "down").double().T
        out.index_add_(0, tok, y * tw[tok, slot].double()[:, None])
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def routing(tokens, experts, topk, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).to(torch.int64)
    tw = torch.softmax(torch.randn(tokens, topk, generator=g), dim=-1).float()
    return ids, tw
