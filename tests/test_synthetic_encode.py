"""synthetic.encode: float weights into FP8-block and MXFP4 sources, checked by bytes worked out by hand and
by the reference decoders; requantize_checkpoint gives checkpoints the converter reads as those formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kt_convert.kt_runtime.format.methods import INT8
from kt_convert.quant.decoders import decode_fp8_block
from kt_convert.quant.mxfp4 import decode_mxfp4
from kt_convert.synthetic.encode import bf16_to_float32, encode_fp8_block, encode_mxfp4, requantize_checkpoint


def test_mxfp4_codes_by_hand():
    w = np.zeros((1, 64), np.float32)
    # group 0: amax 6 -> scale 2^(2 - 2) = 1 (byte 127); ties go to the even code
    w[0, :8] = [0.25, 0.75, 5.0, -2.5, 6.0, -0.0, 1.25, -0.1]
    # group 1: amax 0.375 -> scale 2^(-2 - 2) = 1/16 (byte 123): 0.375 * 16 = 6, 0.1 * 16 = 1.6 -> 1.5
    w[0, 32:34] = [0.375, 0.1]
    e = encode_mxfp4(w)
    assert e["scale"].tolist() == [[127, 123]]
    codes = [int(b) >> s & 0xF for b in e["weight"][0] for s in (0, 4)]
    # 0.25 -> 0 (code 0), 0.75 -> 1.0 (2), 5 -> 4 (6), -2.5 -> -2 (8|4), 6 -> 6 (7), -0 -> 0, 1.25 -> 1.0 (2),
    # -0.1 -> -0 is written as +0 (0)
    assert codes[:8] == [0, 2, 6, 12, 7, 0, 2, 0]
    assert codes[32:34] == [7, 3]
    assert e["weight"].shape == (1, 32) and e["weight"].dtype == np.uint8


def test_fp8_block_bytes_by_hand():
    w = np.zeros((130, 4), np.float32)  # two row blocks of 128 (the second partial), one column block
    w[0, 0], w[0, 1] = 896.0, 3.0  # amax 896 -> scale 2; 3 / 2 = 1.5 = 0 0111 100 = 0x3C
    w[129, 2] = -0.5  # amax 0.5 -> scale 0.5/448; -0.5 / scale = -448 = 1 1111 110 = 0xFE
    e = encode_fp8_block(w)
    assert e["scale"].shape == (2, 1) and e["scale"][0, 0] == 2.0
    assert e["scale"][1, 0] == np.float32(np.float32(0.5) / np.float32(448.0))
    assert e["weight"][0, :2].tolist() == [0x7E, 0x3C] and e["weight"][129, 2] == 0xFE  # 448 = 0 1111 110
    zero = encode_fp8_block(np.zeros((4, 4), np.float32))
    assert zero["scale"].tolist() == [[1.0]] and not zero["weight"].any()


@pytest.mark.parametrize("encoding", ["fp8", "mxfp4"])
def test_round_trip_through_the_reference_decoders(encoding):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 384)) * 0.02).astype(np.float32)
    if encoding == "fp8":
        e = encode_fp8_block(w)
        back = decode_fp8_block(e["weight"], e["scale"], (128, 128)).float().numpy()
        scale = np.repeat(np.repeat(e["scale"], 128, 0), 128, 1)[:256, :384]
        # half a step: 2^-4 of the value (3 mantissa bits), 2^-10 x scale among the subnormals; bf16 rounding
        bound = np.maximum(np.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) + np.abs(w) * 2.0 ** -8
    else:
        e = encode_mxfp4(w)
        back = decode_mxfp4(e["weight"], e["scale"]).float().numpy()
        scale = np.repeat(np.ldexp(1.0, e["scale"].astype(np.int32) - 127), 32, 1)
        # half a step of E2M1 x scale: 0.25 below 2, 0.5 up to 4, 1 up to 6; above 6 (amax / scale is in
        # [4, 8) by the OCP scale rule) the value is clamped to 6
        y = np.abs(w) / scale
        bound = np.where(y < 2, 0.25, np.where(y < 4, 0.5, np.maximum(1.0, y - 6))) * scale
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < (0.03 if encoding == "fp8" else 0.13), rel


def test_values_a_format_holds_give_back_their_bytes():
    rng = np.random.default_rng(4)
    # FP8: random E4M3 codes (no NaN) times 2^-10, each 128 x 128 block holding 448 once: scale 2^-10 exactly
    codes = rng.integers(0, 256, size=(256, 256), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38
    codes[::128, ::128] = 0x7E
    w = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy() * np.float32(2.0 ** -10)
    e = encode_fp8_block(w)
    assert np.array_equal(e["weight"], codes) and np.all(e["scale"] == np.float32(2.0 ** -10))
    # MXFP4: random E2M1 codes (no -0) times 2^s, each group of 32 starting with 6 (code 7): scale 2^s exactly
    nib = rng.integers(0, 16, size=(4, 128), dtype=np.uint8)
    nib[nib == 8] = 0
    nib[:, ::32] = 7
    exps = rng.integers(-10, 3, size=(4, 4))
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    w = decode_mxfp4(packed, (exps + 127).astype(np.uint8)).float().numpy()
    e = encode_mxfp4(w)
    assert np.array_equal(e["weight"], packed) and np.array_equal(e["scale"], exps + 127)


def test_requantized_checkpoints_convert_as_their_format(tmp_path):
    from kt_convert.convert.plan import build_plan
    from kt_convert.convert.source import open_checkpoint
    from kt_convert.synthetic import make_family_checkpoint

    ck = make_family_checkpoint(tmp_path / "bf16", "qwen3_moe_bf16", hidden_size=128, intermediate_size=128,
                                num_experts=2, num_layers=2, mtp_layers=0, num_shards=1)
    for encoding, input_type in (("fp8_block", "fp8"), ("mxfp4", "fp4")):
        enc, dec = tmp_path / encoding / "enc", tmp_path / encoding / "dec"
        assert requantize_checkpoint(ck.path, enc, dec, encoding) == 2 * 2 * 3
        src = open_checkpoint(str(enc))
        try:
            plan = build_plan(src, INT8, 1, "merged")
        finally:
            src.close()
        assert plan.input_type == input_type
        cfg = json.loads((enc / "config.json").read_text())
        assert ("quantization_config" in cfg) == (encoding == "fp8_block")
        from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile

        e, d = SafetensorsFile(enc / "model.safetensors"), SafetensorsFile(dec / "model.safetensors")
        key = "model.layers.1.mlp.experts.0.down_proj.weight"
        want = (decode_fp8_block(e.read(key), e.read(key + "_scale_inv"), (128, 128)) if encoding == "fp8_block"
                else decode_mxfp4(e.read(key), e.read(key + "_scale")))
        assert torch.equal(torch.from_numpy(bf16_to_float32(d.read(key))), want.float())
        router = "model.layers.1.mlp.gate.weight"
        assert np.array_equal(d.read(router), e.read(router))
        e.close(), d.close()
    with pytest.raises(FileExistsError):
        requantize_checkpoint(ck.path, tmp_path / "mxfp4" / "enc", tmp_path / "x", "mxfp4")
    with pytest.raises(ValueError, match="unknown encoding"):
        requantize_checkpoint(ck.path, tmp_path / "a", tmp_path / "b", "nf4")
