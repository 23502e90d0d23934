"""`verify`: integrity and error against the source for every family's synthetic checkpoints, its numbers
against an independent numpy float64 computation (to 1e-6 relative: verify rounds p - r to float32),
damaged outputs caught, thresholds, JSON and HTML."""
import json
import math

import numpy as np
import pytest

import kt_runtime
from convert.cli import main
from convert.errors import UserError
from convert.pipeline import ConvertOptions, convert
from convert.verify import html_report, verify
from kt_runtime.format.layout import ct_key
from kt_runtime.format.safetensors_file import SafetensorsFile
from synthetic import V4_FLASH_VARIANT, VARIANTS, make_family_checkpoint

CLAMPED = {"gpt_oss", "deepseek_v4"}


def _independent(packed: np.ndarray, ref: np.ndarray) -> dict:
    p, r = packed.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    e = p - r
    return {"rel_rms": math.sqrt((e @ e) / (r @ r)), "max_abs": float(np.abs(e).max()),
            "cosine": float(p @ r / math.sqrt((p @ p) * (r @ r))), "snr_db": 10 * math.log10((r @ r) / (e @ e))}


def _close(got: dict, want: dict):
    for key in ("rel_rms", "max_abs", "cosine", "snr_db"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key


def _source_values(ck, layer, expert, proj) -> np.ndarray:
    """What verify compares with: the generator's own decode of its encoding; for an INT4 source the exact
    values (u - 8) * scale, computed here from the stored words."""
    if ck.variant.encoding != "int4_group":
        return ck.reference(layer, expert, proj).float().numpy()
    enc = ck.encoded[(layer, expert, proj)]
    words = enc["packed"].astype(np.int64) & 0xFFFFFFFF
    u = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=-1).reshape(words.shape[0], -1)
    s = (enc["scale"].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return (u - 8) * np.repeat(s, ck.group, axis=1)


def _convert(ck, out, **kw):
    return convert(ConvertOptions(input_path=str(ck.path), output=out, progress=False, **kw))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_is_verified_against_an_independent_computation(tmp_path, variant):
    ck = make_family_checkpoint(tmp_path / "ck", variant, num_experts=3)
    method = "int8" if VARIANTS[variant].family in CLAMPED else "rawint4"
    _convert(ck, tmp_path / "out", quant_method=method, threadpool_count=2)
    report = verify(tmp_path / "out", str(ck.path), threads=2)
    assert report.family == ck.variant.family and report.input_type == ck.input_type
    assert sorted(report.by_layer) == ck.layers and len(report.tensors) == len(ck.layers) * 3 * 3
    w = kt_runtime.load_experts(tmp_path / "out")
    by_name = {(t.layer, t.expert, t.proj): t for t in report.tensors}
    layer = ck.layers[-1]
    for expert, proj in ((0, "gate"), (2, "down")):
        ref = _source_values(ck, layer, expert, proj)
        if method == "rawint4":  # the packed side decoded here from the file's bytes, not through the loader
            st = SafetensorsFile(next(p for p in (tmp_path / "out").glob("*.safetensors")
                                      if ct_key(layer, proj, expert, "weight_packed") in SafetensorsFile(p)))
            b = st.array(ct_key(layer, proj, expert, "weight_packed")).view(np.uint8)
            u = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1).astype(np.float64) - 8
            s = (st.array(ct_key(layer, proj, expert, "weight_scale")).astype(np.uint32) << 16).view(np.float32)
            packed = u * np.repeat(s.astype(np.float64), u.shape[1] // s.shape[1], axis=1)
        else:
            packed = w.dequantize(layer, expert, proj).numpy()
        want = _independent(packed, ref)
        t = by_name[(layer, expert, proj)]
        _close({"rel_rms": t.rel_rms, "max_abs": t.max_abs, "cosine": t.cosine, "snr_db": t.snr_db}, want)
        if ck.variant.encoding == "int4_group":  # codes and scales carried over (RAWINT4 group 32)
            assert t.rel_rms == 0 and t.max_abs == 0
        else:
            assert 0.001 < t.rel_rms < 0.2
    # the layer x projection summary is the norm over the concatenated tensors of that layer and projection
    refs = [_source_values(ck, layer, e, "up") for e in range(3)]
    packs = [w.dequantize(layer, e, "up").numpy() for e in range(3)]
    _close(report.by_layer[layer]["up"].measures(), _independent(np.concatenate(packs), np.concatenate(refs)))


def test_v4_flash_checkpoint(tmp_path, tiny_checkpoint):
    _convert(tiny_checkpoint, tmp_path / "out", quant_method="int4", threadpool_count=2)
    report = verify(tmp_path / "out", str(tiny_checkpoint.path))
    assert report.family == "deepseek_v4" and report.input_type == "fp4" and 0.01 < report.model.rel_rms < 0.3
    assert V4_FLASH_VARIANT  # the V4-Flash generator is the V4 family's MXFP4 variant


@pytest.fixture
def converted(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16")
    _convert(ck, tmp_path / "out", quant_method="int4", threadpool_count=2)
    return ck, tmp_path / "out"


def test_cli_table_json_html_and_threshold(converted, tmp_path, capsys):
    ck, out = converted
    assert main(["verify", str(out), "--source", str(ck.path), "--json", str(tmp_path / "r.json"),
                 "--html", str(tmp_path / "r.html"), "--max-rel-error", "0.5"]) == 0
    table = capsys.readouterr().out  # the table goes to standard output (standard error with --json -)
    assert "gate rel.rms" in table and "every tensor within" in table
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["method"] == "int4" and d["integrity"]["digests"] and len(d["tensors"]) == 2 * 4 * 3
    assert [x["layer"] for x in d["by_layer"]] == ck.layers and d["exceeding"] == []
    worst = max(d["tensors"], key=lambda t: t["rel_rms"])
    assert d["worst"][0] == worst
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and html.count("<rect") >= 2 * 3
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    # a threshold below the error: exit 2, naming the worst tensor first
    assert main(["verify", str(out), "-s", str(ck.path), "--max-rel-error", "0.01"]) == 2
    err = capsys.readouterr().err
    w = d["worst"][0]
    assert f"layer {w['layer']} expert {w['expert']} {w['proj']}" in err.split("error:")[1].split(",")[0]
    assert main(["verify", str(out), "-s", str(ck.path), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["rel_rms"] == d["model"]["rel_rms"]


def test_integrity_only_and_damage(converted, capsys):
    ck, out = converted
    assert main(["verify", str(out)]) == 0
    assert "no --source" in capsys.readouterr().out
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40  # one bit of a packed scale
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "sha256" in err and "layer" in err
    shard.write_bytes(bytes(data[:-10]))  # truncated
    assert main(["verify", str(out), "--no-digests"]) == 2
    assert "bytes" in capsys.readouterr().err


def test_source_mismatch_and_bad_arguments(converted, tmp_path, capsys):
    ck, out = converted
    other = make_family_checkpoint(tmp_path / "other", "qwen3_moe_bf16", intermediate_size=384)
    assert main(["verify", str(out), "-s", str(other.path)]) == 2
    assert "not its source" in capsys.readouterr().err
    assert main(["verify", str(out), "--html", str(tmp_path / "x.html")]) == 2
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(UserError, match="are not in"):
        verify(out, str(ck.path), layers=[7])


def test_same_weights_give_zero_error(tmp_path):
    """A BF16 checkpoint of values already on the int8 grid of each row verifies with no error: the output of
    int8 re-verified against a checkpoint made of its own dequantized weights."""
    ck = make_family_checkpoint(tmp_path / "ck", "kimi_k2_fp8", num_experts=2)
    _convert(ck, tmp_path / "raw", quant_method="rawint4", group_size=32)
    _convert(type("C", (), {"path": tmp_path / "raw"}), tmp_path / "again", quant_method="rawint4", group_size=32)
    report = verify(tmp_path / "again", str(tmp_path / "raw"))
    # the INT4-group source decodes to bf16(q d); requantizing finds the same grid for most groups
    assert report.model.rel_rms < 0.02 and report.model.cosine > 0.9998
    assert html_report(report).count("<title>") >= 3


def test_tensor_sums_against_float64_across_chunks_and_a_partial_row():
    """tensor_sums (float32 row sums into float64 totals) against exact float64 sums, on a size that spans
    chunks and ends in a partial row, with a bf16 torch reference; identical inputs give exactly 0 error."""
    import torch

    from convert.verify import CHUNK, ROW, tensor_sums

    size = 2 * CHUNK + 5 * ROW + 37
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(size, generator=g).to(torch.bfloat16)
    packed = ref.to(torch.float32) + 0.05 * torch.randn(size, generator=g)
    p, r = packed.double().numpy(), ref.double().numpy()
    e = (packed - ref.to(torch.float32)).double().numpy()  # verify's e: p - r rounded to float32
    s = tensor_sums(packed, ref)
    assert s.count == size
    for got, want in ((s.err2, e @ e), (s.ref2, r @ r), (s.packed2, p @ p), (s.dot, p @ r)):
        assert got == pytest.approx(want, rel=1e-7)
    assert s.max_abs == float(np.abs(e).max())
    same = tensor_sums(packed, packed.numpy())
    assert same.err2 == 0 and same.max_abs == 0 and same.rel_rms == 0
    assert same.packed2 == pytest.approx(p @ p, rel=1e-7) and same.cosine == pytest.approx(1, abs=1e-12)
