"""The GPU prefill with Triton and CUDA (marker gpu: skipped without a CUDA GPU).

Triton dequantization (quant/triton_dequant.py) against the torch reference, bit for bit, into float32 and
bfloat16: every method on real packed outputs, and hand-made tiles whose values are known (N-block and K-block
tails, RAWINT4 columns that are no multiple of the program's width). KT_GPU_TEST_DEVICE=cpu with
TRITON_INTERPRET=1 runs these on Triton's CPU interpreter (triton installed; no GPU).

On CUDA only: HybridMoE's GPU prefill against the float reference for every method and family activation (and
against the CPU path), both GEMM paths; the registered staging against the gathered one, bit for bit, its
registration seen by CUDA (the mapping pinned) and released, also where another registration holds part of
the layer's pages; the device memory of a call under the stated budget
(torch.cuda.max_memory_allocated), for both stagings; the overlap (CUDA events: group k + 1's upload runs while
group k is computed, and no group is computed before its upload ends); no host wait on the caller's stream inside
the layer (the call returns while a device sleep queued before it still runs); a registration CUDA refuses leaves
no error pending for torch's next kernel, and "auto" then gathers.
"""
from __future__ import annotations

import gc
import mmap
import os
import warnings

import numpy as np
import pytest
import torch

from kt_convert.kt_runtime import HybridMoE
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.format.methods import INT4, INT8, RAWINT4_G32
from kt_convert.kt_runtime.hybrid import gpu_prefill, host_registration
from kt_convert.kt_runtime.hybrid.expert_staging import LayerSources, copy_tasks, stage_group
from kt_convert.kt_runtime.hybrid.gpu_prefill import PrefillWorkspace
from kt_convert.kt_runtime.hybrid.host_registration import HostSpan, RegistrationError, layer_spans
from kt_convert.quant.amx_tiling import tile
from kt_convert.quant.staged_dequant import (dequantize_staged_reference, dequantize_staged_triton, expert_jobs,
                                             job_tiles, scratch_elements, scratch_views)

from helpers.prefill import CASES, cases, rel  # noqa: F401 (cases: a fixture)

DEVICE = os.environ.get("KT_GPU_TEST_DEVICE", "cuda")
INTERPRETED = DEVICE == "cpu"
gpu = pytest.mark.gpu
real_gpu = pytest.mark.skipif(INTERPRETED, reason="needs a real CUDA device (streams, pinned memory, events)")


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


def _triton_dequant(method, staging: np.ndarray, jobs: np.ndarray, elements: int, dtype):
    dev = torch.from_numpy(staging).to(DEVICE)
    jobs_dev = torch.from_numpy(np.ascontiguousarray(jobs)).to(DEVICE)
    out = torch.full((elements,), float("nan"), dtype=dtype, device=DEVICE)
    dequantize_staged_triton(dev, jobs_dev, len(jobs), job_tiles(method, jobs), method, out)
    return out.cpu()


# ---------------------------------------------------------------- Triton dequantization, bit for bit


@gpu
@pytest.mark.parametrize("name", CASES)
def test_triton_dequant_equals_the_reference(cases, name):
    c = cases[name]
    w, layer = c.weights, c.layer
    m, H, I, T = w.spec.quant_method, w.hidden_size, w.moe_intermediate_size, w.threadpool_count
    src = LayerSources(w, layer)
    experts = [1] if INTERPRETED else list(range(w.num_experts))
    cap = len(experts) + 1  # one scratch slot left unwritten
    g = stage_group(experts, [src.pieces[e] for e in experts], lambda j, off: expert_jobs(m, H, I, T, j, cap, off))
    staging = np.zeros(g.nbytes, np.uint8)
    for pieces in copy_tasks(g, src.regions, 1):
        for a, off in pieces:
            staging[off:off + a.size] = a
    for dtype in (torch.float32, torch.bfloat16):
        ref = torch.full((scratch_elements(cap, H, I),), float("nan"), dtype=dtype)
        dequantize_staged_reference(torch.from_numpy(staging), g.jobs, m, ref)
        got = _triton_dequant(m, staging, g.jobs, ref.numel(), dtype)
        assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[~ref.isnan()],
                           ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[~ref.isnan()])
        assert torch.equal(got.isnan(), ref.isnan())  # the free slot stays unwritten
        w13, w2 = scratch_views(got, cap, H, I)
        for j, e in enumerate(experts):  # and it is the loader's dequantize
            assert torch.equal(w13[j], torch.cat([w.dequantize(layer, e, "gate"), w.dequantize(layer, e, "up")]).to(dtype))
            assert torch.equal(w2[j], w.dequantize(layer, e, "down").to(dtype))


@gpu
@pytest.mark.parametrize("method,n,k", [(INT4, 160, 3712), (INT8, 96, 3648), (INT4, 32, 128), (INT8, 32, 64)])
def test_triton_dequant_of_hand_made_tiles(method, n, k):
    """Known levels and scales, tiled by quant.amx_tiling.tile (the packer's reference byte order, not the
    kernel's closed form): each value must be q * d (INT8) or q * 16 * d (INT4), exactly. Shapes with an N-block
    tail (160 = 128 + 32, 96 = 64 + 32) and a K-block tail (3712 = 3584 + 128, 3648 = 3584 + 64)."""
    rng = np.random.default_rng(n + k)
    lim = 7 if method.bits == 4 else 127
    q = rng.integers(-lim, lim + 1, size=(n, k)).astype(np.int8)
    q[0, :4] = [lim, -lim, 0, 1]
    d = (2.0 ** rng.integers(-12, 4, size=n) * rng.uniform(1, 2, size=n)).astype(np.float32)
    packed = tile(torch.from_numpy(q), method).numpy()
    staging = np.zeros(packed.size + 4 * n + 64, np.uint8)
    staging[:packed.size] = packed
    s_off = -(-packed.size // 64) * 64
    staging[s_off:s_off + 4 * n] = d.view(np.uint8)
    jobs = np.array([[0, s_off, n, k, 0, k]], dtype=np.int64)
    want = q.astype(np.float32) * (d * np.float32(16 if method.bits == 4 else 1))[:, None]
    got = _triton_dequant(method, staging, jobs, n * k, torch.float32).view(n, k).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    got16 = _triton_dequant(method, staging, jobs, n * k, torch.bfloat16).view(n, k)
    assert torch.equal(got16, torch.from_numpy(want).to(torch.bfloat16))


@gpu
def test_triton_dequant_of_hand_made_groups():
    """RAWINT4: u = q + 8 two per byte (even column low), bf16 scales per 32 columns; 96 columns (not a multiple
    of the kernel's 128) written into a wider row (stride 100) at an offset, values (u - 8) * s exactly."""
    n, k, G = 64, 96, RAWINT4_G32.group_size
    rng = np.random.default_rng(3)
    u = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    s = torch.from_numpy(rng.uniform(-2, 2, size=(n, k // G)).astype(np.float32)).to(torch.bfloat16)
    s_bits = s.view(torch.int16).numpy().view(np.uint16)
    staging = np.zeros(packed.size + 2 * s_bits.size + 64, np.uint8)
    staging[:packed.size] = packed.ravel()
    staging[3072:3072 + 2 * s_bits.size] = s_bits.ravel().view(np.uint8)
    jobs = np.array([[0, 3072, n, k, 5, 100]], dtype=np.int64)
    want = (u.astype(np.float32) - 8) * np.repeat(s.float().numpy(), G, axis=1)
    got = _triton_dequant(RAWINT4_G32, staging, jobs, 5 + 100 * n, torch.float32)
    rows = got[5:].view(n, 100)
    assert np.array_equal(rows[:, :k].numpy().view(np.uint32), want.view(np.uint32))
    assert rows[:, k:].isnan().all() and got[:5].isnan().all()


@gpu
def test_engine_with_triton_dequant_equals_torch_dequant(cases):
    """The whole prefill call with the Triton kernels (interpreter or GPU) gives the same bits as with the torch
    reference dequantization on the CPU."""
    c = cases["v4-int4"]
    x, ids, w = c.routing(24, k=2, seed=11)
    torch_ws = PrefillWorkspace("cpu", dequant="torch", gemm="loop")
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                  prefill_workspace=torch_ws)
    want = h(x, ids, w)
    if INTERPRETED:
        h2 = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                       prefill_workspace=PrefillWorkspace("cpu", dequant="triton", gemm="loop"))
        assert torch.equal(h2(x, ids, w), want)
    else:
        h2 = HybridMoE(c.weights, c.layer, device="cuda", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                       prefill_workspace=PrefillWorkspace("cuda", gemm="loop"))
        assert rel(h2(x.cuda(), ids.cuda(), w.cuda()), want) < 1e-5


# ---------------------------------------------------------------- CUDA


@gpu
@real_gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_prefill_equals_the_float_reference(cases, name):
    c = cases[name]
    x, ids, w = c.routing(300, k=3, seed=12)
    ref = c.reference(x, ids, w)
    cpu = CPUMoE(c.weights, c.layer, biases=c.biases).forward(x, ids, w)
    xd, idd, wd = x.cuda(), ids.cuda(), w.cuda()
    for gemm in ("grouped", "loop"):
        ws = PrefillWorkspace("cuda", memory=32 << 20, max_group_bytes=1 << 18, gemm=gemm, staging="registered")
        h = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cuda", biases=c.biases,
                      gpu_prefill_token_threshold=256, prefill_workspace=ws)
        y = h(xd.to(torch.bfloat16), idd, wd)
        assert y.is_cuda and y.dtype == torch.bfloat16 and ws.stats["calls"] == 1 and ws.stats["groups"] > 1
        assert h.prefill.staging() == "registered"
        assert rel(y, ref) < 0.03, (gemm, rel(y, ref))
        assert rel(y, cpu) < 0.1
    h32 = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cuda", gpu_dtype=torch.float32, biases=c.biases,
                    gpu_prefill_token_threshold=256, prefill_workspace=PrefillWorkspace("cuda", gemm="loop"))
    assert rel(h32(x, ids, w), ref) < 1e-4  # x and routing on the host: the result comes back there
    assert not h32(x[:255], ids[:255], w[:255]).is_cuda and h32.prefill.ws.stats["calls"] == 1  # below: CPU path


@gpu
@real_gpu
@pytest.mark.parametrize("staging", ["registered", "gather"])
def test_cuda_prefill_memory_stays_under_the_budget(cases, staging):
    """A tight budget (one expert per group, GEMMs in slices of 128 pairs): the device memory the call allocates,
    beyond its float32 output and the result in x's dtype, stays under gpu_prefill_memory."""
    c = cases["v4-int8"]
    budget = 6 << 20
    x, ids, w = c.routing(512, k=3, seed=13)
    xd, idd, wd = x.to(torch.bfloat16).cuda(), ids.cuda(), w.cuda()
    # a first call on another workspace: the kernels compiled, cuBLAS's workspace for this stream made
    HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2,
              prefill_workspace=PrefillWorkspace("cuda", memory=budget, staging=staging))(xd, idd, wd)
    ws = PrefillWorkspace("cuda", memory=budget, staging=staging)
    h = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2, prefill_workspace=ws)
    plan = h.prefill.plan
    assert plan.group_experts == 1 and plan.pair_block == 128 and plan.device_bytes(h.prefill.sizes) <= budget
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = h(xd, idd, wd)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    outputs = 512 * c.weights.hidden_size * (4 + 2)
    assert plan.slots * plan.slot_bytes < used - outputs <= budget, (used, outputs, budget)
    assert rel(y, c.reference(x, ids, w)) < 0.03 and h.prefill.staging() == staging


def _overlap_layer(tmp_path):
    """A layer large enough that a group's GEMMs outlast the next group's gather and upload: Qwen3-MoE BF16,
    H=2048, I=1024, 16 experts, as int4 (3 MiB per expert)."""
    from kt_convert import kt_runtime
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.synthetic.families import make_family_checkpoint

    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", hidden_size=2048, intermediate_size=1024,
                                num_experts=16, num_layers=1, mtp_layers=0)
    convert(ConvertOptions(input_path=str(ck.path), output=tmp_path / "out", quant_method="int4", progress=False))
    return kt_runtime.load_experts(tmp_path / "out")


@gpu
@real_gpu
@pytest.mark.parametrize("staging", ["registered", "gather"])
def test_cuda_prefill_overlaps_uploads_with_compute(tmp_path, staging):
    w = _overlap_layer(tmp_path)
    layer = w.layers[0]
    ws = PrefillWorkspace("cuda", max_group_bytes=4 << 20, staging=staging)
    h = HybridMoE(w, layer, device="cuda", gpu_prefill_token_threshold=2, prefill_workspace=ws)
    T, k = 32768, 8
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(T)]).cuda()
    wt = torch.softmax(torch.randn(T, k, generator=g), -1).cuda()
    x = (torch.randn(T, 2048, generator=g) * 0.5).to(torch.bfloat16).cuda()
    h(x, ids, wt)  # warm-up: buffers, kernels compiled
    torch.cuda.synchronize()
    ws.trace = []
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    h(x, ids, wt)
    torch.cuda.synchronize()
    groups = ws.trace
    assert len(groups) == 16  # one expert per group
    t = lambda e: start.elapsed_time(e)  # noqa: E731 - ms since the call's start
    spans = [((t(gr["h2d"][0]), t(gr["h2d"][1])), (t(gr["compute"][0]), t(gr["compute"][1]))) for gr in groups]
    for (_, up_end), (compute_start, _) in spans:  # stream order: a group is computed after its upload
        assert compute_start >= up_end - 1e-3
    # the copy engine and the GPU busy at once: an upload runs while an earlier group is being computed
    overlapped = [j for j in range(1, len(spans))
                  if any(spans[j][0][0] < c_end and spans[j][0][1] > c_start for _, (c_start, c_end) in spans[:j])]
    assert len(overlapped) >= len(spans) // 2, spans
    assert h.prefill.staging() == staging


@gpu
@real_gpu
@pytest.mark.parametrize("staging", ["registered", "gather"])
def test_cuda_prefill_never_waits_for_the_callers_stream(cases, staging):
    """A device sleep queued before the call: the call returns while it still runs (routing given on the host;
    the layer fits the two staging slots, so no copy thread waits for an upload either)."""
    c = cases["v4-int4"]
    ws = PrefillWorkspace("cuda", staging=staging)
    h = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2, prefill_workspace=ws)
    x, ids, w = c.routing(64, seed=14)
    xd = x.to(torch.bfloat16).cuda()
    y0 = h(xd, ids, w)  # warm-up (buffers, kernels, cached host blocks)
    torch.cuda.synchronize()
    assert ws.stats["groups"] <= ws.slots
    torch.cuda._sleep(1 << 30)
    slept = torch.cuda.Event()
    slept.record()
    y = h(xd, ids, w)
    assert not slept.query(), "the prefill call waited for work queued before it"
    torch.cuda.synchronize()
    assert torch.equal(y, y0)


# ---------------------------------------------------------------- CUDA: the registered staging


def _pinned(view: np.ndarray) -> bool:
    """Whether CUDA sees these host bytes as page-locked (registered)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only mapping: only asked about
        return torch.from_numpy(view).is_pinned()


@gpu
@real_gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_registered_staging_equals_gathering_bit_for_bit(cases, name):
    """The same call through both stagings (several transfer groups, a GPU-resident expert making a gap): the
    same bits. The registered layer's mapping is page-locked from its first call (not before) until close()."""
    gc.collect()  # layers of earlier tests over these weights: collected, their registrations released
    c = cases[name]
    x, ids, w = c.routing(300, k=3, seed=18)
    xd, idd, wd = x.to(torch.bfloat16).cuda(), ids.cuda(), w.cuda()
    out, layers = {}, {}
    for staging in ("gather", "registered"):
        ws = PrefillWorkspace("cuda", memory=32 << 20, max_group_bytes=1 << 18, staging=staging)
        h = layers[staging] = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cuda", biases=c.biases,
                                        gpu_prefill_token_threshold=256, prefill_workspace=ws)
        if staging == "registered":
            assert not _pinned(h.prefill.sources.regions[0])
        out[staging] = h(xd, idd, wd)
        assert h.prefill.staging() == staging and ws.stats["groups"] > 1
    assert torch.equal(out["registered"], out["gather"])
    reg = layers["registered"].prefill
    region = reg.sources.regions[0]
    assert _pinned(region) and reg.registered_bytes >= reg.sources.packed_bytes(range(c.weights.num_experts))
    assert layers["gather"].prefill.registered_bytes == 0
    reg.close()
    assert not _pinned(region) and not host_registration.registry().users
    assert torch.equal(layers["registered"](xd, idd, wd), out["gather"]) and _pinned(region)  # registered again
    del layers, reg, h
    gc.collect()
    assert not _pinned(region) and not host_registration.registry().users  # released with the layer


@gpu
@real_gpu
def test_cuda_failed_registration_leaves_no_error_pending():
    """CUDA refuses pages registered twice; the error is consumed where it happens, so torch's next kernel launch
    (which reads the runtime's last error) runs."""
    buf = mmap.mmap(-1, 1 << 20)  # anonymous, page-aligned
    view = np.frombuffer(buf, np.uint8)
    span = HostSpan(view.__array_interface__["data"][0], view.nbytes)
    rt = host_registration.registry().runtime()
    rt.register(span)
    try:
        assert _pinned(view)
        with pytest.raises(RegistrationError, match=r"cudaHostRegister of 1048576 bytes at 0x[0-9a-f]+ failed"):
            rt.register(span)
        y = torch.ones(1024, device="cuda") * 2  # a kernel launch, checked with cudaGetLastError
        torch.cuda.synchronize()
        assert float(y.sum()) == 2048
    finally:
        rt.unregister(span)
    assert not _pinned(view)
    del view
    buf.close()


@gpu
@real_gpu
def test_cuda_auto_gathers_where_cuda_refuses_the_registration(cases, monkeypatch):
    """The layer's pages already registered behind the registry's back: CUDA refuses the layer's registration,
    "auto" says so once and gathers, with the same bits as the registered staging; "registered" is refused."""
    monkeypatch.setattr(gpu_prefill, "_WARNED", set())
    gc.collect()
    c = cases["v4-int8"]
    x, ids, w = c.routing(64, k=2, seed=19)
    xd, idd, wd = x.to(torch.bfloat16).cuda(), ids.cuda(), w.cuda()
    want = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2,
                     prefill_workspace=PrefillWorkspace("cuda", staging="registered"))(xd, idd, wd)
    gc.collect()
    src = LayerSources(c.weights, c.layer)
    (span,) = layer_spans([(v.__array_interface__["data"][0], v.nbytes) for v in src.regions], src.pieces)
    assert not host_registration.registry().users
    rt = host_registration.registry().runtime()
    rt.register(span)
    try:
        h = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2,
                      prefill_workspace=PrefillWorkspace("cuda"))
        with pytest.warns(RuntimeWarning, match=r"gathers the packed experts.*cudaHostRegister of \d+ bytes"):
            y = h(xd, idd, wd)
        assert h.prefill.staging() == "gather" and torch.equal(y, want)
        h = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2,
                      prefill_workspace=PrefillWorkspace("cuda", staging="registered"))
        with pytest.raises(ValueError, match="gpu_prefill_staging='gather'"):
            h(xd, idd, wd)
        assert torch.equal(torch.ones(4, device="cuda").add_(1).cpu(), torch.full((4,), 2.0))  # nothing pending
    finally:
        rt.unregister(span)


@gpu
@real_gpu
def test_cuda_layer_sharing_pages_with_another_registration(cases):
    """The first half of the layer's pages registered by "another layer" through the registry: the layer
    registers only the rest (CUDA refuses overlapping registrations), its copies are cut at the boundary, and
    the result equals the gathered one bit for bit; releasing both unregisters every page."""
    gc.collect()
    c = cases["v4-int4"]
    x, ids, w = c.routing(300, k=3, seed=21)
    xd, idd, wd = x.to(torch.bfloat16).cuda(), ids.cuda(), w.cuda()
    want = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2,
                     prefill_workspace=PrefillWorkspace("cuda", staging="gather", max_group_bytes=1 << 18))(xd, idd, wd)
    gc.collect()
    reg = host_registration.registry()
    src = LayerSources(c.weights, c.layer)
    (span,) = layer_spans([(v.__array_interface__["data"][0], v.nbytes) for v in src.regions], src.pieces)
    page = host_registration.PAGE
    half = HostSpan(span.start, span.nbytes // 2 // page * page)
    held = reg.acquire([half])
    try:
        h = HybridMoE(c.weights, c.layer, device="cuda", gpu_prefill_token_threshold=2,
                      prefill_workspace=PrefillWorkspace("cuda", staging="registered", max_group_bytes=1 << 18))
        y = h(xd, idd, wd)
        assert torch.equal(y, want) and h.prefill.staging() == "registered"
        rest = HostSpan(half.end, span.end - half.end)
        assert reg.users == {half: 2, rest: 1}
        region = src.regions[0]
        base = region.__array_interface__["data"][0]
        assert _pinned(region[half.end - base - 1:]) and _pinned(region[half.end - base:])
        h.prefill.close()
        assert reg.users == {half: 1} and not _pinned(region[half.end - base:])
    finally:
        reg.release(held)
    assert not reg.users and not _pinned(src.regions[0])
