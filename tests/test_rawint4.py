"""Group-wise INT4 output in kt-kernel's RAWINT4 layout: the method rows, the C++ packer against the torch
reference and hand-computed groups, the round trip with the project's own INT4-group decoder (the one that
reads Kimi-K2-Thinking), every family it supports, and the refusals."""
import json

import numpy as np
import pytest
import torch

import kt_kernels
import kt_runtime
from helpers.numerics import random_bf16
from helpers.outputs import read_json
from convert.cli import main
from convert.pipeline import ConvertOptions, convert
from kt_runtime.format.byte_orders import ct_key
from kt_runtime.format.methods import (CHOICES, INT4, METHODS, RAWINT4_G32, RAWINT4_G64, RAWINT4_G128, method_for)
from kt_runtime.format.safetensors_file import SafetensorsFile
from quant.cpu import PackTarget, SourceMatrix, pack_cpu
from quant.decoders import decode_int4_group, unpack_int4_words
from quant.group_int4 import dequantize_groups, quantize_groups
from quant.reference import pack_reference
from synthetic.families import VARIANTS, make_family_checkpoint

GROUPED = [RAWINT4_G32, RAWINT4_G64, RAWINT4_G128]
CLAMPED = {"gpt_oss", "deepseek_v4", "deepseek_v41", "glm5"}  # families with a SwiGLU clamp: refused
SUPPORTED = sorted(v for v, row in VARIANTS.items() if row.family not in CLAMPED)


def test_method_rows_and_choices():
    assert CHOICES["rawint4"] == (32, 64, 128) and CHOICES["int4"] == ()
    assert method_for("rawint4") is RAWINT4_G128 and method_for("RAWINT4", 32) is RAWINT4_G32
    assert method_for("int8").name == "int8" and method_for("rawint4-g64") is RAWINT4_G64
    with pytest.raises(ValueError, match="--group-size 48 is not available"):
        method_for("rawint4", 48)
    with pytest.raises(ValueError, match="not to int4"):
        method_for("int4", 32)
    for m in GROUPED:
        assert (m.kt_method, m.bits, m.scale_dtype, m.byte_order.numa_split, m.k_align) == \
            ("RAWINT4", 4, "BF16", False, m.group_size)
        assert m.weight_bytes(64, 256) == 64 * 128 and m.scale_count(64, 256) == 64 * 256 // m.group_size
        assert kt_kernels.method_info(m.name)["group_size"] == m.group_size


def _hand_group(values, d):
    """Independent: q = clamp(round-half-even(v / d), -8, 7) in float64 (exact for these inputs)."""
    return np.clip(np.round(np.asarray(values, np.float64) / d), -8, 7)


def test_scales_pick_amax_over_8_only_when_it_is_better():
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([-1.0, 0.5, 0.25, 0.125])  # extreme negative: amax/8 = 0.125 holds -1 as -8 exactly
    w[1, :4] = torch.tensor([1.0, -0.5, 0.25, 0.125])  # extreme positive: amax/8 would clip 1.0 to 7/8
    packed, scales = quantize_groups(w.to(torch.bfloat16), 32)
    s = scales.float()
    assert s[0, 0] == 0.125 and s[1, 0] == torch.tensor(1 / 7).to(torch.bfloat16).float()
    got = dequantize_groups(packed, scales, 2, 32, 32)
    assert torch.equal(got[0, :4], torch.tensor([-1.0, 0.5, 0.25, 0.125]))
    q1 = _hand_group([1.0, -0.5, 0.25, 0.125], float(s[1, 0]))
    assert np.array_equal(got[1, :4].double().numpy(), q1 * float(s[1, 0]))
    # offset-binary nibbles, even column in the low nibble: row 0 holds q = -8, 4 -> bytes 0x0 | 0xC << 4
    assert packed[0, 0] == (0 | (12 << 4)) and packed[0, 2] == 8 | (8 << 4)  # zeros are stored as 8


@pytest.mark.parametrize("method", GROUPED)
def test_cpu_packer_writes_the_reference_bytes(method):
    w = random_bf16(96, 512, seed=7, scale=0.02)
    w[2, 128:256] = 0  # an all-zero group: scale 0, nibbles 8
    w[3, 130] = float("nan")
    src = SourceMatrix("bf16", w.view(torch.int16).numpy().view(np.uint16))
    dst = PackTarget.empty(method, 96, 384)
    bad = pack_cpu(method, [(src, 128, 384, dst)], num_threads=2)
    ref_w, ref_s, ref_bad = pack_reference(w[:, 128:], method)
    assert bad == [ref_bad] == [1]
    assert np.array_equal(dst.weight.reshape(96, -1), ref_w.numpy())
    assert np.array_equal(dst.scales.reshape(96, -1), ref_s.view(torch.int16).numpy().view(np.uint16))
    # independent float64 check: every value within half a step (no scale choice clips a weight)
    deq = dequantize_groups(torch.from_numpy(dst.weight), torch.from_numpy(dst.scales), 96, 384, method.group_size)
    x = w[:, 128:].double().nan_to_num(0.0).numpy()
    d = np.repeat(ref_s.double().numpy(), method.group_size, axis=1)
    err = np.abs(deq.double().numpy() - x)
    assert np.all(err <= d / 2 * (1 + 1e-6))
    assert 0.3 < (ref_s.float() == (torch.from_numpy(np.abs(x)).float().reshape(96, -1, method.group_size).amax(-1)
                                   / 8).to(torch.bfloat16).float()).float().mean() < 0.9  # both scales are used


@pytest.mark.parametrize("method", GROUPED)
def test_packer_round_trips_with_the_int4_group_decoder(method):
    """The packed words read back through decode_int4_group (what decodes Kimi-K2-Thinking) give the exact
    dequantized values, rounded to bf16 as that decoder defines."""
    w = random_bf16(64, 256, seed=3, scale=0.05)
    packed, scales = quantize_groups(w, method.group_size)
    words = packed.numpy().view(np.int32)  # [N, K/8]: little-endian words, element j at bits 4j
    bits = scales.view(torch.int16).numpy().view(np.uint16)
    exact = dequantize_groups(packed, scales, 64, 256, method.group_size)
    assert torch.equal(decode_int4_group(words, bits, method.group_size, "BF16"), exact.to(torch.bfloat16))
    u = np.stack([(packed.numpy() & 0xF), (packed.numpy() >> 4)], axis=-1).reshape(64, 256).astype(np.int64)
    assert np.array_equal(unpack_int4_words(words).numpy(), u)  # the decoder's nibble order is the writer's


def _convert(ck, out, **kw):
    return convert(ConvertOptions(input_path=str(ck.path), output=out, progress=False, **kw))


@pytest.mark.parametrize("variant", SUPPORTED)
def test_every_supported_family_writes_what_kt_rawint4_loads(tmp_path, variant):
    ck = make_family_checkpoint(tmp_path / "ck", variant)
    report = _convert(ck, tmp_path / "out", quant_method="rawint4", group_size=64, threadpool_count=2)
    assert report.method == "rawint4-g64" and report.threadpool_count == 1
    manifest = read_json(tmp_path / "out" / "kt_manifest.json")
    assert (manifest["method"], manifest["kt_method"], manifest["threadpool_count"]) == ("rawint4-g64", "RAWINT4", 1)
    qc = read_json(tmp_path / "out" / "config.json")["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["config_groups"]["group_0"]["weights"]["group_size"]) == \
        ("compressed-tensors", "pack-quantized", 64)
    index = read_json(tmp_path / "out" / "model.safetensors.index.json")["weight_map"]
    w = kt_runtime.load_experts(tmp_path / "out")
    for layer in ck.layers:
        # kt's CompressedSafeTensorLoader: {base}.mlp.experts.{E}.{proj}_proj.*, base = model.layers.{L}
        st = SafetensorsFile(tmp_path / "out" / index[ct_key(layer, "gate", 0, "weight_packed")])
        for expert in range(ck.num_experts):
            for proj in ("gate", "up", "down"):
                n, k = (ck.hidden_size, ck.intermediate_size) if proj == "down" else (ck.intermediate_size, ck.hidden_size)
                words = st.array(ct_key(layer, proj, expert, "weight_packed"))
                scales = st.array(ct_key(layer, proj, expert, "weight_scale"))
                assert (st.tensors[ct_key(layer, proj, expert, "weight_packed")].dtype, words.shape) == ("I32", (n, k // 8))
                assert (st.tensors[ct_key(layer, proj, expert, "weight_scale")].dtype, scales.shape) == ("BF16", (n, k // 64))
                assert list(st.array(ct_key(layer, proj, expert, "weight_shape"))) == [n, k]
                ref_w, ref_s, _ = pack_reference(ck.reference(layer, expert, proj), RAWINT4_G64)
                assert np.array_equal(words.view(np.uint8), ref_w.numpy()), (layer, expert, proj)
                assert np.array_equal(scales, ref_s.view(torch.int16).numpy().view(np.uint16))
                exact = w.dequantize(layer, expert, proj)
                assert torch.equal(decode_int4_group(words, scales, 64, "BF16"), exact.to(torch.bfloat16))
        st.close()


def test_the_output_reads_back_as_a_compressed_tensors_source(tmp_path):
    """The converter reads its own RAWINT4 output as an INT4-group checkpoint (Kimi-K2-Thinking's format):
    converting it again to int8 packs exactly the values the loader dequantizes."""
    from quant.reference import pack_expert_reference

    ck = make_family_checkpoint(tmp_path / "ck", "kimi_k2_fp8", num_layers=2)
    _convert(ck, tmp_path / "raw", quant_method="rawint4", group_size=32)
    report = convert(ConvertOptions(input_path=str(tmp_path / "raw"), output=tmp_path / "i8", quant_method="int8",
                                    threadpool_count=2, progress=False))
    assert report.input_type == "int4"
    raw, i8 = kt_runtime.load_experts(tmp_path / "raw"), kt_runtime.load_experts(tmp_path / "i8")
    layer = ck.layers[0]
    for proj in ("gate", "down"):
        src = raw.dequantize(layer, 1, proj).to(torch.bfloat16)
        for t, (ref_w, ref_s) in enumerate(pack_expert_reference(src, proj, ck.hidden_size, ck.intermediate_size, 2,
                                                                   METHODS["int8"])):
            got_w, got_s = i8.expert_tensors(layer, 1, proj, t)
            assert np.array_equal(got_w, ref_w.numpy()) and np.array_equal(got_s, ref_s.numpy())


@pytest.mark.parametrize("variant", ["deepseek_v4_fp8", "gpt_oss_mxfp4"])
def test_swiglu_clamp_families_are_refused(tmp_path, capsys, variant):
    ck = make_family_checkpoint(tmp_path / "ck", variant)
    assert main(["-i", str(ck.path), "-o", str(tmp_path / "o"), "--quant-method", "rawint4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "swiglu_limit" in err and "--quant-method int4 or int8" in err and "MXFP4" in err
    assert not (tmp_path / "o" / "kt_manifest.json").exists()


def test_v4_flash_mxfp4_is_refused(tmp_path, capsys, tiny_checkpoint):
    assert main(["-i", str(tiny_checkpoint.path), "-o", str(tmp_path / "o"), "--quant-method", "rawint4"]) == 2
    assert "refuses with --kt-method RAWINT4" in capsys.readouterr().err


def test_layout_group_and_alignment_refusals(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1)
    args = ["-i", str(ck.path), "-o", str(tmp_path / "o"), "--no-progress", "--quant-method"]
    assert main(args + ["rawint4", "--no-merge-safetensor"]) == 2
    assert "writes safetensors only" in capsys.readouterr().err
    assert main(args + ["int4", "--group-size", "32"]) == 2
    assert "not to int4" in capsys.readouterr().err
    assert main(args + ["rawint4", "--group-size", "48"]) == 2  # not a choice
    # I = 256 served over 4 pools: 64 columns of down per pool, not a multiple of 128
    assert main(args + ["rawint4", "--threadpool-count", "4"]) == 2
    assert "256 / 4 = 64 is not a multiple of 128" in capsys.readouterr().err
    assert main(args + ["rawint4", "--group-size", "64", "--threadpool-count", "4"]) == 0


def test_rawint4_packs_on_the_cpu_whatever_the_device(tmp_path, capsys, monkeypatch):
    import convert.pipeline as pipeline

    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")  # as on a GPU host
    report = _convert(ck, tmp_path / "auto", quant_method="rawint4", device="auto")
    assert report.device == "cpu"
    with pytest.raises(Exception, match="packed on the CPU only"):
        _convert(ck, tmp_path / "cuda", quant_method="rawint4", device="cuda")


def test_kt_kernel_loader_reads_the_output(tmp_path):
    """Where kt-kernel is installed: its own RAWINT4 loader finds every expert under the key we write, as the
    uint8 [N, K/2] bytes and bf16 scales our loader holds."""
    loader_mod = pytest.importorskip("kt_kernel.utils.loader")
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_experts=3)
    _convert(ck, tmp_path / "out", quant_method="rawint4", group_size=32)
    w = kt_runtime.load_experts(tmp_path / "out")
    kt = loader_mod.CompressedSafeTensorLoader(str(tmp_path / "out"))
    for layer in ck.layers:
        got = kt.load_experts(f"model.layers.{layer}")
        for proj in ("gate", "up", "down"):
            assert len(got[proj]) == ck.num_experts
            for e in range(ck.num_experts):
                ours_w, ours_s = w.expert_tensors(layer, e, proj, 0)
                assert got[proj][e].dtype == torch.uint8 and got[f"{proj}_scale"][e].dtype == torch.bfloat16
                assert np.array_equal(got[proj][e].numpy(), np.asarray(ours_w))
                assert np.array_equal(got[f"{proj}_scale"][e].view(torch.int16).numpy().view(np.uint16), np.asarray(ours_s))
