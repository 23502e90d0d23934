"""The one-token GPU part of a HybridMoE as per-slot CUDA graphs over static buffers.

One graph per (GPU slot, first hit or not): the slot's expert (GpuExperts.expert_forward) and the weighted
accumulation into a static output row. A graph bakes its weight pointers in, so graphs are keyed by slot
rather than by the number of hits, a step replays one per hit, and a dynamic swap (which reloads a slot
in place) keeps them valid. On a CPU device the same bodies run eagerly (tests).
"""
from __future__ import annotations

import numpy as np
import torch

from .gpu_experts import GpuExperts


class DecodeGraphs:
    """inp [H+G] (float32) on the device holds the token (inp[:H]) and the hit weights (slot s's routing weight
    in inp[H+s]); it is filled by ONE host-to-device copy of the pinned inp_host. Graph (s, first=True) casts
    the token into x [1,H] (gpu_dtype), computes expert slot s and writes its weighted output into out [1,H]
    (float32); graph (s, False) adds into out. The CPU result goes through the pinned y_host into y. On a CPU
    device (tests) the same functions run eagerly in place of graphs.

    Buffer reuse needs no events: a step's pinned buffers are only rewritten after a host wait that drained
    the stream the previous step was queued on (the routing copy's wait, or the wait for a host result);
    otherwise launch() waits for that stream."""

    def __init__(self, gpu: GpuExperts, num_slots: int):
        self.gpu = gpu
        self.device = dev = gpu.device
        H, G = gpu.hidden_size, num_slots
        self.H = H
        self.cuda = dev.type == "cuda"
        self.x = torch.zeros((1, H), dtype=gpu.dtype, device=dev)
        self.inp = torch.zeros((H + G,), dtype=torch.float32, device=dev)
        self.gw = self.inp[H:]
        self.out = torch.zeros((1, H), dtype=torch.float32, device=dev)
        self.y = torch.zeros((1, H), dtype=torch.float32, device=dev)
        self.inp_host = torch.zeros((H + G,), dtype=torch.float32, pin_memory=self.cuda)
        self.x_host = self.inp_host[:H].view(1, H)  # the token, float32 (also the CPU engine's input)
        self.inp_np = self.inp_host.numpy()
        self.gw_np = self.inp_np[H:]
        self.y_host = torch.zeros((1, H), dtype=torch.float32, pin_memory=self.cuda)
        self.y_np = self.y_host.numpy()
        self.out_host = torch.zeros((1, H), dtype=torch.float32, pin_memory=self.cuda)
        self.graphs: dict[tuple[int, bool], object] = {}
        self.captured = 0
        self.last_stream = None  # the stream the last step was queued on
        self.drained = None      # a stream known to be idle (a host wait drained it since the last step)
        if self.cuda:
            with torch.cuda.device(dev):
                self.stream = torch.cuda.Stream(dev)
                self.pool = torch.cuda.graph_pool_handle()

    def run_slot(self, s: int, first: bool) -> None:
        """Slot s on the static row (the graphs' body; the expert as GpuExperts.compute runs a decode row)."""
        if first:
            self.x.copy_(self.inp[:self.H].view(1, self.H))
        o = self.gpu.expert_forward(self.x, s)
        if first:
            torch.mul(o, self.gw[s:s + 1, None], out=self.out)
        else:
            self.out.addcmul_(o, self.gw[s:s + 1, None])

    def ensure(self, keys) -> None:
        """Capture the graphs of `keys` not captured yet (before any of a step's copies or replays: a capture
        synchronizes the device and runs the body once to warm up, which writes `x` and `out`)."""
        for key in keys:
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)

    def _capture(self, s: int, first: bool):
        if not self.cuda:
            return lambda: self.run_slot(s, first)
        dev = self.device
        with torch.cuda.device(dev):
            torch.cuda.synchronize(dev)
            with torch.cuda.stream(self.stream):
                self.run_slot(s, first)  # warm-up: cuBLAS handles and workspaces for this stream
            self.stream.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                self.run_slot(s, first)
            torch.cuda.synchronize(dev)
        self.drained = None
        self.captured += 1
        return g.replay

    def set_token(self, x: torch.Tensor) -> None:
        """x [1,H] (any float dtype, on the host) into the pinned input buffer (float32)."""
        self.x_host.copy_(x)

    def launch(self, x, hits) -> None:
        """Queue the GPU part of one token: hits = [(slot, weight), ...] sorted by slot, slots distinct; x [1,H]
        (None: already written by set_token). Graphs must exist (ensure). CUDA calls: one copy, one replay
        per hit."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            last = self.last_stream
            if last is not None and self.drained != last:
                last.synchronize()  # the last step is done with the pinned and static buffers
            self.last_stream = stream
            self.drained = None
        if x is not None:
            self.set_token(x.detach().cpu() if x.device.type != "cpu" else x)
        gw = self.gw_np
        for s, wt in hits:
            gw[s] = wt
        self.inp.copy_(self.inp_host, non_blocking=True)
        first = True
        graphs = self.graphs
        for s, _ in hits:
            graphs[(s, first)]()
            first = False

    def finish(self, y, out_dtype: torch.dtype) -> torch.Tensor:
        """out + y (the CPU rows' result, float32 [1,H] numpy on the host) on the device, rounded once to
        out_dtype, into a fresh tensor (CUDA calls: one copy, one add)."""
        np.copyto(self.y_np, y)
        self.y.copy_(self.y_host, non_blocking=True)
        res = torch.empty((1, self.H), dtype=out_dtype, device=self.out.device)
        torch.add(self.out, self.y, out=res)
        return res

    def finish_host(self, y, out_dtype: torch.dtype) -> torch.Tensor:
        """out (+ y, float32 numpy [1,H] or None) on the host: one device-to-host copy and a wait, the add on
        the CPU."""
        if self.cuda:
            self.out_host.copy_(self.out, non_blocking=True)
            self.last_stream.synchronize()
            self.drained = self.last_stream
            o = self.out_host
        else:
            o = self.out
        if y is None:
            return o.to(out_dtype, copy=True)
        res = torch.from_numpy(np.add(o.numpy(), y))
        return res if out_dtype == torch.float32 else res.to(out_dtype)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """out (no CPU rows) as a fresh tensor of `dtype`."""
        return self.out.to(dtype, copy=True)
