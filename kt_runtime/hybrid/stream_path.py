"""The stream-ordered step of a HybridMoE: no host sync, capturable into a CUDA graph with the whole model step.

On the caller's stream, for a call with T tokens and k routed experts per token (fixed per StreamStep):
  1. on the device: slot = slot_of[ids]; the CPU rows' ids (-1 for GPU experts, and for deferred ones)
  2. async copies of x (float32), those ids and the weights into pinned host buffers
  3. host function host_submit(job): hands the buffers to the CPU engine's submission thread, returns
  4. the GPU experts (GpuExperts.dense_forward) run meanwhile
  5. host function host_wait(job): the stream waits for the CPU result
  6. async copy of the CPU result to the device; out = GPU part + CPU part (+ the previous layer's
     deferred part)
Buffer reuse is safe by stream order alone: the next call's copies into the pinned buffers are queued
after this call's wait and its copy back.

Deferral (`defer` d > 0): per token, the d CPU experts with the smallest routing weights go into a
second job, submitted after the first; this layer does not wait for it. The next MoE layer called
(`DeferralChain`) waits for it after its own GPU work and adds its result to its output, so the
deferred experts run while the next layer's attention and GPU experts do (their output reaches the
residual stream one layer late).

On a CPU device (tests) the same steps run eagerly: the host functions are called directly.
"""
from __future__ import annotations

import torch

from kt_convert import kt_kernels

from . import stream_ops


def deferral_mask(cpu_slot: torch.Tensor, w: torch.Tensor, defer: int) -> torch.Tensor:
    """bool [T,k]: per token the `defer` CPU slots (cpu_slot True) of smallest weight (ties: the later slot),
    computed on the tensors' device without a sync."""
    if defer <= 0:
        return torch.zeros_like(cpu_slot)
    key = torch.where(cpu_slot, w.to(torch.float32), torch.full_like(w, float("inf"), dtype=torch.float32))
    order = torch.sort(key, dim=1, stable=True, descending=False).indices  # smallest first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return cpu_slot & (rank < defer)


class DeferralChain:
    """Carries one layer's deferred CPU result to the next MoE layer called (inject gives all layers of a model
    one chain). pending: (StreamStep or None, float32 [T,H] device tensor, or a callable giving it)."""

    def __init__(self):
        self.pending = None

    def put(self, item) -> None:
        self.pending = item

    def take(self):
        item, self.pending = self.pending, None
        return item


def pending_result(item) -> torch.Tensor:
    """A deferred result carried on a chain: (StreamStep, job index) is waited for in stream order and brought
    to the device; a tensor (the eager path's) is itself."""
    if isinstance(item, tuple):
        step, i = item
        return step._collect(i)
    return item


class StreamStep:
    """Fixed buffers and CPU-engine jobs of one HybridMoE for calls of T tokens with k experts each."""

    def __init__(self, hybrid, tokens: int, topk: int):
        self.hybrid = hybrid
        self.T, self.k = T, k = tokens, topk
        H = hybrid.hidden_size
        dev = hybrid.device
        self.cuda = dev.type == "cuda"
        pin = self.cuda

        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        cpu = hybrid.cpu
        self.x_h = host((T, H), torch.float32)
        self.w_h = host((T, k), torch.float32)
        self.jobs = []
        for _ in range(2):  # [0]: the experts waited for in this layer, [1]: the deferred ones
            ids_h, y_h = host((T, k), torch.int64), host((T, H), torch.float32)
            job = cpu._layer.host_job(self.x_h.numpy(), ids_h.numpy(), self.w_h.numpy(), y_h.numpy(), cpu.isa,
                                      cpu.num_threads)
            self.jobs.append((job, ids_h, y_h, torch.zeros((T, H), dtype=torch.float32, device=dev)))
        self.submit_fn, self.wait_fn = kt_kernels.host_functions()

    def _host(self, fn: int, job) -> None:
        if self.cuda:
            stream_ops.launch_host_func(torch.cuda.current_stream(self.hybrid.device), fn, job.address)
        elif fn == self.submit_fn:
            job.submit()
        else:
            job.wait()

    def _collect(self, i: int) -> torch.Tensor:
        """Wait (in stream order) for job i and bring its result to the device."""
        job, _, y_h, y_d = self.jobs[i]
        self._host(self.wait_fn, job)
        y_d.copy_(y_h, non_blocking=True)
        return y_d

    def run(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, defer: int, chain: DeferralChain | None,
            parts: str = "both"):
        h = self.hybrid
        slot = h.slot_of_dev[ids]  # [T,k], -1: CPU expert
        if parts == "gpu":
            return (h.gpu.dense_forward(x, slot, w) if h.num_gpu_experts else
                    torch.zeros(x.shape, dtype=torch.float32, device=x.device)).to(x.dtype)
        on_cpu = slot < 0
        deferred = deferral_mask(on_cpu, w, defer) if defer > 0 else None
        now = on_cpu if deferred is None else on_cpu & ~deferred
        minus1 = torch.full_like(ids, -1)
        self.x_h.copy_(x, non_blocking=True)
        self.w_h.copy_(w, non_blocking=True)
        self.jobs[0][1].copy_(torch.where(now, ids, minus1), non_blocking=True)
        if deferred is not None:
            self.jobs[1][1].copy_(torch.where(deferred, ids, minus1), non_blocking=True)
        self._host(self.submit_fn, self.jobs[0][0])
        if deferred is not None:
            self._host(self.submit_fn, self.jobs[1][0])
        prev = chain.take() if chain is not None else None
        if parts == "serial":
            y = self._collect(0)
        out = h.gpu.dense_forward(x, slot, w) if h.num_gpu_experts and parts != "cpu" else None
        if parts != "serial":
            y = self._collect(0)
        out = y.clone() if out is None else out + y
        if prev is not None:
            out = out + pending_result(prev).to(out.device)
        if deferred is not None:
            if chain is not None and hasattr(chain, "put"):
                chain.put((self, 1))
            else:  # nowhere to carry it: added here (the last layer)
                out = out + self._collect(1)
        return out.to(x.dtype)

    def failures(self) -> list[str]:
        """The CPU engine's errors in this step's jobs so far (its host functions cannot raise)."""
        return [j.last_error for j, *_ in self.jobs if j.failures]
