"""The families added with NVFP4 / MXFP8 / compressed-tensors MXFP4 sources: each is detected, converted, loaded
and run by CPUMoE (every ISA here, bit-identical) and HybridMoE (CPU experts plus GPU experts run on the CPU)
against the float reference of the loaded weights; Kimi K3 at its latent expert width with SiTU."""
import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from kt_convert import kt_runtime
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.expert_activation import Activation
from kt_convert.kt_runtime.hybrid.layer import HybridMoE
from kt_convert.kt_runtime.reference import moe_reference
from kt_convert.synthetic.families import make_family_checkpoint

ISAS = kt_kernels.moe_isas()  # the engine's ISA rows this CPU runs, portable first
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


# -- detection is strict: the config and the tensors must agree (exit 2 naming the file and the fix) -------------

def _refused(tmp_path, capsys, variant, edit=None, drop=(), *needles):
    from helpers.outputs import read_json
    from kt_convert.convert.cli import main
    import json

    ck = make_family_checkpoint(tmp_path / "ck", variant, hidden_size=256, intermediate_size=256, num_layers=2,
                                num_experts=2)
    cfg = read_json(ck.path / "config.json")
    if edit is not None:
        edit(cfg.get("text_config", cfg))
        (ck.path / "config.json").write_text(json.dumps(cfg))
    for name in drop:
        (ck.path / name).unlink()
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_nvfp4_is_never_guessed_without_its_config(tmp_path, capsys):
    _refused(tmp_path, capsys, "qwen3_moe_nvfp4_modelopt", lambda c: c.pop("quantization_config"),
             ("hf_quant_config.json",), "NVFP4", "declares no quantization_config", "quant_algo 'NVFP4'")


def test_nvfp4_tensors_with_an_mxfp4_config_are_refused(tmp_path, capsys):
    def to_mxfp4(c):
        c["quantization_config"]["format"] = "mxfp4-pack-quantized"
    _refused(tmp_path, capsys, "qwen3_moe_nvfp4_ct", to_mxfp4, (), "stored as NVFP4", "mxfp4-pack-quantized")


def test_mxfp4_tensors_with_an_nvfp4_config_are_refused(tmp_path, capsys):
    def to_nvfp4(c):
        c["quantization_config"]["format"] = "nvfp4-pack-quantized"
    _refused(tmp_path, capsys, "kimi_k3_mxfp4", to_nvfp4, (), "stored as MXFP4", "nvfp4-pack-quantized")


def test_modelopt_layout_with_a_compressed_tensors_config_is_refused(tmp_path, capsys):
    """The layout decides whether the per-tensor scale multiplies or divides: it must match the declaration."""
    def to_ct(c):
        c["quantization_config"] = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}
    _refused(tmp_path, capsys, "glm5_nvfp4", to_ct, ("hf_quant_config.json",), "stored as NVFP4",
             "compressed-tensors format 'nvfp4-pack-quantized'")


def test_quant_algo_and_hf_quant_config_must_agree(tmp_path, capsys):
    def to_fp8(c):
        c["quantization_config"]["quant_algo"] = "FP8"
    _refused(tmp_path, capsys, "qwen3_moe_nvfp4_modelopt", to_fp8, (), "disagree", "hf_quant_config.json")


def test_nvfp4_group_size_must_be_16(tmp_path, capsys):
    def group32(c):
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    _refused(tmp_path, capsys, "qwen4_exp_nvfp4", group32, (), "group_size is 32")


def test_a_zero_per_tensor_scale_stops_the_conversion(tmp_path, capsys):
    import json

    from kt_convert.convert.cli import main
    from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile

    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_nvfp4_ct", hidden_size=256, intermediate_size=256,
                                num_layers=1, num_experts=2, num_shards=1)
    key = "model.layers.0.mlp.experts.1.up_proj.weight_global_scale"
    f = SafetensorsFile(ck.path / "model.safetensors")
    offset = f.tensors[key].offset
    f.close()
    with open(ck.path / "model.safetensors", "r+b") as fh:  # the test's own file
        fh.seek(offset)
        fh.write(np.zeros(1, "<f4").tobytes())
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert key in err and "positive finite" in err
    assert json.loads((tmp_path / "o" / "kt_manifest.json").read_text()).get("complete") is not True
