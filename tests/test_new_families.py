"""The families added with NVFP4 / MXFP8 / compressed-tensors MXFP4 sources: each is detected, converted, loaded
and run by CPUMoE (every ISA here, bit-identical) and HybridMoE (CPU experts plus GPU experts run on the CPU)
against the float reference of the loaded weights; Kimi K3 at its latent expert width with SiTU."""
import numpy as np
import pytest
import torch

import kt_kernels
import kt_runtime
from convert.pipeline import ConvertOptions, convert
from kt_runtime.cpu_moe import CPUMoE
from kt_runtime.expert_activation import Activation
from kt_runtime.hybrid.layer import HybridMoE
from kt_runtime.reference import moe_reference
from synthetic.families import make_family_checkpoint

ISAS = [i for i in ("portable", "avx2", "avx512", "amx") if
        ("portable", "avx2", "avx512", "amx").index(i) <= ("portable", "avx2", "avx512", "amx").index(kt_kernels.best_isa())]
NEW = ["deepseek_v41_mxfp4", "glm5_fp8", "glm5_nvfp4", "qwen4_exp_fp8", "qwen4_exp_nvfp4", "kimi_k3_mxfp4",
       "qwen3_moe_nvfp4_modelopt", "qwen3_moe_nvfp4_ct", "minimax_m2_mxfp8"]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module", params=NEW)
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ck = make_family_checkpoint(d / "ck", request.param, hidden_size=256, intermediate_size=256)
    report = convert(ConvertOptions(input_path=str(ck.path), output=d / "out", progress=False, threadpool_count=2,
                                    quant_method="int8"))
    assert report.family == ck.variant.family
    return ck, kt_runtime.load_experts(d / "out")


def test_detected_converted_loaded_and_run(converted):
    ck, packed = converted
    layer = ck.layers[-1]
    assert packed.hidden_size == ck.hidden_size  # Kimi K3: routed_expert_hidden_size, not hidden_size
    g = torch.Generator().manual_seed(3)
    T, k = 12, 2
    scale = 0.002 if ck.variant.encoding == "mxfp4" else 0.05  # the synthetic MXFP4 weights are large
    x = torch.randn(T, ck.hidden_size, generator=g) * scale
    ids = torch.stack([torch.randperm(ck.num_experts, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    ref = moe_reference(packed, layer, x, ids, w)
    moe = CPUMoE(packed, layer)
    y = moe.forward(x, ids, w)
    assert rel(y, ref) < 0.03, rel(y, ref)
    args = (x.numpy(), ids.numpy(), w.numpy())
    first = moe.forward_f32(*args)
    for isa in ISAS:
        moe.isa = isa
        assert np.array_equal(moe.forward_f32(*args).view(np.uint32), first.view(np.uint32)), isa
    h = HybridMoE(packed, layer, num_gpu_experts=2, device="cpu", gpu_dtype=torch.float32)
    assert rel(h.forward(x, ids, w), ref) < 0.03
    if ck.variant.family == "kimi_k3":  # the manifest's SiTU, with the config's betas, is what runs
        assert moe.activation == "situ"
        assert rel(moe_reference(packed, layer, x, ids, w, activation=Activation("silu")), ref) > 0.1
    if ck.variant.family in ("glm5", "deepseek_v41"):  # the clamp is recorded and applied
        assert packed.swiglu_limit == 10.0


def test_kimi_k3_records_both_widths(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "kimi_k3_mxfp4", hidden_size=256, intermediate_size=256)
    convert(ConvertOptions(input_path=str(ck.path), output=tmp_path / "out", progress=False, threadpool_count=1))
    w = kt_runtime.load_experts(tmp_path / "out")
    assert w.hidden_size == 256 and ck.config["text_config"]["hidden_size"] == 512
    assert w.manifest.source["model_hidden_size"] == 512
    assert w.manifest.source["activation_params"] == {"beta": 4.0, "linear_beta": 25.0}
