"""Bad inputs a user can hand the converter: each ends with exit code 2, one message naming the
file/tensor and what to do, no traceback, and nothing in the output that looks complete."""
import json
import shutil
import struct

import numpy as np
import pytest

from kt_convert import kt_runtime
from kt_convert.convert.cli import main
from helpers.checkpoints import assert_nothing_complete, drop, rewrite, set_config
from helpers.outputs import read_json
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.kt_runtime.format.names import INDEX_FILE, MANIFEST_FILE

W1 = "layers.1.ffn.experts.2.w1"  # gate projection of layer 1, expert 2 (official key style)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """2 layers, 4 experts, H=384, I=512, 2 shards (expert keys of layer 1 live in the second)."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("bad") / "base", "v4-flash-tiny", num_experts=4,
                                    num_shards=2).path


def shard_of(ck, key):
    return read_json(ck / INDEX_FILE)["weight_map"][key]


def edit_tensor(ck, key, fn):
    rewrite(ck, lambda name, t: {k: (fn(*v) if k == key else v) for k, v in t.items()})


def set_header(path, fn):
    """Rewrite the JSON header of a safetensors file in place (same data section)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = fn(json.loads(data[8:8 + n]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


# --- the cases: (id, mutate(ck) -> extra CLI args or None, words the message must contain) ---

def m_missing_config(ck):
    (ck / "config.json").unlink()


def m_config_not_json(ck):
    (ck / "config.json").write_text('{"model_type": "deepseek_v4", ')


def m_config_not_object(ck):
    (ck / "config.json").write_text("[1, 2]")


def m_config_unreadable(ck):
    (ck / "config.json").unlink()
    (ck / "config.json").mkdir()


def m_config_no_hidden(ck):
    cfg = read_json(ck / "config.json")
    del cfg["hidden_size"]
    (ck / "config.json").write_text(json.dumps(cfg))


def m_unknown_family(ck):
    set_config(ck, model_type="llama", architectures=["LlamaForCausalLM"])
    drop(ck, lambda k: ".ffn.experts." in k or k.startswith("mtp."))


def m_truncated(ck):
    p = ck / shard_of(ck, W1 + ".weight")
    p.write_bytes(p.read_bytes()[:-1000])


def m_corrupt_header_json(ck):
    p = ck / shard_of(ck, W1 + ".weight")
    data = bytearray(p.read_bytes())
    data[9] = ord("X")  # '{X"...': not JSON
    p.write_bytes(bytes(data))


def m_offsets_outside(ck):
    p = ck / shard_of(ck, W1 + ".weight")

    def fn(h):
        b, e = h[W1 + ".weight"]["data_offsets"]
        h[W1 + ".weight"]["data_offsets"] = [b + 10**9, e + 10**9]
        return h
    set_header(p, fn)


def m_header_length_garbage(ck):
    p = ck / shard_of(ck, W1 + ".weight")
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**40) + data[8:])


def m_wrong_dtype(ck):
    edit_tensor(ck, W1 + ".weight", lambda dt, shape, data: ("F16", (shape[0], shape[1] // 2), data))


def m_wrong_weight_shape(ck):
    edit_tensor(ck, W1 + ".weight", lambda dt, shape, data: (dt, (shape[0] // 2, shape[1]), data[:len(data) // 2]))


def m_wrong_scale_shape(ck):
    edit_tensor(ck, W1 + ".scale", lambda dt, shape, data: (dt, (shape[0], shape[1] * 2), data * 2))


def m_wrong_scale_dtype(ck):
    edit_tensor(ck, W1 + ".scale", lambda dt, shape, data: ("I8", shape, data))


def m_missing_expert(ck):
    drop(ck, lambda k: k.startswith("layers.1.ffn.experts.3."))


def m_missing_projection(ck):
    drop(ck, lambda k: k.startswith("layers.1.ffn.experts.2.w2."))


def m_missing_scale(ck):
    drop(ck, lambda k: k == W1 + ".scale")


def m_extra_expert(ck):
    set_config(ck, n_routed_experts=3)


def m_dims_disagree(ck):
    set_config(ck, hidden_size=256)


def m_key_in_two_shards(ck):
    key = W1 + ".weight"
    home = shard_of(ck, key)
    copy = {}

    def grab(name, t):
        if name == home:
            copy[key] = t[key]
        return t
    rewrite(ck, grab)
    rewrite(ck, lambda name, t: {**t, **copy} if name != home else t)


def m_index_names_missing_file(ck):
    (ck / shard_of(ck, W1 + ".weight")).unlink()


def m_index_not_json(ck):
    (ck / INDEX_FILE).write_text("{not json")


def m_nonfinite(ck):
    # E8M0 0xFF is NaN (decoded as non-finite): one group of 32 weights of one row
    edit_tensor(ck, W1 + ".scale", lambda dt, shape, data: (dt, shape, b"\xff" + data[1:]))


def m_unaligned(ck):
    return ["--threadpool-count", "3"]


def m_bad_threadpool(ck):
    return ["--threadpool-count", "0"]


CASES = [
    ("missing config.json", m_missing_config, ["config.json", "missing"]),
    ("config.json not JSON", m_config_not_json, ["config.json", "not valid JSON", "re-download"]),
    ("config.json not an object", m_config_not_object, ["config.json", "JSON object"]),
    ("config.json unreadable", m_config_unreadable, ["config.json", "is a directory", "regular files", "re-download"]),
    ("config.json without hidden_size", m_config_no_hidden, ["config.json", "hidden_size", "add it"]),
    ("unknown family", m_unknown_family, ["'llama'", "not a supported", "deepseek_v4"]),
    ("truncated shard", m_truncated, ["model-0000", "truncated", "re-download"]),
    ("corrupt header JSON", m_corrupt_header_json, ["model-0000", "not valid JSON", "re-download"]),
    ("offsets outside the file", m_offsets_outside, ["model-0000", W1 + ".weight", "re-download"]),
    ("garbage header length", m_header_length_garbage, ["model-0000", "header length", "re-download"]),
    ("wrong weight dtype", m_wrong_dtype, [W1 + ".weight", "F16", "supported"]),
    ("wrong weight shape", m_wrong_weight_shape, [W1 + ".weight", "shape", "config.json dims"]),
    ("wrong scale shape", m_wrong_scale_shape, [W1 + ".scale", "shape", "[512, 12]"]),
    ("wrong scale dtype", m_wrong_scale_dtype, [W1 + ".scale", "I8", "F8_E8M0"]),
    ("missing expert", m_missing_expert, ["layer 1", "expert 3", "incomplete"]),
    ("missing projection", m_missing_projection, ["layer 1 expert 2", "down", "incomplete"]),
    ("missing scale", m_missing_scale, [W1 + ".weight", "no scale", "incomplete"]),
    ("more experts than config", m_extra_expert, ["layer 0 has expert 3", "3 experts"]),
    ("config dims disagree with tensors", m_dims_disagree, ["shape", "config.json dims do not match"]),
    ("key in two shards", m_key_in_two_shards, [W1 + ".weight", "two files", "remove the stray copy"]),
    ("index names a missing file", m_index_names_missing_file, [INDEX_FILE, "missing", "fetch the missing file"]),
    ("index not JSON", m_index_not_json, [INDEX_FILE, "not valid JSON"]),
    ("NaN/Inf weights", m_nonfinite, [W1 + ".weight", "NaN/Inf", "--allow-nonfinite", "re-download"]),
    ("unaligned dimensions", m_unaligned, ["not divisible by --threadpool-count 3", "threadpool counts that work"]),
    ("threadpool count 0", m_bad_threadpool, ["--threadpool-count", "at least 1"]),
]


@pytest.mark.parametrize("mutate,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_clear_message(base_checkpoint, tmp_path, capsys, mutate, needles):
    ck = tmp_path / "ck"
    shutil.copytree(base_checkpoint, ck)
    extra = mutate(ck) or []
    out = tmp_path / "out"
    code = main(["-i", str(ck), "-o", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    first = max(i for i, line in enumerate(lines) if line.startswith(("error: ", "Error: ")))
    assert all(line.startswith("  ") for line in lines[first + 1:]), err  # the error, then its indented table
    for needle in needles:
        assert needle in err, (needle, err)
    assert_nothing_complete(out)


def test_missing_input_path(tmp_path, capsys):
    assert main(["-i", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "nope") in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_directory_without_safetensors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no .safetensors files" in capsys.readouterr().err


def test_output_inside_the_input_is_refused(base_checkpoint, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(base_checkpoint, ck)
    before = sorted(p.name for p in ck.iterdir())
    for out in (ck / "kt", ck, ck / "a" / "b"):
        assert main(["-i", str(ck), "-o", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "inside the input" in err and "outside" in err, err
    assert sorted(p.name for p in ck.iterdir()) == before  # nothing created in the input


def test_output_is_a_file(base_checkpoint, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(["-i", str(base_checkpoint), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_nonfinite_allowed_goes_on_and_reports(base_checkpoint, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(base_checkpoint, ck)
    m_nonfinite(ck)
    out = tmp_path / "out"
    code = main(["-i", str(ck), "-o", str(out), "--no-progress", "--allow-nonfinite", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    listing = ("warning: 32 NaN/Inf source values packed as 0 (--allow-nonfinite) in 1 tensor; kt_manifest.json "
               f"keeps the list:\n  {W1}.weight: 32\n")
    assert listing in err, err
    report = read_json(tmp_path / "r.json")
    assert report["nonfinite"] == {W1 + ".weight": 32}
    completed = read_json(out / "kt_manifest.json")["completed"]
    assert completed["1"]["nonfinite"] == {W1 + ".weight": 32} and "nonfinite" not in completed["0"]
    # a re-run converts nothing and still says what the output holds
    assert main(["-i", str(ck), "-o", str(out), "--no-progress", "--allow-nonfinite"]) == 0
    err = capsys.readouterr().err
    assert "nothing to convert" in err and listing in err, err
    w = kt_runtime.load_experts(out)
    gate = w.dequantize(1, 2, "gate")
    assert bool(gate.isfinite().all())
    assert np.count_nonzero(gate[0, :32].numpy()) == 0 and np.count_nonzero(gate[0, 32:].numpy()) > 0


def test_nonfinite_listing_is_capped_with_a_count():
    from kt_convert.convert.report import ConversionReport

    counts = {f"model.layers.{i}.mlp.experts.0.up_proj.weight": i + 1 for i in range(13)}
    report = ConversionReport(output="o", family="f", input_type="bf16", method="int4", kt_method="AMXINT4",
                              threadpool_count=1, device="cpu", layers=13, layers_converted=13, layers_resumed=0,
                              experts_per_layer=1, mtp_tensors_skipped=0, input_bytes=0, output_bytes=0, seconds=1.0,
                              nonfinite=counts)
    lines = report.nonfinite_warning().splitlines()
    assert lines[0] == ("warning: 91 NaN/Inf source values packed as 0 (--allow-nonfinite) in 13 tensors; "
                        "kt_manifest.json keeps the list:")
    assert lines[1:11] == [f"  model.layers.{i}.mlp.experts.0.up_proj.weight: {i + 1}" for i in range(10)]
    assert lines[11] == "  ... and 3 more tensors (every one in kt_manifest.json and the --json report)"
    assert len(lines) == 12
    report.nonfinite = {}
    assert report.nonfinite_warning() == ""


def test_manifest_refuses_a_malformed_nonfinite_record(base_checkpoint, tmp_path):
    import json

    from kt_convert.kt_runtime.format.errors import ManifestError
    from kt_convert.kt_runtime.format.manifest import read_manifest

    out = tmp_path / "out"
    assert main(["-i", str(base_checkpoint), "-o", str(out), "--no-progress"]) == 0
    d = read_json(out / "kt_manifest.json")
    for bad in ([1], {"k": 0}, {"k": "3"}, {"k": True}):
        d["completed"]["0"]["nonfinite"] = bad
        (out / "kt_manifest.json").write_text(json.dumps(d))
        with pytest.raises(ManifestError, match=r"completed\[0\].nonfinite must map tensor names to positive counts"):
            read_manifest(out)


def test_output_below_a_file(base_checkpoint, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["-i", str(base_checkpoint), "-o", str(tmp_path / "f" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "f") in err, err



# --- pre-flight: refused early, with numbers ---

def test_not_enough_disk_is_refused_before_any_work(base_checkpoint, tmp_path, capsys, monkeypatch):
    from kt_convert.convert import preflight

    monkeypatch.setattr(preflight, "disk_free", lambda path: 1_000_000)
    out = tmp_path / "out"
    assert main(["-i", str(base_checkpoint), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "1 MB are free" in err and "writes 19.2 MB" in err and "free 18.2 MB" in err, err
    assert not out.exists()  # the folder this refused run created is gone again, lock file included


def test_not_enough_memory_is_refused_before_any_work(base_checkpoint, tmp_path, capsys, monkeypatch):
    from kt_convert.convert import preflight

    monkeypatch.setattr(preflight, "mem_available", lambda: 100 << 20)
    out = tmp_path / "out"
    assert main(["-i", str(base_checkpoint), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and "100 MiB are available" in err, err
    assert not (out / MANIFEST_FILE).exists()


def test_preflight_estimate_is_bounded_whatever_the_model_size(base_checkpoint, tmp_path, capsys):
    from types import SimpleNamespace

    from kt_convert.convert import preflight
    from kt_convert.convert.layer_pack import BATCH_BYTES, experts_per_batch
    from kt_convert.kt_runtime.format.digest import BLOCK

    assert preflight.mem_available() > 0
    peaks = []
    for layers, experts in ((2, 8), (61, 256), (200, 512)):
        per_layer = experts * 3 * 7168 * 2048 // 2  # a DeepSeek-sized INT4 layer
        lps = [SimpleNamespace(output_bytes=per_layer, input_bytes=per_layer) for _ in range(layers)]  # MXFP4 in
        plan = SimpleNamespace(layers=lps, num_experts=experts, hidden_size=7168, moe_intermediate_size=2048,
                               layout="merged")
        est = preflight.estimate(plan, lps, experts_per_batch(plan), threads=64)
        assert est.output_bytes == layers * per_layer
        peaks.append(est.peak_memory_bytes)
        # two packed batches and two source buffers of the same size (MXFP4 in, INT4 out), and the first
        # digest block of two shards whose headers are completed at commit
        assert est.held_bytes == 2 * min(BLOCK, per_layer)
        assert est.peak_memory_bytes < preflight.BASE_MEMORY + 4 * BATCH_BYTES + 2 * BLOCK + (128 << 20)
    assert max(peaks) - min(peaks) < 4 * BATCH_BYTES  # independent of the number of layers
    assert main(["-i", str(base_checkpoint), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "pre-flight: writing 2.42 MB, peak memory about" in capsys.readouterr().err


def test_unwritable_report_path_is_a_user_error(base_checkpoint, tmp_path, capsys):
    report = tmp_path / "no" / "such" / "dir" / "r.json"
    assert main(["-i", str(base_checkpoint), "-o", str(tmp_path / "out"), "--no-progress", "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(report) in err and "No such file" in err, err


@pytest.mark.parametrize("bits,name", [(0x7FC0, "NaN"), (0xFF80, "-Inf")])
def test_nonfinite_bf16_source_weights(tmp_path, capsys, bits, name):
    from kt_convert.synthetic.families import make_family_checkpoint

    ck = make_family_checkpoint(tmp_path / "q", "qwen3_moe_bf16", num_experts=2, mtp_layers=0).path
    key = "model.layers.1.mlp.experts.1.down_proj.weight"

    def poison(dt, shape, data):
        w = np.frombuffer(data, dtype=np.uint16).copy()
        w[[3, 777]] = bits
        return dt, shape, w.tobytes()

    edit_tensor(ck, key, poison)
    out = tmp_path / "out"
    assert main(["-i", str(ck), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert key in err and "NaN/Inf" in err and "Traceback" not in err, name
    assert not (out / INDEX_FILE).exists()
    assert main(["-i", str(ck), "-o", str(out), "--no-progress", "--allow-nonfinite",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert read_json(tmp_path / "r.json")["nonfinite"] == {key: 2}
