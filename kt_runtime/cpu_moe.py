"""CPU MoE engine over packed experts (read in place, no repacking).

    w = kt_runtime.load_experts(path)
    moe = CPUMoE(w, layer)
    y = moe.forward(x, topk_ids, topk_weights)          # torch: x [T,H] bf16/fp32 -> [T,H] same dtype
    y = moe.forward_f32(x_np, ids_np, weights_np)       # numpy float32 buffers, no torch

Contract (kernels_cpp/moe.hpp): each token is quantized to int8 (symmetric, amax/127, as kt's BufferA);
gate/up (+ biases); SiLU-gate (or gpt-oss's activation) with the optional clamp (gate <= L, |up| <= L); the
intermediate re-quantized per token and NUMA slice; down (+ bias); the top-k experts summed with their weights. Every ISA path (AMX tiles,
AVX-512 VNNI, portable C++) gives bit-identical results; exp is the fixed polynomial exp_det, not
libm's. The GIL is released while computing. One forward is one parallel region over a persistent
pool whose workers spin for KT_MOE_SPIN_US microseconds (default 2000) after a call before they sleep
(0: at once).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kt_convert import kt_kernels

from .expert_activation import Activation, ExpertBiases
from .format.names import PROJECTIONS
from .format.methods import METHODS



def check_moe_inputs(x, topk_ids, topk_weights, hidden_size: int) -> None:
    """The shapes every MoE call takes (ValueError otherwise): torch tensors, x [T, H], topk_ids [T, k],
    topk_weights of topk_ids' shape."""
    if not all(isinstance(t, torch.Tensor) for t in (x, topk_ids, topk_weights)):
        raise ValueError("x, topk_ids and topk_weights must be torch tensors")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"x must be [tokens, {hidden_size}], got {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [tokens={x.shape[0]}, k], got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} differs from topk_ids "
                         f"{tuple(topk_ids.shape)}")


class CPUMoE:
    """One layer's routed experts, run on the CPU.

    weights: the object from `kt_runtime.load_experts` (attributes method, threadpool_count,
    num_experts, hidden_size, moe_intermediate_size, layers, activation, swiglu_limit;
    `expert_tensors(layer, expert, proj, numa)`).
    num_threads: threads of the shared pool, 0 .. kt_kernels.MAX_THREADS (None or 0: every CPU this process
    may use); they are started by the constructor (kt_kernels.ThreadStartError when the system refuses one).
    activation / swiglu_limit: override the manifest's ("silu", or "gpt_oss" / "situ" with the manifest's
    activation_params; expert_activation.Activation; rawint4 weights run "silu" only).
    biases: expert_activation.ExpertBiases of this layer (gpt-oss: read_expert_biases or the model's), or None.
    isa: "auto" or one of kt_kernels.moe_isas(), the engine's ISAs this CPU runs (of portable, avx2, avxvnni,
    avx512, amx); ValueError for another.
    """

    def __init__(self, weights, layer: int, num_threads: int | None = None, activation: str | None = None,
                 swiglu_limit: float | None = None, isa: str = "auto", biases: ExpertBiases | None = None):
        layers = list(weights.layers)
        if layer not in layers:
            raise ValueError(f"layer {layer} is not in these weights (layers: {layers})")
        method = str(weights.method).lower()
        if method not in METHODS:
            raise ValueError(f"unsupported quant method {weights.method!r} (expected {' or '.join(METHODS)})")
        act = Activation.of(weights, activation)
        limit = swiglu_limit if swiglu_limit is not None else getattr(weights, "swiglu_limit", None)
        if limit is not None:
            limit = float(limit)
            if not (math.isfinite(limit) and limit > 0):
                raise ValueError(f"swiglu_limit must be a positive finite number, got {limit}")
        self.layer = layer
        self.method = method
        self.hidden_size = int(weights.hidden_size)
        self.intermediate_size = int(weights.moe_intermediate_size)
        self.num_experts = int(weights.num_experts)
        self.threadpool_count = int(weights.threadpool_count)
        self.activation = act.kind
        self.act = act
        if biases is not None and not isinstance(biases, ExpertBiases):
            raise ValueError(f"biases must be an ExpertBiases or None, got {type(biases).__name__}")
        self.biases = biases.check(self.num_experts, self.hidden_size, self.intermediate_size) \
            if biases is not None and biases.any() else None
        self.swiglu_limit = limit
        self.isa = isa
        shards = []
        for e in range(self.num_experts):
            per_numa = []
            for t in range(self.threadpool_count):
                six = []
                for p in PROJECTIONS:
                    w, s = weights.expert_tensors(layer, e, p, t)
                    six += [np.asarray(w), np.asarray(s)]
                per_numa.append(tuple(six))
            shards.append(per_numa)
        # Validates alignment, sizes and dtypes of every shard (ValueError otherwise).
        extra = act.engine_kwargs()
        if self.biases is not None:
            extra.update(self.biases.engine_kwargs())
        self._layer = kt_kernels.MoELayer(method, shards, self.hidden_size, self.intermediate_size,
                                          self.threadpool_count, limit, **extra)
        kt_kernels.best_isa()  # CPU detection (and the AMX permission request) before the first call
        self.num_threads = num_threads
        if isa != "auto":
            self._check_isa(isa)

    @property
    def num_threads(self) -> int:
        """Threads of the engine's pool for this layer (0: every CPU this process may use)."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, n: int | None) -> None:
        """Validated; the pool's threads start now: kt_kernels.ThreadStartError (a RuntimeError naming the
        thread that failed) here rather than at the next forward."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= kt_kernels.MAX_THREADS):
            raise ValueError(f"num_threads must be an int in [0, {kt_kernels.MAX_THREADS}] or None (0, None: every "
                             f"CPU this process may use), got {n!r}")
        kt_kernels.start_moe_pool(n or 0)
        self._num_threads = n or 0

    @staticmethod
    def _check_isa(isa: str) -> None:
        runnable = kt_kernels.moe_isas()
        if isa not in runnable:
            raise ValueError(f"isa {isa!r} is not one this CPU runs (expected auto, {', '.join(runnable)})")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts of this layer for T tokens, on the CPU.

        x: hidden states [T, H] (H = hidden_size), bfloat16 or float32; topk_ids: the router's experts
        [T, k], int64 in [0, num_experts); topk_weights: their weights [T, k], float32 (applied as given:
        normalize them first if the model does). All CPU tensors. Returns [T, H] in x's dtype:
        y[t] = sum_j topk_weights[t, j] * down(silu(gate x[t]) * up x[t]) of expert topk_ids[t, j]
        (with the swiglu clamp where the model has one), shared experts not included. ValueError naming
        the argument on a wrong shape, dtype, device, id out of range or non-finite value.
        """
        check_moe_inputs(x, topk_ids, topk_weights, self.hidden_size)
        if x.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
        if topk_ids.dtype != torch.int64:
            raise ValueError(f"topk_ids must be int64, got {topk_ids.dtype}")
        if topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32, got {topk_weights.dtype}")
        for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device.type != "cpu":
                raise ValueError(f"{name} must be on the CPU, got {t.device}")
        xf = x.detach().to(torch.float32).contiguous()
        ids = topk_ids.detach().contiguous()
        tw = topk_weights.detach().contiguous()
        y = torch.from_numpy(self.forward_f32(xf.numpy(), ids.numpy(), tw.numpy()))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    __call__ = forward

    def forward_f32(self, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """The engine on host buffers, without torch: x float32 [T, H], topk_ids int64 [T, k], topk_weights
        float32 [T, k], all C-contiguous -> a new float32 [T, H]. ValueError (kt_kernels.KernelArgumentError)
        naming the argument on a wrong shape, dtype, layout, id out of range or non-finite value."""
        return self._layer.forward(x, topk_ids, topk_weights, self.isa, self._num_threads)

    def __repr__(self) -> str:
        return (f"CPUMoE(layer={self.layer}, method={self.method}, experts={self.num_experts}, "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, threadpool_count={self.threadpool_count}, "
                f"activation={self.activation}, swiglu_limit={self.swiglu_limit}, biases={self.biases is not None}, "
                f"isa={self.isa})")
