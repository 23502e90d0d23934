"""One layer's routed experts split between a GPU (hot experts, bf16, torch) and the CPU (the rest, CPUMoE).

    w = kt_runtime.load_experts(out_dir)
    moe = HybridMoE(w, layer, num_gpu_experts=16, device="cuda", placement="frequency", stats=stats)
    y = moe(x, topk_ids, topk_weights)      # x [T,H] on any device -> [T,H], same device and dtype

A call copies the routing to the host (it decides which rows go where: asynchronous copies into pinned
memory, then one wait on an event) and splits it.

Decode (one token, CUDA; cuda_graphs=True, the default there): the GPU part is launched from the calling
thread BEFORE the CPU engine starts, as CUDA graphs: one graph per GPU slot (the slot's two matmuls,
clamp, SiLU-gate and weighted accumulation into a static output row; a graph bakes its weight pointers in,
so graphs are keyed by slot rather than by the number of hits, and a step replays one per hit, about 10 µs
each, no weight copies). The token and the hit weights reach the graphs through static buffers (one
device copy, one pinned host-to-device copy). The GPU then computes while this thread runs the CPU engine;
the CPU result goes through a pinned buffer to the device and one add kernel gives the output. Graphs are
captured on first use (or all at once by capture_decode_graphs()) and stay valid across dynamic swaps
(weights are reloaded in place). A decode call with no GPU hit is the CPU engine alone, bit-identical to
CPUMoE.

Other calls (prefill, device="cpu", cuda_graphs=False): the GPU experts are handed to a persistent launcher
thread (which queues them with torch on `device`, on the caller's stream) while the calling thread runs the
CPU experts through CPUMoE (the engine releases the GIL); then it waits for the launcher and sums both.

The CPU engine gets one core fewer than the process may use by default (num_threads=None): its workers spin
between calls, and the calling thread (decode) or the launcher thread needs a core of its own. The GPU
experts are dequantized from the packed file, so the GPU part differs from the CPU part only by the CPU
engine's int8 activations (and bf16 rounding). A HybridMoE is not meant to be called from several threads
at once (the decode graphs use static buffers).

Dynamic placement (dynamic=True): routing counts are observed on every call; every `update_interval`
calls the hottest CPU experts replace the coldest GPU ones (at most `max_swaps` per update, and only
when hotter by the factor `1 + hysteresis`); the window of counts then decays by `decay`.

Profiling: set `moe.profile = {}` and each call appends per-stage host times (seconds) to
profile[stage]: routing (copy to the host + wait), split (checks, observe, split), gpu_launch (decode:
input copies and graph replays; otherwise the hand-off), cpu_engine, join (waiting for the launcher),
final_add.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .placement import gpu_expert_mask, resolve_stats

class _Job:
    """One call handed to the launcher thread; wait() returns its result or re-raises its error."""

    __slots__ = ("fn", "args", "result", "error", "_done")

    def __init__(self, fn, args):
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self._done = threading.Lock()
        self._done.acquire()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
        finally:
            self.fn = self.args = None
            self._done.release()

    def wait(self, reraise: bool = True):
        self._done.acquire()
        self._done.release()
        if self.error is not None and reraise:
            raise self.error
        return self.result


class _Launcher:
    """A persistent daemon thread running jobs in order (the GPU part's kernel launches).

    A lock and a SimpleQueue (both C-level, GIL released while blocked): the hand-off costs a thread
    wake-up, not an executor's futures and conditions."""

    def __init__(self, name: str = "kt-gpu-launch"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # thread-local; the jobs build no autograd graph
        while True:
            job = self._q.get()
            if job is None:
                return
            job.run()

    def submit(self, fn, *args) -> _Job:
        job = _Job(fn, args)
        self._q.put(job)
        return job


_launcher_obj: _Launcher | None = None
_launcher_lock = threading.Lock()


def _launcher() -> _Launcher:
    global _launcher_obj
    obj = _launcher_obj
    if obj is None or not obj.thread.is_alive():
        with _launcher_lock:
            if _launcher_obj is None or not _launcher_obj.thread.is_alive():
                _launcher_obj = _Launcher()
            obj = _launcher_obj
    return obj


def _forget_launcher() -> None:  # a forked child has no launcher thread
    global _launcher_obj, _launcher_lock
    _launcher_obj = None
    _launcher_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_launcher)


def default_cpu_threads() -> int:
    """CPU engine threads HybridMoE uses by default: the CPUs this process may use, less one for the thread
    that launches the GPU experts (the engine's workers spin between calls and would starve it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n - 1)


class _DecodeGraphs:
    """The one-token GPU part of a HybridMoE as per-slot CUDA graphs over static buffers.

    inp [H+G] (float32) on the device holds the token (inp[:H]) and the hit weights (slot s's routing weight
    in inp[H+s]); it is filled by ONE host-to-device copy of the pinned inp_host. Graph (s, first=True) casts
    the token into x [1,H] (gpu_dtype), computes expert slot s and writes its weighted output into out [1,H]
    (float32); graph (s, False) adds into out. The CPU result goes through the pinned y_host into y. On a CPU
    device (tests) the same functions run eagerly in place of graphs.

    Buffer reuse needs no events: a step's pinned buffers are only rewritten after a host wait that drained
    the stream the previous step was queued on (the routing copy's wait, or the wait for a host result);
    otherwise launch() waits for that stream."""

    def __init__(self, moe: "HybridMoE"):
        self.moe = moe
        dev = moe.device
        H, G = moe.hidden_size, moe.num_gpu_experts
        self.H = H
        self.cuda = dev.type == "cuda"
        self.x = torch.zeros((1, H), dtype=moe.gpu_dtype, device=dev)
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
        """Slot s on the static row (the graphs' body; the same kernels as HybridMoE._gpu_compute's decode rows)."""
        m = self.moe
        I = m.intermediate_size
        if first:
            self.x.copy_(self.inp[:self.H].view(1, self.H))
        h = F.linear(self.x, m._w13[s])
        if m._clamp_lo is not None:
            h.clamp_(m._clamp_lo, m._clamp_hi)
        h = F.silu(h[:, :I]) * h[:, I:]
        o = F.linear(h, m._w2[s])
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
        dev = self.moe.device
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
            stream = torch.cuda.current_stream(self.moe.device)
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


def _load_weights(weights):
    if isinstance(weights, (str, Path)):
        from .loader import load_experts

        return load_experts(weights)
    return weights


class HybridMoE:
    """One layer of packed routed experts, the `num_gpu_experts` hot ones on `device`, the rest on the CPU.

    weights: a PackedExperts (kt_runtime.load_experts) or the path of a packed output.
    num_gpu_experts: int N, or a bool mask [E] / list of expert ids (then `placement` is ignored).
    placement: "uniform" (experts 0..N-1), "frequency" (top N of `stats` for this layer), or a mask / ids.
    stats: routing statistics for "frequency": ExpertStats, a stats file path, or {layer: counts}.
    dynamic: promote / demote experts between calls from the observed routing (see module doc).
    num_threads: CPU engine threads (None: default_cpu_threads(), every usable CPU but one; 0: all of them).
    activation, swiglu_limit, isa: passed to CPUMoE (activation / limit override the manifest).
    gpu_dtype: dtype of the GPU-resident experts and of their matmuls (bfloat16).
    cuda_graphs: one-token calls through the decode path (module doc): None = on CUDA devices; True on a CPU
        device runs the same path eagerly (tests); False = every call through the launcher thread.
    """

    def __init__(self, weights, layer: int, num_gpu_experts=0, device: str | torch.device = "cuda",
                 placement="uniform", stats=None, dynamic: bool = False, update_interval: int = 32,
                 max_swaps: int | None = None, hysteresis: float = 0.25, decay: float = 0.5,
                 num_threads: int | None = None, activation: str | None = None,
                 swiglu_limit: float | None = None, isa: str = "auto", gpu_dtype: torch.dtype = torch.bfloat16,
                 cuda_graphs: bool | None = None):
        from .cpu_moe import CPUMoE

        weights = _load_weights(weights)
        self.weights = weights
        self.layer = layer
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available (use device='cpu' to run the GPU part on the CPU)")
        # CPUMoE validates layer, method, activation, limit and num_threads; it holds every expert of the
        # layer (mmapped, no copy), so a dynamic demotion needs no reload on the CPU side.
        if num_threads is None:
            num_threads = default_cpu_threads()
        self.cpu = CPUMoE(weights, layer, num_threads=num_threads, activation=activation,
                          swiglu_limit=swiglu_limit, isa=isa)
        self.num_experts = self.cpu.num_experts
        self.hidden_size = self.cpu.hidden_size
        self.intermediate_size = self.cpu.intermediate_size
        self.swiglu_limit = self.cpu.swiglu_limit
        self.gpu_dtype = gpu_dtype
        E = self.num_experts
        stats = resolve_stats(stats, E)
        counts = None
        if placement == "frequency" and not isinstance(num_gpu_experts, (list, tuple, torch.Tensor)):
            if stats is None:
                raise ValueError("placement='frequency' needs routing statistics (stats=...)")
            counts = stats.counts(layer) if layer in stats.layers else None
            if counts is None:
                raise ValueError(f"placement='frequency': the routing statistics have no counts for layer {layer} "
                                 f"(layers with statistics: {stats.layers})")
        mask = gpu_expert_mask(E, num_gpu_experts, placement, counts)
        self.num_gpu_experts = int(mask.sum())
        # GPU slots: experts in slot order; slot_of[e] = slot or -1 for CPU experts
        self._slot_expert = mask.nonzero().flatten().tolist()
        self._slot_of = torch.full((E,), -1, dtype=torch.int64)
        self._slot_np = self._slot_of.numpy()  # shares memory with _slot_of
        for s, e in enumerate(self._slot_expert):
            self._slot_of[e] = s
        self._slot_list = self._slot_np.tolist()  # the same table as a list (decode: plain indexing)
        G, H, I = self.num_gpu_experts, self.hidden_size, self.intermediate_size
        self._w13 = torch.empty((G, 2 * I, H), dtype=gpu_dtype, device=self.device)
        self._w2 = torch.empty((G, H, I), dtype=gpu_dtype, device=self.device)
        for s, e in enumerate(self._slot_expert):
            self._load_slot(s, e)
        # one in-place clamp of [gate | up]: gate <= L, -L <= up <= L (bounds in gpu_dtype, as a scalar clamp)
        self._clamp_lo = self._clamp_hi = None
        if self.swiglu_limit is not None and G:
            L = self.swiglu_limit
            self._clamp_lo = torch.cat([torch.full((I,), float("-inf")), torch.full((I,), -L)]).to(
                device=self.device, dtype=gpu_dtype)
            self._clamp_hi = torch.full((2 * I,), L).to(device=self.device, dtype=gpu_dtype)
        # routing observation / dynamic placement
        self.counts = torch.zeros(E, dtype=torch.int64)  # every call since construction
        self.window = torch.zeros(E, dtype=torch.float64)  # decayed counts driving dynamic updates
        self._counts_np, self._window_np = self.counts.numpy(), self.window.numpy()
        self.dynamic = bool(dynamic)
        if not isinstance(update_interval, int) or update_interval < 1:
            raise ValueError(f"update_interval must be a positive int, got {update_interval!r}")
        self.update_interval = update_interval
        self.max_swaps = max(1, G // 4) if max_swaps is None else int(max_swaps)
        if self.max_swaps < 0:
            raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")
        self.hysteresis = float(hysteresis)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.calls = 0
        self.swaps: list[tuple[int, int, int]] = []  # (call, promoted expert, demoted expert)
        self.profile: dict[str, list[float]] | None = None  # per-stage host seconds when set to a dict
        self._pin: dict = {}
        self._routing_ev: dict = {}
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self._decode = _DecodeGraphs(self) if cuda_graphs and G else None

    # ------------------------------------------------------------------ placement
    @property
    def gpu_mask(self) -> torch.Tensor:
        """bool [E]: experts resident on `device`."""
        return self._slot_of >= 0

    @property
    def gpu_experts(self) -> list[int]:
        return sorted(self._slot_expert)

    def _load_slot(self, slot: int, expert: int) -> None:
        w = self.weights
        gate = w.dequantize(self.layer, expert, "gate")
        up = w.dequantize(self.layer, expert, "up")
        down = w.dequantize(self.layer, expert, "down")
        self._w13[slot].copy_(torch.cat([gate, up], 0).to(self.gpu_dtype))
        self._w2[slot].copy_(down.to(self.gpu_dtype))

    def swap(self, promote: int, demote: int) -> None:
        """Move CPU expert `promote` into the GPU slot of GPU expert `demote`."""
        if not (0 <= promote < self.num_experts and 0 <= demote < self.num_experts):
            raise ValueError(f"expert ids must be in [0, {self.num_experts})")
        slot = int(self._slot_of[demote])
        if slot < 0:
            raise ValueError(f"expert {demote} is not on the GPU")
        if int(self._slot_of[promote]) >= 0:
            raise ValueError(f"expert {promote} is already on the GPU")
        self._load_slot(slot, promote)
        self._slot_of[demote] = -1
        self._slot_of[promote] = slot
        self._slot_list[demote] = -1
        self._slot_list[promote] = slot
        self._slot_expert[slot] = promote
        self.swaps.append((self.calls, promote, demote))

    def rebalance(self, max_swaps: int | None = None) -> list[tuple[int, int]]:
        """Promote the hottest CPU experts over the coldest GPU ones (by the decayed window of counts).

        Returns the (promoted, demoted) pairs; then decays the window."""
        limit = self.max_swaps if max_swaps is None else max_swaps
        done = []
        if self.num_gpu_experts and self.num_gpu_experts < self.num_experts and limit > 0:
            score = self.window
            on_gpu = self.gpu_mask
            cpu_ids = (~on_gpu).nonzero().flatten()
            gpu_ids = on_gpu.nonzero().flatten()
            hot = cpu_ids[torch.sort(-score[cpu_ids], stable=True).indices].tolist()
            cold = gpu_ids[torch.sort(score[gpu_ids], stable=True).indices].tolist()
            for a, b in zip(hot, cold):
                if len(done) >= limit or not score[a] > score[b] * (1.0 + self.hysteresis):
                    break
                self.swap(a, b)
                done.append((a, b))
        self.window *= self.decay
        return done

    def place(self, placement="frequency", stats=None) -> None:
        """Re-place the GPU slots now (same number of GPU experts): "frequency" by `stats` or, without
        stats, by the counts observed so far; "uniform"; or a mask / list of ids."""
        n = self.num_gpu_experts
        counts = None
        if isinstance(placement, str) and placement == "frequency":
            st = resolve_stats(stats, self.num_experts)
            counts = st.counts(self.layer) if st is not None else self.counts
        mask = gpu_expert_mask(self.num_experts, n, placement, counts)
        want = set(mask.nonzero().flatten().tolist())
        have = set(self._slot_expert)
        for a, b in zip(sorted(want - have), sorted(have - want)):
            self.swap(a, b)

    def observe(self, topk_ids: torch.Tensor) -> None:
        c = np.bincount(topk_ids.numpy().reshape(-1), minlength=self.num_experts)
        self._counts_np += c
        self._window_np += c

    # ------------------------------------------------------------------ compute
    def _check(self, x, topk_ids, topk_weights):
        if not all(isinstance(t, torch.Tensor) for t in (x, topk_ids, topk_weights)):
            raise ValueError("x, topk_ids and topk_weights must be torch tensors")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [tokens, {self.hidden_size}], got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating tensor, got {x.dtype}")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"topk_ids must be [tokens={x.shape[0]}, k], got {tuple(topk_ids.shape)}")
        if tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} differs from topk_ids "
                             f"{tuple(topk_ids.shape)}")
        if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")

    def split(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """Host-side routing split (numpy: a few µs for decode). topk_ids int64 / topk_weights float32 [T,k]
        on the CPU ->

        cpu: None or (token rows int64 [Tc], ids [Tc,kc], weights [Tc,kc]) for CPUMoE (padding slots
             repeat a CPU expert of the same token with weight 0, so they cost no extra weight reads);
        gpu: None or (token rows int64 [P], weights float32 [P], [(slot, start, end), ...]) grouped by slot.
        """
        if topk_ids.numel() <= 64:
            return self._split_small(topk_ids, topk_weights)
        ids, w = topk_ids.numpy(), topk_weights.numpy()
        slot = self._slot_np[ids]  # [T,k]
        on_gpu = slot >= 0
        cpu_part = gpu_part = None
        n_cpu = ids.shape[1] - on_gpu.sum(1)
        rows = np.flatnonzero(n_cpu > 0)
        if rows.size:
            if not on_gpu.any():
                cpu_part = (torch.from_numpy(rows), topk_ids, topk_weights)
            else:
                kc = int(n_cpu.max())
                og = on_gpu[rows]
                order = np.argsort(og, axis=1, kind="stable")[:, :kc]
                cid = np.take_along_axis(ids[rows], order, 1)
                cw = np.take_along_axis(w[rows], order, 1)
                pad = np.take_along_axis(og, order, 1)
                if pad.any():
                    cid = np.where(pad, cid[:, :1], cid)
                    cw = np.where(pad, np.float32(0), cw)
                cpu_part = (torch.from_numpy(rows), torch.from_numpy(np.ascontiguousarray(cid, dtype=np.int64)),
                            torch.from_numpy(np.ascontiguousarray(cw, dtype=np.float32)))
        if on_gpu.any():
            tok, pos = np.nonzero(on_gpu)
            s = slot[tok, pos]
            order = np.argsort(s, kind="stable")
            tok, pos, s = tok[order], pos[order], s[order]
            uniq, first, cnt = np.unique(s, return_index=True, return_counts=True)
            groups = [(int(u), int(f), int(f + c)) for u, f, c in zip(uniq, first, cnt)]
            gpu_part = (torch.from_numpy(tok.astype(np.int64)), torch.from_numpy(w[tok, pos].astype(np.float32)), groups)
        return cpu_part, gpu_part

    def _split_small(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """split() for decode-sized routing, in plain Python (fewer fixed costs than numpy)."""
        slot_of = self._slot_np.tolist()
        rows, cid, cw, gpu = [], [], [], []
        for t, (ri, rw) in enumerate(zip(topk_ids.tolist(), topk_weights.tolist())):
            ci, cwt = [], []
            for e, wt in zip(ri, rw):
                s = slot_of[e]
                if s < 0:
                    ci.append(e)
                    cwt.append(wt)
                else:
                    gpu.append((s, t, wt))
            if ci:
                rows.append(t)
                cid.append(ci)
                cw.append(cwt)
        cpu_part = gpu_part = None
        if rows:
            if not gpu:
                cpu_part = (torch.arange(len(rows)), topk_ids, topk_weights)
            else:
                kc = max(len(c) for c in cid)
                for ci, cwt in zip(cid, cw):
                    pad = kc - len(ci)
                    ci.extend([ci[0]] * pad)
                    cwt.extend([0.0] * pad)
                cpu_part = (torch.tensor(rows, dtype=torch.int64), torch.tensor(cid, dtype=torch.int64),
                            torch.tensor(cw, dtype=torch.float32))
        if gpu:
            gpu.sort(key=lambda r: r[0])
            groups, start = [], 0
            for i in range(1, len(gpu) + 1):
                if i == len(gpu) or gpu[i][0] != gpu[start][0]:
                    groups.append((gpu[start][0], start, i))
                    start = i
            gpu_part = (torch.tensor([g[1] for g in gpu], dtype=torch.int64),
                        torch.tensor([g[2] for g in gpu], dtype=torch.float32), groups)
        return cpu_part, gpu_part

    @staticmethod
    def _cpu_rows(x_host: torch.Tensor, cpu_part) -> torch.Tensor:
        rows = cpu_part[0]
        return x_host if rows.numel() == x_host.shape[0] else x_host.index_select(0, rows)

    def _cpu_compute(self, x_host: torch.Tensor, cpu_part):
        return self.cpu.forward(self._cpu_rows(x_host, cpu_part), cpu_part[1], cpu_part[2])

    def _gpu_compute(self, x_dev: torch.Tensor, gpu_part, out: torch.Tensor) -> torch.Tensor:
        """Adds the GPU experts' weighted outputs into `out` (float32 [T,H] on device).

        A slot hit by one token (decode) reads that token's row as a view and adds into its output row with
        one addcmul (no index tensors, no gather / scatter kernels): 5 kernels per hit (6 with the clamp)."""
        tok, gw, groups = gpu_part
        dev = self.device
        tok_l = tok.tolist()
        gw_d = gw.to(dev, non_blocking=True)
        tok_d = None
        xg = x_dev if x_dev.dtype == self.gpu_dtype else x_dev.to(self.gpu_dtype)
        I, lo, hi = self.intermediate_size, self._clamp_lo, self._clamp_hi
        for sl, a, b in groups:
            if b - a == 1:
                t = tok_l[a]
                xs = xg[t:t + 1]
            else:
                if tok_d is None:
                    tok_d = tok.to(dev, non_blocking=True)
                t = tok_d[a:b]
                xs = xg.index_select(0, t)
            h = F.linear(xs, self._w13[sl])
            if lo is not None:
                h.clamp_(lo, hi)
            h = F.silu(h[:, :I]) * h[:, I:]
            o = F.linear(h, self._w2[sl])
            if b - a == 1:
                out[t:t + 1].addcmul_(o, gw_d[a:a + 1, None])
            else:
                out.index_add_(0, t, o.float() * gw_d[a:b, None])
        return out

    def _gpu_run(self, x: torch.Tensor, gpu_part, stream) -> torch.Tensor:
        """The GPU part as the launcher thread runs it: on the caller's stream, into a fresh float32 [T,H]."""
        if stream is not None:
            with torch.cuda.stream(stream):
                return self._gpu_run(x, gpu_part, None)
        out = torch.zeros((x.shape[0], self.hidden_size), dtype=torch.float32, device=self.device)
        return self._gpu_compute(x.to(self.device, non_blocking=True), gpu_part, out)

    # ------------------------------------------------------------------ decode graphs
    @property
    def cuda_graphs(self) -> bool:
        """Whether one-token calls take the decode path (graphs on CUDA; the same code run eagerly on a CPU
        device, for tests)."""
        return self._decode is not None

    def capture_decode_graphs(self) -> int:
        """Capture every decode graph now (2 per GPU slot) instead of on first use; returns how many exist."""
        if self._decode is None:
            return 0
        self._decode.ensure([(s, f) for s in range(self.num_gpu_experts) for f in (True, False)])
        return len(self._decode.graphs)

    def decode_hits(self, ids_row, w_row):
        """One token's routing (lists of k ids / weights) -> (cpu ids, cpu weights, [(slot, weight)] sorted by
        slot), or None where the decode path does not apply (no GPU hit, or a GPU expert twice)."""
        ids_row = ids_row.tolist() if hasattr(ids_row, "tolist") else list(ids_row)
        slot_of = self._slot_list
        cid, cw, hits = [], [], []
        for e, wt in zip(ids_row, w_row):
            s = slot_of[e]
            if s < 0:
                cid.append(e)
                cw.append(wt)
            else:
                hits.append((s, wt))
        if not hits:
            return None
        if len(hits) > 1:
            hits.sort()
            if len({s for s, _ in hits}) != len(hits):
                return None
        return cid, cw, hits

    def launch_decode_gpu(self, x: torch.Tensor, hits) -> None:
        """Queue the decode GPU part (graph replays into the static output row) on the current stream."""
        dg = self._decode
        dg.ensure([(s, i == 0) for i, (s, _) in enumerate(hits)])
        dg.launch(x, hits)  # x on the device is brought to the host first (the forward path has it there)

    # ------------------------------------------------------------------ forward
    def _pinned_for(self, *ts):
        key = tuple((tuple(t.shape), t.dtype) for t in ts)
        bufs = self._pin.get(key)
        if bufs is None:
            bufs = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in ts)
            self._pin[key] = bufs
        return bufs

    def _routing_to_host(self, x, topk_ids, topk_weights):
        """(ids, weights, x on the host or None): no wait when the routing is already on the CPU; else
        asynchronous copies into pinned memory and one wait (on an event after them)."""
        if not (topk_ids.is_cuda or topk_weights.is_cuda or x.is_cuda):
            return topk_ids.detach(), topk_weights.detach(), None
        ts = (topk_ids.detach(), topk_weights.detach(), x.detach())
        if x.shape[0] == 1 and all(t.is_cuda and t.device == x.device for t in ts):
            # decode: static pinned buffers (no host allocations), one wait on the stream (which also tells
            # the decode buffers that the last step on this stream is done)
            bufs = self._pinned_for(*ts)
            for b, t in zip(bufs, ts):
                b.copy_(t, non_blocking=True)
            stream = torch.cuda.current_stream(x.device)
            stream.synchronize()
            if self._decode is not None:
                self._decode.drained = stream
            return bufs
        # three async copies into pinned memory, one wait (instead of one sync each)
        ids, w, x_host = (t.to("cpu", non_blocking=True) for t in ts)
        torch.cuda.current_stream(x.device if x.is_cuda else None).synchronize()
        if not (topk_ids.is_cuda and topk_weights.is_cuda and x.is_cuda):
            torch.cuda.synchronize()
        return ids, w, x_host

    def _stage(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        prof = self.profile
        if prof is not None:
            prof.setdefault(name, []).append(t - t0)
        return t

    def _forward_decode(self, x, x_host, ids, w, t):
        """The one-token path (see the module doc); None where it does not apply (then nothing was done: no
        call counted, nothing queued)."""
        if x.device.type != "cpu" and x.device != self._decode.out.device:  # (self.device may be "cuda", no index)
            return None
        ids_l = ids.reshape(-1).tolist()
        if not ids_l:
            return None
        E = self.num_experts
        for e in ids_l:
            if not 0 <= e < E:
                raise ValueError(f"topk_ids must be in [0, {E})")
        if w.dtype != torch.float32:
            w = w.to(torch.float32)  # as the other path rounds float64 weights
        r = self.decode_hits(ids_l, w.reshape(-1).tolist())
        if r is None:
            return None
        cid, cw, hits = r
        dg = self._decode
        graphs = dg.graphs
        if (hits[0][0], True) not in graphs or any((s, False) not in graphs for s, _ in hits[1:]):
            try:
                dg.ensure([(s, i == 0) for i, (s, _) in enumerate(hits)])
            except Exception as e:  # noqa: BLE001 - a capture that fails: the launcher path from now on
                if not dg.cuda:
                    raise
                warnings.warn(f"HybridMoE layer {self.layer}: CUDA graph capture failed ({e!r}); one-token calls "
                              f"go through the launcher thread from now on", RuntimeWarning, stacklevel=3)
                self._decode = None
                torch.cuda.synchronize(self.device)
                return None
        self.calls += 1
        cn, wn = self._counts_np, self._window_np
        for e in ids_l:
            cn[e] += 1
            wn[e] += 1
        t = self._stage("split", t)
        xh = x.detach() if x_host is None else x_host
        return self._decode_rest(x, xh, dg, cid, cw, hits, t)

    def _decode_rest(self, x, xh, dg, cid, cw, hits, t):
        dg.launch(xh, hits)  # the token into the pinned input (float32; also the CPU engine's input), one copy, replays
        t = self._stage("gpu_launch", t)
        y = None
        if cid:
            cids = np.array([cid], dtype=np.int64)
            cws = np.array([cw], dtype=np.float32)
            raw = getattr(self.cpu, "_layer", None) if "forward" not in vars(self.cpu) else None
            xdt = xh.dtype if xh.dtype in (torch.float32, torch.bfloat16) else torch.float32
            if raw is not None:
                y = raw.forward(dg.inp_np[:dg.H].reshape(1, dg.H), cids, cws, self.cpu.isa, self.cpu.num_threads)
                if xdt != torch.float32:
                    y = torch.from_numpy(y).to(xdt).float().numpy()  # as CPUMoE.forward returns it
            else:
                xc = dg.x_host if xdt == torch.float32 else dg.x_host.to(xdt)
                y = self.cpu.forward(xc, torch.from_numpy(cids), torch.from_numpy(cws)).float().numpy()
        t = self._stage("cpu_engine", t)
        if x.device.type == "cpu" and self.device.type != "cpu":
            res = dg.finish_host(y, x.dtype)  # waits for the GPU part; the add on the CPU
        elif y is None:
            res = dg.result(x.dtype)
        else:
            res = dg.finish(y, x.dtype)
        self._stage("final_add", t)
        return res

    @torch.no_grad()
    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        self._check(x, topk_ids, topk_weights)
        ids, w, x_host = self._routing_to_host(x, topk_ids, topk_weights)
        t = self._stage("routing", t)
        if self._decode is not None and x.shape[0] == 1:
            res = self._forward_decode(x, x_host, ids, w, t)
            if res is not None:
                if self.dynamic and self.calls % self.update_interval == 0:
                    self.rebalance()
                return res
        ids = ids.to(torch.int64).contiguous()
        w = w.to(torch.float32).contiguous()
        if ids.numel() and (ids.numpy().min() < 0 or ids.numpy().max() >= self.num_experts):
            raise ValueError(f"topk_ids must be in [0, {self.num_experts})")
        self.calls += 1
        self.observe(ids)
        cpu_part, gpu_part = self.split(ids, w)
        t = self._stage("split", t)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        out = y_cpu = None
        if cpu_part is None:
            if gpu_part is not None:
                out = self._gpu_run(x.detach(), gpu_part, stream)
                t = self._stage("gpu_launch", t)
        else:
            x_host = x.detach() if x_host is None else x_host
            if x_host.dtype not in (torch.float32, torch.bfloat16):
                x_host = x_host.float()
            xs = self._cpu_rows(x_host, cpu_part)
            # The engine's inputs are ready before the launcher is woken: from the hand-off to the engine's C++
            # (which releases the GIL) this thread runs no torch op, since each one drops the GIL and the
            # launcher's Python would then hold this thread off for most of the GPU part's launches.
            raw = getattr(self.cpu, "_layer", None) if "forward" not in vars(self.cpu) else None
            if raw is not None:
                args = (xs.to(torch.float32).contiguous().numpy(), cpu_part[1].contiguous().numpy(),
                        cpu_part[2].contiguous().numpy(), self.cpu.isa, self.cpu.num_threads)
            # GPU experts: queued by the launcher thread while this thread runs the CPU engine
            job = _launcher().submit(self._gpu_run, x.detach(), gpu_part, stream) if gpu_part is not None else None
            t = self._stage("gpu_launch", t)
            try:
                if raw is not None:
                    y_cpu = torch.from_numpy(raw.forward(*args))
                    if xs.dtype != torch.float32:
                        y_cpu = y_cpu.to(xs.dtype)  # as CPUMoE.forward returns it
                else:
                    y_cpu = self.cpu.forward(xs, cpu_part[1], cpu_part[2])
            except BaseException:
                if job is not None:
                    job.wait(reraise=False)  # the launcher is done with our tensors before we unwind
                raise
            t = self._stage("cpu_engine", t)
            if job is not None:
                out = job.wait()
                t = self._stage("join", t)
        T = x.shape[0]
        if y_cpu is not None:
            rows = cpu_part[0]
            y_cpu = y_cpu.float()
            if out is None and rows.numel() == T:
                out = y_cpu.to(self.device)
            else:
                if out is None:
                    out = torch.zeros((T, self.hidden_size), dtype=torch.float32, device=self.device)
                y_cpu = y_cpu.to(self.device, non_blocking=True)
                if rows.numel() == T:
                    if x.device == out.device and x.dtype != out.dtype and x.dtype.is_floating_point:
                        res = torch.empty((T, self.hidden_size), dtype=x.dtype, device=out.device)
                        torch.add(out, y_cpu, out=res)  # one kernel: the float32 sum, rounded once
                        out = res
                    else:
                        out += y_cpu
                else:
                    out.index_add_(0, rows.to(self.device), y_cpu)
        elif out is None:
            out = torch.zeros((T, self.hidden_size), dtype=torch.float32, device=self.device)
        out = out.to(device=x.device, dtype=x.dtype)
        self._stage("final_add", t)
        if self.dynamic and self.calls % self.update_interval == 0:
            self.rebalance()
        return out

    __call__ = forward

    def __repr__(self) -> str:
        return (f"HybridMoE(layer={self.layer}, method={self.cpu.method}, experts={self.num_experts}, "
                f"gpu_experts={self.num_gpu_experts} on {self.device}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, dynamic={self.dynamic})")
