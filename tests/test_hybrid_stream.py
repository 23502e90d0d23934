"""The stream-ordered path (kt_runtime/hybrid/stream_path.py), the engine's skipped slots and host jobs, and
expert deferral, on the CPU (a "GPU" device of type cpu runs the same torch code; the host functions are
called directly in stream order). The @gpu tests for CUDA (host functions on a real stream, CUDA graph
capture and replay) are in tests/test_hybrid_gpu.py.

Weights: the v4-flash-tiny synthetic checkpoint (H=384, I=512, 8 experts, 2 layers) as int8, 2 NUMA shards.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from kt_convert import kt_runtime
from helpers.engine_knobs import knobs
from kt_convert.kt_runtime import HybridMoE
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.hybrid.stream_path import DeferralChain, deferral_mask
from kt_convert.kt_runtime.reference import moe_reference

from helpers.stream import E, H, packed, rel, routing  # noqa: F401 (packed: a fixture)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("prefill", [False, True])
def test_skipped_slots_are_weight_zero_slots(packed, prefill):
    """id -1 skips a slot: the same result, bit for bit, as sending that slot to an expert the token already
    has with weight 0; a token with every slot skipped gets a zero row (both schedules)."""
    moe = CPUMoE(packed, 0)
    with knobs(prefill_min_avg_rows=0 if prefill else 10 ** 9):
        x, ids, w = routing(6, seed=1)
        ids, w = ids.numpy().copy(), w.numpy().copy()
        skip = ids.copy()
        skip[0, 1] = skip[2, 0] = skip[2, 2] = -1
        skip[4, :] = -1
        zero_w = w.copy()
        same = ids.copy()
        for t, j in zip(*np.nonzero(skip < 0)):
            zero_w[t, j] = 0.0
            keep = [jj for jj in range(3) if skip[t, jj] >= 0]
            same[t, j] = ids[t, keep[0]] if keep else ids[t, j]
        xs = x.numpy()
        got = moe.forward_f32(xs, skip, w)
        want = moe.forward_f32(xs, same, zero_w)
        assert np.array_equal(bits(got), bits(want))
        assert not got[4].any() and got[0].any()
        assert not moe.forward_f32(xs, np.full_like(ids, -1), w).any()
        with pytest.raises(ValueError, match=r"= -2 is out of range"):
            moe.forward_f32(xs, np.full_like(ids, -2), w)


def test_host_job(packed):
    """A job over fixed buffers: each submit runs forward on what the buffers hold at that time (results
    equal forward_f32 bit for bit); submissions run in order; a bad id fails that run loudly (NaN rows,
    failures, last_error) and the next good run is fine."""
    moe = CPUMoE(packed, 1)
    x, ids, w = (a.numpy().copy() for a in routing(4, seed=2))
    out = np.zeros((4, H), np.float32)
    job = moe._layer.host_job(x, ids, w, out, "auto", 0)
    submit, wait = kt_kernels.host_functions()
    assert submit and wait and submit != wait and job.address
    job.submit()
    job.wait()
    assert np.array_equal(bits(out), bits(moe.forward_f32(x, ids, w)))
    x2, ids2, w2 = (a.numpy() for a in routing(4, seed=3))
    np.copyto(x, x2), np.copyto(ids, ids2), np.copyto(w, w2)  # new contents, same buffers
    job.submit()
    job.submit()
    job.wait()
    assert (job.submitted, job.done, job.failures) == (3, 3, 0)
    assert np.array_equal(bits(out), bits(moe.forward_f32(x2, ids2, w2)))
    ids[1, 2] = E
    job.submit()
    job.wait()
    assert job.failures == 1 and "topk_ids[1, 2] = 8 is out of range" in job.last_error and np.isnan(out).all()
    ids[1, 2] = 0
    job.submit()
    job.wait()
    assert np.isfinite(out).all() and job.failures == 1
    with pytest.raises(ValueError, match="out must be a writable"):
        moe._layer.host_job(x, ids, w, np.zeros((3, H), np.float32), "auto", 0)


@pytest.mark.parametrize("gpu", [0, [2], [0, 3, 5], 8])
@pytest.mark.parametrize("T", [1, 4])
def test_stream_path_equals_forward(packed, gpu, T):
    x, ids, w = routing(T, seed=T)
    h = HybridMoE(packed, 1, num_gpu_experts=gpu, device="cpu", gpu_dtype=torch.float32)
    y = h.forward_stream(x, ids, w)
    ref = h.forward(x, ids, w)
    assert y.shape == (T, H) and y.dtype == x.dtype
    if h.num_gpu_experts == 0:  # the CPU engine alone: bit-identical
        assert torch.equal(y, ref) and torch.equal(y, CPUMoE(packed, 1).forward(x, ids, w))
    else:  # the dense GPU part sums the slots in another order
        assert rel(y, ref) < 1e-5
    if h.num_gpu_experts == E:
        assert rel(y, moe_reference(packed, 1, x, ids, w)) < 1e-5
    assert h.stream_failures() == []
    y2 = h.forward_stream(x, ids, w)  # buffers reused
    assert torch.equal(y2, y)


def test_stream_path_bf16_and_fallbacks(packed):
    x, ids, w = routing(2, seed=5)
    h = HybridMoE(packed, 0, num_gpu_experts=3, device="cpu")
    yb = h.forward_stream(x.bfloat16(), ids, w)
    assert yb.dtype == torch.bfloat16 and rel(yb, h.forward(x, ids, w)) < 0.02
    h.stream_max_tokens = 1  # more tokens: forward (eager), same result
    assert rel(h.forward_stream(x, ids, w), h.forward(x, ids, w)) < 1e-6
    assert list(h._streams) == [(2, 3)]


def test_stream_path_follows_swaps(packed):
    x, ids, w = routing(1, seed=6)
    h = HybridMoE(packed, 0, num_gpu_experts=[0, 1], device="cpu", gpu_dtype=torch.float32)
    before = h.forward_stream(x, ids, w)
    h.swap(int(ids[0, 0]) if int(ids[0, 0]) > 1 else 7, 0)
    assert h.slot_of_dev.tolist() == h.slots.slot_np.tolist()
    after = h.forward_stream(x, ids, w)
    assert rel(after, h.forward(x, ids, w)) < 1e-5 and rel(after, before) < 0.1


def test_deferral_mask():
    cpu = torch.tensor([[True, True, False, True], [False, False, True, False], [True, True, True, True]])
    w = torch.tensor([[0.3, 0.1, 0.05, 0.2], [0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.1, 0.5]])
    assert deferral_mask(cpu, w, 1).tolist() == [[False, True, False, False], [False, False, True, False],
                                                 [False, False, True, False]]
    assert deferral_mask(cpu, w, 2).tolist() == [[False, True, False, True], [False, False, True, False],
                                                 [True, False, True, False]]
    assert not deferral_mask(cpu, w, 0).any()


@pytest.mark.parametrize("stream", [False, True])
def test_deferral_moves_experts_one_layer_later(packed, stream):
    """Two layers on one chain, defer=1: layer 0 returns its result without each token's smallest-weight CPU
    expert, layer 1 returns its own plus that one; so the sum of the two outputs (fixed inputs) is the sum
    without deferral, and layer 0's missing part is exactly the deferred expert's output. Eager and stream
    paths agree."""
    x0, ids0, w0 = routing(3, seed=7)
    x1, ids1, w1 = routing(3, seed=8)
    plain = [HybridMoE(packed, L, num_gpu_experts=[1, 4], device="cpu", gpu_dtype=torch.float32) for L in (0, 1)]
    chain = DeferralChain()
    hs = [HybridMoE(packed, L, num_gpu_experts=[1, 4], device="cpu", gpu_dtype=torch.float32, defer=d)
          for L, d in ((0, 1), (1, 0))]
    for h, carry in zip(hs, (True, False)):
        h.deferral, h.defer_carry = chain, carry
    run = (lambda h, *a: h.forward_stream(*a)) if stream else (lambda h, *a: h.forward(*a))
    y0, y1 = run(hs[0], x0, ids0, w0), run(hs[1], x1, ids1, w1)
    p0, p1 = plain[0].forward(x0, ids0, w0), plain[1].forward(x1, ids1, w1)
    assert chain.pending is None
    assert rel(y0 + y1, p0 + p1) < 1e-5
    deferred = deferral_mask(plain[0].slot_of_dev[ids0] < 0, w0, 1)
    assert deferred.sum() == 3
    y_def = CPUMoE(packed, 0).forward(x0, ids0, torch.where(deferred, w0, 0.0))
    assert rel(p0 - y0, y_def) < 1e-5 and rel(y0, p0) > 0.01
    # the two paths give the same outputs
    chain2 = DeferralChain()
    other = [HybridMoE(packed, L, num_gpu_experts=[1, 4], device="cpu", gpu_dtype=torch.float32, defer=d)
             for L, d in ((0, 1), (1, 0))]
    for h, carry in zip(other, (True, False)):
        h.deferral, h.defer_carry = chain2, carry
    orun = (lambda h, *a: h.forward(*a)) if stream else (lambda h, *a: h.forward_stream(*a))
    assert rel(orun(other[0], x0, ids0, w0), y0) < 1e-5 and rel(orun(other[1], x1, ids1, w1), y1) < 1e-5


def test_bad_defer(packed):
    with pytest.raises(ValueError, match="defer must be an int >= 0"):
        HybridMoE(packed, 0, device="cpu", defer=-1)


DEFER_FAMILIES = [("qwen3_moe", 3), ("deepseek_v4", 3)]


@pytest.mark.parametrize("family,gpu", DEFER_FAMILIES)
def test_deferral_accuracy_on_tiny_models(tmp_path, family, gpu):
    """The accuracy effect of deferral, measured: logits of tiny random models (test_inject's) with int8 experts
    injected, defer = 0, 1, 2 CPU experts per token (top-2 routing: at most 2 CPU experts), against the
    original model, in units of the error of dropping the routed experts altogether (zero_err). Deferral
    feeds each layer's input without the deferred experts' output, so it costs accuracy; it must stay well
    below dropping them. (The numbers go to docs/BENCHMARKS.md.)"""
    pytest.importorskip("transformers")
    import copy

    from helpers.tiny_models import err, logits, make_model, save_and_convert, tokens, zeroed_copy

    model = make_model(family)
    packed = save_and_convert(model, tmp_path, "int8")
    ids = tokens()
    ref = logits(model, ids)
    zero_err = err(logits(zeroed_copy(model), ids), ref)
    errs = {}
    for d in (0, 1, 2):
        m = copy.deepcopy(model)
        kt_runtime.inject(m, packed, num_gpu_experts=gpu, device="cpu", defer=d)
        errs[d] = err(logits(m, ids), ref)
    print(f"\n{family}: zero_err {zero_err:.3f}; err vs original with defer 0/1/2: "
          + " / ".join(f"{errs[d]:.4f} ({errs[d] / zero_err:.3f} x zero_err)" for d in (0, 1, 2)))
    assert errs[0] < 0.2 * zero_err
    assert errs[1] > errs[0] and errs[2] >= errs[1] * 0.5  # deferral changes the result
    assert errs[1] < 0.6 * zero_err and errs[2] < zero_err


def test_host_job_outlived_by_nothing(packed):
    """Dropping a job right after a submit waits for that run (its buffers are still being written)."""
    import gc

    moe = CPUMoE(packed, 0)
    x, ids, w = (a.numpy().copy() for a in routing(64, seed=4))
    out = np.zeros((64, H), np.float32)
    job = moe._layer.host_job(x, ids, w, out, "auto", 0)
    job.submit()
    del job
    gc.collect()
    assert np.array_equal(bits(out), bits(moe.forward_f32(x, ids, w)))
