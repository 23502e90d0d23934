"""`verify`: integrity and error against the source for every family's synthetic checkpoints, its numbers
against an independent numpy float64 computation (to 1e-6 relative: verify rounds p - r to float32),
damaged outputs caught, thresholds, JSON and HTML."""
import json
import math

import numpy as np
import pytest

from kt_convert import kt_runtime
from kt_convert.convert.cli import main
from kt_convert.convert.errors import UserError
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.convert.verify import html_report, verify
from kt_convert.kt_runtime.format.byte_orders import ct_key
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from kt_convert.synthetic import V4_FLASH_VARIANT, VARIANTS, make_family_checkpoint

CLAMPED = {"gpt_oss", "deepseek_v4", "deepseek_v41", "glm5"}


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


def test_another_familys_source_is_not_blamed_on_layers(converted, tmp_path, capsys):
    """A source of another family whose MoE layers differ (V3: layer 0 dense) is named as not the output's
    source, with its layers, never as a --layers problem the user did not pass."""
    ck, out = converted
    v3 = make_family_checkpoint(tmp_path / "v3", "deepseek_v3_bf16", hidden_size=ck.hidden_size,
                                intermediate_size=ck.intermediate_size, num_experts=ck.num_experts)
    assert main(["verify", str(out), "-s", str(v3.path)]) == 2
    err = capsys.readouterr().err
    assert "--layers" not in err, err
    assert (f"--source {v3.path} (deepseek_v3) has no MoE layer 0 (its MoE layers: 1), which {out} holds: not its "
            f"source ({out} was converted from a qwen3_moe checkpoint)") in err, err


def test_sizes_in_adaptive_units_and_the_threshold_list_printed_once(converted, capsys):
    ck, out = converted
    assert main(["verify", str(out), "-s", str(ck.path), "--max-rel-error", "0.01"]) == 2
    captured = capsys.readouterr()
    assert "0.00 GB" not in captured.out + captured.err
    packed = sum(f.stat().st_size for f in out.glob("model-*.safetensors"))
    assert packed < 10**7 and f"2 files, {packed / 1e6:.3g} MB, digests checked" in captured.out, captured.out
    assert " MB of source in " in captured.out
    first = "layer 0 expert" if "layer 0 expert" in captured.err else "layer 1 expert"
    assert captured.err.count("tensors exceed --max-rel-error 0.01") == 1
    named = captured.err.split("error:")[1].split(",")[0].split(" (")[0].strip()  # the worst tensor, named once
    assert first in captured.err and (captured.out + captured.err).count(named + " (") == 1


def _png_pixels(path):
    """RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium writes), as uint8 [h, w, channels]."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.setdefault(kind, []).append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and color in (2, 6) and interlace == 0
    ch = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    rows, prev, stride = [], np.zeros(w * ch, dtype=np.int32), w * ch
    for y in range(h):
        f, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        out = np.zeros(stride, dtype=np.int32)
        for i in range(stride):  # PNG's five filters (None, Sub, Up, Average, Paeth)
            a = out[i - ch] if i >= ch else 0
            b, c = prev[i], (prev[i - ch] if i >= ch else 0)
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[i] = (line[i] + pred) & 0xFF
        rows.append(out)
        prev = out
    return np.array(rows, dtype=np.uint8).reshape(h, w, ch)


def test_html_legend_fits_its_picture(converted):
    """The legend (11 steps, 16 px each) lies inside the SVG's height for any number of layers."""
    import re

    ck, out = converted
    report = verify(out, str(ck.path), layers=[ck.layers[0]])  # one layer: the map is shorter than the legend
    page = html_report(report)
    height = int(re.search(r'<svg [^>]*height="(\d+)"', page)[1])
    bottoms = [float(y) + float(hh) for y, hh in re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="20" height="([\d.]+)"',
                                                              page)]
    assert len(bottoms) == 11 and max(bottoms) < height
    caption = float(re.search(r'<text x="[\d.]+" y="([\d.]+)">layer \(rows\)', page)[1])
    assert max(bottoms) < caption <= height


def test_html_page_in_headless_chromium_shows_the_whole_legend(converted, tmp_path):
    """Rendered by a real browser: every legend step's colour is on the screenshot as a whole swatch."""
    import re
    import shutil
    import subprocess

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    ck, out = converted
    page = html_report(verify(out, str(ck.path), layers=[ck.layers[0]]))
    (tmp_path / "r.html").write_text(page)
    png = tmp_path / "r.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-color-profile=srgb", "--force-device-scale-factor=1", "--window-size=900,700",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
                           (tmp_path / "r.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    pixels = _png_pixels(png)[..., :3].reshape(-1, 3)
    swatches = re.findall(r'width="20" height="14" fill="rgb\((\d+),(\d+),(\d+)\)"', page)
    assert len(swatches) == 11
    for rgb in swatches:  # a 20 x 14 swatch: at least 200 pixels of its exact colour (the map's cells add more)
        assert int((pixels == np.array(rgb, dtype=np.uint8)).all(axis=1).sum()) >= 200, rgb


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

    from kt_convert.convert.verify import CHUNK, ROW, tensor_sums

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
