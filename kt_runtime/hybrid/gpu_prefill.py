"""GPU prefill: a layer's CPU-resident experts streamed to the GPU from the mapped packed weights, dequantized
there and computed with grouped GEMMs (HybridMoE takes it for calls of gpu_prefill_token_threshold tokens or
more; prefill_plan.py says when and how much memory).

One call, for the experts the chunk routes to (PrefillPart), in transfer groups of consecutive experts
(prefill_plan.transfer_groups), through a ring of `slots` staging slots (a device buffer each), in one of two
stagings (gpu_prefill_staging; "auto": registered where the registration succeeds, else gather):

  registered  the layer's mapped packed bytes are page-locked with CUDA once (host_registration.py), at the
              layer's first prefill call; the copy stream copies group k's byte runs straight from the mapping
              into slot k % slots (after the slot's previous group was dequantized: an event), records `uploaded`
  gather      copy threads gather group k's packed bytes from the mappings into the slot's pinned host buffer
              (after that slot's previous upload is complete: its event, waited for on a copy thread); the copy
              stream uploads it (after the slot's previous group was dequantized), records `uploaded`

    caller stream  wait `uploaded`; dequantize group k (Triton, the packed byte order) into the scratch,
                   record `consumed`; grouped GEMMs of its (token, expert) pairs, added into the output

So group k + 1 crosses PCIe while group k is computed (and, gathering, group k + 2 is gathered meanwhile); the
calling thread waits only for gathers (host work), never for the device (past the first call, which compiles
the kernels, tries the grouped GEMM once, allocates the buffers and registers the layer); registered, it waits
for nothing. Groups are laid out (expert_staging.stage_group) as they are reached, so the first upload starts
before the later groups are laid out. The overlap is within a layer: the next layer's experts are not known
before its router has run, so each layer starts with one group's transfer that nothing hides (groups are small
for that reason: DEFAULT_GROUP_BYTES).

`PrefillWorkspace` holds the slots, the scratch, the copy stream and threads: one per model, shared by its
layers (inject makes one), allocated at the first prefill call and kept (release() frees them).
`GpuPrefill` is one layer's part: where its experts are in the files, its registration, its biases and clamp on
the device; close() (or its collection) unregisters its bytes.
On a CPU device (tests) the same code runs synchronously: no streams and no registration (the registered
staging copies from the mappings into the slot, the gather staging gathers into it in place), and
dequantization by the torch reference unless dequant="triton" (Triton's interpreter).
"""
from __future__ import annotations

import os
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from ..format.names import PROJECTIONS
from ..format.spec import shard_shape
from ..format.methods import get_method
from . import host_registration
from .expert_staging import LayerSources, copy_tasks, stage_group
from .gpu_experts import clamp_bounds, gated_activation
from .prefill_plan import (DEFAULT_GROUP_BYTES, DEFAULT_SLOTS, BudgetPlan, ExpertSizes, check_memory, check_staging,
                           check_tables, pair_activation_bytes, pair_slices, plan_budget, staging_after_registration,
                           transfer_groups)

GEMMS = ("auto", "grouped", "loop")
DEQUANTS = ("auto", "triton", "torch")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the GPU prefill cannot run for a HybridMoE on `device`, or None."""
    if device.type != "cuda":
        return f"the GPU experts' device is {device.type}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


_WARNED: set[str] = set()  # reasons already reported: one warning per process, not one per layer


def warn_ignored(threshold: int, reason: str) -> None:
    """The one warning that gpu_prefill_token_threshold is ignored, and why."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"gpu_prefill_token_threshold={threshold} is ignored: {reason}; prefill chunks run their "
                  f"CPU-resident experts on the CPU engine", RuntimeWarning, stacklevel=4)


def warn_gathering(reason: str) -> None:
    """The one warning that gpu_prefill_staging='auto' gathers instead of registering, and why."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"gpu_prefill_staging='auto': the GPU prefill gathers the packed experts into pinned buffers "
                  f"(the registration of the mapped files with CUDA failed: {reason})", RuntimeWarning, stacklevel=5)


def _grouped_mm():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _Slot:
    """One staging slot: its device bytes and, for the gather staging, pinned host bytes (allocated on first use;
    on a CPU device the same buffer), with the events that free each again."""

    def __init__(self, nbytes: int, device: torch.device):
        cuda = device.type == "cuda"
        self.nbytes = nbytes
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._pinned = None if cuda else self.dev
        self._pinned_np = None
        # the pinned bytes may be overwritten (waited for by copy threads: blocking, not spinning on a core)
        self.uploaded = torch.cuda.Event(blocking=True) if cuda else None
        self.consumed = torch.cuda.Event() if cuda else None  # the device bytes may be overwritten

    @property
    def pinned(self) -> torch.Tensor:
        if self._pinned is None:
            self._pinned = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        return self._pinned

    @property
    def pinned_np(self) -> np.ndarray:
        if self._pinned_np is None:
            self._pinned_np = self.pinned.numpy()
        return self._pinned_np


class PrefillWorkspace:
    """The GPU prefill's buffers, copy stream and copy threads, shared by the HybridMoE layers of a model.

    device: where the experts are computed ("cuda": the real path; "cpu": the same code synchronously, tests).
    memory: the GPU memory budget in bytes (prefill_plan: what it covers); None: DEFAULT_MEMORY.
    slots: staging slots (2: double-buffered). max_group_bytes: packed bytes per transfer group, at most.
    copy_threads: threads gathering packed bytes into pinned memory (None: the usable CPUs, at most 16).
    staging: "registered", "gather" or "auto" (prefill_plan.check_staging; None: "auto"), for every layer.
    gemm: "grouped" (torch's grouped GEMM, one call per slice), "loop" (one matmul per expert) or "auto"
        (grouped where it runs on this device and dtype). dequant: "triton", "torch" (the reference, CPU only)
        or "auto" (triton on CUDA, torch on the CPU).
    trace: set to a list and each group appends its CUDA timing events (bench_prefill, tests):
        {"experts", "bytes", "h2d": (start, end), "compute": (start, end)}.
    """

    def __init__(self, device="cuda", memory: int | None = None, slots: int = DEFAULT_SLOTS,
                 max_group_bytes: int = DEFAULT_GROUP_BYTES, copy_threads: int | None = None, gemm: str = "auto",
                 dequant: str = "auto", staging: str | None = None):
        self.device = torch.device(device)
        self.memory = check_memory(memory)
        self.staging = check_staging(staging)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        if dequant not in DEQUANTS:
            raise ValueError(f"dequant must be one of {DEQUANTS}, got {dequant!r}")
        if dequant == "torch" and self.device.type != "cpu":
            raise ValueError("dequant='torch' (the reference) runs on the CPU only")
        self.slots, self.max_group_bytes, self.gemm, self.dequant = slots, int(max_group_bytes), gemm, dequant
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        self.copy_threads = copy_threads or min(16, cpus)
        self.trace: list | None = None
        self.stats = {"calls": 0, "groups": 0, "experts": 0, "staged_bytes": 0}
        self._plans: dict = {}
        self._gemm_ok: dict = {}
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: tuple | None = None  # (key, slots, scratch)
        self.copy_stream = None
        self.scratch_free = None  # recorded after each call's last use of the scratch
        # where layers register their bytes (None on a CPU device: the "device" reads host memory as it is)
        self.registry = host_registration.registry() if self.cuda else None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def plan(self, sizes: ExpertSizes, fixed_bytes: int) -> BudgetPlan:
        key = (sizes, fixed_bytes)
        if key not in self._plans:
            self._plans[key] = plan_budget(sizes, self.memory, fixed_bytes, self.slots, self.max_group_bytes)
        return self._plans[key]

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.copy_threads, thread_name_prefix="kt-prefill-copy")
        return self._pool

    def buffers(self, plan: BudgetPlan, scratch_elements: int, dtype: torch.dtype):
        """(slots, flat scratch) for `plan`, allocated on first use and when the plan changes (another layer
        shape or dtype shares this workspace)."""
        key = (plan.slot_bytes, scratch_elements, dtype)
        if self._buffers is not None and self._buffers[0] == key:
            return self._buffers[1], self._buffers[2]
        self.release()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.scratch_free = torch.cuda.Event()
        slots = [_Slot(plan.slot_bytes, self.device) for _ in range(plan.slots)]
        scratch = torch.empty(scratch_elements, dtype=dtype, device=self.device)
        self._buffers = (key, slots, scratch)
        return slots, scratch

    def release(self) -> None:
        """Free the slots and the scratch (after the device is done with them); the next call allocates again."""
        if self._buffers is not None and self.cuda:
            torch.cuda.synchronize(self.device)
        self._buffers = None

    def gather(self, group, regions, dst: np.ndarray, gate=None) -> list:
        """Futures of the copy threads filling dst (a slot's pinned bytes) with a staged group, each waiting for
        `gate` (a future) first."""
        pool = self.pool()
        return [pool.submit(_copy, gate, dst, pieces) for pieces in copy_tasks(group, regions, self.copy_threads)]

    def grouped_gemm_ok(self, dtype: torch.dtype) -> bool:
        """Whether the grouped GEMM is used for this dtype (gemm "auto": tried once on this device)."""
        if self.gemm != "auto":
            return self.gemm == "grouped"
        if dtype not in self._gemm_ok:
            fn, ok = _grouped_mm(), False
            if fn is not None:
                try:
                    a = torch.ones((16, 64), dtype=dtype, device=self.device)
                    b = torch.ones((2, 32, 64), dtype=dtype, device=self.device)
                    offs = torch.tensor([8, 16], dtype=torch.int32, device=self.device)
                    y = fn(a, b.transpose(1, 2), offs=offs)
                    ok = tuple(y.shape) == (16, 32) and bool((y.float() == 64).all())
                except (RuntimeError, TypeError, NotImplementedError, ValueError):
                    ok = False
            self._gemm_ok[dtype] = ok
        return self._gemm_ok[dtype]


def _release(registry, counted, device, regions) -> None:
    """A layer's registration released: once no copy from its pages can still be in flight (regions: the mapped
    views, kept alive until then)."""
    if device is not None:
        torch.cuda.synchronize(device)
    registry.release(counted)


def _copy(gate, dst: np.ndarray, pieces) -> None:
    if gate is not None:
        gate.result()  # the slot's previous upload is complete
    for src, offset in pieces:
        np.copyto(dst[offset:offset + src.size], src)


class GpuPrefill:
    """The GPU prefill of one layer: run(x, part, out) adds the CPU-resident experts' outputs for `part`'s pairs
    into out (float32 [T, H] on the workspace's device), queued on the current stream.

    staging(): the layer's staging, decided at its first call (registering its bytes unless the workspace's
    staging is "gather"); `registered_bytes` and `registration_s` say what the registration locked and took,
    `registration_error` why it failed. close(): unregisters them (a later call registers again); collecting
    the layer does the same. Neither happens while a copy from the mapping may still be in flight."""

    def __init__(self, weights, layer: int, workspace: PrefillWorkspace, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, swiglu_limit: float | None, activation, biases=None):
        from kt_convert.quant.staged_dequant import check_dims, scratch_elements

        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"the GPU prefill computes in bfloat16 or float32, not {dtype}")
        self.ws, self.layer, self.dtype, self.act = workspace, layer, dtype, activation
        self.method = get_method(weights.method)
        self.H, self.I, self.T = hidden_size, intermediate_size, int(weights.threadpool_count)
        check_dims(self.method, self.H, self.I, self.T)
        self.sources = LayerSources(weights, layer)
        self._check_sizes(layer)
        dev = workspace.device
        item = torch.empty(0, dtype=dtype).element_size()
        self.job_bytes = 3 * self.T * 6 * 8
        self.sizes = ExpertSizes(self.sources.expert_bound(self.job_bytes) + 8, 3 * self.H * self.I * item,
                                 pair_activation_bytes(self.H, self.I, item))
        H, I = self.H, self.I  # not self: the layer is freed (and unregisters) as soon as it is dropped
        self.scratch_elements = lambda capacity: scratch_elements(capacity, H, I)
        self.clamp_lo, self.clamp_hi = clamp_bounds(swiglu_limit, self.I, dev, dtype)
        self.b13 = self.b2 = None
        E = int(weights.num_experts)
        if biases is not None and biases.any():
            zeros = torch.zeros
            self.b13 = torch.cat([biases.gate if biases.gate is not None else zeros(E, self.I),
                                  biases.up if biases.up is not None else zeros(E, self.I)], 1).to(dev, dtype)
            self.b2 = (biases.down if biases.down is not None else zeros(E, self.H)).to(dev, dtype)
        fixed = sum(t.numel() * t.element_size() for t in (self.clamp_lo, self.clamp_hi, self.b13, self.b2)
                    if t is not None)
        self.fixed_bytes = fixed
        self.plan = workspace.plan(self.sizes, fixed)  # a budget too small is refused here, not mid-prefill
        self._staging: str | None = None
        self._mapped: list | None = None  # torch views of the mapped regions (the registered staging's sources)
        self._cuts: list | None = None  # per region, the offsets where one registered span ends and another begins
        self._unregister = None  # weakref.finalize releasing the registration
        self.registered_bytes, self.registration_s = 0, 0.0
        self.registration_error: str | None = None  # why the registration failed ("auto" gathers then)

    def staging(self) -> str:
        """The layer's staging, "registered" or "gather": decided at the first call (the layer's bytes registered
        there), then kept until close()."""
        if self._staging is None:
            self._staging = self._decide_staging()
        return self._staging

    def _decide_staging(self) -> str:
        ws, error = self.ws, None
        self.registration_error = None
        regions = self.sources.regions
        if ws.staging != "gather" and ws.registry is not None:
            bounds = [(v.__array_interface__["data"][0], v.nbytes) for v in regions]
            spans = host_registration.layer_spans(bounds, self.sources.pieces)
            t0 = time.perf_counter()
            try:
                counted = ws.registry.acquire(spans)
            except host_registration.RegistrationError as e:
                error = self.registration_error = str(e)
            else:
                self.registration_s = time.perf_counter() - t0
                self.registered_bytes = sum(s.nbytes for s in spans)
                self._cuts = host_registration.region_cuts(bounds, counted)
                # the finalizer holds the views: the mappings stay mapped until their registration is released
                device = torch.device("cuda", torch.cuda.current_device()) if ws.cuda else None  # run() set it
                self._unregister = weakref.finalize(self, _release, ws.registry, counted, device, regions)
                self._unregister.atexit = False  # at exit the process's pins go with it
        staging = staging_after_registration(ws.staging, error)
        if error is not None:
            warn_gathering(error)
        if staging == "registered":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only mappings: torch warns that it cannot write them (it won't)
                self._mapped = [torch.from_numpy(v) for v in regions]
        return staging

    def close(self) -> None:
        """Unregister the layer's bytes (once the device is done with them); a later call decides again."""
        if self._unregister is not None:
            self._unregister()
        self._unregister, self._mapped, self._staging, self._cuts = None, None, None, None
        self.registered_bytes, self.registration_s = 0, 0.0

    def _check_sizes(self, layer: int) -> None:
        """Every tensor has the size the dequantization jobs read (ValueError naming the first that does not):
        a kernel must never read past a tensor into its neighbour or out of the staging slot."""
        from kt_convert.quant.staged_dequant import scale_nbytes

        want = {}
        for proj in PROJECTIONS:
            n, k = shard_shape(proj, self.H, self.I, self.T)
            want[(proj, "weight")] = self.method.weight_bytes(n, k)
            want[(proj, "scale")] = scale_nbytes(self.method, n, k)
        for e, pieces in enumerate(self.sources.pieces):
            for p in pieces:
                if p.nbytes != want[(p.proj, p.part)]:
                    raise ValueError(f"layer {layer} expert {e} {p.proj} NUMA shard {p.numa}: the {p.part} has "
                                     f"{p.nbytes} bytes, {self.method.name} needs {want[(p.proj, p.part)]}")

    def _jobs(self, capacity: int):
        from kt_convert.quant.staged_dequant import expert_jobs

        m, H, I, T = self.method, self.H, self.I, self.T
        return lambda j, offset_of: expert_jobs(m, H, I, T, j, capacity, offset_of)

    def _tables(self, part, slices):
        """One host-to-device copy of the call's pair tables: tokens, experts (with biases), weights, and every
        slice's int32 expert ends (for the grouped GEMM); returns device views."""
        P = part.tokens.size
        eid = np.repeat(part.experts, np.diff(part.offsets)) if self.b13 is not None else np.zeros(0, np.int64)
        ends = np.array([e for _, sl in slices for e in sl.ends], dtype=np.int32)
        parts = [part.tokens.view(np.uint8), eid.view(np.uint8), part.weights.view(np.uint8), ends.view(np.uint8)]
        host = torch.from_numpy(np.concatenate(parts))
        dev = host.pin_memory().to(self.ws.device, non_blocking=True) if self.ws.cuda else host
        a, b, c = 8 * P, 8 * P + eid.nbytes, 8 * P + eid.nbytes + 4 * P
        return dev[:a].view(torch.int64), dev[a:b].view(torch.int64), dev[b:c].view(torch.float32), \
            dev[c:].view(torch.int32)

    @torch.no_grad()
    def run(self, x: torch.Tensor, part, out: torch.Tensor, meanwhile=None) -> None:
        """x [T, H] on the device; part: routing.PrefillPart; out float32 [T, H] on the device (added into).
        meanwhile(): called once the first gathers are under way (HybridMoE queues its GPU experts there)."""
        if self.ws.cuda:
            with torch.cuda.device(self.ws.device):  # Triton and new streams use the current device
                return self._run(x, part, out, meanwhile)
        return self._run(x, part, out, meanwhile)

    def _run(self, x, part, out, meanwhile) -> None:
        from kt_convert.quant.staged_dequant import (dequantize_staged_reference, dequantize_staged_triton, job_tiles,
                                          scratch_views)

        ws, plan = self.ws, self.plan
        check_tables(part.tokens.size, plan)
        direct = self.staging() == "registered"
        groups = transfer_groups(part.experts, plan.group_experts)
        cap = plan.group_experts
        make_jobs = self._jobs(cap)
        staged: list = []

        def stage(k: int):  # laid out when first needed: the first upload does not wait for the last layout
            while len(staged) <= k:
                g = groups[len(staged)]
                staged.append(stage_group(g, [self.sources.pieces[e] for e in g], make_jobs))
            return staged[k]

        firsts = np.cumsum([0] + [len(g) for g in groups])
        slices = [(k, sl) for k, g in enumerate(groups)
                  for sl in pair_slices(part.offsets, int(firsts[k]), len(g), plan.pair_block)]
        slots, scratch = ws.buffers(plan, self.scratch_elements(cap), self.dtype)
        w13, w2 = scratch_views(scratch, cap, self.H, self.I)
        grouped = ws.grouped_gemm_ok(self.dtype)
        use_triton = ws.dequant == "triton" or (ws.dequant == "auto" and ws.cuda)
        cuda, S = ws.cuda, len(slots)
        stream = torch.cuda.current_stream(ws.device) if cuda else None
        regions = self.sources.regions
        reads: dict[int, list] = {}
        traces: dict[int, dict] = {}

        def submit(k: int) -> None:  # gather staging: copy threads fill the slot's pinned bytes
            slot = slots[k % S]
            gate = ws.pool().submit(slot.uploaded.synchronize) if cuda else None
            reads[k] = ([gate] if gate is not None else []) + ws.gather(stage(k), regions, slot.pinned_np, gate)

        def upload(k: int) -> None:  # group k into its slot's device bytes, after its gathers when gathering
            group, slot = stage(k), slots[k % S]
            for f in reads.pop(k, ()):
                f.result()
            if not cuda:
                if direct:
                    self._copy_mapped(group, slot.dev)
                return
            trace = traces[k] = self._trace_events(group) if ws.trace is not None else None
            with torch.cuda.stream(ws.copy_stream):
                ws.copy_stream.wait_event(slot.consumed)  # the slot's previous group is dequantized
                if trace:
                    trace["h2d"][0].record(ws.copy_stream)
                if direct:
                    self._copy_mapped(group, slot.dev)
                else:
                    slot.dev[:group.nbytes].copy_(slot.pinned[:group.nbytes], non_blocking=True)
                if trace:
                    trace["h2d"][1].record(ws.copy_stream)
                slot.uploaded.record(ws.copy_stream)

        feed = upload if direct else submit  # what is started S groups ahead
        try:
            for k in range(min(S, len(groups))):
                feed(k)
            tok_d, eid_d, w_d, ends_d = self._tables(part, slices)
            if cuda:
                stream.wait_event(ws.scratch_free)  # the previous call (maybe on another stream) is done with it
            if meanwhile is not None:
                meanwhile()
            xg = x if x.dtype == self.dtype else x.to(self.dtype)
            at_slice, at_end = 0, 0
            for k in range(len(groups)):
                group, slot = stage(k), slots[k % S]
                if not direct:
                    upload(k)
                trace = traces.pop(k, None)
                if cuda:
                    stream.wait_event(slot.uploaded)
                    if trace:
                        trace["compute"][0].record(stream)
                count = len(group.experts)
                jobs = group.jobs
                if use_triton:
                    jobs_dev = slot.dev[group.jobs_offset:group.nbytes].view(torch.int64)
                    dequantize_staged_triton(slot.dev, jobs_dev, len(jobs), job_tiles(self.method, jobs), self.method,
                                             scratch)
                else:
                    dequantize_staged_reference(slot.dev, jobs, self.method, scratch)
                if cuda:
                    slot.consumed.record(stream)
                if k + S < len(groups):
                    feed(k + S)
                while at_slice < len(slices) and slices[at_slice][0] == k:
                    sl = slices[at_slice][1]
                    ends = ends_d[at_end:at_end + count]
                    self._gemms(xg, sl, tok_d, eid_d, w_d, ends, w13, w2, count, grouped, out)
                    at_slice += 1
                    at_end += count
                if trace:
                    trace["compute"][1].record(stream)
                    ws.trace.append(trace)
            if cuda:
                ws.scratch_free.record(stream)
        except BaseException:
            pending = [f for fs in reads.values() for f in fs]
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    f.exception()  # wait: no copy thread writes into a slot after this call
            raise
        ws.stats["calls"] += 1
        ws.stats["groups"] += len(staged)
        ws.stats["experts"] += len(part.experts)
        ws.stats["staged_bytes"] += sum(g.nbytes for g in staged)

    def _copy_mapped(self, group, dev: torch.Tensor) -> None:
        """The registered staging: each byte run of the group straight from its mapping into the slot's device
        bytes (cut where one registered span ends and the next begins: a copy reads one registration), then the
        job table (through pinned memory, which torch keeps until the copy is done), queued on the current
        stream."""
        for r in group.runs:
            src = self._mapped[r.region]
            for lo, hi in host_registration.split_range(r.src, r.src + r.nbytes, self._cuts[r.region]
                                                        if self._cuts else ()):
                dst = r.dst + lo - r.src
                dev[dst:dst + hi - lo].copy_(src[lo:hi], non_blocking=True)
        jobs = torch.from_numpy(group.jobs.reshape(-1).view(np.uint8))
        if dev.is_cuda:
            jobs = jobs.pin_memory()
        dev[group.jobs_offset:group.nbytes].copy_(jobs, non_blocking=True)

    @staticmethod
    def _trace_events(group) -> dict:
        ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        return {"experts": len(group.experts), "bytes": group.nbytes, "h2d": (ev(), ev()), "compute": (ev(), ev())}

    def _gemms(self, xg, sl, tok_d, eid_d, w_d, ends, w13, w2, count, grouped, out) -> None:
        """The pairs of one slice: down(act(clamp([gate | up] x + b))) + b, weighted, added into out."""
        a, b = sl.start, sl.end
        t = tok_d[a:b]
        xs = xg.index_select(0, t)
        h = self._linear(xs, w13, count, sl.ends, ends, grouped)
        if self.b13 is not None:
            h += self.b13.index_select(0, eid_d[a:b])
        h = gated_activation(h, self.clamp_lo, self.clamp_hi, self.act, self.I)
        o = self._linear(h, w2, count, sl.ends, ends, grouped)
        if self.b2 is not None:
            o += self.b2.index_select(0, eid_d[a:b])
        out.index_add_(0, t, o.float().mul_(w_d[a:b, None]))

    def _linear(self, xs, w, count, host_ends, dev_ends, grouped):
        """xs [m, K] rows grouped by expert (expert j: rows up to host_ends[j]) times w[j] [N, K]^T -> [m, N]."""
        if grouped and self.ws.grouped_gemm_ok(xs.dtype):
            try:
                return _grouped_mm()(xs, w[:count].transpose(1, 2), offs=dev_ends)
            except (RuntimeError, ValueError) as e:  # a shape the grouped kernel refuses: one matmul per expert
                if self.ws.gemm != "auto":
                    raise
                self.ws._gemm_ok[xs.dtype] = False
                warnings.warn(f"the grouped GEMM failed ({e}); the GPU prefill runs one matmul per expert from now on",
                              RuntimeWarning, stacklevel=2)
        y = torch.empty((xs.shape[0], w.shape[1]), dtype=xs.dtype, device=xs.device)
        lo = 0
        for j, hi in enumerate(host_ends):
            if hi > lo:
                torch.mm(xs[lo:hi], w[j].t(), out=y[lo:hi])
            lo = hi
        return y
