"""The GPU prefill's logic on the CPU (kt_runtime/hybrid/gpu_prefill.py, prefill_plan.py, expert_staging.py,
routing.split_prefill): when a call takes it, which pairs it computes, the fallback without CUDA, the
memory-budget planning, the staging layout, and its results.

The engine runs here on a CPU PrefillWorkspace: the same staging, job tables, slices and GEMMs as on CUDA, run
synchronously, with the torch reference dequantization (the Triton kernels: test_gpu_prefill_gpu.py).
Tolerances: gpu_dtype float32 computes the dequantized packed weights in float32, so it equals the float
reference MoE (kt_runtime.reference) to 1e-5; bfloat16 weights and matmuls: < 0.03.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kt_convert.kt_runtime import HybridMoE
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.hybrid import gpu_prefill, host_registration, routing
from kt_convert.kt_runtime.hybrid.expert_staging import LayerSources, Piece, copy_tasks, stage_group
from kt_convert.kt_runtime.expert_activation import Activation
from kt_convert.kt_runtime.hybrid.gpu_prefill import GpuPrefill, PrefillWorkspace
from kt_convert.kt_runtime.hybrid.prefill_plan import (ALIGN, MIN_PAIR_BLOCK, TABLE_SHARE, ExpertSizes, check_memory,
                                            check_staging, check_threshold, pair_activation_bytes, pair_slices,
                                            plan_budget, prefill_applies, staging_after_registration,
                                            transfer_groups)
from kt_convert.kt_runtime.hybrid.stream_path import DeferralChain
from kt_convert.kt_runtime.reference import moe_reference

from helpers.prefill import CASES, cases, rel  # noqa: F401 (cases: a fixture)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(gpu_prefill, "_WARNED", set())


def cpu_workspace(**kw):
    return PrefillWorkspace("cpu", **kw)


# ---------------------------------------------------------------- the threshold


def test_threshold_values():
    assert [check_threshold(v) for v in (None, 0, 1, 2048, np.int64(7))] == [None, None, 1, 2048, 7]
    for bad in (True, False, -1, 1.5, "2048", [4]):
        with pytest.raises(ValueError, match="gpu_prefill_token_threshold"):
            check_threshold(bad)
    # kt's rule: at or above the threshold, counted in the tokens of one call
    assert prefill_applies(2048, 2048) and prefill_applies(4096, 2048)
    assert not prefill_applies(2047, 2048) and not prefill_applies(10 ** 6, None) and not prefill_applies(5, 0)
    assert check_memory(None) == 2 << 30 and check_memory(1 << 20) == 1 << 20
    for bad in (0, -5, True, 1.0, "1G"):
        with pytest.raises(ValueError, match="gpu_prefill_memory"):
            check_memory(bad)


def test_calls_below_the_threshold_take_the_cpu_path_unchanged(cases):
    c = cases["v4-int8"]
    x, ids, w = c.routing(7, seed=1)
    ws = cpu_workspace()
    h = HybridMoE(c.weights, c.layer, num_gpu_experts=2, device="cpu", gpu_prefill_token_threshold=8,
                  prefill_workspace=ws)
    plain = HybridMoE(c.weights, c.layer, num_gpu_experts=2, device="cpu")
    assert h.prefill is not None and h.gpu_prefill_token_threshold == 8
    assert not h.takes_prefill(7) and h.takes_prefill(8) and h.takes_prefill(9)
    assert torch.equal(h(x, ids, w), plain(x, ids, w)) and ws.stats["calls"] == 0


def test_calls_at_the_threshold_run_no_cpu_engine(cases, monkeypatch):
    c = cases["v4-int8"]
    x, ids, w = c.routing(8, seed=2)
    ws = cpu_workspace()
    h = HybridMoE(c.weights, c.layer, num_gpu_experts=2, device="cpu", gpu_dtype=torch.float32,
                  gpu_prefill_token_threshold=8, prefill_workspace=ws)

    def no_engine(*a, **k):
        raise AssertionError("the CPU engine ran on a GPU prefill call")

    monkeypatch.setattr(h.cpu, "forward_f32", no_engine)
    h.profile = {}
    y = h(x, ids, w)
    assert ws.stats["calls"] == 1 and "gpu_prefill" in h.profile and "cpu_engine" not in h.profile
    assert rel(y, c.reference(x, ids, w)) < 1e-5
    # settable later: off, then on again
    h.gpu_prefill_token_threshold = 0
    assert h.gpu_prefill_token_threshold is None and not h.takes_prefill(10 ** 6)
    h.gpu_prefill_token_threshold = 4
    assert h.takes_prefill(4)


def test_forward_stream_and_deferral_leave_prefill_calls_to_forward(cases):
    c = cases["v4-int8"]
    x, ids, w = c.routing(12, seed=3)
    ws = cpu_workspace()
    h = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cpu", gpu_dtype=torch.float32,
                  gpu_prefill_token_threshold=10, prefill_workspace=ws)
    ref = c.reference(x, ids, w)
    assert rel(h.forward_stream(x, ids, w), ref) < 1e-5 and ws.stats["calls"] == 1  # 12 <= stream_max_tokens
    # a deferring layer defers nothing on a prefill call: it adds what the previous layer left, carries nothing
    chain = DeferralChain()
    d = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cpu", gpu_dtype=torch.float32, defer=1,
                  gpu_prefill_token_threshold=10, prefill_workspace=ws)
    d.deferral = chain
    left = torch.full((12, c.weights.hidden_size), 0.5)
    chain.put(left)
    y = d(x, ids, w)
    assert chain.take() is None and rel(y, ref + left) < 1e-5


# ---------------------------------------------------------------- the routing of a prefill call


def test_split_prefill_by_hand():
    slot_of = np.array([-1, 0, -1, -1, 1, -1], dtype=np.int64)  # experts 1 and 4 on the GPU
    ids = torch.tensor([[3, 1, 0], [4, 3, 5], [0, 2, 3], [1, 4, 1]])
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
    part, gpu = routing.split_prefill(ids, w, slot_of)
    assert part.experts.tolist() == [0, 2, 3, 5]  # CPU-resident experts touched; 1 and 4 stay on the GPU
    assert part.offsets.tolist() == [0, 2, 3, 6, 7]
    assert part.tokens.tolist() == [0, 2, 2, 0, 1, 2, 1]  # expert 0: tokens 0, 2; 2: 2; 3: 0, 1, 2; 5: 1
    assert np.allclose(part.weights, [0.2, 0.6, 0.7, 0.0, 0.4, 0.8, 0.5])
    assert part.tokens.dtype == np.int64 and part.weights.dtype == np.float32
    assert gpu.groups == [(0, 0, 3), (1, 3, 5)]  # slot 0 (expert 1): tokens 0, 3, 3; slot 1 (expert 4): 1, 3
    assert gpu.tokens.tolist() == [0, 3, 3, 1, 3] and torch.allclose(gpu.weights, torch.tensor([.1, .9, 1.1, .3, 1.0]))
    # nothing on the CPU: no prefill part; nothing on the GPU: no GPU part
    assert routing.split_prefill(ids[3:], w[3:], slot_of)[0] is None
    part, gpu = routing.split_prefill(ids, w, np.full(6, -1, dtype=np.int64))
    assert gpu is None and part.offsets[-1] == 12


def test_split_prefill_matches_split_on_random_routings():
    g = torch.Generator().manual_seed(5)
    for T, E, k, G in ((1, 8, 2, 3), (50, 16, 4, 5), (300, 64, 6, 0), (200, 32, 8, 32)):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        slot_of = np.full(E, -1, dtype=np.int64)
        slot_of[torch.randperm(E, generator=g)[:G].numpy()] = np.arange(G)
        part, gpu = routing.split_prefill(ids, w, slot_of)
        _, gpu_ref = routing.split_numpy(ids, w, slot_of)
        assert (gpu is None) == (gpu_ref is None)
        if gpu is not None:
            assert gpu.groups == gpu_ref.groups and torch.equal(gpu.tokens, gpu_ref.tokens)
        pairs = {(t, int(e), float(wt)) for t in range(T) for e, wt in zip(ids[t].tolist(), w[t].tolist())
                 if slot_of[e] < 0}
        got = set()
        if part is not None:
            for i, e in enumerate(part.experts.tolist()):
                a, b = part.offsets[i], part.offsets[i + 1]
                assert b > a and sorted(part.tokens[a:b].tolist()) == part.tokens[a:b].tolist()
                got |= {(int(t), e, float(wt)) for t, wt in zip(part.tokens[a:b], part.weights[a:b])}
        assert got == pairs


# ---------------------------------------------------------------- the fallback


def test_without_cuda_the_threshold_is_ignored_with_one_warning(cases):
    c = cases["v4-int4"]
    x, ids, w = c.routing(9, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = [HybridMoE(c.weights, c.layer, num_gpu_experts=2, device="cpu", gpu_prefill_token_threshold=4)
                  for _ in range(3)]
        layers[0].gpu_prefill_token_threshold = 2
    messages = [str(m.message) for m in caught if "gpu_prefill_token_threshold" in str(m.message)]
    assert len(messages) == 1 and "ignored" in messages[0] and "not CUDA" in messages[0]
    plain = HybridMoE(c.weights, c.layer, num_gpu_experts=2, device="cpu")
    for h in layers:
        assert h.prefill is None and not h.takes_prefill(10 ** 6)
        assert torch.equal(h(x, ids, w), plain(x, ids, w))
    assert gpu_prefill.unavailable_reason(torch.device("cpu")) is not None


def test_unavailable_reasons(monkeypatch):
    import importlib.util

    assert "not CUDA" in gpu_prefill.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in gpu_prefill.unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert "triton is not installed" in gpu_prefill.unavailable_reason(torch.device("cuda"))


def test_bad_arguments(cases):
    c = cases["v4-int8"]
    ws = cpu_workspace()
    for kw, match in (({"gpu_prefill_token_threshold": -3}, "gpu_prefill_token_threshold"),
                      ({"gpu_prefill_token_threshold": 4, "gpu_prefill_memory": "2G"}, "gpu_prefill_memory"),
                      ({"gpu_prefill_token_threshold": 4, "gpu_prefill_memory": 1 << 30, "prefill_workspace": ws},
                       "not both"),
                      ({"gpu_prefill_token_threshold": 4, "prefill_workspace": cpu_workspace(memory=1 << 20)},
                       r"gpu_prefill_memory=1048576 bytes cannot hold one expert.*at least \d+ bytes")):
        with pytest.raises(ValueError, match=match):
            HybridMoE(c.weights, c.layer, device="cpu", **kw)
    for kw, match in (({"slots": 0}, "slots"), ({"gemm": "cublas"}, "gemm"), ({"dequant": "numpy"}, "dequant"),
                      ({"memory": -1}, "gpu_prefill_memory")):
        with pytest.raises(ValueError, match=match):
            PrefillWorkspace("cpu", **kw)
    with pytest.raises(ValueError, match="CPU only"):
        PrefillWorkspace("cuda", dequant="torch")
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_prefill_token_threshold=2, prefill_workspace=ws)
    x, ids, w = c.routing(4)
    bad = ids.clone()
    bad[1, 0] = 8
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 8\)"):
        h(x, bad, w)
    with pytest.raises(ValueError, match="x must be"):
        h(x[:, :5], ids, w)


def test_a_chunk_beyond_the_table_reserve_is_refused_with_the_fix(cases):
    """8 MiB keep 256 KiB for one call's routing tables (20 bytes a pair): 8000 pairs fit, 16000 do not."""
    c = cases["v4-int8"]
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                  prefill_workspace=cpu_workspace(memory=8 << 20))
    assert h.prefill.plan.table_bytes == (8 << 20) // TABLE_SHARE
    x, ids, w = c.routing(1000, k=8)
    assert rel(h(x, ids, w), c.reference(x, ids, w)) < 1e-5
    x, ids, w = c.routing(2000, k=8)
    with pytest.raises(ValueError, match="chunk the prefill smaller or raise gpu_prefill_memory"):
        h(x, ids, w)


# ---------------------------------------------------------------- the memory budget


def test_plan_budget_by_hand():
    sizes = ExpertSizes(staged_bytes=1000, dequant_bytes=3000, pair_bytes=100)
    p = plan_budget(sizes, budget=64_000, fixed_bytes=1000, slots=2, max_group_bytes=10 ** 9)
    # table 64000 // 32 = 2000; avail = 61000; pairs: 61000 // 4 // 100 = 152; rest 45800; per expert 5000 -> 9
    assert (p.table_bytes, p.pair_block, p.group_experts, p.slot_bytes) == (2000, 152, 9, 9000)
    assert p.device_bytes(sizes) == 2000 + 1000 + 2 * 9000 + 9 * 3000 + 152 * 100 <= 64_000
    # the group size cap: 3 experts of 1000 staged bytes
    assert plan_budget(sizes, 64_000, 1000, max_group_bytes=3500).group_experts == 3
    # three slots: fewer experts per group
    assert plan_budget(sizes, 64_000, 1000, slots=3, max_group_bytes=10 ** 9).group_experts == 7
    # the least budget the message names works; less than one expert does not
    with pytest.raises(ValueError) as e:
        plan_budget(sizes, 10_000, 0)
    least = int(str(e.value).split("at least ")[1].split()[0])
    assert plan_budget(sizes, least, 0).group_experts >= 1
    assert "gpu_prefill_memory=10000" in str(e.value) and f"{MIN_PAIR_BLOCK} pairs" in str(e.value)


def test_plans_stay_under_their_budget():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = ExpertSizes(int(rng.integers(1, 10 ** 7)), int(rng.integers(1, 10 ** 8)), int(rng.integers(1, 10 ** 5)))
        budget = int(rng.integers(1, 10 ** 10))
        fixed = int(rng.integers(0, 10 ** 6))
        try:
            p = plan_budget(sizes, budget, fixed, slots=int(rng.integers(1, 4)),
                            max_group_bytes=int(rng.integers(1, 10 ** 9)))
        except ValueError as e:
            assert "gpu_prefill_memory" in str(e)
            continue
        assert p.group_experts >= 1 and p.pair_block >= MIN_PAIR_BLOCK
        assert p.device_bytes(sizes) <= budget and p.table_bytes == budget // TABLE_SHARE


def test_v4_flash_layer_plan():
    """DeepSeek-V4-Flash int4 (one NUMA shard) at the default 2 GiB: 12.6 MB staged and 50 MB in bf16 per
    expert; 10 experts per group (the 128 MiB cap), so 26 groups for a chunk that touches all 256."""
    H, I = 4096, 2048
    tensors = 3 * H * I // 2 + 4 * (2 * I + H)  # weights, fp32 scales per row
    staged = tensors + 6 * (ALIGN - 1) + 3 * 6 * 8 + 8  # alignment, job rows, the table's alignment
    sizes = ExpertSizes(staged, 3 * H * I * 2, pair_activation_bytes(H, I, 2))
    p = plan_budget(sizes, 2 << 30)
    assert p.group_experts == 10 and p.device_bytes(sizes) <= 2 << 30
    groups = transfer_groups(range(256), p.group_experts)
    assert len(groups) == 26 and {len(g) for g in groups} == {9, 10}


def test_transfer_groups_and_pair_slices():
    assert transfer_groups([], 4) == []
    assert transfer_groups([1, 4, 5, 7, 9], 2) == [(1, 4), (5, 7), (9,)]
    assert transfer_groups(range(10), 4) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]  # even: 4, 3, 3, not 4, 4, 2
    assert transfer_groups(range(3), 8) == [(0, 1, 2)]
    with pytest.raises(ValueError):
        transfer_groups([1], 0)
    offsets = [0, 3, 3, 10, 12, 20]  # expert i: [offsets[i], offsets[i+1]); the group is experts 1, 2, 3
    s = pair_slices(offsets, 1, 3, 4)
    assert [(x.start, x.end) for x in s] == [(3, 7), (7, 11), (11, 12)]
    assert [x.ends for x in s] == [(0, 4, 4), (0, 3, 4), (0, 0, 1)]
    assert [x.ends for x in pair_slices(offsets, 0, 5, 100)] == [(3, 3, 10, 12, 20)]
    rng = np.random.default_rng(1)
    for _ in range(100):
        counts = rng.integers(1, 50, size=12)
        off = np.concatenate([[0], np.cumsum(counts)])
        first, n, block = int(rng.integers(0, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 90))
        sl = pair_slices(off, first, n, block)
        assert sl[0].start == off[first] and sl[-1].end == off[first + n]
        assert all(a.end == b.start for a, b in zip(sl, sl[1:])) and all(0 < x.end - x.start <= block for x in sl)
        for x in sl:  # the ends rebuild which expert every pair of the slice belongs to
            owner = np.searchsorted(off[first + 1:first + n + 1], np.arange(x.start, x.end), side="right")
            assert np.array_equal(np.searchsorted(np.array(x.ends), np.arange(x.end - x.start), side="right"), owner)


# ---------------------------------------------------------------- the staging layout


def test_stage_group_coalesces_and_keeps_alignment():
    def jobs(j, offset_of):
        return np.array([[*offset_of("gate", 0), j, 0, 0, 0]], dtype=np.int64)

    # expert a: two adjacent tensors; expert b: adjacent to a's end; expert c: elsewhere, misaligned by 8
    a = [Piece("gate", 0, "weight", 0, 128, 1000), Piece("gate", 0, "scale", 0, 1128, 40)]
    b = [Piece("gate", 0, "weight", 0, 1168, 500), Piece("gate", 0, "scale", 0, 1668, 20)]
    c = [Piece("gate", 0, "weight", 1, 72, 300), Piece("gate", 0, "scale", 0, 5000, 12)]
    g = stage_group([3, 4, 9], [a, b, c], jobs)
    assert [tuple(r) for r in g.runs] == [(0, 128, 1560, 0), (1, 72, 300, 1608), (0, 5000, 12, 1928)]
    assert all(r.dst % ALIGN == r.src % ALIGN for r in g.runs)
    assert g.offsets[(0, "gate", 0, "scale")] == 1000 and g.offsets[(1, "gate", 0, "weight")] == 1040
    assert g.offsets[(2, "gate", 0, "weight")] == 1608 and g.offsets[(2, "gate", 0, "scale")] == 1928
    assert g.jobs.tolist() == [[0, 1000, 0, 0, 0, 0], [1040, 1540, 1, 0, 0, 0], [1608, 1928, 2, 0, 0, 0]]
    assert g.jobs_offset == 1944 and g.nbytes == 1944 + 3 * 48 and g.weight_bytes == 1872


def test_layer_sources_are_the_mapped_tensors(cases):
    for name in ("v4-int4", "raw-g32"):
        c = cases[name]
        w = c.weights
        src = LayerSources(w, c.layer)
        assert len(src.regions) == 1  # one merged shard per layer: one mapping
        for e in (0, w.num_experts - 1):
            for p in src.pieces[e]:
                arr = np.asarray(w.expert_tensors(c.layer, e, p.proj, p.numa)[0 if p.part == "weight" else 1])
                assert np.array_equal(src.regions[p.region][p.offset:p.offset + p.nbytes], arr.view(np.uint8).ravel())
        # consecutive experts of a merged shard: one copy run (AMX layout) or one per projection (RAWINT4: the
        # weight_shape tensors sit between)
        g = stage_group([0, 1, 2], [src.pieces[e] for e in range(3)], lambda j, off: np.zeros((0, 6), np.int64))
        assert len(g.runs) == (1 if name == "v4-int4" else 9)
        staged = np.zeros(g.nbytes, np.uint8)
        tasks = copy_tasks(g, src.regions, 5, min_bytes=4096)
        sizes = [sum(a.size for a, _ in t) for t in tasks]
        assert len(tasks) == 5 and max(sizes) - min(sizes) <= 5 and sum(sizes) == g.weight_bytes + g.jobs.nbytes
        for a, off in (piece for t in tasks for piece in t):
            staged[off:off + a.size] = a
        assert len(copy_tasks(g, src.regions, 64, min_bytes=sum(sizes) // 3)) == 3  # no share below min_bytes
        for j in range(3):
            for p in src.pieces[j]:
                at = g.offsets[(j, p.proj, p.numa, p.part)]
                assert np.array_equal(staged[at:at + p.nbytes], src.regions[p.region][p.offset:p.offset + p.nbytes])
        assert src.expert_bound(0) * 3 >= g.nbytes


def test_plain_arrays_and_strided_views_are_staged_too(cases):
    """A weights object whose tensors are not views of one mapping (owned arrays, a strided view): each gets a
    region of its own and the results do not change."""
    c = cases["v4-int8"]
    real = c.weights

    class Copied:
        def __init__(self, w):
            self.w = w
            for name in ("method", "threadpool_count", "num_experts", "hidden_size", "moe_intermediate_size"):
                setattr(self, name, getattr(w, name))

        def expert_tensors(self, layer, e, proj, numa):
            wt, s = self.w.expert_tensors(layer, e, proj, numa)
            doubled = np.repeat(np.asarray(s), 2)[::2]  # a strided view of a bigger array
            return np.array(wt), doubled

    class Truncated(Copied):
        def expert_tensors(self, layer, e, proj, numa):
            wt, s = self.w.expert_tensors(layer, e, proj, numa)
            return (wt[:-64] if (e, proj, numa) == (5, "down", 1) else wt), s

    with pytest.raises(ValueError, match=r"layer 1 expert 5 down NUMA shard 1: the weight has 98240 bytes, int8 "
                                         r"needs 98304"):
        GpuPrefill(Truncated(real), c.layer, cpu_workspace(), real.hidden_size, real.moe_intermediate_size,
                   torch.float32, real.swiglu_limit, Activation())
    src = LayerSources(Copied(real), c.layer)
    assert len(src.regions) == real.num_experts * 3 * 2 * 2
    x, ids, w = c.routing(16, seed=6)
    ws = cpu_workspace()
    h = HybridMoE(real, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                  prefill_workspace=ws)
    y = h(x, ids, w)
    assert h.prefill.staging() == "registered"  # "auto" on a CPU workspace: copies straight from the regions
    h.prefill.sources = src
    h.prefill.close()  # the next call decides its staging again, over the new regions
    assert torch.equal(h(x, ids, w), y)
    ws.staging = "gather"
    h.prefill.close()
    assert torch.equal(h(x, ids, w), y) and h.prefill.staging() == "gather"


# ---------------------------------------------------------------- results


@pytest.mark.parametrize("name", CASES)
def test_results_equal_the_float_reference(cases, name):
    """Every method and family activation, several transfer groups and GEMM slices, GPU-resident experts in the
    same call, both GEMM paths; float32: the float reference; bfloat16: within 0.03."""
    c = cases[name]
    E = c.weights.num_experts
    x, ids, w = c.routing(200, k=3, seed=7)
    ref = c.reference(x, ids, w)
    for gemm in ("grouped", "loop"):
        ws = cpu_workspace(memory=24 << 20, max_group_bytes=1 << 17, gemm=gemm)
        h = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cpu", gpu_dtype=torch.float32,
                      biases=c.biases, gpu_prefill_token_threshold=100, prefill_workspace=ws)
        assert h.prefill.plan.pair_block < 3 * 200  # several slices
        y = h(x, ids, w)
        assert ws.stats["calls"] == 1 and ws.stats["experts"] == E - 1 and ws.stats["groups"] > 1
        assert rel(y, ref) < 1e-5, (gemm, rel(y, ref))
        hb = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cpu", biases=c.biases,
                       gpu_prefill_token_threshold=100, prefill_workspace=cpu_workspace(gemm=gemm))
        yb = hb(x.to(torch.bfloat16), ids, w)
        assert yb.dtype == torch.bfloat16 and rel(yb, ref) < 0.03, (gemm, rel(yb, ref))
    cpu = CPUMoE(c.weights, c.layer, biases=c.biases).forward(x, ids, w)
    assert rel(y, cpu) < 0.1  # the CPU path: int8 activations


def test_the_carried_level_minus8_reaches_the_prefill(cases):
    """k2-g32 carries Kimi-K2's codes, the level -8 (stored nibble 0) among them, so the results above cover the
    prefill reading it as stored: (0 - 8) * s, the loader's value."""
    c = cases["k2-g32"]
    packed = np.asarray(c.weights.expert_tensors(c.layer, 0, "gate", 0)[0]).view(np.uint8)
    assert np.count_nonzero((packed & 0xF) == 0) + np.count_nonzero((packed >> 4) == 0) > 0
    deq = c.weights.dequantize(c.layer, 0, "gate")
    scales = np.asarray(c.weights.expert_tensors(c.layer, 0, "gate", 0)[1]).view(np.uint16).reshape(deq.shape[0], -1)
    s = torch.from_numpy((scales.astype(np.uint32) << 16).view(np.float32)).repeat_interleave(32, dim=1)
    low = torch.from_numpy((packed.reshape(deq.shape[0], -1) & 0xF) == 0)
    assert torch.equal(deq[:, 0::2][low], -8 * s[:, 0::2][low])


class _Unclamped:
    """Packed weights seen without their swiglu_limit."""

    swiglu_limit = None

    def __init__(self, weights):
        self._weights = weights

    def __getattr__(self, name):
        return getattr(self._weights, name)


@pytest.mark.parametrize("name", ["v4-int8", "gptoss-int4"])
def test_the_clamp_and_the_biases_matter(cases, name):
    """The activation details are really exercised: dropping the clamp (or the biases) moves the reference far
    beyond the tolerance the results meet."""
    c = cases[name]
    x, ids, w = c.routing(64, k=2, seed=8)
    ref = c.reference(x, ids, w)
    assert rel(moe_reference(_Unclamped(c.weights), c.layer, x, ids, w, biases=c.biases), ref) > 0.05
    if c.biases is not None:
        assert rel(moe_reference(c.weights, c.layer, x, ids, w), ref) > 0.05
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, biases=c.biases,
                  gpu_prefill_token_threshold=2, prefill_workspace=cpu_workspace())
    assert rel(h(x, ids, w), ref) < 1e-5


def test_repeated_calls_reuse_the_workspace_across_layers(cases):
    c = cases["v4-int4"]
    ws = cpu_workspace(memory=16 << 20, max_group_bytes=1 << 18)
    layers = [HybridMoE(c.weights, layer, num_gpu_experts=n, device="cpu", gpu_dtype=torch.float32,
                        gpu_prefill_token_threshold=16, prefill_workspace=ws) for layer, n in ((0, 2), (1, 0))]
    x, ids, w = c.routing(32, seed=9)
    first = [h(x, ids, w) for h in layers]
    buffers = ws._buffers
    for _ in range(2):
        assert all(torch.equal(h(x, ids, w), y) for h, y in zip(layers, first))
    assert ws._buffers is buffers and ws.stats["calls"] == 6
    assert rel(first[0], moe_reference(c.weights, 0, x, ids, w)) < 1e-5
    assert rel(first[1], moe_reference(c.weights, 1, x, ids, w)) < 1e-5


# ---------------------------------------------------------------- the staging: registered or gathered


class _Runtime:
    """A stand-in for the CUDA runtime behind a HostRegistry: records the spans, refuses them when told to."""

    def __init__(self, refuse: str | None = None):
        self.refuse, self.registered, self.calls = refuse, set(), 0

    def register(self, span):
        self.calls += 1
        if self.refuse:
            raise host_registration.RegistrationError(self.refuse)
        self.registered.add(span)

    def unregister(self, span):
        self.registered.remove(span)


def _registering_workspace(runtime, **kw):
    ws = cpu_workspace(**kw)
    ws.registry = host_registration.HostRegistry(runtime)  # what a CUDA workspace has, over the stand-in
    return ws


def test_staging_values_and_decisions():
    assert [check_staging(v) for v in (None, "auto", "registered", "gather")] == ["auto", "auto", "registered",
                                                                                  "gather"]
    for bad in ("pinned", "", 1, True):
        with pytest.raises(ValueError, match="gpu_prefill_staging must be one of auto, registered, gather"):
            check_staging(bad)
    assert staging_after_registration("auto", None) == "registered"
    assert staging_after_registration("registered", None) == "registered"
    assert staging_after_registration("auto", "no driver") == "gather"
    assert staging_after_registration("gather", None) == "gather"
    with pytest.raises(ValueError, match=r"gpu_prefill_staging='registered'.*\(no driver\); use "
                                         r"gpu_prefill_staging='gather'"):
        staging_after_registration("registered", "no driver")


def test_staging_arguments(cases):
    c = cases["v4-int8"]
    with pytest.raises(ValueError, match="gpu_prefill_staging must be one of"):
        PrefillWorkspace("cpu", staging="mapped")
    with pytest.raises(ValueError, match="gpu_prefill_staging must be one of"):
        HybridMoE(c.weights, c.layer, device="cpu", gpu_prefill_token_threshold=4, gpu_prefill_staging="mapped")
    with pytest.raises(ValueError, match="give gpu_prefill_staging or prefill_workspace, not both"):
        HybridMoE(c.weights, c.layer, device="cpu", gpu_prefill_token_threshold=4, gpu_prefill_staging="gather",
                  prefill_workspace=cpu_workspace())
    assert cpu_workspace().staging == "auto" and cpu_workspace(staging="gather").staging == "gather"


@pytest.mark.parametrize("name", CASES)
def test_registered_and_gathered_staging_give_the_same_bits(cases, name):
    """Copies straight from the mappings and gathers into a pinned slot put the same bytes where the jobs read
    them: the same output, bit for bit, over several transfer groups with gaps (a GPU-resident expert)."""
    c = cases[name]
    x, ids, w = c.routing(120, k=3, seed=15)
    out = {}
    for staging in ("registered", "gather"):
        ws = cpu_workspace(memory=24 << 20, max_group_bytes=1 << 17, staging=staging)
        h = HybridMoE(c.weights, c.layer, num_gpu_experts=1, device="cpu", gpu_dtype=torch.float32,
                      biases=c.biases, gpu_prefill_token_threshold=100, prefill_workspace=ws)
        out[staging] = h(x, ids, w)
        assert h.prefill.staging() == staging and ws.stats["groups"] > 1
        assert ws.registry is None and h.prefill.registered_bytes == 0  # a CPU workspace registers nothing
    assert torch.equal(out["registered"], out["gather"])
    assert rel(out["registered"], c.reference(x, ids, w)) < 1e-5


def test_a_refused_registration_falls_back_to_gathering_once_said(cases):
    """With "auto", a registration the registry refuses (a stand-in for CUDA's answer) gives one warning naming
    the reason for the model, the layers gather, results unchanged; "registered" is refused with the reason and
    the fix; "gather" tries no registration."""
    c = cases["v4-int4"]
    x, ids, w = c.routing(40, seed=16)
    want = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                     prefill_workspace=cpu_workspace(staging="gather"))(x, ids, w)
    rt = _Runtime(refuse="cudaErrorNotSupported (801)")
    ws = _registering_workspace(rt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = [HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                            prefill_workspace=ws) for _ in range(2)]
        got = [h(x, ids, w) for h in layers] + [layers[0](x, ids, w)]
    said = [str(m.message) for m in caught if "gpu_prefill_staging" in str(m.message)]
    assert said == ["gpu_prefill_staging='auto': the GPU prefill gathers the packed experts into pinned buffers (the "
                    "registration of the mapped files with CUDA failed: cudaErrorNotSupported (801))"]
    assert all(torch.equal(y, want) for y in got) and [h.prefill.staging() for h in layers] == ["gather"] * 2
    assert rt.calls == 2  # once per layer, not per call
    ws = _registering_workspace(_Runtime(refuse="cudaErrorNotSupported (801)"), staging="registered")
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_prefill_token_threshold=2, prefill_workspace=ws)
    with pytest.raises(ValueError, match=r"cannot be registered with CUDA \(cudaErrorNotSupported \(801\)\); use "
                                         r"gpu_prefill_staging='gather'"):
        h(x, ids, w)
    rt = _Runtime(refuse="never asked")
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                  prefill_workspace=_registering_workspace(rt, staging="gather"))
    assert torch.equal(h(x, ids, w), want) and rt.calls == 0


def test_registration_spans_the_layer_once_and_is_released(cases):
    """The layer's span: from its first packed byte to its last, in whole pages of its one mapping; two layers
    over the same mapping register it once; close() and the layer's collection release it; a closed layer
    registers again at its next call."""
    import gc

    c = cases["v4-int4"]
    rt = _Runtime()
    ws = _registering_workspace(rt)
    a, b = (HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                      prefill_workspace=ws) for _ in range(2))
    x, ids, w = c.routing(24, seed=17)
    assert not rt.registered  # lazily: at the first prefill call
    y = a(x, ids, w)
    assert torch.equal(b(x, ids, w), y) and a.prefill.staging() == b.prefill.staging() == "registered"
    (span,) = rt.registered
    region = a.prefill.sources.regions[0]
    base = region.__array_interface__["data"][0]
    pieces = [p for row in a.prefill.sources.pieces for p in row]
    lo, hi = min(p.offset for p in pieces), max(p.offset + p.nbytes for p in pieces)
    page = host_registration.PAGE
    assert span.start % page == 0 and span.nbytes % page == 0 and base <= span.start <= base + lo
    assert base + hi <= span.end < base + hi + page and span.nbytes == a.prefill.registered_bytes
    assert ws.registry.users == {span: 2} and rt.calls == 1
    a.prefill.close()
    assert ws.registry.users == {span: 1} and rt.registered == {span}
    del b
    gc.collect()
    assert ws.registry.users == {} and rt.registered == set()  # the last user collected: unregistered
    assert torch.equal(a(x, ids, w), y) and rt.registered == {span} and rt.calls == 2  # registered again
    a.prefill.close()
    a.prefill.close()  # twice: nothing more to release
    assert rt.registered == set()


def test_a_layer_meeting_another_layers_pages_shares_them_and_cuts_its_copies(cases, monkeypatch):
    """Pages already registered by another layer over the same mapping (its span ends inside this layer's
    bytes): this layer counts itself on them, registers only the rest, and cuts every copy that crosses from one
    registration into the next; the same bits as gathering. Its close() leaves the other layer's pages alone;
    a threshold set to None unregisters."""
    c = cases["v4-int4"]
    x, ids, w = c.routing(60, k=3, seed=20)
    want = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                     prefill_workspace=cpu_workspace(staging="gather", max_group_bytes=1 << 17))(x, ids, w)
    rt = _Runtime()
    ws = _registering_workspace(rt, max_group_bytes=1 << 17)
    h = HybridMoE(c.weights, c.layer, device="cpu", gpu_dtype=torch.float32, gpu_prefill_token_threshold=2,
                  prefill_workspace=ws)
    region = h.prefill.sources.regions[0]
    base = region.__array_interface__["data"][0]
    page = host_registration.PAGE
    pieces = [p for row in h.prefill.sources.pieces for p in row]
    middle = (min(p.offset for p in pieces) + max(p.offset + p.nbytes for p in pieces)) // 2
    cut = (base + middle) // page * page
    other = host_registration.HostSpan(base // page * page, cut - base // page * page)
    held = ws.registry.acquire([other])  # "another layer"
    pieces_copied = []
    split = host_registration.split_range

    def spy(lo, hi, cuts):
        out = split(lo, hi, cuts)
        pieces_copied.extend(out)
        return out

    monkeypatch.setattr(host_registration, "split_range", spy)
    assert torch.equal(h(x, ids, w), want) and h.prefill.staging() == "registered"
    (own,) = rt.registered - {other}
    assert own.start == cut and ws.registry.users == {other: 2, own: 1}
    boundary = cut - base
    assert all(hi <= boundary or lo >= boundary for lo, hi in pieces_copied)  # no copy reads two registrations
    assert any(hi == boundary for lo, hi in pieces_copied)  # and one was cut there
    h.prefill.close()
    assert ws.registry.users == {other: 1} and rt.registered == {other}
    assert torch.equal(h(x, ids, w), want) and ws.registry.users == {other: 2, own: 1}
    h.gpu_prefill_token_threshold = None
    assert ws.registry.users == {other: 1} and rt.registered == {other}
    ws.registry.release(held)
    assert rt.registered == set()


def test_consecutive_experts_of_a_merged_shard_are_one_copy(cases):
    """A merged shard holds each expert's tensors together and the experts in order: a group of consecutive
    experts is one byte run (one copy from the mapping); a gap in the experts starts another."""
    c = cases["v4-int4"]
    src = LayerSources(c.weights, c.layer)
    jobs = lambda j, offset_of: np.zeros((0, 6), np.int64)  # noqa: E731 - the runs do not depend on the jobs
    whole = stage_group([0, 1, 2, 3], [src.pieces[e] for e in range(4)], jobs)
    assert len(whole.runs) == 1 and whole.runs[0].nbytes == src.packed_bytes(range(4))
    gapped = stage_group([0, 1, 3], [src.pieces[e] for e in (0, 1, 3)], jobs)
    assert [r.nbytes for r in gapped.runs] == [src.packed_bytes([0, 1]), src.packed_bytes([3])]


def test_split_prefill_with_more_experts_than_16_bits():
    """Expert ids beyond int16 (sorted as int64) group the same way as small ones."""
    E = 40000
    slot_of = np.full(E, -1, dtype=np.int64)
    slot_of[7] = 0
    ids = torch.tensor([[39999, 7, 3], [3, 32768, 39999]])
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    part, gpu = routing.split_prefill(ids, w, slot_of)
    assert part.experts.tolist() == [3, 32768, 39999] and part.offsets.tolist() == [0, 2, 3, 5]
    assert part.tokens.tolist() == [0, 1, 1, 0, 1] and part.weights.tolist() == [2, 3, 4, 0, 5]
    assert gpu.groups == [(0, 0, 1)] and gpu.tokens.tolist() == [0]
