"""HybridMoE: one layer's routed experts split between a GPU (the hot ones, in torch) and the CPU engine.

Contract of a call y = moe(x, topk_ids, topk_weights), x [T,H] on any device -> [T,H], same device and dtype:
the routing is copied to the host (asynchronous copies into pinned memory, one wait) and split
(routing.py); the GPU experts' part and the CPU experts' part are computed at the same time and summed.

- One token with a GPU hit, on the decode path (cuda_graphs, the default on CUDA): the GPU part is queued
  from the calling thread BEFORE the CPU engine starts, as per-slot CUDA graphs (decode_graphs.py); the CPU
  result is added on the device (or, for host inputs, the GPU result on the host).
- Every other call (prefill, cuda_graphs=False, a GPU expert twice): the GPU part is handed to the launcher
  thread (launcher.py), which queues it on the caller's stream, while the calling thread runs CPUMoE.
- No GPU hit: the CPU engine alone, bit-identical to CPUMoE.
- T >= gpu_prefill_token_threshold (prefill chunks; None/0: never): no CPU engine and no x on the host. The
  CPU-resident experts the call routes to are streamed to the GPU from the packed files, dequantized and
  computed there (gpu_prefill.py), the GPU-resident ones as above, both on the caller's stream. Without CUDA
  or triton the threshold is ignored (one warning).

The CPU engine gets one core fewer than the process may use by default (default_cpu_threads): its workers
spin between calls and the calling or launcher thread needs a core. A HybridMoE is not meant to be called
from several threads at once (the decode path uses static buffers).

Profiling: set `moe.profile = {}` and each call appends per-stage host times (seconds) to profile[stage]:
routing (copy to the host + wait), split (checks, observe, split), gpu_launch (decode: input copies and
graph replays; otherwise the hand-off), cpu_engine, join (waiting for the launcher), gpu_prefill (queueing the
GPU prefill, its gathers included), final_add.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch

from ..cpu_moe import CPUMoE, check_moe_inputs
from ..loader import as_packed_experts
from . import routing
from .decode_graphs import DecodeGraphs
from .gpu_experts import GpuExperts
from .gpu_prefill import GpuPrefill, PrefillWorkspace, unavailable_reason, warn_ignored
from .launcher import launcher
from .placement import RoutingCounts, SlotTable, gpu_expert_mask, resolve_stats
from .prefill_plan import check_memory, check_staging, check_threshold, prefill_applies
from .stream_path import DeferralChain, StreamStep, deferral_mask, pending_result


def default_cpu_threads() -> int:
    """CPU engine threads HybridMoE uses by default: the CPUs this process may use, less one for the thread
    that launches the GPU experts (the engine's workers spin between calls and would starve it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n - 1)


class HybridMoE:
    """One layer of packed routed experts, the `num_gpu_experts` hot ones on `device`, the rest on the CPU.

    weights: a PackedExperts (kt_runtime.load_experts) or the path of a packed output.
    num_gpu_experts: int N, or a bool mask [E] / list of expert ids (then `placement` is ignored).
    placement: "uniform" (experts 0..N-1), "frequency" (top N of `stats` for this layer), or a mask / ids.
    stats: routing statistics for "frequency": ExpertStats, a stats file path, or {layer: counts}.
    dynamic: every `update_interval` calls the hottest CPU experts replace the coldest GPU ones (at most
        `max_swaps` per update, only when hotter by the factor 1 + `hysteresis`); the window of counts then
        decays by `decay` (placement.RoutingCounts).
    num_threads: CPU engine threads (None: default_cpu_threads(), every usable CPU but one; 0: all of them).
    activation, swiglu_limit, isa, biases: passed to CPUMoE (activation / limit override the manifest; biases:
        expert_activation.ExpertBiases, gpt-oss) and used alike by the GPU experts.
    gpu_dtype: dtype of the GPU-resident experts and of their matmuls (bfloat16).
    cuda_graphs: one-token calls through the decode path: None = on CUDA devices; True on a CPU device runs
        the same path eagerly (tests); False = every call through the launcher thread. Settable later.
    defer: per token, how many of its CPU experts (the smallest routing weights) are deferred: their output is
        added by the next MoE layer called on the same `deferral` chain (DeferralChain; inject sets one per
        model and `defer_carry` False on the last layer, which adds its own). 0: none.
    stream_max_tokens: forward_stream takes the stream-ordered path up to this many tokens.
    gpu_prefill_token_threshold: calls of at least this many tokens run their CPU-resident experts on the GPU
        (streamed from the packed files; kt's --kt-gpu-prefill-token-threshold). None or 0: never. Ignored, with
        one warning, without CUDA or triton. Settable later.
    gpu_prefill_memory: the GPU prefill's device memory budget in bytes (None: 2 GiB; prefill_plan.py says what
        it covers). gpu_prefill_staging: how packed experts reach the GPU: "registered" (the layer's mapped bytes
        page-locked with CUDA at its first prefill call, copied straight from the mapping), "gather" (gathered into
        pinned buffers first) or "auto" (None: registered where the registration succeeds, else gather, with one
        warning). prefill_workspace: a gpu_prefill.PrefillWorkspace shared by a model's layers (inject makes one;
        give it instead of gpu_prefill_memory and gpu_prefill_staging); one on a CPU device runs the path on the
        CPU (tests).

    Parts, public for tests and benchmarks: `cpu` (CPUMoE), `gpu` (GpuExperts), `slots` (SlotTable),
    `routing_counts` (RoutingCounts), `decode_graphs` (DecodeGraphs, or None off the decode path), `prefill`
    (GpuPrefill, or None without a threshold or where it cannot run).
    """

    def __init__(self, weights, layer: int, num_gpu_experts=0, device: str | torch.device = "cuda",
                 placement="uniform", stats=None, dynamic: bool = False, update_interval: int = 32,
                 max_swaps: int | None = None, hysteresis: float = 0.25, decay: float = 0.5,
                 num_threads: int | None = None, activation: str | None = None,
                 swiglu_limit: float | None = None, isa: str = "auto", gpu_dtype: torch.dtype = torch.bfloat16,
                 cuda_graphs: bool | None = None, biases=None, defer: int = 0, stream_max_tokens: int = 16,
                 gpu_prefill_token_threshold: int | None = None, gpu_prefill_memory: int | None = None,
                 gpu_prefill_staging: str | None = None, prefill_workspace: PrefillWorkspace | None = None):
        weights = as_packed_experts(weights)
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
                          swiglu_limit=swiglu_limit, isa=isa, biases=biases)
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
        self.num_gpu_experts = G = int(mask.sum())
        self.slots = SlotTable(mask)
        self.gpu = GpuExperts(weights, layer, G, self.hidden_size, self.intermediate_size, self.device, gpu_dtype,
                              self.swiglu_limit, self.cpu.act, self.cpu.biases)
        for s, e in enumerate(self.slots.experts):
            self.gpu.load(s, e)
        self.routing_counts = RoutingCounts(E)
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
        self._pinned: dict = {}
        self.decode_graphs: DecodeGraphs | None = None
        self._graphs_off: DecodeGraphs | None = None  # kept while cuda_graphs is False
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if isinstance(defer, bool) or not isinstance(defer, int) or defer < 0:
            raise ValueError(f"defer must be an int >= 0, got {defer!r}")
        self.defer = defer
        self.deferral: DeferralChain | None = None
        self.defer_carry = True
        self.stream_max_tokens = int(stream_max_tokens)
        self.slot_of_dev = torch.from_numpy(self.slots.slot_np.copy()).to(self.device)
        self._streams: dict[tuple[int, int], StreamStep] = {}
        if prefill_workspace is not None and gpu_prefill_memory is not None:
            raise ValueError("give gpu_prefill_memory or prefill_workspace, not both (the workspace has its budget)")
        if prefill_workspace is not None and gpu_prefill_staging is not None:
            raise ValueError("give gpu_prefill_staging or prefill_workspace, not both (the workspace has its staging)")
        if prefill_workspace is not None and prefill_workspace.device.type != self.device.type:
            raise ValueError(f"prefill_workspace is on {prefill_workspace.device}, the GPU experts on {self.device}")
        self._prefill_memory = check_memory(gpu_prefill_memory)
        self._prefill_staging = check_staging(gpu_prefill_staging)
        self.prefill_workspace = prefill_workspace
        self.prefill: GpuPrefill | None = None
        self._prefill_threshold: int | None = None
        self.gpu_prefill_token_threshold = gpu_prefill_token_threshold

    # ------------------------------------------------------------------ GPU prefill
    @property
    def gpu_prefill_token_threshold(self) -> int | None:
        """Calls of at least this many tokens take the GPU prefill (None: never; the layer's registered bytes,
        if any, are unregistered then)."""
        return self._prefill_threshold

    @gpu_prefill_token_threshold.setter
    def gpu_prefill_token_threshold(self, value) -> None:
        threshold = check_threshold(value)
        if threshold is not None and self.prefill is None:
            self.prefill = self._make_prefill(threshold)
        if threshold is None and self.prefill is not None:
            self.prefill.close()
        self._prefill_threshold = threshold

    def _make_prefill(self, threshold: int) -> GpuPrefill | None:
        ws = self.prefill_workspace
        reason = unavailable_reason(self.device) if ws is None or ws.cuda else None
        if reason is not None:
            warn_ignored(threshold, reason)
            return None
        if ws is None:
            ws = self.prefill_workspace = PrefillWorkspace(self.device, self._prefill_memory,
                                                           staging=self._prefill_staging)
        return GpuPrefill(self.weights, self.layer, ws, self.hidden_size, self.intermediate_size, self.gpu_dtype,
                          self.swiglu_limit, self.cpu.act, self.cpu.biases)

    def takes_prefill(self, tokens: int) -> bool:
        """Whether a call of `tokens` tokens runs its CPU-resident experts on the GPU."""
        return self.prefill is not None and prefill_applies(tokens, self._prefill_threshold)

    # ------------------------------------------------------------------ placement
    @property
    def counts(self) -> torch.Tensor:
        """int64 [E]: routing counts of every call since construction."""
        return self.routing_counts.counts

    @property
    def window(self) -> torch.Tensor:
        """float64 [E]: the decayed counts that drive dynamic placement."""
        return self.routing_counts.window

    @property
    def gpu_mask(self) -> torch.Tensor:
        """bool [E]: experts resident on `device`."""
        return self.slots.mask

    @property
    def gpu_experts(self) -> list[int]:
        return sorted(self.slots.experts)

    def swap(self, promote: int, demote: int) -> None:
        """Move CPU expert `promote` into the GPU slot of GPU expert `demote`."""
        if not (0 <= promote < self.num_experts and 0 <= demote < self.num_experts):
            raise ValueError(f"expert ids must be in [0, {self.num_experts})")
        slot = int(self.slots.slot_of[demote])
        if slot < 0:
            raise ValueError(f"expert {demote} is not on the GPU")
        if int(self.slots.slot_of[promote]) >= 0:
            raise ValueError(f"expert {promote} is already on the GPU")
        self.gpu.load(slot, promote)
        self.slots.move(promote, demote)
        self.slot_of_dev[demote] = -1  # in place: captured stream steps read it at replay
        self.slot_of_dev[promote] = slot
        self.swaps.append((self.calls, promote, demote))

    def rebalance(self, max_swaps: int | None = None) -> list[tuple[int, int]]:
        """Promote the hottest CPU experts over the coldest GPU ones (by the decayed window of counts).

        Returns the (promoted, demoted) pairs; then decays the window."""
        limit = self.max_swaps if max_swaps is None else max_swaps
        done = []
        if self.num_gpu_experts and self.num_gpu_experts < self.num_experts and limit > 0:
            for a, b in self.routing_counts.promotions(self.gpu_mask, limit, self.hysteresis):
                self.swap(a, b)
                done.append((a, b))
        self.routing_counts.decay(self.decay)
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
        have = set(self.slots.experts)
        for a, b in zip(sorted(want - have), sorted(have - want)):
            self.swap(a, b)

    def observe(self, topk_ids: torch.Tensor) -> None:
        self.routing_counts.observe(topk_ids.numpy())

    # ------------------------------------------------------------------ routing
    def split(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """topk_ids int64 / topk_weights float32 [T,k] on the CPU -> (routing.CpuPart or None, routing.GpuPart
        or None) for the current slots."""
        return routing.split(topk_ids, topk_weights, self.slots.slot_np)

    def decode_hits(self, ids_row, w_row):
        """One token's routing -> (cpu ids, cpu weights, [(slot, weight)] sorted by slot), or None where the
        decode path does not apply (routing.decode_hits)."""
        return routing.decode_hits(ids_row, w_row, self.slots.slot_list)

    # ------------------------------------------------------------------ decode graphs
    @property
    def cuda_graphs(self) -> bool:
        """Whether one-token calls take the decode path (graphs on CUDA; the same code run eagerly on a CPU
        device, for tests)."""
        return self.decode_graphs is not None

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        """False: one-token calls through the launcher thread; True: back on the decode path (graphs
        captured before are kept). Without GPU experts there is no decode path."""
        if not on:
            if self.decode_graphs is not None:
                self._graphs_off, self.decode_graphs = self.decode_graphs, None
        elif self.decode_graphs is None and self.num_gpu_experts:
            self.decode_graphs = self._graphs_off or DecodeGraphs(self.gpu, self.num_gpu_experts)
            self._graphs_off = None

    def capture_decode_graphs(self) -> int:
        """Capture every decode graph now (2 per GPU slot) instead of on first use; returns how many exist."""
        if self.decode_graphs is None:
            return 0
        self.decode_graphs.ensure([(s, f) for s in range(self.num_gpu_experts) for f in (True, False)])
        return len(self.decode_graphs.graphs)

    def launch_decode_gpu(self, x: torch.Tensor, hits) -> None:
        """Queue the decode GPU part (graph replays into the static output row) on the current stream."""
        dg = self.decode_graphs
        dg.ensure([(s, i == 0) for i, (s, _) in enumerate(hits)])
        dg.launch(x, hits)  # x on the device is brought to the host first (the forward path has it there)

    # ------------------------------------------------------------------ forward
    def _check(self, x, topk_ids, topk_weights):
        check_moe_inputs(x, topk_ids, topk_weights, self.hidden_size)
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating tensor, got {x.dtype}")
        if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")

    def _pinned_for(self, *ts):
        key = tuple((tuple(t.shape), t.dtype) for t in ts)
        bufs = self._pinned.get(key)
        if bufs is None:
            bufs = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in ts)
            self._pinned[key] = bufs
        return bufs

    def _routing_to_host(self, x, topk_ids, topk_weights, with_x: bool = True):
        """(ids, weights, x on the host or None): no wait when the routing is already on the CPU; else
        asynchronous copies into pinned memory and one wait (on an event after them). with_x False: x stays."""
        if not (topk_ids.is_cuda or topk_weights.is_cuda or (with_x and x.is_cuda)):
            return topk_ids.detach(), topk_weights.detach(), None
        ts = (topk_ids.detach(), topk_weights.detach(), x.detach())
        if not with_x:
            ts = ts[:2]
        elif x.shape[0] == 1 and all(t.is_cuda and t.device == x.device for t in ts):
            # decode: static pinned buffers (no host allocations), one wait on the stream (which also tells
            # the decode buffers that the last step on this stream is done)
            bufs = self._pinned_for(*ts)
            for b, t in zip(bufs, ts):
                b.copy_(t, non_blocking=True)
            stream = torch.cuda.current_stream(x.device)
            stream.synchronize()
            if self.decode_graphs is not None:
                self.decode_graphs.drained = stream
            return bufs
        # async copies into pinned memory, one wait (instead of one sync each)
        host = [t.to("cpu", non_blocking=True) for t in ts]
        torch.cuda.current_stream(x.device if x.is_cuda else None).synchronize()
        if not (topk_ids.is_cuda and topk_weights.is_cuda and x.is_cuda):
            torch.cuda.synchronize()
        return host[0], host[1], host[2] if with_x else None

    def _count_routing(self, ids: torch.Tensor, w: torch.Tensor):
        """The call's routing on the host as int64 ids (checked against the expert count) and float32 weights;
        the call counted and its experts observed (dynamic placement)."""
        ids = ids.to(torch.int64).contiguous()
        w = w.to(torch.float32).contiguous()
        if ids.numel() and (ids.numpy().min() < 0 or ids.numpy().max() >= self.num_experts):
            raise ValueError(f"topk_ids must be in [0, {self.num_experts})")
        self.calls += 1
        self.observe(ids)
        return ids, w

    def _stage(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        prof = self.profile
        if prof is not None:
            prof.setdefault(name, []).append(t - t0)
        return t

    def _forward_decode(self, x, x_host, ids, w, t):
        """The one-token path (see the module doc); None where it does not apply (then nothing was done: no
        call counted, nothing queued)."""
        dg = self.decode_graphs
        if x.device.type != "cpu" and x.device != dg.out.device:  # (self.device may be "cuda", no index)
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
        graphs = dg.graphs
        if (hits[0][0], True) not in graphs or any((s, False) not in graphs for s, _ in hits[1:]):
            try:
                dg.ensure([(s, i == 0) for i, (s, _) in enumerate(hits)])
            except Exception as e:  # noqa: BLE001 - a capture that fails: the launcher path from now on
                if not dg.cuda:
                    raise
                warnings.warn(f"HybridMoE layer {self.layer}: CUDA graph capture failed ({e!r}); one-token calls "
                              f"go through the launcher thread from now on", RuntimeWarning, stacklevel=3)
                self.decode_graphs = None
                torch.cuda.synchronize(self.device)
                return None
        self.calls += 1
        self.routing_counts.observe_list(ids_l)
        t = self._stage("split", t)
        xh = x.detach() if x_host is None else x_host
        dg.launch(xh, hits)  # the token into the pinned input (float32; also the CPU engine's input), one copy, replays
        t = self._stage("gpu_launch", t)
        y = None
        if cid:
            y = self.cpu.forward_f32(dg.inp_np[:dg.H].reshape(1, dg.H), np.array([cid], dtype=np.int64),
                                     np.array([cw], dtype=np.float32))
            if xh.dtype == torch.bfloat16:
                y = torch.from_numpy(y).to(torch.bfloat16).float().numpy()  # as CPUMoE.forward returns it
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
        if self.defer or self.deferral is not None:
            return self._forward_deferring(x, topk_ids, topk_weights)
        return self._forward(x, topk_ids, topk_weights)

    def _forward_deferring(self, x, topk_ids, topk_weights):
        """forward with deferral, eagerly (the order of the stream path, computed at once): this call's
        result without its deferred experts, plus the deferred result the previous layer on the chain left."""
        self._check(x, topk_ids, topk_weights)
        chain = self.deferral
        prev = chain.take() if chain is not None else None
        y_def = None
        if self.defer and not self.takes_prefill(x.shape[0]):  # a GPU prefill call defers nothing
            ids = topk_ids.detach().to(self.slot_of_dev.device, torch.int64)
            w = topk_weights.detach().to(self.slot_of_dev.device, torch.float32)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
                raise ValueError(f"topk_ids must be in [0, {self.num_experts})")
            deferred = deferral_mask(self.slot_of_dev[ids] < 0, w, self.defer)
            if bool(deferred.any()):
                w_now = torch.where(deferred, 0.0, w)
                ids_def = torch.where(deferred, ids, -1).cpu()
                x_h = x.detach().to("cpu", torch.float32)
                y_def = torch.from_numpy(self.cpu.forward_f32(x_h.contiguous().numpy(), ids_def.contiguous().numpy(),
                                                              w.cpu().contiguous().numpy()))
                topk_weights = w_now.to(topk_weights.device)
        out = self._forward(x, topk_ids, topk_weights).float()
        if prev is not None:
            out = out + pending_result(prev).to(out.device)
        if y_def is not None:
            if chain is not None and self.defer_carry:
                chain.put(y_def)
            else:
                out = out + y_def.to(out.device)
        return out.to(x.dtype)

    # ------------------------------------------------------------------ stream-ordered path
    def stream_step(self, tokens: int, topk: int) -> StreamStep:
        """The fixed buffers and CPU-engine jobs of calls with `tokens` tokens of `topk` experts (made once)."""
        key = (tokens, topk)
        step = self._streams.get(key)
        if step is None:
            step = self._streams[key] = StreamStep(self, tokens, topk)
        return step

    @torch.no_grad()
    def forward_stream(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       parts: str = "both") -> torch.Tensor:
        """forward without host syncs, everything queued on the current stream (stream_path.py), so that a CUDA
        graph can capture it inside a whole model step. Taken when x and the routing are on `device` and
        T <= stream_max_tokens; otherwise forward. Routing ids are checked by the CPU engine at run time (an
        out-of-range id makes that run's CPU rows NaN and is reported by stream_failures), not here. Routing
        counts (dynamic placement) are not observed on this path. parts (benchmarks): "cpu" or "gpu" computes that
        part alone, "serial" the CPU part and then the GPU part (queued after the wait: no overlap)."""
        if parts not in ("both", "cpu", "gpu", "serial"):
            raise ValueError(f"parts must be 'both', 'cpu', 'gpu' or 'serial', got {parts!r}")
        ok = (x.device == self.slot_of_dev.device and topk_ids.device == x.device and topk_weights.device == x.device
              and x.dim() == 2 and x.shape[0] <= self.stream_max_tokens and topk_ids.dim() == 2
              and not self.takes_prefill(x.shape[0]))
        if not ok:
            return self.forward(x, topk_ids, topk_weights)
        self._check(x, topk_ids, topk_weights)
        step = self.stream_step(x.shape[0], topk_ids.shape[1])
        chain = self.deferral if self.defer_carry else None
        if self.deferral is not None and not self.defer_carry:  # the last layer: takes, never carries
            return step.run(x, topk_ids.to(torch.int64), topk_weights, self.defer, _TakeOnly(self.deferral), parts)
        return step.run(x, topk_ids.to(torch.int64), topk_weights, self.defer, chain, parts)

    def stream_failures(self) -> list[str]:
        """Errors of the CPU engine in stream-ordered runs so far (empty when none)."""
        return [e for step in self._streams.values() for e in step.failures()]

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        self._check(x, topk_ids, topk_weights)
        if self.takes_prefill(x.shape[0]):
            return self._forward_prefill(x, topk_ids, topk_weights, t)
        ids, w, x_host = self._routing_to_host(x, topk_ids, topk_weights)
        t = self._stage("routing", t)
        if self.decode_graphs is not None and x.shape[0] == 1:
            res = self._forward_decode(x, x_host, ids, w, t)
            if res is not None:
                if self.dynamic and self.calls % self.update_interval == 0:
                    self.rebalance()
                return res
        ids, w = self._count_routing(ids, w)
        cpu_part, gpu_part = self.split(ids, w)
        t = self._stage("split", t)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        out = y_cpu = None
        if cpu_part is None:
            if gpu_part is not None:
                out = self.gpu.run(x.detach(), gpu_part, stream)
                t = self._stage("gpu_launch", t)
        else:
            x_host = x.detach() if x_host is None else x_host
            if x_host.dtype not in (torch.float32, torch.bfloat16):
                x_host = x_host.float()
            xs = routing.cpu_rows(x_host, cpu_part)
            # The engine's inputs are ready before the launcher is woken: from the hand-off to the engine's C++
            # (which releases the GIL) this thread runs no torch op, since each one drops the GIL and the
            # launcher's Python would then hold this thread off for most of the GPU part's launches.
            args = (xs.to(torch.float32).contiguous().numpy(), cpu_part.ids.contiguous().numpy(),
                    cpu_part.weights.contiguous().numpy())
            # GPU experts: queued by the launcher thread while this thread runs the CPU engine
            job = launcher().submit(self.gpu.run, x.detach(), gpu_part, stream) if gpu_part is not None else None
            t = self._stage("gpu_launch", t)
            try:
                y_cpu = torch.from_numpy(self.cpu.forward_f32(*args))
                if xs.dtype != torch.float32:
                    y_cpu = y_cpu.to(xs.dtype)  # as CPUMoE.forward returns it
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
            rows = cpu_part.rows
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

    def _forward_prefill(self, x, topk_ids, topk_weights, t):
        """The GPU prefill call (see the module doc): routing to the host, the CPU-resident experts' pairs to
        GpuPrefill, the GPU-resident ones to GpuExperts, queued on the current stream into one float32 sum."""
        ids, w, _ = self._routing_to_host(x, topk_ids, topk_weights, with_x=False)
        t = self._stage("routing", t)
        ids, w = self._count_routing(ids, w)
        part, gpu_part = routing.split_prefill(ids, w, self.slots.slot_np)
        t = self._stage("split", t)
        dev = self.prefill.ws.device
        xd = x.detach().to(dev, non_blocking=True)
        out = torch.zeros((x.shape[0], self.hidden_size), dtype=torch.float32, device=dev)
        resident = (lambda: self.gpu.compute(xd, gpu_part, out)) if gpu_part is not None else None
        if part is not None:
            self.prefill.run(xd, part, out, meanwhile=resident)
        elif resident is not None:
            resident()
        t = self._stage("gpu_prefill", t)
        out = out.to(device=x.device, dtype=x.dtype)
        self._stage("final_add", t)
        if self.dynamic and self.calls % self.update_interval == 0:
            self.rebalance()
        return out

    __call__ = forward

    def __repr__(self) -> str:
        return (f"HybridMoE(layer={self.layer}, method={self.cpu.method}, experts={self.num_experts}, "
                f"gpu_experts={self.num_gpu_experts} on {self.device}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, dynamic={self.dynamic}, "
                f"gpu_prefill_token_threshold={self.gpu_prefill_token_threshold if self.prefill else None})")


class _TakeOnly:
    """A chain view for the last layer: takes what the previous layer deferred; what it defers itself is added
    in the same call (put is refused, so StreamStep adds it)."""

    def __init__(self, chain: DeferralChain):
        self.chain = chain

    def take(self):
        return self.chain.take()
