"""Group-wise INT4 output in kt-kernel's RAWINT4 layout: the method rows, the C++ packer against the torch
reference and hand-computed groups, the round trip with the project's own INT4-group decoder (the one that
reads Kimi-K2-Thinking), every family it supports, and the refusals."""
import json
import math

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from kt_convert import kt_runtime
from helpers.numerics import available_isas, random_bf16
from helpers.outputs import read_json
from kt_convert.convert.cli import main
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.kt_runtime.format.byte_orders import ct_key
from kt_convert.kt_runtime.format.methods import (BF16_LEAST_SQUARES, CHOICES, INT4, METHODS, RAWINT4_G32, RAWINT4_G64,
                                                  RAWINT4_G128, method_for)
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.decoders import decode_int4_group, unpack_int4_words
from kt_convert.quant.group_int4 import dequantize_groups, quantize_groups
from kt_convert.quant.reference import pack_reference
from kt_convert.synthetic.families import VARIANTS, make_family_checkpoint

GROUPED = [RAWINT4_G32, RAWINT4_G64, RAWINT4_G128]
AVAILABLE_ISAS = available_isas()
CLAMPED = {"gpt_oss", "deepseek_v4", "deepseek_v41", "glm5"}  # families with a SwiGLU clamp: refused
SUPPORTED = sorted(v for v, row in VARIANTS.items() if row.family not in CLAMPED)


def test_method_rows_and_choices():
    assert CHOICES["rawint4"] == (32, 64, 128) and CHOICES["int4"] == ()
    assert method_for("rawint4") is RAWINT4_G32 and method_for("RAWINT4", 128) is RAWINT4_G128  # default: 32
    assert method_for("int8").name == "int8" and method_for("rawint4-g64") is RAWINT4_G64
    with pytest.raises(ValueError, match="--group-size 48 is not available"):
        method_for("rawint4", 48)
    with pytest.raises(ValueError, match="not to int4"):
        method_for("int4", 32)
    for m in GROUPED:
        assert (m.kt_method, m.bits, m.scale_dtype, m.byte_order.numa_split, m.k_align) == \
            ("RAWINT4", 4, "BF16", False, m.group_size)
        assert (m.levels, m.scale_arithmetic) == (7, BF16_LEAST_SQUARES)
        assert m.weight_bytes(64, 256) == 64 * 128 and m.scale_count(64, 256) == 64 * 256 // m.group_size
        assert kt_kernels.method_info(m.name)["group_size"] == m.group_size


# every positive finite bf16 value, ascending: the independent oracle tries them all
ALL_BF16_SCALES = (np.arange(1, 0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


def _least_error(x: np.ndarray) -> tuple[float, float]:
    """Independent: (the least sum of squared errors over every bf16 scale with codes clamp(rint(x/d), -7, 7),
    the smallest scale reaching it), in float64."""
    a = x.astype(np.float64)
    best, best_d = math.inf, 0.0
    for c in range(0, len(ALL_BF16_SCALES), 4096):
        d = ALL_BF16_SCALES[c : c + 4096, None]
        sse = ((a - np.clip(np.round(a / d), -7, 7) * d) ** 2).sum(1)
        i = int(np.argmin(sse))
        if sse[i] < best:
            best, best_d = float(sse[i]), float(d[i, 0])
    return best, best_d


def _sse(x: np.ndarray, packed: np.ndarray, scale_bits: np.ndarray) -> float:
    a = x.astype(np.float64)
    u = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1).astype(np.float64) - 8
    d = float((np.asarray(scale_bits, np.uint32) << 16).view(np.float32))
    return float(((a - u * d) ** 2).sum())


def _bf16(values) -> np.ndarray:
    return torch.tensor(np.asarray(values, np.float32)).to(torch.bfloat16).float().numpy()


def _groups(g: int, seed: int) -> list[np.ndarray]:
    """Groups where a scale rule could go wrong: gaussian, heavy-tailed, sparse, on a -7..7 grid (error 0),
    on half steps (ties), one weight, equal weights, tiny (subnormal) and huge magnitudes."""
    rng = np.random.default_rng(seed)
    out = [_bf16(rng.standard_normal(g) * 0.02), _bf16(rng.standard_t(3, g)), _bf16(rng.laplace(size=g) * (rng.random(g) < 0.2)),
           _bf16(rng.integers(-7, 8, g) * 0.0078125), _bf16((rng.integers(-12, 13, g) + 0.5) * 0.25),
           _bf16(np.eye(1, g, 3)[0] * -3.0), np.full(g, -0.75, np.float32), _bf16(rng.standard_normal(g) * 1e-39),
           _bf16(rng.standard_normal(g) * 1e37), _bf16(rng.standard_normal(g) * 10.0 ** rng.uniform(-20, 20))]
    return out


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", GROUPED)
def test_each_group_takes_the_least_error_scale_of_every_bf16_value(method, isa):
    """The packer's scale, at every ISA level, against an oracle that tries all 32640 positive bf16 scales: no
    scale gives less squared error over the levels -7..7, and on a tie the smallest is taken; -8 is never
    written."""
    g = method.group_size
    groups = _groups(g, seed=g)
    x = np.stack(groups).astype(np.float32)
    dst = PackTarget.empty(method, len(groups), g)
    assert pack_cpu(method, [(SourceMatrix("f32", x), 0, g, dst)], isa=isa, num_threads=2) == [0]
    packed, scales = dst.weight.reshape(len(groups), -1), dst.scales.reshape(len(groups))
    assert not np.any((packed & 0xF) == 0) and not np.any((packed >> 4) == 0)  # no -8
    for row, group in enumerate(groups):
        best, smallest = _least_error(group)
        ours = _sse(group, packed[row], scales[row])
        assert ours <= best * (1 + 1e-12), row
        if best > 0:
            assert float((np.uint32(scales[row]) << 16).view(np.float32)) == smallest, row


def _hard_groups(g: int, count: int, seed: int) -> np.ndarray:
    """[count, g] bf16-exact groups, a sixth of each kind: gaussian, student-t 2, clipping-prone (g - 1 nearly
    equal weights and one larger), on a bf16 grid with a few weights off it, half steps (ties), magnitudes from
    2^-92 to 2^101 (both sides of where the SIMD rows leave a group to the reference)."""
    rng = np.random.default_rng(seed)
    k = count // 6
    grid = _bf16(rng.uniform(0.05, 1, (k, 1))) * rng.integers(-8, 9, (k, g)) * np.where(rng.random((k, g)) < 0.1, 1.0078125, 1)
    clip = np.repeat(rng.uniform(0.01, 0.99, (k, 1)), g, axis=1) * np.where(rng.random((k, g)) < 0.2, 1.01, 1)
    clip[:, 0] = 1.0
    parts = [rng.standard_normal((k, g)) * 0.02, rng.standard_t(2, (k, g)), clip, grid,
             (rng.integers(-12, 13, (k, g)) + 0.5) * 0.125,
             rng.standard_normal((k, g)) * 2.0 ** rng.uniform(-92, 101, (k, 1))]
    return _bf16(np.concatenate(parts)).astype(np.float32)


@pytest.mark.parametrize("isa", [i for i in AVAILABLE_ISAS if i != "portable"])
@pytest.mark.parametrize("method", GROUPED)
def test_simd_search_writes_the_event_sweeps_bytes(method, isa):
    """The SIMD rows' search (blocks of candidates, skipped where an error floor shows none can win) gives the
    bytes of the reference's event sweep (the portable row) on thousands of hard groups."""
    g = method.group_size
    x = _hard_groups(g, 6 * 1024 * 32 // g, seed=g).reshape(-1, 8 * g)
    n, k = x.shape
    out = {}
    for level in ("portable", isa):
        dst = PackTarget.empty(method, n, k)
        assert pack_cpu(method, [(SourceMatrix("f32", x), 0, k, dst)], isa=level, num_threads=2) == [0]
        out[level] = dst
    assert np.array_equal(out[isa].scales, out["portable"].scales)
    assert np.array_equal(out[isa].weight, out["portable"].weight)


def test_hand_checked_groups():
    """Values 1.5, 0.5, -0.5 are exact at d = 0.5 (codes 3, 1, -1) and d = 0.25 (6, 2, -2): the smaller scale
    is kept, not bf16(amax / 7) = 0.2148 (which errs). A -7..7 grid group comes back unchanged; an all-zero
    group has scale 0 and codes 0 (nibble 8)."""
    w = torch.zeros(3, 32)
    w[0, :3] = torch.tensor([1.5, 0.5, -0.5])
    w[1] = torch.tensor([(i % 15) - 7 for i in range(32)], dtype=torch.float32) * 0.0625
    packed, scales = quantize_groups(w.to(torch.bfloat16), 32)
    assert scales.float().reshape(-1).tolist() == [0.25, 0.0625, 0.0]
    u = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(3, 32).to(torch.int64) - 8
    assert u[0, :4].tolist() == [6, 2, -2, 0] and u[1].tolist() == [(i % 15) - 7 for i in range(32)]
    assert not u[2].any() and packed[2, 0] == 0x88


@pytest.mark.parametrize("method", GROUPED)
def test_less_error_than_amax_over_7(method):
    """bf16(amax / 7) rounded up is one of the candidates, so no group errs more than with it; over gaussian
    weights the least-error scales give 10-20 % less squared error (measured: docs/FORMAT.md §9)."""
    g = method.group_size
    w = random_bf16(64, 512, seed=4, scale=0.02)
    packed, scales = quantize_groups(w, g)
    x = w.double().reshape(-1, g)
    amax7 = (x.abs().amax(-1) / 7).float()
    d7 = ((amax7.view(torch.int32) + 0xFFFF) & -65536).view(torch.float32).double()[:, None]  # rounded up to bf16
    q7 = torch.where(d7 > 0, x / d7, 0.0).round().clamp(-7, 7)  # random_bf16's row 0 is all zero
    sse7 = ((x - q7 * d7) ** 2).sum(-1)
    deq = dequantize_groups(packed, scales, 64, 512, g).double().reshape(-1, g)
    sse = ((x - deq) ** 2).sum(-1)
    assert torch.all(sse <= sse7 * (1 + 1e-12))
    assert 0.70 < float(sse.sum() / sse7.sum()) < 0.95


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", GROUPED)
def test_cpu_packer_writes_the_reference_bytes(method, isa):
    w = random_bf16(96, 512, seed=7, scale=0.02)
    w[2, 128:256] = 0  # an all-zero group: scale 0, nibbles 8
    w[3, 130] = float("nan")
    w[4, 128:] = torch.from_numpy(np.concatenate(_groups(32, seed=5) + _groups(32, seed=6)[:2])).to(torch.bfloat16)
    src = SourceMatrix("bf16", w.view(torch.int16).numpy().view(np.uint16))
    dst = PackTarget.empty(method, 96, 384)
    bad = pack_cpu(method, [(src, 128, 384, dst)], isa=isa, num_threads=2)
    ref_w, ref_s, ref_bad = pack_reference(w[:, 128:], method)
    assert bad == [ref_bad] == [1]
    assert np.array_equal(dst.weight.reshape(96, -1), ref_w.numpy())
    assert np.array_equal(dst.scales.reshape(96, -1), ref_s.view(torch.int16).numpy().view(np.uint16))
    assert dst.scales.reshape(96, -1)[2, 0] == 0 and np.all(dst.weight.reshape(96, -1)[2, :64] == 0x88)


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
                if (expert, proj) == (0, "gate"):  # the numerics: tests above; here the keys and the layout
                    ref_w, ref_s, _ = pack_reference(ck.reference(layer, expert, proj), RAWINT4_G64)
                    assert np.array_equal(words.view(np.uint8), ref_w.numpy()), (layer, expert, proj)
                    assert np.array_equal(scales, ref_s.view(torch.int16).numpy().view(np.uint16))
                exact = w.dequantize(layer, expert, proj)
                assert torch.equal(decode_int4_group(words, scales, 64, "BF16"), exact.to(torch.bfloat16))
        st.close()


def test_the_output_reads_back_as_a_compressed_tensors_source(tmp_path):
    """The converter reads its own RAWINT4 output as an INT4-group checkpoint (Kimi-K2-Thinking's format):
    converting it again to int8 packs exactly the values the loader dequantizes."""
    from kt_convert.quant.reference import pack_expert_reference

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
    assert main(args + ["rawint4", "--group-size", "128", "--threadpool-count", "4"]) == 2
    assert "256 / 4 = 64 is not a multiple of 128" in capsys.readouterr().err
    assert main(args + ["rawint4", "--group-size", "64", "--threadpool-count", "4"]) == 0


def test_rawint4_packs_on_the_cpu_whatever_the_device(tmp_path, capsys, monkeypatch):
    import kt_convert.convert.pipeline as pipeline

    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")  # as on a GPU host
    report = _convert(ck, tmp_path / "auto", quant_method="rawint4", device="auto")
    assert report.device == "cpu"
    with pytest.raises(Exception, match="packed on the CPU only"):
        _convert(ck, tmp_path / "cuda", quant_method="rawint4", device="cuda")
