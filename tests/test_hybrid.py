"""HybridMoE and placement (kt_runtime/hybrid/).

Weights: the v4-flash-tiny synthetic checkpoint (H=384, I=512, 8 experts, 2 layers, swiglu_limit)
converted to int8 and int4 with 2 NUMA shards. The "GPU" experts run on device="cpu" here (same
torch code as on CUDA); the @gpu tests repeat the key checks on CUDA.

Tolerances: the GPU part computes the dequantized packed weights in float (float32 here), the CPU
part quantizes activations to int8 (≈1-2 % relative per the CPU engine's tests). So
- all experts on the GPU (float32) == float MoE on the dequantized weights (1e-5);
- a GPU/CPU mix vs all-CPU: < 0.1 relative (the int8 activations of the GPU part only; the synthetic
  MXFP4 weights drive the clamp and give ≈5 % for the CPU engine against float);
- no GPU experts == CPUMoE bit for bit.
"""
from __future__ import annotations

import threading

import pytest
import torch

from kt_convert import kt_runtime
from kt_convert.kt_runtime import ExpertStats, HybridMoE, gpu_expert_mask
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.hybrid import routing as split_module
from kt_convert.kt_runtime.reference import moe_reference


@pytest.fixture(scope="module", params=["int8", "int4"])
def packed(request, tiny_checkpoint, tmp_path_factory):
    from kt_convert.convert.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp(f"hybrid_{request.param}") / "out"
    convert(ConvertOptions(input_path=str(tiny_checkpoint.path), output=out, quant_method=request.param,
                           threadpool_count=2, progress=False))
    return kt_runtime.load_experts(out)


def routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    x = torch.randn(T, 384, generator=g)
    return x, ids, w


float_moe = moe_reference


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_library_reference_moe(packed):
    """kt_runtime.reference.moe_reference against test_cpu_moe's float model (written separately)."""
    from helpers.moe import float_moe as separate_float_moe

    x, ids, w = routing(5, 8, 2, seed=13)
    ref = moe_reference(packed, 1, x, ids, w)
    assert ref.dtype == torch.float32 and ref.shape == (5, 384) and packed.swiglu_limit is not None
    assert rel(ref, separate_float_moe(packed, 1, x, ids, w, limit=packed.swiglu_limit)) < 1e-6


def test_no_gpu_experts_is_cpumoe_exactly(packed):
    x, ids, w = routing(9, 8, 2)
    h = HybridMoE(packed, 1, num_gpu_experts=0, device="cpu")
    assert h.num_gpu_experts == 0 and h.gpu_experts == []
    assert torch.equal(h(x, ids, w), CPUMoE(packed, 1).forward(x, ids, w))


def test_all_gpu_is_float_moe(packed):
    x, ids, w = routing(9, 8, 2, seed=1)
    h = HybridMoE(packed, 0, num_gpu_experts=8, device="cpu", gpu_dtype=torch.float32)
    assert rel(h(x, ids, w), float_moe(packed, 0, x, ids, w)) < 1e-5
    hb = HybridMoE(packed, 0, num_gpu_experts=8, device="cpu")  # bf16 weights and matmuls
    assert rel(hb(x, ids, w), float_moe(packed, 0, x, ids, w)) < 0.03


@pytest.mark.parametrize("gpu", [[0, 1, 2], [5], [1, 3, 4, 6, 7]])
def test_mix_equals_all_cpu_up_to_quantization(packed, gpu):
    x, ids, w = routing(13, 8, 3, seed=2)
    cpu_only = CPUMoE(packed, 1).forward(x, ids, w)
    h = HybridMoE(packed, 1, num_gpu_experts=gpu, device="cpu", gpu_dtype=torch.float32)
    assert h.gpu_experts == gpu
    y = h(x, ids, w)
    assert rel(y, cpu_only) < 0.1
    # exactly: CPU engine on the CPU experts' slots + float MoE on the GPU experts' slots
    on_gpu = torch.isin(ids, torch.tensor(gpu))
    w_cpu, w_gpu = torch.where(on_gpu, 0.0, w), torch.where(on_gpu, w, 0.0)
    expect = CPUMoE(packed, 1).forward(x, ids, w_cpu) + float_moe(packed, 1, x, ids, w_gpu)
    assert rel(y, expect) < 1e-5


def test_split_padding_and_token_subsets(packed):
    h = HybridMoE(packed, 0, num_gpu_experts=[0, 1], device="cpu", gpu_dtype=torch.float32)
    ids = torch.tensor([[0, 1, 2], [3, 0, 4], [1, 0, 1], [5, 6, 7]])
    w = torch.rand(4, 3)
    cpu, gpu = h.split(ids, w)
    rows, cid, cw = cpu
    assert rows.tolist() == [0, 1, 3]  # token 2 is all-GPU: not sent to the CPU
    assert cid.shape == (3, 3)
    assert cid[0].tolist() == [2, 2, 2] and cw[0, 1:].tolist() == [0.0, 0.0]  # pads repeat a CPU expert, weight 0
    tok, gw, groups = gpu
    assert [g[0] for g in groups] == [0, 1]
    x = torch.randn(4, 384)
    ref = float_moe(packed, 0, x, ids, torch.where(ids < 2, w, 0.0)) + \
        CPUMoE(packed, 0).forward(x, ids, torch.where(ids < 2, 0.0, w))
    assert rel(h(x, ids, w), ref) < 1e-5


def test_dtypes_devices_and_edge_cases(packed):
    h = HybridMoE(packed, 1, num_gpu_experts=4, device="cpu")
    x, ids, w = routing(5, 8, 2, seed=3)
    y = h(x.bfloat16(), ids.int(), w.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (5, 384)
    assert rel(y, h(x, ids, w)) < 0.06  # bf16 inputs, weights and output
    assert h(x.half(), ids, w).dtype == torch.float16
    empty = h(torch.zeros(0, 384), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 384)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        h(x, torch.full_like(ids, 8), w)
    with pytest.raises(ValueError, match=r"x must be \[tokens, 384\]"):
        h(x[:, :100], ids, w)
    with pytest.raises(ValueError, match="topk_weights shape"):
        h(x, ids, w[:, :1])
    with pytest.raises(ValueError, match="integer"):
        h(x, ids.float(), w)
    with pytest.raises(ValueError, match="layer 7"):
        HybridMoE(packed, 7, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            HybridMoE(packed, 0, 2, device="cuda")


def test_gpu_part_overlaps_cpu_part(packed, monkeypatch):
    """The GPU experts are queued by the launcher thread while the calling thread runs the CPU engine."""
    h = HybridMoE(packed, 0, num_gpu_experts=[0, 1, 2, 3], device="cpu", gpu_dtype=torch.float32)
    seen = {}
    orig_cpu, orig_gpu = h.cpu.forward_f32, h.gpu.compute
    cpu_started, gpu_started = threading.Event(), threading.Event()

    def cpu_forward(*a):
        seen["cpu"] = threading.current_thread().name
        cpu_started.set()
        assert gpu_started.wait(5), "the GPU part did not start while the CPU part ran"
        return orig_cpu(*a)

    def gpu_compute(*a):
        seen["gpu"] = threading.current_thread().name
        gpu_started.set()
        assert cpu_started.wait(5), "the CPU part did not start while the GPU part ran"
        return orig_gpu(*a)

    monkeypatch.setattr(h.cpu, "forward_f32", cpu_forward)
    monkeypatch.setattr(h.gpu, "compute", gpu_compute)
    x, ids, w = routing(6, 8, 2, seed=4)
    ids[:, 0] = 0  # every token has a GPU expert
    ids[:, 1] = 5  # and a CPU one
    y = h(x, ids, w)
    assert seen["gpu"] == "kt-gpu-launch" and seen["cpu"] == threading.current_thread().name
    on_gpu = ids < 4
    expect = CPUMoE(packed, 0).forward(x, ids, torch.where(on_gpu, 0.0, w)) + \
        float_moe(packed, 0, x, ids, torch.where(on_gpu, w, 0.0))
    assert rel(y, expect) < 1e-5


def test_all_gpu_rows_run_inline(packed, monkeypatch):
    """No CPU rows: the GPU part runs in the calling thread (no hand-off)."""
    h = HybridMoE(packed, 0, num_gpu_experts=[0, 1], device="cpu", gpu_dtype=torch.float32)
    seen = []
    orig = h.gpu.compute
    monkeypatch.setattr(h.gpu, "compute", lambda *a: seen.append(threading.current_thread().name) or orig(*a))
    x, _, w = routing(3, 8, 2, seed=6)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert rel(h(x, ids, w), float_moe(packed, 0, x, ids, w)) < 1e-5
    assert seen == [threading.current_thread().name]


def test_decode_rows_and_token_groups_agree(packed):
    """Single-token slots (views + addcmul) and multi-token slots (index_select / index_add) give the float MoE,
    also when one token has several GPU experts."""
    h = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cpu", gpu_dtype=torch.float32)
    x, _, w = routing(4, 8, 3, seed=11)
    ids = torch.tensor([[1, 4, 0], [6, 2, 3], [4, 1, 6], [5, 4, 7]])  # slot 4 shared, 1 and 6 twice
    on_gpu = torch.isin(ids, torch.tensor([1, 4, 6]))
    expect = CPUMoE(packed, 1).forward(x, ids, torch.where(on_gpu, 0.0, w)) + \
        float_moe(packed, 1, x, ids, torch.where(on_gpu, w, 0.0))
    assert rel(h(x, ids, w), expect) < 1e-5
    for t in range(4):  # decode: one token at a time (every slot a single row)
        assert rel(h(x[t:t + 1], ids[t:t + 1], w[t:t + 1]), expect[t:t + 1]) < 1e-5


def test_gpu_errors_propagate_and_launcher_survives(packed, monkeypatch):
    h = HybridMoE(packed, 0, num_gpu_experts=2, device="cpu")
    x, ids, w = routing(3, 8, 2)
    ids[:, 0], ids[:, 1] = 0, 5

    def boom(*a):
        raise RuntimeError("gpu part failed")

    monkeypatch.setattr(h.gpu, "compute", boom)
    with pytest.raises(RuntimeError, match="gpu part failed"):
        h(x, ids, w)
    monkeypatch.undo()
    assert h(x, ids, w).shape == (3, 384)


def test_default_cpu_threads_leave_a_core(packed):
    import os

    from kt_convert.kt_runtime.hybrid import default_cpu_threads

    assert default_cpu_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert HybridMoE(packed, 0, 2, device="cpu").cpu.num_threads == default_cpu_threads()
    assert HybridMoE(packed, 0, 2, device="cpu", num_threads=1).cpu.num_threads == 1


def test_cpu_errors_propagate(packed, monkeypatch):
    h = HybridMoE(packed, 0, num_gpu_experts=2, device="cpu")

    def boom(*a):
        raise RuntimeError("cpu engine failed")

    monkeypatch.setattr(h.cpu, "forward_f32", boom)
    x, ids, w = routing(3, 8, 2)
    with pytest.raises(RuntimeError, match="cpu engine failed"):
        h(x, ids, w)


# ---------------------------------------------------------------- placement

def test_gpu_expert_mask_strategies():
    assert gpu_expert_mask(8, 3).tolist() == [True] * 3 + [False] * 5
    assert gpu_expert_mask(8, 0).sum() == 0 and gpu_expert_mask(8, 8).all()
    counts = torch.tensor([5, 1, 9, 9, 0, 7, 1, 2])
    assert gpu_expert_mask(8, 3, "frequency", counts).nonzero().flatten().tolist() == [2, 3, 5]
    assert gpu_expert_mask(8, 2, "frequency", torch.zeros(8)).nonzero().flatten().tolist() == [0, 1]  # ties: low id
    assert gpu_expert_mask(8, [6, 1]).nonzero().flatten().tolist() == [1, 6]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[2, 7]] = True
    assert torch.equal(gpu_expert_mask(8, mask), mask)
    assert torch.equal(gpu_expert_mask(8, 2, placement=mask), mask)
    for bad, match in [((8, 9), r"\[0, 8\]"), ((8, -1), r"\[0, 8\]"), ((8, [8]), r"\[0, 8\)"),
                       ((8, [1, 1]), "repeat"), ((8, torch.ones(7, dtype=torch.bool)), "8 entries"),
                       ((8, 2, "frequency"), "statistics"), ((8, 2, "hot"), "unknown placement"),
                       ((8, 3, mask), "selects 2"), ((8, 2.5), "bool mask")]:
        with pytest.raises(ValueError, match=match):
            gpu_expert_mask(*bad)


def test_expert_stats_roundtrip(tmp_path):
    s = ExpertStats(8)
    s.record(3, torch.tensor([[0, 1], [1, 2]]))
    s.record(3, torch.tensor([[1, 7]]))
    s.record(5, torch.tensor([4]))
    assert s.layers == [3, 5]
    assert s.counts(3).tolist() == [1, 3, 1, 0, 0, 0, 0, 1]
    s.save(tmp_path / "stats.json")
    t = ExpertStats.load(tmp_path / "stats.json")
    assert t.layers == [3, 5] and torch.equal(t.counts(3), s.counts(3))
    t.merge(s)
    assert t.counts(5)[4] == 2
    with pytest.raises(KeyError, match="layer 4"):
        s.counts(4)
    with pytest.raises(ValueError, match="outside"):
        s.record(3, torch.tensor([8]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        ExpertStats.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="9 counts for 8"):
        ExpertStats(8, {0: [1] * 9})


def test_frequency_placement_from_stats(packed, tmp_path):
    s = ExpertStats(8, {1: [0, 0, 4, 0, 9, 0, 3, 0]})
    h = HybridMoE(packed, 1, num_gpu_experts=3, device="cpu", placement="frequency", stats=s)
    assert h.gpu_experts == [2, 4, 6]
    s.save(tmp_path / "s.json")
    assert HybridMoE(packed, 1, 2, device="cpu", placement="frequency", stats=tmp_path / "s.json").gpu_experts == [2, 4]
    assert HybridMoE(packed, 1, 1, device="cpu", placement="frequency", stats={1: s.counts(1)}).gpu_experts == [4]
    with pytest.raises(ValueError, match="no counts for layer 0"):
        HybridMoE(packed, 0, 2, device="cpu", placement="frequency", stats=s)
    with pytest.raises(ValueError, match="needs routing statistics"):
        HybridMoE(packed, 0, 2, device="cpu", placement="frequency")
    with pytest.raises(ValueError, match="for 4 experts"):
        HybridMoE(packed, 1, 2, device="cpu", placement="frequency", stats=ExpertStats(4, {1: [1, 2, 3, 4]}))


def test_dynamic_promotes_hot_cpu_experts(packed):
    h = HybridMoE(packed, 0, num_gpu_experts=2, device="cpu", dynamic=True, update_interval=4, max_swaps=1,
                  gpu_dtype=torch.float32)
    assert h.gpu_experts == [0, 1]
    x, _, w = routing(4, 8, 2, seed=5)
    hot = torch.tensor([[6, 7]] * 4)
    for i in range(3):
        h(x, hot, w)
    assert h.gpu_experts == [0, 1] and h.swaps == []  # rate limit: nothing before update_interval calls
    h(x, hot, w)
    assert len(h.swaps) == 1 and h.gpu_experts == [1, 6]  # one swap per update (max_swaps=1)
    for i in range(4):
        h(x, hot, w)
    assert h.gpu_experts == [6, 7]
    y = h(x, hot, w)
    assert rel(y, float_moe(packed, 0, x, hot, w)) < 1e-5  # now computed all on the "GPU", still right
    assert h.counts.sum() == 9 * 4 * 2
    # routing moves to {0, 6}: 0 replaces the now cold 7, 6 stays (no churn)
    both = torch.tensor([[0, 6]] * 4)
    for i in range(12):
        h(x, both, w)
    assert h.gpu_experts == [0, 6]
    assert [s[1:] for s in h.swaps] == [(6, 0), (7, 1), (0, 7)]
    # explicit re-placement
    h.place("uniform")
    assert h.gpu_experts == [0, 1]
    h.place("frequency")  # by the counts observed so far
    assert h.gpu_experts == sorted(torch.sort(-h.counts.double(), stable=True).indices[:2].tolist())
    with pytest.raises(ValueError, match="not on the GPU"):
        h.swap(2, 3)


def test_static_never_swaps(packed):
    h = HybridMoE(packed, 0, num_gpu_experts=2, device="cpu", update_interval=1)
    x, _, w = routing(4, 8, 2)
    for _ in range(3):
        h(x, torch.tensor([[6, 7]] * 4), w)
    assert h.gpu_experts == [0, 1]
    assert h.rebalance() == [(6, 0)]  # a manual rebalance still works (max_swaps defaults to 1 here)
    assert h.gpu_experts == [1, 6]


@pytest.mark.gpu
def test_cuda_matches_cpu_device(packed):
    x, ids, w = routing(17, 8, 2, seed=7)
    hc = HybridMoE(packed, 1, num_gpu_experts=[0, 2, 5], device="cpu")
    hg = HybridMoE(packed, 1, num_gpu_experts=[0, 2, 5], device="cuda")
    y_cpu = hc(x, ids, w)
    y_gpu = hg(x.cuda(), ids.cuda(), w.cuda())
    assert y_gpu.device.type == "cuda"
    assert rel(y_gpu.cpu(), y_cpu) < 0.01
    assert rel(hg(x, ids, w), y_cpu) < 0.01  # CPU inputs: result on the CPU


def test_split_paths_agree_and_prefill(packed):
    """The Python (decode) and numpy (prefill) routing splits give the same result."""
    h = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cpu", gpu_dtype=torch.float32)
    x, ids, w = routing(40, 8, 3, seed=9)
    small = split_module.split_python(ids, w, h.slots.slot_list)
    assert len(ids.reshape(-1)) > split_module.SMALL  # h.split takes numpy here
    for a, b in zip(small, h.split(ids, w)):
        assert a[:2] is not None and all(torch.equal(u, v) for u, v in zip(a[:2], b[:2]))
    assert small[1].groups == h.split(ids, w)[1].groups == split_module.split_numpy(ids, w, h.slots.slot_np)[1].groups
    on_gpu = torch.isin(ids, torch.tensor([1, 4, 6]))
    expect = CPUMoE(packed, 1).forward(x, ids, torch.where(on_gpu, 0.0, w)) + \
        float_moe(packed, 1, x, ids, torch.where(on_gpu, w, 0.0))
    assert rel(h(x, ids, w), expect) < 1e-5


@pytest.mark.gpu
def test_cuda_decode_on_a_side_stream(packed):
    """Decode steps (one token, bf16) on a non-default stream: the launcher queues on the caller's stream."""
    x, ids, w = routing(6, 8, 3, seed=12)
    x = x.bfloat16()
    hc = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cpu")
    hg = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ys = [hg(x[t:t + 1].cuda(), ids[t:t + 1].cuda(), w[t:t + 1].cuda()) for t in range(6)]
    side.synchronize()
    y = torch.cat(ys).float().cpu()
    assert all(t.dtype == torch.bfloat16 for t in ys)
    assert rel(y, hc(x, ids, w).float()) < 0.02  # same bf16 inputs; bf16 GPU matmuls on both devices


# ---------------------------------------------------------------- decode path (CUDA graphs; eager on a CPU device)

DECODE_ROWS = [[1, 0, 2], [4, 6, 5], [6, 1, 4], [0, 2, 3], [1, 1, 7], [3, 6, 6], [7, 4, 0]]  # mixes, all-GPU,
# no GPU hit (CPU engine alone), a GPU expert twice and a CPU expert twice (launcher path / padding)


def _decode_pair(packed, layer=1, gpu=(1, 4, 6), **kw):
    eager = HybridMoE(packed, layer, num_gpu_experts=list(gpu), device="cpu", cuda_graphs=False, **kw)
    dec = HybridMoE(packed, layer, num_gpu_experts=list(gpu), device="cpu", cuda_graphs=True, **kw)
    return eager, dec


def test_decode_path_equals_launcher_path(packed):
    """One-token calls through the decode path (static buffers, per-slot graph bodies run eagerly here) give the
    launcher path's results bit for bit, for every input dtype; no GPU hit: CPUMoE bit for bit."""
    eager, dec = _decode_pair(packed)
    assert dec.cuda_graphs and not eager.cuda_graphs
    assert not HybridMoE(packed, 1, num_gpu_experts=0, device="cpu", cuda_graphs=True).cuda_graphs
    g = torch.Generator().manual_seed(21)
    xs = torch.randn(len(DECODE_ROWS), 384, generator=g)
    ws = torch.rand(len(DECODE_ROWS), 3, generator=g)
    ids = torch.tensor(DECODE_ROWS)
    cpu = CPUMoE(packed, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for t in range(len(DECODE_ROWS)):
            x, i, w = xs[t:t + 1].to(dtype), ids[t:t + 1], ws[t:t + 1]
            y = dec(x, i, w)
            assert y.dtype == dtype and y.shape == (1, 384)
            assert torch.equal(y, eager(x, i, w)), (dtype, DECODE_ROWS[t])
            assert torch.equal(dec(x, i.int(), w.bfloat16()), eager(x, i.int(), w.bfloat16()))
            if dtype != torch.float16 and t == 3:
                assert torch.equal(y, cpu.forward(x, i, w))
    assert dec.calls == eager.calls and torch.equal(dec.counts, eager.counts)
    # the per-slot bodies that ran: (slot, first) keys only for the hits seen
    assert set(dec.decode_graphs.graphs) <= {(s, f) for s in range(3) for f in (True, False)}
    assert dec.capture_decode_graphs() == 6 and eager.capture_decode_graphs() == 0


def test_decode_path_runs_gpu_part_first_in_the_calling_thread(packed, monkeypatch):
    """Decode: the GPU part is queued by the calling thread before the CPU engine starts; no launcher job."""
    _, dec = _decode_pair(packed, layer=0, gpu=(0, 1, 2, 3), gpu_dtype=torch.float32)
    seen = []
    orig_launch, orig_cpu = dec.decode_graphs.launch, dec.cpu.forward_f32
    monkeypatch.setattr(dec.decode_graphs, "launch",
                        lambda *a: seen.append(("gpu", threading.current_thread().name)) or orig_launch(*a))
    monkeypatch.setattr(dec.cpu, "forward_f32",
                        lambda *a: seen.append(("cpu", threading.current_thread().name)) or orig_cpu(*a))

    def no_launcher():
        raise AssertionError("the decode path must not use the launcher thread")

    monkeypatch.setattr(kt_runtime.hybrid.layer, "launcher", no_launcher)
    x, _, w = routing(1, 8, 3, seed=22)
    ids = torch.tensor([[5, 2, 0]])
    y = dec(x, ids, w)
    me = threading.current_thread().name
    assert seen == [("gpu", me), ("cpu", me)]
    on_gpu = ids < 4
    expect = CPUMoE(packed, 0).forward(x, ids, torch.where(on_gpu, 0.0, w)) + \
        float_moe(packed, 0, x, ids, torch.where(on_gpu, w, 0.0))
    assert rel(y, expect) < 1e-5


def test_decode_profile_stages_and_errors(packed, monkeypatch):
    eager, dec = _decode_pair(packed)
    dec.profile, eager.profile = {}, {}
    x, _, w = routing(1, 8, 3, seed=23)
    ids = torch.tensor([[1, 0, 2]])
    dec(x, ids, w)
    eager(x, ids, w)
    assert set(dec.profile) == {"routing", "split", "gpu_launch", "cpu_engine", "final_add"}
    assert set(eager.profile) == {"routing", "split", "gpu_launch", "cpu_engine", "join", "final_add"}
    assert all(len(v) == 1 and v[0] >= 0 for v in dec.profile.values())

    def boom(*a):
        raise RuntimeError("cpu engine failed")

    monkeypatch.setattr(dec.cpu, "forward_f32", boom)
    with pytest.raises(RuntimeError, match="cpu engine failed"):
        dec(x, ids, w)
    monkeypatch.undo()
    assert torch.equal(dec(x, ids, w), eager(x, ids, w))  # the static buffers are rewritten each step


def test_decode_path_with_dynamic_swaps(packed):
    """Swaps reload GPU slots in place: the decode path (graphs on CUDA) keeps giving the launcher path's results."""
    kw = dict(gpu=(0, 1), dynamic=True, update_interval=3, max_swaps=1)
    eager, dec = _decode_pair(packed, layer=0, **kw)
    g = torch.Generator().manual_seed(24)
    for step in range(14):
        x = torch.randn(1, 384, generator=g)
        w = torch.rand(1, 2, generator=g)
        ids = torch.tensor([[6, 7]]) if step < 9 else torch.tensor([[0, 6]])
        assert torch.equal(dec(x, ids, w), eager(x, ids, w)), step
    assert dec.swaps == eager.swaps and len(dec.swaps) >= 2
    assert dec.gpu_experts == eager.gpu_experts


@pytest.mark.gpu
def test_cuda_graph_decode(packed):
    """CUDA graphs for one-token calls: same results as the eager CUDA path and the CPU device, back-to-back steps
    without syncs, a side stream, CPU inputs, swaps, and every graph captured up front."""
    g = torch.Generator().manual_seed(25)
    n = len(DECODE_ROWS)
    xs = torch.randn(n, 384, generator=g).bfloat16()
    ws = torch.rand(n, 3, generator=g)
    ids = torch.tensor(DECODE_ROWS)
    hg = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cuda")
    he = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cuda", cuda_graphs=False)
    hc = HybridMoE(packed, 1, num_gpu_experts=[1, 4, 6], device="cpu")
    assert hg.cuda_graphs and not he.cuda_graphs
    xd, idd, wd = xs.cuda(), ids.cuda(), ws.cuda()
    yg = [hg(xd[t:t + 1], idd[t:t + 1], wd[t:t + 1]) for t in range(n)]  # no sync between steps
    ye = [he(xd[t:t + 1], idd[t:t + 1], wd[t:t + 1]) for t in range(n)]
    torch.cuda.synchronize()
    assert all(y.device.type == "cuda" and y.dtype == torch.bfloat16 and y.shape == (1, 384) for y in yg)
    assert len(hg.decode_graphs.graphs) >= 3 and hg.decode_graphs.captured == len(hg.decode_graphs.graphs)
    y_cpu = hc(xs, ids, ws).float()
    for t in range(n):
        assert rel(yg[t].float().cpu(), ye[t].float().cpu()) < 2e-3, t
        assert rel(yg[t].float().cpu(), y_cpu[t:t + 1]) < 0.02, t
    # float32 inputs, a side stream, results kept across steps
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ys = [hg(xd[t:t + 1].float(), idd[t:t + 1], wd[t:t + 1]) for t in range(n)]
    side.synchronize()
    for t in range(n):
        assert ys[t].dtype == torch.float32 and rel(ys[t].cpu(), yg[t].float().cpu()) < 0.01, t
    # CPU inputs, CUDA experts: result on the CPU
    yh = hg(xs[0:1], ids[0:1], ws[0:1])
    assert yh.device.type == "cpu" and rel(yh.float(), yg[0].float().cpu()) < 2e-3
    yh = hg(xs[1:2], ids[1:2], ws[1:2])  # all three experts on the GPU
    assert yh.device.type == "cpu" and rel(yh.float(), yg[1].float().cpu()) < 2e-3
    # every graph up front; a swap reloads a slot in place and the graphs follow it
    assert hg.capture_decode_graphs() == 6
    hg.swap(2, 1)
    hc.swap(2, 1)
    for t in range(n):
        y = hg(xd[t:t + 1], idd[t:t + 1], wd[t:t + 1])
        assert rel(y.float().cpu(), hc(xs[t:t + 1], ids[t:t + 1], ws[t:t + 1]).float()) < 0.02, t
