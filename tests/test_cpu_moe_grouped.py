"""The CPU engine on group-wise INT4 (rawint4-gG, kernels_cpp/moe_group*.cpp).

- The exact int32 group sums of every ISA kernel equal an independent numpy int64 computation.
- The float product of the group sums (one implementation per ISA) equals an independent float32 numpy
  computation with the same roundings in the same order, bit for bit, on every ISA.
- The GEMM of every ISA (the prefill kernel: weights unpacked once per call, group sums and their float product
  fused) equals an independent numpy computation (int64 group sums, float32 products and sums in group order),
  bit for bit.
- CPUMoE.forward (the group-wise schedule) is bit-identical on every ISA this CPU has (portable, avx2, avxvnni,
  avx512, amx), for any thread count, and whether the experts' products run the GEMM or the group sums.
- Against the float MoE on the dequantized weights (kt_runtime.reference, float64): relative L2 error
  < 0.05 (the int8 activation quantization, as for int4/int8); against the same model quantizing the
  activations as the engine does: < 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from kt_convert import kt_runtime
from helpers.engine_knobs import knobs
from kt_convert.kt_kernels import _testing
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.reference import moe_reference
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.synthetic.families import make_family_checkpoint
from helpers.moe import float_moe, rel_err, routing

ISAS = kt_kernels.moe_isas()  # the engine's ISA rows this CPU runs, portable first


@pytest.mark.parametrize("group,k", [(32, 96), (32, 512), (64, 384), (128, 3840)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_group_sums_exact_on_every_isa(group, k, m):
    rng = np.random.default_rng(group + k + m)
    w = rng.integers(0, 256, size=(64, k // 2), dtype=np.uint8)
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    a[0, :group] = -128  # the extremes
    w[0, : group // 2] = 0x00  # q = -8 everywhere in the first group of row 0
    u = np.stack([w & 15, w >> 4], axis=-1).reshape(64, k).astype(np.int64) - 8  # even column = low nibble
    want = np.einsum("mgc,ngc->mgn", a.astype(np.int64).reshape(m, k // group, group), u.reshape(64, k // group, group))
    assert want[0, 0, 0] == 8 * 128 * group
    for isa in ISAS:
        for prepared in (False, True):  # the kernel splits the rows itself / the engine's group_prepare did
            assert np.array_equal(_testing.group_dot(w, 64, k, group, a, isa, prepared), want), (isa, prepared)


@pytest.mark.parametrize("G", [1, 3, 128])
def test_group_scale_same_roundings_on_every_isa(G):
    # the float product, computed here independently in float32 (each product and sum rounded, groups in order)
    rng = np.random.default_rng(G)
    gsum = rng.integers(-(2**17), 2**17, size=(G, 32), dtype=np.int32)
    gsum[0, 0] = 8 * 128 * 128  # the largest group sum (group 128)
    scale = (rng.standard_normal((G, 32)) * np.float32(1e-3)).astype(np.float32)
    scale[0, 1] = 1e-40  # a subnormal scale
    st = (scale.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)
    sf = (st.astype(np.uint32) << 16).view(np.float32)
    want = np.zeros(32, np.float32)
    for g in range(G):
        want = want + gsum[g].astype(np.float32) * sf[g]
    assert want.dtype == np.float32 and np.isfinite(want).all() and want[1] != 0
    for isa in ISAS:
        got = _testing.group_scale(gsum, st, isa)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), isa


def _bf16_scales(rng, shape):
    scale = (rng.standard_normal(shape) * np.float32(1e-3)).astype(np.float32)
    scale.flat[1] = 1e-40  # a subnormal scale
    return (scale.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)


@pytest.mark.parametrize("group,k", [(32, 96), (32, 512), (64, 384), (128, 3840), (32, 1056)])
def test_group_gemm_exact_on_every_isa(group, k):
    # P[i][j] = (((0 + float(gsum[i][0][j]) * s[j][0]) + float(gsum[i][1][j]) * s[j][1]) + ...), each product and
    # sum rounded to float32, computed here in numpy from int64 group sums; row counts that hit every row block
    # and tail of the kernels (4 and 3 rows per block, 16 and 32 per AMX block), k with 128- and 64-column tails
    n, G = 64, k // group
    rng = np.random.default_rng(group + k)
    w = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    w[0] = 0x00  # q = -8 everywhere in row 0
    st = _bf16_scales(rng, (n, G))
    sf = (st.astype(np.uint32) << 16).view(np.float32)
    u = np.stack([w & 15, w >> 4], axis=-1).reshape(n, k).astype(np.int64) - 8
    with knobs(amx_min_tokens=16):
        for m in (1, 3, 4, 5, 16, 17, 33, 40):
            a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
            a[0] = -128
            gsum = np.einsum("mgc,ngc->mgn", a.astype(np.int64).reshape(m, G, group), u.reshape(n, G, group))
            assert np.abs(gsum).max() < 2 ** 24  # float(gsum) is exact
            want = np.zeros((m, n), np.float32)
            for g in range(G):
                want = want + gsum[:, g, :].astype(np.float32) * sf[:, g]
            assert want.dtype == np.float32 and np.isfinite(want).all()
            for isa in ISAS:
                got = _testing.group_gemm(w, st, n, k, group, a, isa)
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (isa, m)


@pytest.fixture(scope="module", params=[32, 128])
def grouped(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"g{request.param}")
    ck = make_family_checkpoint(root / "ck", "qwen3_moe_bf16", hidden_size=384, intermediate_size=256, num_experts=6)
    convert(ConvertOptions(input_path=str(ck.path), output=root / "out", quant_method="rawint4",
                           group_size=request.param, progress=False))
    return kt_runtime.load_experts(root / "out")


@pytest.mark.parametrize("tokens,topk,limit", [(1, 2, None), (5, 3, None), (40, 2, None), (48, 4, 0.02),
                                               (70, 3, 0.02)])
def test_forward_identical_on_every_isa_and_close_to_float(grouped, tokens, topk, limit):
    w = grouped
    layer = w.layers[-1]
    ids, tw = routing(tokens, w.num_experts, topk, seed=tokens)
    if tokens > 1:
        ids[::4, 1] = ids[::4, 0]  # duplicate ids: two rows of one expert add into one token
    x = torch.randn(tokens, w.hidden_size, generator=torch.Generator().manual_seed(tokens))
    default = _testing.knob("group_gemm_min_rows")
    with knobs(group_gemm_min_rows=1 << 40):  # the group sums and their float product only
        ref = CPUMoE(w, layer, isa="portable", swiglu_limit=limit).forward(x, ids, tw)
        for gemm_min in (1 << 40, 0, 5, default):  # never, always, experts of 5+ rows, the default
            _testing.knob("group_gemm_min_rows", gemm_min)
            for isa in ISAS + ["auto"]:
                for threads in (1, 3):
                    got = CPUMoE(w, layer, isa=isa, swiglu_limit=limit, num_threads=threads).forward(x, ids, tw)
                    assert torch.equal(got, ref), (isa, gemm_min, threads)
    if limit is None:
        assert rel_err(ref, moe_reference(w, layer, x, ids, tw)) < 0.05
    assert rel_err(ref, float_moe(w, layer, x, ids, tw, limit, quant_act=True)) < 1e-4
    assert rel_err(ref, float_moe(w, layer, x, ids, tw, limit)) < 0.05


def test_amx_unpacked_tiles_never_serve_other_weights(grouped):
    """Two layers in turn, 16+ rows per expert (the AMX tiles), on one thread: each equals the reference."""
    w = grouped
    ids, tw = routing(64, w.num_experts, 2)
    x = torch.randn(64, w.hidden_size, generator=torch.Generator().manual_seed(9))
    want = {layer: CPUMoE(w, layer, isa="portable").forward(x, ids, tw) for layer in w.layers}
    for _ in range(2):
        for layer in w.layers:
            assert torch.equal(CPUMoE(w, layer, num_threads=1).forward(x, ids, tw), want[layer])


def test_group_schedule_profile(grouped):
    """The group-wise schedule records its stage profile (the stages of the prefill schedule, its task sizes)."""
    w = grouped
    ids, tw = routing(64, w.num_experts, 2)
    x = torch.randn(64, w.hidden_size, generator=torch.Generator().manual_seed(3))
    with knobs(profiling=1):
        CPUMoE(w, w.layers[0], num_threads=2).forward(x, ids, tw)
        p = _testing.profile()
    assert {"wall", "q", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait", "gemm_min_rows"} <= set(p)
    assert p["wall"] > 0 and p["g_dot"] > 0 and p["d_dot"] > 0 and p["threads"] == 2
    assert p["gemm_min_rows"] == _testing.knob("group_gemm_min_rows")


@pytest.mark.amx
@pytest.mark.skipif("amx" not in ISAS, reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("min_tokens", [1, 16, 1 << 20])
def test_amx_group_schedule(grouped, min_tokens):
    """The AMX tiles (group sums and GEMM) at every tile threshold, 16/32-row tails, 1 and 16 threads."""
    w = grouped
    layer = w.layers[-1]
    with knobs(amx_min_tokens=min_tokens, group_gemm_min_rows=1 << 40):
        for tokens in (7, 23, 50, 90):
            ids, tw = routing(tokens, w.num_experts, 3, seed=tokens)
            x = torch.randn(tokens, w.hidden_size, generator=torch.Generator().manual_seed(tokens))
            _testing.knob("group_gemm_min_rows", 1 << 40)
            ref = CPUMoE(w, layer, isa="portable").forward(x, ids, tw)
            for gemm_min in (1 << 40, 0, 16):
                _testing.knob("group_gemm_min_rows", gemm_min)
                for threads in (1, 16):
                    got = CPUMoE(w, layer, isa="amx", num_threads=threads).forward(x, ids, tw)
                    assert torch.equal(got, ref), (tokens, gemm_min, threads)


def test_layer_reads_its_own_copy_of_the_scales(grouped):
    # MoELayer copies the bf16 group scales (into row-group order) when it is built: overwriting the caller's
    # arrays afterwards changes nothing, and the result is CPUMoE's on the same weights
    w = grouped
    layer = w.layers[0]
    shards, scales = [], []
    for e in range(w.num_experts):
        six = []
        for p in ("gate", "up", "down"):
            wt, s = w.expert_tensors(layer, e, p, 0)
            scales.append(np.array(s, copy=True))
            six += [np.asarray(wt), scales[-1]]
        shards.append([tuple(six)])
    moe = kt_kernels.MoELayer(w.method, shards, w.hidden_size, w.moe_intermediate_size, 1, None)
    ids, tw = routing(3, w.num_experts, 2, seed=7)
    x = torch.randn(3, w.hidden_size, generator=torch.Generator().manual_seed(7))
    args = (x.numpy(), ids.numpy().astype(np.int64), tw.numpy().astype(np.float32), "auto", 1)
    before = moe.forward(*args)
    for s in scales:
        s[...] = 0x7FC0  # bf16 NaN
    after = moe.forward(*args)
    want = CPUMoE(w, layer, num_threads=1).forward(x, ids, tw).numpy()
    assert np.isfinite(after).all() and np.abs(after).max() > 0
    assert np.array_equal(after.view(np.uint32), before.view(np.uint32))
    assert np.array_equal(after.view(np.uint32), want.view(np.uint32))


def test_bad_group_scales_are_refused(grouped):
    w = grouped
    layer = w.layers[0]
    shards = []
    for e in range(w.num_experts):
        six = []
        for p in ("gate", "up", "down"):
            wt, s = w.expert_tensors(layer, e, p, 0)
            six += [np.asarray(wt), np.asarray(s).astype(np.float32) if (e, p) == (1, "up") else np.asarray(s)]
        shards.append([tuple(six)])
    with pytest.raises(ValueError, match=r"weights\[1\]\[0\] up scales: dtype must be uint16"):
        kt_kernels.MoELayer(w.method, shards, w.hidden_size, w.moe_intermediate_size, 1, None)
    six = list(shards[1][0])
    six[3] = np.asarray(w.expert_tensors(layer, 1, "up", 0)[1]).ravel()[:100]
    shards[1][0] = tuple(six)
    with pytest.raises(ValueError, match=r"up scales: 100 values, expected"):
        kt_kernels.MoELayer(w.method, shards, w.hidden_size, w.moe_intermediate_size, 1, None)


def test_activations_and_biases_kt_rawint4_lacks_are_refused(grouped):
    """The group-wise schedule runs SiLU without expert biases, as kt-kernel's RAWINT4 does: gpt_oss and situ are
    refused when the layer is built, biases when it runs, each naming the fix; the betas are checked first."""
    w = grouped
    layer = w.layers[0]
    shards = [[tuple(np.asarray(t) for p in ("gate", "up", "down") for t in w.expert_tensors(layer, e, p, 0))]
              for e in range(w.num_experts)]
    args = (w.method, shards, w.hidden_size, w.moe_intermediate_size, 1, None)
    for activation in ("gpt_oss", "situ"):
        with pytest.raises(ValueError, match=f"group-wise INT4 layers run the SiLU activation only, not {activation}; "
                                             "use int4 or int8 weights"):
            kt_kernels.MoELayer(*args, activation=activation)
        with pytest.raises(ValueError, match=f"not {activation}"):
            CPUMoE(w, layer, activation=activation)
    with pytest.raises(ValueError, match="situ activation's beta and linear_beta must be positive finite"):
        kt_kernels.MoELayer(*args, activation="situ", beta=0.0)
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gpt_oss', 'situ', got 'gelu'"):
        kt_kernels.MoELayer(*args, activation="gelu")
    assert kt_kernels.MoELayer(*args).activation == "silu"
    biased = kt_kernels.MoELayer(*args, down_bias=np.zeros((w.num_experts, w.hidden_size), np.float32))
    ids, tw = routing(2, w.num_experts, 2)
    x = np.zeros((2, w.hidden_size), np.float32)
    with pytest.raises(ValueError, match="group-wise INT4 layers take no expert biases; use int4 or int8 weights"):
        biased.forward(x, ids.numpy().astype(np.int64), tw.numpy().astype(np.float32), "auto", 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hybrid_layer_on_group_wise_weights(grouped, device):
    """HybridMoE: its GPU experts come from the loader's dequantize, its CPU part is CPUMoE on the group-wise
    weights; none, all and some experts on the "GPU" side."""
    from kt_convert.kt_runtime import HybridMoE

    w = grouped
    layer = w.layers[-1]
    ids, tw = routing(11, w.num_experts, 2, seed=4)
    x = torch.randn(11, w.hidden_size, generator=torch.Generator().manual_seed(4))
    cpu = CPUMoE(w, layer).forward(x, ids, tw)
    assert torch.equal(HybridMoE(w, layer, num_gpu_experts=0, device=device)(x, ids, tw).cpu(), cpu)
    full = HybridMoE(w, layer, num_gpu_experts=w.num_experts, device=device, gpu_dtype=torch.float32)
    assert rel_err(full(x, ids, tw).cpu(), moe_reference(w, layer, x, ids, tw)) < 1e-5
    mixed = HybridMoE(w, layer, num_gpu_experts=3, device=device)(x, ids, tw).cpu()
    assert rel_err(mixed, cpu) < 0.05
