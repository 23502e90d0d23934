"""Every checkpoint family: the new source decoders (C++ packer on every ISA here against the torch
reference, byte for byte) and end-to-end conversion of every family's synthetic checkpoint against
the reference quantizer applied to that family's bf16 decode."""
import json

import numpy as np
import pytest
import torch

from kt_convert import kt_runtime
from helpers.numerics import available_isas
from helpers.outputs import read_json
from kt_convert.convert.cli import main
from kt_convert.convert.families import FAMILIES
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.convert.plan import build_plan
from kt_convert.convert.source import open_checkpoint
from kt_convert.synthetic.families import VARIANTS, make_family_checkpoint
from kt_convert.kt_runtime.format.methods import INT4, INT8, get_method
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.decoders import (decode_f16, decode_fp8_block, decode_int4_group, e4m3_to_float32,
                                       encode_int4_words, unpack_int4_words)
from kt_convert.quant.reference import pack_expert_reference, pack_reference

AVAILABLE_ISAS = available_isas()


def _cpu_pack(method, src, col0, k, isa, threads=2):
    dst = PackTarget.empty(method, src.shape[0], k)
    bad = pack_cpu(method, [(src, col0, k, dst)], isa=isa, num_threads=threads)
    return dst, bad[0]


def _assert_packs_like_reference(method, src, full_bf16, col0, k, isa, nonfinite=0):
    ref_w, ref_s, ref_bad = pack_reference(full_bf16[:, col0 : col0 + k], method)
    dst, bad = _cpu_pack(method, src, col0, k, isa)
    assert bad == ref_bad == nonfinite
    assert np.array_equal(dst.weight, ref_w.numpy())
    assert np.array_equal(dst.scales.view(np.uint32), ref_s.numpy().view(np.uint32))


def _fp8_bytes(rng, n, k):
    w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    w[(w & 0x7F) == 0x7F] = 0x3C  # no NaN codes in the random part
    return w


def test_e4m3_decode_matches_the_format():
    codes = np.arange(256, dtype=np.uint8)
    got = e4m3_to_float32(codes).numpy()
    for c in range(256):
        e, m, neg = (c >> 3) & 0xF, c & 7, c >> 7
        if c & 0x7F == 0x7F:
            assert np.isnan(got[c])
            continue
        v = m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        assert got[c] == (-v if neg else v), c


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
@pytest.mark.parametrize("block", [(128, 128), (64, 32), (128, 48)])  # 48: lanes straddle scales
def test_cpu_fp8_block_matches_reference(isa, method, block):
    rng = np.random.default_rng(1)
    n, ktot = 320, 640  # 2.5 x 5 blocks of 128: partial row blocks
    w = _fp8_bytes(rng, n, ktot)
    grid = (-(-n // block[0]), -(-ktot // block[1]))
    # scales that make products need rounding to bf16 (not powers of two)
    s = (2.0 ** rng.integers(-12, -4, size=grid) * rng.uniform(1, 2, size=grid)).astype(np.float32)
    full = decode_fp8_block(w, s, block)
    for row0, rows, col0, k in ((0, 320, 0, 640), (64, 128, 0, 640), (0, 320, 128, 256), (192, 64, 384, 256)):
        src = SourceMatrix("fp8_block", w, s, block).rows(row0, rows)
        _assert_packs_like_reference(method, src, full[row0 : row0 + rows], col0, k, isa)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_cpu_fp8_nan_codes_and_overflow_are_nonfinite(isa):
    rng = np.random.default_rng(2)
    w = _fp8_bytes(rng, 64, 128)
    w[3, 5], w[4, 6] = 0x7F, 0xFF  # E4M3FN NaN
    w[7, 7] = 0x7E  # 448 * 2^120 overflows fp32 -> inf
    s = np.full((1, 1), 2.0 ** 120, dtype=np.float32)
    full = decode_fp8_block(w, s, (128, 128))
    _assert_packs_like_reference(INT8, SourceMatrix("fp8_block", w, s, (128, 128)), full, 0, 128, isa,
                                 nonfinite=int((~torch.isfinite(full.float())).sum()))


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
def test_cpu_f16_matches_reference(isa, method):
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((64, 384)) * 0.05).astype(np.float16)
    h[0, :12] = np.array([6e-8, 1e-5, -3e-6, 65504, -65504, 0.1, 0, -0.0, 1, 2, 1.00390625, 1.01171875],
                         dtype=np.float16)  # subnormals, extremes, ties to even
    full = decode_f16(h.view(np.uint16))
    assert torch.equal(full, torch.from_numpy(h).to(torch.bfloat16))
    for col0, k in ((0, 384), (128, 256)):
        _assert_packs_like_reference(method, SourceMatrix("f16", h.view(np.uint16)), full, col0, k, isa)


def test_int4_words_round_trip_and_bit_order():
    u = np.arange(16)[None, :].repeat(2, 0)
    words = encode_int4_words(u)
    assert words.shape == (2, 2) and words.dtype == np.int32
    assert words[0, 0] == 0x76543210 and words[0, 1] == np.uint32(0xFEDCBA98).view(np.int32)
    assert np.array_equal(unpack_int4_words(words).numpy(), u)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
@pytest.mark.parametrize("scale_dtype,group", [("BF16", 32), ("F32", 32), ("BF16", 128), ("BF16", 8)])
def test_cpu_int4_group_matches_reference(isa, method, scale_dtype, group):
    rng = np.random.default_rng(4)
    n, ktot = 64, 512
    u = rng.integers(0, 16, size=(n, ktot))
    words = encode_int4_words(u)
    sc = rng.uniform(0.001, 0.01, size=(n, ktot // group)).astype(np.float32)
    scales = (sc.view(np.uint32) >> 16).astype(np.uint16) if scale_dtype == "BF16" else sc
    full = decode_int4_group(words, scales, group, scale_dtype)
    want = (torch.from_numpy(u - 8).float() * torch.from_numpy(
        (scales.astype(np.uint32) << 16).view(np.float32) if scale_dtype == "BF16" else sc).repeat_interleave(group, 1))
    assert torch.equal(full, want.to(torch.bfloat16))
    for col0, k in ((0, 512), (128, 256)):
        _assert_packs_like_reference(method, SourceMatrix("int4_group", words, scales, (1, group)), full, col0, k, isa)


def test_cpu_packer_rejects_bad_block_arguments():
    w = np.zeros((64, 128), np.uint8)
    dst = PackTarget.empty(INT8, 64, 128)
    with pytest.raises(ValueError, match="scales do not cover"):
        pack_cpu(INT8, [(SourceMatrix("fp8_block", w, np.ones((1, 1), np.float32), (32, 128)), 0, 128, dst)])
    with pytest.raises(ValueError, match="float32"):
        pack_cpu(INT8, [(SourceMatrix("fp8_block", w, np.ones((1, 1), np.float64), (128, 128)), 0, 128, dst)])
    with pytest.raises(ValueError, match="need scales"):
        pack_cpu(INT8, [(SourceMatrix("int4_group", np.zeros((64, 16), np.int32), None, (1, 32)), 0, 128, dst)])


# -- end to end: every family's synthetic checkpoint -----------------------------------------------



def _convert(ck, out, **kw):
    return convert(ConvertOptions(input_path=str(ck.path), output=out, progress=False, **kw))


def assert_family_matches_reference(ck, out, method_name, threadpool_count):
    method = get_method(method_name)
    w = kt_runtime.load_experts(out)
    assert w.layers == ck.layers
    assert (w.hidden_size, w.moe_intermediate_size, w.num_experts) == (ck.hidden_size, ck.intermediate_size,
                                                                       ck.num_experts)
    for layer in ck.layers:
        for expert in range(ck.num_experts):
            for proj in ("gate", "up", "down"):
                ref = pack_expert_reference(ck.reference(layer, expert, proj), proj, ck.hidden_size,
                                            ck.intermediate_size, threadpool_count, method)
                for t, (ref_w, ref_s) in enumerate(ref):
                    got_w, got_s = w.expert_tensors(layer, expert, proj, t)
                    assert np.array_equal(got_w, ref_w.numpy()), (layer, expert, proj, t)
                    assert np.array_equal(got_s.view(np.uint32), ref_s.numpy().view(np.uint32)), (layer, expert, proj, t)


MTP_SKIPPED = {"deepseek_v3_fp8": 24, "deepseek_v3_bf16": 12, "glm4_moe_bf16": 12, "qwen3_5_moe_bf16": 2,
               "glm5_fp8": 24}
ACTIVATION = {"gpt_oss": "gpt_oss", "kimi_k3": "situ"}
SWIGLU_LIMIT = {"gpt_oss": 7.0, "deepseek_v4": 10.0, "deepseek_v41": 10.0, "glm5": 10.0}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_converts_byte_identically_to_the_reference(tmp_path, variant):
    ck = make_family_checkpoint(tmp_path / "ck", variant)
    report = _convert(ck, tmp_path / "out", threadpool_count=2)
    assert report.family == ck.variant.family and report.input_type == ck.input_type
    assert report.mtp_tensors_skipped == MTP_SKIPPED.get(variant, 0)
    assert_family_matches_reference(ck, tmp_path / "out", "int4", 2)
    manifest = read_json(tmp_path / "out" / "kt_manifest.json")
    assert manifest["activation"] == ACTIVATION.get(ck.variant.family, "silu")
    assert manifest["swiglu_limit"] == SWIGLU_LIMIT.get(ck.variant.family)


@pytest.mark.parametrize("variant", ["deepseek_v3_fp8", "minimax_m2_fp8", "deepseek_v4_fp8"])
@pytest.mark.parametrize("block", [(128, 128), (64, 96)])
def test_fp8_partial_blocks_and_row_slices_inside_blocks(tmp_path, variant, block):
    # H=320, I=192: both dims end in a partial 128-block; T=3 slices I into 64-row pieces that start
    # inside a scale block; the block size is read from config.json (here also 64x96)
    ck = make_family_checkpoint(tmp_path / "ck", variant, hidden_size=320, intermediate_size=192, num_experts=3,
                                block=block)
    _convert(ck, tmp_path / "out", threadpool_count=3, quant_method="int8")
    assert_family_matches_reference(ck, tmp_path / "out", "int8", 3)


def test_k_block_tail_with_int4_groups(tmp_path):
    # H = 3712 = 3584 + 128: gate/up rows run past one K-block of the tiled layout
    ck = make_family_checkpoint(tmp_path / "ck", "kimi_k2_int4", hidden_size=3712, intermediate_size=128,
                                num_experts=2, num_layers=2, group=128, num_shards=1)
    _convert(ck, tmp_path / "out", threadpool_count=1)
    assert_family_matches_reference(ck, tmp_path / "out", "int4", 1)


def test_orientation_comes_from_the_family_not_the_shapes(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_vl_moe_bf16", num_layers=1)
    cfg = read_json(ck.path / "config.json")
    cfg["model_type"] = cfg["text_config"]["model_type"] = "qwen3_5_moe"  # claims [E, 2I, H]
    (ck.path / "config.json").write_text(json.dumps(cfg))
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gate_up_proj [E, 2I, H]" in err and "[4, 384, 512]" in err
    cfg["model_type"] = cfg["text_config"]["model_type"] = "some_new_vl_moe"  # fused keys, unknown family
    (ck.path / "config.json").write_text(json.dumps(cfg))
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'some_new_vl_moe' is not a supported MoE family" in err and "mlp.experts.gate_up_proj" in err
    assert "qwen3_vl_moe" in err and "gpt_oss" in err


def test_per_expert_keys_of_an_unknown_model_type_are_recognised(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1)
    cfg = read_json(ck.path / "config.json")
    cfg["model_type"] = "qwen9_moe"
    (ck.path / "config.json").write_text(json.dumps(cfg))
    _convert(ck, tmp_path / "out", threadpool_count=1)
    assert_family_matches_reference(ck, tmp_path / "out", "int4", 1)


def test_unknown_family_lists_what_is_supported(tmp_path, capsys):
    from kt_convert.kt_runtime.format.safetensors_file import save_file

    (tmp_path / "ck").mkdir()
    save_file(tmp_path / "ck" / "model.safetensors",
              {"model.layers.0.moe.expert_bank.0.weight": ("BF16", (4, 4), np.zeros(16, np.uint16))})
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model_type": "mystery", "hidden_size": 4}))
    assert main(["-i", str(tmp_path / "ck"), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'mystery'" in err and "model.layers.0.moe.expert_bank.0.weight" in err
    for family in FAMILIES:
        assert family.name in err


@pytest.mark.parametrize("variant,wrong", [("deepseek_v3_fp8", "bf16"), ("kimi_k2_int4", "fp8"),
                                           ("qwen3_moe_fp16", "bf16"), ("gpt_oss_mxfp4", "int4")])
def test_explicit_input_type_must_match_the_files(tmp_path, capsys, variant, wrong):
    ck = make_family_checkpoint(tmp_path / "ck", variant, num_layers=2, num_experts=2)
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--input-type", wrong, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--input-type {wrong} does not match" in err and f"are {ck.input_type} ({ck.variant.family})" in err
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--input-type", ck.input_type,
                 "--threadpool-count", "1", "--no-progress"]) == 0


def test_gpt_oss_plan_records_what_the_runtime_must_add(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "gpt_oss_mxfp4", num_layers=2)
    c = open_checkpoint(str(ck.path))
    plan = build_plan(c, get_method("int4"), 2, "merged")
    assert (plan.activation, plan.swiglu_limit) == ("gpt_oss", 7.0)
    assert plan.source_info["activation_params"] == {"alpha": 1.702, "up_offset": 1.0}
    assert plan.source_info["unpacked_expert_tensors"] == [
        f"model.layers.{L}.mlp.experts.{p}_proj_bias" for L in (0, 1) for p in ("down", "gate_up")]
    assert not any(k.endswith("_bias") for k in plan.routed_keys)  # --include-non-expert copies them
    assert plan.source_info["expert_layout"] == "gpt-oss-interleaved"
    c.close()


def test_fp8_without_a_block_size_is_refused(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "deepseek_v3_fp8", num_layers=2, num_experts=2)
    cfg = read_json(ck.path / "config.json")
    del cfg["quantization_config"]["weight_block_size"]
    (ck.path / "config.json").write_text(json.dumps(cfg))
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "weight_block_size" in capsys.readouterr().err


def test_fp8_scale_grid_must_match_the_block_size(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "minimax_m2_fp8", num_layers=1, num_experts=2)
    cfg = read_json(ck.path / "config.json")
    cfg["quantization_config"]["weight_block_size"] = [64, 64]  # the files hold 128x128 grids
    (ck.path / "config.json").write_text(json.dumps(cfg))
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "weight_scale_inv" in err and "blocks 64x64" in err


def test_asymmetric_int4_is_refused(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "kimi_k2_int4", num_layers=2, num_experts=2)
    cfg = read_json(ck.path / "config.json")
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (ck.path / "config.json").write_text(json.dumps(cfg))
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "symmetric int4" in capsys.readouterr().err


def test_mtp_and_dense_layers_are_left_alone(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "glm4_moe_bf16", num_layers=3, num_experts=2)
    c = open_checkpoint(str(ck.path))
    plan = build_plan(c, get_method("int4"), 1, "merged")
    assert [lp.layer for lp in plan.layers] == [1, 2]  # layer 0 dense, layer 3 MTP
    assert plan.skipped_mtp_layers == ["3"] and plan.skipped_mtp_keys == 6
    assert not any("shared_experts" in k or "layers.0." in k for k in plan.routed_keys)
    c.close()


@pytest.mark.parametrize("prefix", ["", "language_model.", "language_model.model.", "model.language_model."])
def test_key_prefixes(tmp_path, prefix):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1, num_experts=2, prefix=prefix)
    assert any(k.startswith(prefix + "layers.0.mlp.experts.1.") for k in ck.weight_map)
    report = _convert(ck, tmp_path / "out", threadpool_count=1)
    assert report.family == "qwen3_moe"
    assert_family_matches_reference(ck, tmp_path / "out", "int4", 1)


def test_v4_expert_dtype_must_agree_with_the_weights(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "deepseek_v4_fp8", num_layers=1, num_experts=2)
    cfg = read_json(ck.path / "config.json")
    cfg["expert_dtype"] = "fp4"
    (ck.path / "config.json").write_text(json.dumps(cfg))
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "expert_dtype is 'fp4' but the routed experts are stored as fp8" in capsys.readouterr().err
