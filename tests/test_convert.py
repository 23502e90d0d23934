"""End-to-end conversion of synthetic DeepSeek-V4-Flash checkpoints: bytes against the torch
reference, layouts, resume, re-runs, argument checks, CLI exit codes, and loading back."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kt_convert import kt_runtime
from helpers import ROOT
from helpers.outputs import read_json, tree_hashes
from kt_convert.convert import pipeline
from kt_convert.convert.cli import main
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.kt_runtime.format.byte_orders import merged_key
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from kt_convert.kt_runtime.format.methods import get_method
from kt_convert.quant.mxfp4 import decode_mxfp4
from kt_convert.quant.reference import pack_expert_reference

OFFICIAL = {"gate": "w1", "up": "w3", "down": "w2"}


def source_bf16(ckpt_path, layer, expert, proj):
    """Decode one expert matrix of an official-style synthetic checkpoint with the reference decoder."""
    index = read_json(ckpt_path / "model.safetensors.index.json")["weight_map"]
    base = f"layers.{layer}.ffn.experts.{expert}.{OFFICIAL[proj]}"
    w = SafetensorsFile(ckpt_path / index[base + ".weight"]).array(base + ".weight").view(np.uint8)
    s = SafetensorsFile(ckpt_path / index[base + ".scale"]).array(base + ".scale")
    return decode_mxfp4(w, s)


def run(ckpt, out, **kw):
    return convert(ConvertOptions(input_path=str(ckpt), output=out, progress=False, **kw))


def assert_matches_reference(ckpt_path, out, method_name, threadpool_count, experts=None):
    method = get_method(method_name)
    w = kt_runtime.load_experts(out)
    H, I = w.hidden_size, w.moe_intermediate_size
    for layer in w.layers:
        for expert in experts if experts is not None else range(w.num_experts):
            for proj in ("gate", "up", "down"):
                ref = pack_expert_reference(source_bf16(ckpt_path, layer, expert, proj), proj, H, I, threadpool_count, method)
                for t, (ref_w, ref_s) in enumerate(ref):
                    got_w, got_s = w.expert_tensors(layer, expert, proj, t)
                    assert np.array_equal(got_w, ref_w.numpy()), (layer, expert, proj, t)
                    assert np.array_equal(got_s, ref_s.numpy()), (layer, expert, proj, t)


@pytest.mark.parametrize("method,threadpool_count", [("int4", 1), ("int4", 2), ("int4", 4), ("int8", 1), ("int8", 2), ("int8", 4)])
def test_merged_output_matches_reference(tiny_checkpoint, tmp_path, method, threadpool_count):
    report = run(tiny_checkpoint.path, tmp_path / "out", quant_method=method, threadpool_count=threadpool_count)
    assert report.layers_converted == 2 and report.mtp_tensors_skipped == 48
    assert_matches_reference(tiny_checkpoint.path, tmp_path / "out", method, threadpool_count,
                             experts=None if threadpool_count == 2 else [0, 7])
    out = tmp_path / "out"
    manifest = read_json(out / "kt_manifest.json")
    assert manifest["kt_method"] == ("AMXINT4" if method == "int4" else "AMXINT8")
    assert manifest["threadpool_count"] == threadpool_count and manifest["complete"] is True
    index = read_json(out / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    shard = SafetensorsFile(out / "model-00002-of-00002.safetensors")
    assert shard.metadata["layer"] == "1" and shard.metadata["threadpool_count"] == str(threadpool_count)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in shard.tensors.values()) * 2
    assert all(i.offset % 64 == 0 for i in shard.tensors.values())
    assert (out / "config.json").read_bytes() == (tiny_checkpoint.path / "config.json").read_bytes()
    assert (out / "tokenizer.json").exists()
    assert not list(out.glob("*.tmp"))


def test_output_loads_with_the_safetensors_library(tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    run(tiny_checkpoint.path, tmp_path / "out", threadpool_count=2)
    w = kt_runtime.load_experts(tmp_path / "out")
    with safe_open(tmp_path / "out" / "model-00001-of-00002.safetensors", framework="pt") as f:
        key = merged_key(0, "down", 3, 1, "weight")
        t = f.get_tensor(key)
        assert t.dtype == torch.int8 and t.dim() == 1
        assert np.array_equal(t.view(torch.uint8).numpy(), w.expert_tensors(0, 3, "down", 1)[0])
        assert f.get_tensor(merged_key(0, "gate", 0, 0, "scale")).dtype == torch.float32


def test_every_storage_and_key_style_gives_identical_output(tmp_path):
    outs = []
    for storage, style in (("I8", "official"), ("U8", "model"), ("F4", "hf_alias")):
        ck = make_v4_flash_checkpoint(tmp_path / f"ck_{storage}", "v4-flash-tiny", storage=storage, key_style=style,
                                      num_shards=2, num_experts=4)
        run(ck.path, tmp_path / f"out_{storage}", threadpool_count=2)
        outs.append({k: v for k, v in tree_hashes(tmp_path / f"out_{storage}").items() if k != "kt_manifest.json"})
    # shard metadata carries the source fingerprint, so compare tensors rather than files
    loaded = [kt_runtime.load_experts(tmp_path / f"out_{s}") for s in ("I8", "U8", "F4")]
    for key in loaded[0]._tensors:
        ref = loaded[0]._tensors[key]
        for other in loaded[1:]:
            assert np.array_equal(other._tensors[key][0], ref[0]) and np.array_equal(other._tensors[key][1], ref[1])


def test_single_file_checkpoint(tmp_path):
    ck = make_v4_flash_checkpoint(tmp_path / "single", "v4-flash-tiny", single_file=True, num_experts=4)
    report = run(ck.path / "model.safetensors", tmp_path / "out", threadpool_count=1)
    assert report.layers_converted == 2
    assert_matches_reference_single(ck.path, tmp_path / "out")


def assert_matches_reference_single(ckpt_path, out):
    w = kt_runtime.load_experts(out)
    f = SafetensorsFile(ckpt_path / "model.safetensors")
    wt = f.array("layers.0.ffn.experts.1.w1.weight").view(np.uint8)
    sc = f.array("layers.0.ffn.experts.1.w1.scale")
    (ref_w, ref_s), = pack_expert_reference(decode_mxfp4(wt, sc), "gate", w.hidden_size, w.moe_intermediate_size, 1,
                                            get_method("int4"))
    assert np.array_equal(w.expert_tensors(0, 1, "gate", 0)[0], ref_w.numpy())


def test_kt_folder_layout_holds_the_same_bytes(tiny_checkpoint, tmp_path):
    run(tiny_checkpoint.path, tmp_path / "merged", threadpool_count=2)
    run(tiny_checkpoint.path, tmp_path / "folders", threadpool_count=2, merge=False)
    files = sorted(p.relative_to(tmp_path / "folders") for p in (tmp_path / "folders").rglob("*.kt"))
    assert len(files) == 2 * 8 * 3 * 2 * 2
    assert str(files[0]).startswith("_layer_0/_numa_0/INT4_")
    assert (tmp_path / "folders" / "_layer_1/_numa_1/INT4_down_5_49152Byte_quant_.kt").stat().st_size == 49152
    assert (tmp_path / "folders" / "_layer_1/_numa_1/INT4_down_5_1536Byte_scale_.kt").stat().st_size == 1536
    assert not list((tmp_path / "folders").glob("*.safetensors"))
    a, b = kt_runtime.load_experts(tmp_path / "merged"), kt_runtime.load_experts(tmp_path / "folders")
    for key in a._tensors:
        assert np.array_equal(a._tensors[key][0], b._tensors[key][0])
        assert np.array_equal(a._tensors[key][1], b._tensors[key][1])


def test_thread_counts_give_identical_bytes(tiny_checkpoint, tmp_path):
    run(tiny_checkpoint.path, tmp_path / "t1", threadpool_count=2, cpuinfer_threads=1)
    run(tiny_checkpoint.path, tmp_path / "t3", threadpool_count=2, cpuinfer_threads=3)
    assert tree_hashes(tmp_path / "t1") == tree_hashes(tmp_path / "t3")


def test_interrupted_run_resumes_to_identical_bytes(tiny_checkpoint, tmp_path, monkeypatch):
    run(tiny_checkpoint.path, tmp_path / "fresh", threadpool_count=2)
    real = pipeline.convert_layer
    calls = []

    def crash_on_second_layer(reader, plan, lp, outputs, *a, **kw):
        calls.append(lp.layer)
        if len(calls) == 2:
            real(reader, plan, lp, outputs, *a, **kw)
            raise KeyboardInterrupt  # after the data, before the shard is committed
        return real(reader, plan, lp, outputs, *a, **kw)

    monkeypatch.setattr(pipeline, "convert_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_checkpoint.path, tmp_path / "resumed", threadpool_count=2)
    partial = tmp_path / "resumed"
    assert (partial / "model-00001-of-00002.safetensors").exists()
    assert not (partial / "model-00002-of-00002.safetensors").exists()
    assert not list(partial.glob("*.tmp")) and not (partial / "model.safetensors.index.json").exists()
    assert read_json(partial / "kt_manifest.json")["complete"] is False
    with pytest.raises(kt_runtime.PackedWeightsError, match="re-run the same convert command"):
        kt_runtime.load_experts(partial)
    monkeypatch.setattr(pipeline, "convert_layer", real)
    report = run(tiny_checkpoint.path, partial, threadpool_count=2)
    assert (report.layers_converted, report.layers_resumed) == (1, 1)
    assert tree_hashes(partial) == tree_hashes(tmp_path / "fresh")


def test_rerun_skips_verified_layers_and_redoes_damaged_ones(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run(tiny_checkpoint.path, out, threadpool_count=2)
    before = tree_hashes(out)
    report = run(tiny_checkpoint.path, out, threadpool_count=2)
    assert (report.layers_converted, report.layers_resumed) == (0, 2)
    assert tree_hashes(out) == before
    shard = out / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(kt_runtime.PackedWeightsError, match="sha256"):
        kt_runtime.load_experts(out)
    kt_runtime.load_experts(out, verify=False)  # sizes still agree
    report = run(tiny_checkpoint.path, out, threadpool_count=2)
    assert (report.layers_converted, report.layers_resumed) == (1, 1)
    assert tree_hashes(out) == before


def test_other_arguments_into_the_same_output_are_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_checkpoint.path, out, threadpool_count=2)
    code = main(["-i", str(tiny_checkpoint.path), "-o", str(out), "--threadpool-count", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "threadpool_count" in err and "--overwrite" in err
    assert main(["-i", str(tiny_checkpoint.path), "-o", str(out), "--threadpool-count", "1", "--overwrite",
                 "--no-progress"]) == 0
    assert kt_runtime.load_experts(out).threadpool_count == 1


def test_non_empty_foreign_directory_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["-i", str(tiny_checkpoint.path), "-o", str(out), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args,needle", [
    (["--threadpool-count", "3"], "moe_intermediate_size 512 is not divisible by --threadpool-count 3"),
    (["--threadpool-count", "8"], "512 / 8 = 64 is not a multiple of 128"),
    (["--threadpool-count", "8"], "threadpool counts that work with int4: 1, 2, 4; --quant-method int8 works"),
    (["--threadpool-count", "8", "--quant-method", "int8"], None),
])
def test_alignment_is_checked_before_any_work(tiny_checkpoint, tmp_path, capsys, args, needle):
    code = main(["-i", str(tiny_checkpoint.path), "-o", str(tmp_path / "out"), "--no-progress", *args])
    err = capsys.readouterr().err
    if needle is None:
        assert code == 0, err  # 512 / 8 = 64 is fine for int8
        return
    assert code == 2 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_input_type_contradicting_the_files_is_refused(tiny_checkpoint, tmp_path, capsys):
    assert main(["-i", str(tiny_checkpoint.path), "-o", str(tmp_path / "o"), "--input-type", "bf16",
                 "--no-progress"]) == 2
    assert "fp4" in capsys.readouterr().err


def test_missing_input_and_missing_config(tmp_path, capsys):
    assert main(["-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2


def test_cli_json_report_and_console_script(tiny_checkpoint, tmp_path):
    report_path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_cpu_weights.py"), "--input-path",
                           str(tiny_checkpoint.path), "--input-type", "fp4", "--output", str(tmp_path / "out"),
                           "--quant-method", "int8", "--cpuinfer-threads", "2", "--threadpool-count", "2",
                           "--json", str(report_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["layers_converted"] == 2 and report["kt_method"] == "AMXINT8"
    assert report["mtp_tensors_skipped"] == 48 and report["input_bytes"] > 0
    assert "layer 1 done (2/2)" in proc.stderr and "B/s" in proc.stderr


def test_include_non_expert_writes_a_last_shard(tiny_checkpoint, tmp_path):
    run(tiny_checkpoint.path, tmp_path / "out", threadpool_count=2, include_non_expert=True)
    index = read_json(tmp_path / "out" / "model.safetensors.index.json")["weight_map"]
    last = SafetensorsFile(tmp_path / "out" / "model-00003-of-00003.safetensors")
    assert "embed.weight" in last and index["embed.weight"] == "model-00003-of-00003.safetensors"
    assert not any(".experts." in k for k in last.keys())
    kt_runtime.load_experts(tmp_path / "out")


def test_loader_infers_parameters_without_manifest(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run(tiny_checkpoint.path, out, threadpool_count=2, quant_method="int8")
    ref = kt_runtime.load_experts(out)
    (out / "kt_manifest.json").unlink()
    with pytest.warns(UserWarning, match="inferred"):
        w = kt_runtime.load_experts(out)
    assert (w.method, w.threadpool_count, w.num_experts, w.hidden_size, w.moe_intermediate_size, w.layers) == \
        ("int8", 2, 8, 384, 512, [0, 1])
    assert torch.equal(w.dequantize(1, 2, "down"), ref.dequantize(1, 2, "down"))


def test_loader_rejects_truncated_shard(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run(tiny_checkpoint.path, out, threadpool_count=2)
    shard = out / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(kt_runtime.PackedWeightsError):
        kt_runtime.load_experts(out, verify=False)


def test_overwrite_replaces_only_what_a_conversion_writes(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale shard")
    (out / "_layer_7").mkdir()
    run(tiny_checkpoint.path, out, threadpool_count=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00009.safetensors").exists() and not (out / "_layer_7").exists()
    assert kt_runtime.load_experts(out).threadpool_count == 2


def test_cli_group_runs_the_conversion_by_default(tiny_checkpoint, tmp_path):
    """kt's command line is the group's default command: the console script `convert-cpu-weights -i X -o Y`,
    `python -m kt_convert -i X -o Y` and the named subcommand `convert` write the same bytes; --help is the
    conversion's own."""
    from pathlib import Path

    from kt_convert.convert.cli import cli
    from kt_convert.convert.cli.conversion import convert_command

    assert cli.default == "convert" and cli.commands["convert"] is convert_command and "verify" in cli.commands
    script = Path(sys.executable).parent / "convert-cpu-weights"
    flags = ["-i", str(tiny_checkpoint.path), "--threadpool-count", "2", "--quant-method", "int8", "--no-progress"]
    outs = [tmp_path / name for name in ("script", "module", "subcommand")]
    runs = [[sys.executable, "-m", "kt_convert", *flags, "-o", str(outs[1])]]
    if script.exists():  # installed (pip install -e .)
        runs.append([str(script), *flags, "-o", str(outs[0])])
    for cmd in runs:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert main(["convert", *flags, "-o", str(outs[2])]) == 0
    assert tree_hashes(outs[1]) == tree_hashes(outs[2])
    if script.exists():
        assert tree_hashes(outs[0]) == tree_hashes(outs[1])
        helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0 and helped.stdout.startswith("Usage: convert-cpu-weights [OPTIONS]")
        assert "--input-path" in helped.stdout and "--threadpool-count" in helped.stdout


def test_one_read_of_a_layer_feeds_several_outputs(tiny_checkpoint, tmp_path):
    """The per-layer loop's seams (convert.layer_io): convert_layer packs every batch the LayerReader reads
    into each LayerOutput; two outputs of one read hold the bytes of two separate runs."""
    from kt_convert.convert.layer_io import LayerOutput, LayerReader
    from kt_convert.convert.layer_pack import convert_layer, experts_per_batch
    from kt_convert.convert.options import RunOptions
    from kt_convert.convert.packers import make_packer
    from kt_convert.convert.plan import build_plan
    from kt_convert.convert.progress import Progress
    from kt_convert.convert.source import open_checkpoint
    from kt_convert.kt_runtime.format.methods import INT4, INT8

    refs = {(INT4, 2): tmp_path / "int4", (INT8, 1): tmp_path / "int8"}
    for (method, t), out in refs.items():
        run(tiny_checkpoint.path, out, quant_method=method.name, threadpool_count=t, merge=method is INT4)

    class Recorder:
        def __init__(self):
            self.pairs = {}

        def write_pair(self, proj, expert, numa, weight, scale):
            self.pairs[(expert, proj, numa)] = (weight.copy(), scale.copy())

        def set_source(self, source_sha256):
            self.source_sha256 = source_sha256

    ckpt = open_checkpoint(str(tiny_checkpoint.path))
    try:
        plan = build_plan(ckpt, INT4, 2, "merged")
        reader = LayerReader(ckpt, plan, plan.layers, experts_per_batch(plan), threads=2)
        packer = make_packer("cpu")
        run_options = RunOptions(input_path=str(tiny_checkpoint.path))
        for lp in plan.layers:
            outputs = [LayerOutput(m, t, Recorder()) for m, t in refs]
            convert_layer(reader, plan, lp, outputs, run_options, Progress(0, 0, False), {}, packer)
            for out, path in zip(outputs, refs.values()):
                w = kt_runtime.load_experts(path)
                assert len(out.writer.pairs) == w.num_experts * 3 * out.threadpool_count
                assert out.writer.source_sha256 == w.manifest.completed[lp.layer].source_sha256
                for (expert, proj, t), (weight, scale) in out.writer.pairs.items():
                    ref_w, ref_s = w.expert_tensors(lp.layer, expert, proj, t)
                    assert np.array_equal(weight, ref_w) and np.array_equal(scale, ref_s), (path, expert, proj, t)
        with pytest.raises(RuntimeError, match="out of order"):
            next(reader.batches(plan.layers[0]))
        reader.close()
        packer.close()
    finally:
        ckpt.close()
