"""The exact path into RAWINT4: a compressed-tensors INT4 source (Kimi-K2 style) whose groups hold whole output
groups keeps its codes and bf16 scales bit for bit (re-keyed, re-laid-out), verify --source reports zero error,
and the pre-flight and verify say what is exact, what is lossy and where the level -8 is (kt computes it
wrongly in some builds). Also what the first lines say about a group-wise output (group size, NUMA split,
--kt-threadpool-count)."""
import json

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from kt_convert.convert.cli import main
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.convert.quant_notes import minus8_count
from kt_convert.convert.verify import verify
from kt_convert.kt_runtime.format.byte_orders import ct_key
from kt_convert.kt_runtime.format.methods import RAWINT4_G32, RAWINT4_G64
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.decoders import encode_int4_words
from kt_convert.quant.reference import pack_reference
from kt_convert.synthetic.families import make_family_checkpoint


def _convert(ck, out, **kw):
    return convert(ConvertOptions(input_path=str(ck.path), output=out, progress=False, **kw))


def _shard_tensors(out, layer, expert, proj):
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    st = SafetensorsFile(out / index[ct_key(layer, proj, expert, "weight_packed")])
    try:
        return (st.array(ct_key(layer, proj, expert, "weight_packed")).copy(),
                st.array(ct_key(layer, proj, expert, "weight_scale")).copy())
    finally:
        st.close()


def _independent_minus8(words: np.ndarray) -> int:
    w = words.astype(np.int64) & 0xFFFFFFFF
    return int(sum(np.count_nonzero(((w >> (4 * j)) & 0xF) == 0) for j in range(8)))


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("k2") / "ck", "kimi_k2_int4", num_experts=3)


def test_kimi_k2_int4_is_carried_bit_for_bit_and_verify_reports_zero(k2, tmp_path, capsys):
    report = _convert(k2, tmp_path / "out", quant_method="rawint4")  # the default group size: 32, the source's
    err = capsys.readouterr().err
    assert report.method == "rawint4-g32"
    minus8 = 0
    for layer in k2.layers:
        for expert in range(k2.num_experts):
            for proj in ("gate", "up", "down"):
                words, scales = _shard_tensors(tmp_path / "out", layer, expert, proj)
                enc = k2.encoded[(layer, expert, proj)]
                assert np.array_equal(words, enc["packed"]) and np.array_equal(scales, enc["scale"]), (layer, expert, proj)
                minus8 += _independent_minus8(enc["packed"])
    assert minus8 > 0  # the generator draws every stored nibble 0..15, -8 included
    assert "pre-flight: exact: the source's INT4 codes and bf16 scales (groups of 32) are carried over" in err
    first = k2.encoded[(k2.layers[0], 0, "gate")]["packed"]
    assert (f"uses the level -8 in {_independent_minus8(first)} of {first.size * 8} codes" in err
            and "95009ea" in err and "0.7.2" in err)
    result = verify(tmp_path / "out", str(k2.path), threads=2)
    assert result.model.rel_rms == 0 and result.model.max_abs == 0 and all(t.rel_rms == 0 for t in result.tensors)
    assert (result.minus8_codes, result.codes) == (minus8, sum(e["packed"].size * 8 for e in k2.encoded.values()))
    assert any("uses the level -8" in line for line in result.notes())
    code = main(["verify", str(tmp_path / "out"), "--source", str(k2.path), "--json", str(tmp_path / "v.json")])
    assert code == 0
    assert "model: rel RMS 0.000%" in capsys.readouterr().out
    assert json.loads((tmp_path / "v.json").read_text())["minus8_codes"] == minus8


def test_a_coarser_source_group_is_carried_with_its_scale_repeated(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "kimi_k2_int4", num_experts=2, num_layers=2, group=128)
    _convert(ck, tmp_path / "out", quant_method="rawint4", group_size=32)
    assert "carried over into RAWINT4 groups of 32" in capsys.readouterr().err
    layer = ck.layers[0]
    for proj in ("gate", "down"):
        words, scales = _shard_tensors(tmp_path / "out", layer, 1, proj)
        enc = ck.encoded[(layer, 1, proj)]
        assert np.array_equal(words, enc["packed"]) and np.array_equal(scales, np.repeat(enc["scale"], 4, axis=1))
    assert verify(tmp_path / "out", str(ck.path)).model.max_abs == 0


def test_lossy_conversions_of_an_int4_source_say_so(k2, tmp_path, capsys):
    _convert(k2, tmp_path / "g64", quant_method="rawint4", group_size=64)
    err = capsys.readouterr().err
    assert ("pre-flight: lossy: the source is already quantized (compressed-tensors INT4, groups of 32); RAWINT4 "
            "group 64 quantizes it again" in err and "exact instead: --quant-method rawint4 --group-size 32" in err)
    assert "computes group 32 only" in err and "pre-flight: exact" not in err  # kt computes groups of 64 wrongly
    assert 0.01 < verify(tmp_path / "g64", str(k2.path)).model.rel_rms < 0.2
    _convert(k2, tmp_path / "i4", quant_method="int4")
    err = capsys.readouterr().err
    assert "lossy: the source is already quantized" in err and "AMXINT4 quantizes it again" in err
    bf16 = make_family_checkpoint(tmp_path / "bf", "qwen3_moe_bf16", num_layers=1)
    _convert(bf16, tmp_path / "bfo", quant_method="rawint4")
    err = capsys.readouterr().err
    assert "pre-flight: lossy" not in err and "pre-flight: exact" not in err and "level -8" not in err  # not quantized before


def _int4_source(n: int, k: int, group: int, seed: int):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 16, size=(n, k))
    scales = (rng.uniform(0.001, 0.01, size=(n, k // group)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return u, encode_int4_words(u), scales


def test_the_packer_copies_codes_and_decodes_only_unusable_scales():
    """Carried rows are the source's bytes; a group whose scale is NaN or too large to decode every code finitely
    (|scale| >= 2^124) is decoded and quantized as any other source would be (non-finite values counted, 0)."""
    u, words, scales = _int4_source(8, 256, 64, seed=3)
    scales[2, 1] = 0x7FC0  # NaN
    scales[5, 3] = 0x7E00  # 2^125: 8 * 2^125 overflows bf16
    scales[6, 0] = 0x0001  # subnormal: carried as it is
    src = SourceMatrix("int4_group", words, scales, (1, 64))
    dst = PackTarget.empty(RAWINT4_G32, 8, 256)
    bad = pack_cpu(RAWINT4_G32, [(src, 0, 256, dst)], num_threads=2)
    got_w, got_s = dst.weight.reshape(8, -1), dst.scales.reshape(8, -1)
    repeated = np.repeat(scales, 2, axis=1)
    for row in range(8):
        for g in range(8):
            cols = slice(16 * g, 16 * g + 16)
            if (row, g // 2) in ((2, 1), (5, 3)):
                continue
            assert np.array_equal(got_w[row, cols], words.view(np.uint8)[row, cols]) and got_s[row, g] == repeated[row, g]
    # the NaN group: 64 non-finite values, packed as zeros with scale 0
    assert not np.any(got_s[2, 2:4]) and np.all(got_w[2, 32:64] == 0x88)
    # the huge group: exactly what the quantizer makes of its decoded values (non-finite ones zeroed)
    decoded = torch.from_numpy(((u[5:6, 192:256] - 8) * np.float32(2.0 ** 125)).astype(np.float32)).to(torch.bfloat16)
    ref_w, ref_s, ref_bad = pack_reference(decoded, RAWINT4_G32)
    assert np.array_equal(got_w[5, 96:128], ref_w.numpy()[0])
    assert np.array_equal(got_s[5, 6:8], ref_s.view(torch.int16).numpy().view(np.uint16)[0])
    assert bad == [64 + ref_bad] and ref_bad > 0


def test_the_packer_refuses_to_carry_what_is_not_on_the_grid():
    _, words, scales = _int4_source(4, 128, 32, seed=1)
    job = lambda sc, method, block: ("int4_group", words, sc, 0, 128, np.empty(4 * 64, np.uint8),  # noqa: E731
                                     np.empty(4 * 128 // method.group_size, np.uint16), (0, 1, block), True)
    f32 = (scales.astype(np.uint32) << 16).view(np.float32)
    with pytest.raises(ValueError, match="carried over only"):  # float32 scales: no bf16 grid to keep
        kt_kernels.pack(RAWINT4_G32.name, [job(f32, RAWINT4_G32, 32)])
    with pytest.raises(ValueError, match="carried over only"):  # an output group of 64 spans two source scales
        kt_kernels.pack(RAWINT4_G64.name, [job(scales, RAWINT4_G64, 32)])
    f32_src = SourceMatrix("int4_group", words, f32, (1, 32))
    assert not f32_src.carries_codes(RAWINT4_G32) and SourceMatrix("int4_group", words, scales, (1, 32)).carries_codes(RAWINT4_G32)
    assert minus8_count(words) == _independent_minus8(words)


def test_first_lines_of_a_group_wise_output(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1)
    args = ["-i", str(ck.path), "--no-progress", "--quant-method", "rawint4", "--device", "cpu"]
    assert main(args + ["-o", str(tmp_path / "a"), "--threadpool-count", "2"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[2] == (f"output: RAWINT4 group size 32 (the default: every kt-kernel RAWINT4 kernel computes it), one "
                        f"safetensors shard per layer, packed on the cpu -> {tmp_path / 'a'}")
    assert lines[3] == ("output: no NUMA split: kt splits the whole matrices per pool when it loads them, so these "
                        "files serve any pool count; serve with --kt-threadpool-count 2 (checked; 1, 4, 8 also work)")
    assert main(args + ["-o", str(tmp_path / "b"), "--group-size", "128", "--threadpool-count", "1"]) == 0
    err = capsys.readouterr().err
    assert "output: RAWINT4 group size 128, one safetensors shard" in err
    assert "serve with --kt-threadpool-count 1 (checked; 2 also works)" in err
    assert "computes group 32 only: with groups of 128 its MoE output is NaN or it crashes" in err
    # the same files whatever --threadpool-count they were checked for
    assert main(args + ["-o", str(tmp_path / "c"), "--threadpool-count", "4"]) == 0
    capsys.readouterr()
    for name in ("model-00001-of-00001.safetensors",):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
