"""What a new user meets first: the first lines of a run, its wording, what it leaves behind, the
device probe, download hints, kt's flags and scripts, and the README's commands and example."""
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT
from helpers.outputs import read_json, tree_hashes
from kt_convert.convert.cli import main
from kt_convert.convert.families import FAMILIES
from kt_convert.kt_runtime.format.names import LOCK_FILE, MANIFEST_FILE
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """2 MoE layers of 4 experts, with one MTP layer."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("first") / "v4", "v4-flash-tiny", num_experts=4,
                                    mtp_layers=1).path


def cli(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the first lines of a conversion ---

def test_first_lines_say_family_format_layers_experts_and_output(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress", "--device", "cpu")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == f"source: {ckpt}: family deepseek_v4, MXFP4 (I8/U8/F4 + E8M0) routed experts"
    assert lines[1] == ("model: 2 MoE layers (0-1), 4 experts each (top-2), hidden 384, expert intermediate 512; "
                        "24 MTP expert tensors skipped (not routed experts of the main model)")
    assert lines[2] == (f"output: AMXINT4 for 2 NUMA pools (--kt-threadpool-count 2), one safetensors shard per "
                        f"layer, packed on the cpu -> {out}")
    # V4 clamps its SwiGLU: which runtimes apply the clamp to this output
    assert lines[3] == ("note: this model clamps its SwiGLU (swiglu_limit 10: gate <= 10, |up| <= 10), recorded in "
                        "kt_manifest.json and applied by kt_runtime (CPUMoE, HybridMoE); kt-kernel 95009ea takes a "
                        "clamp only with --kt-method MXFP4 or MXFP8 and refuses it with AMXINT4: serve this output "
                        "with kt_runtime, or the checkpoint's own experts with a kt method that takes the clamp")
    assert lines[4].startswith("pre-flight: writing 2.42 MB, peak memory about ")
    assert "packing batches of 1.15 MiB from 1.2 MiB of source" in lines[4]
    assert lines[5].startswith("layer 0 done (1/2): 1.25 MB in ") and lines[6].startswith("layer 1 done (2/2)")
    assert lines[7].startswith("2 layers converted, 0 already done, 4 experts each (int4, threadpool count 2, cpu): "
                               "2.51 MB in, 2.42 MB out, ")
    assert len(lines) == 8


@pytest.mark.parametrize("variant,limit", [("glm5_fp8", "10"), ("gpt_oss_bf16", "7"), ("qwen3_moe_bf16", None)])
def test_the_plan_says_which_runtimes_apply_a_swiglu_clamp(tmp_path, capsys, variant, limit):
    """GLM-5.3-Flash's and gpt-oss's clamps, to AMXINT8 and with --kt-sft-manifest; none for a model without one."""
    from kt_convert.synthetic.families import make_family_checkpoint

    src = make_family_checkpoint(tmp_path / "src", variant, num_layers=2).path
    code, out, err = cli(capsys, "-i", src, "-o", tmp_path / "out", "--quant-method", "int8", "--dry-run")
    assert code == 0, err
    notes = [line for line in out.splitlines() if "clamp" in line]
    if limit is None:
        assert notes == []
        return
    assert len(notes) == 1 and f"swiglu_limit {limit}: gate <= {limit}, |up| <= {limit}" in notes[0]
    assert "applied by kt_runtime" in notes[0] and "MXFP4 or MXFP8 and refuses it with AMXINT8" in notes[0]
    assert "SFT" not in notes[0]
    code, _, err = cli(capsys, "-i", src, "-o", tmp_path / "sft", "--quant-method", "int8", "--no-merge-safetensor",
                       "--kt-sft-manifest", "--no-progress", "--device", "cpu")
    assert code == 0, err
    note = next(line for line in err.splitlines() if "clamp" in line)
    assert note.endswith("; kt-kernel's SFT mode takes no clamp with any method")
    assert err.splitlines().index(note) < next(i for i, x in enumerate(err.splitlines()) if x.startswith("pre-flight"))


def test_one_layer_reads_singular_and_small_sizes_keep_their_digits(ckpt, tmp_path, capsys):
    code, _, err = cli(capsys, "-i", ckpt, "-o", tmp_path / "out", "--no-progress", "--layers", "1",
                       "--threadpool-count", "1")
    assert code == 0, err
    assert "1 layer converted, 0 already done" in err and "1 layers" not in err
    assert "1 MoE layer (1) of the model's 2" in err and "for 1 NUMA pool (" in err
    assert "0.00 GB" not in err and " 0 MiB" not in err and "1.2 MB out" in err


def stop_before_committing(monkeypatch, layer):
    """The run stops (a full disk) when it commits `layer`: the layers before it stay completed."""
    from kt_convert.convert import pipeline

    commit = pipeline._commit_layer

    def commit_or_fail(writers, lay, *rest):
        if lay == layer:
            for job, writer in writers:
                writer.abort()
            raise OSError(28, "No space left on device", str(writers[0][0].out))
        return commit(writers, lay, *rest)

    monkeypatch.setattr(pipeline, "_commit_layer", commit_or_fail)


def test_resume_counts_layers_over_the_whole_model(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_before_committing(m, 1)
        code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress")
    assert code == 2 and "no space left" in err
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress")
    assert code == 0, err
    assert "resuming: 1 of 2 layers already done (0); converting the other 1" in err
    assert "layer 1 done (2/2)" in err and "(1/1)" not in err
    assert "1 layer converted, 1 already done" in err
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress")
    assert code == 0 and "already complete: 2 layers converted by an earlier run (0-1)" in err
    assert err.splitlines()[-1] == f"nothing to convert: all 2 layers were converted by an earlier run -> {out}"


def test_unknown_model_type_with_known_keys_names_the_table_used(ckpt, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "my_v4_finetune"
    (ck / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "-i", ck, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert err.splitlines()[0] == ("note: model_type 'my_v4_finetune' is not a known family; its routed-expert keys "
                                   "match the deepseek_v4 table (DeepSeek-V4-Flash (MXFP4) / -Flash-Base (FP8): "
                                   "layers.L.ffn.experts.E.w1/w3/w2): converting with that table")


def test_unknown_family_error_lists_families_as_a_table(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    save_file({"model.layers.0.moe.expert_0.fc1.weight": np.zeros((4, 4), np.float32)}, str(ck / "model.safetensors"))
    code, _, err = cli(capsys, "-i", ck, "-o", tmp_path / "out", "--no-progress")
    assert code == 2 and not (tmp_path / "out").exists()
    lines = err.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert "model_type 'llama' is not a supported MoE family" in lines[head]
    assert "model.layers.0.moe.expert_0.fc1.weight" in lines[head]
    table = lines[head + 1:]
    assert len(table) == len(FAMILIES) and all(len(line) < 160 for line in table)
    for family, line in zip(FAMILIES, table):
        assert line.split()[:2] == [family.name, "/".join(family.model_types)], line
    assert len({line.index(line.split()[1], len(line.split()[0]) + 2) for line in table}) == 1  # aligned columns


# --- what a run leaves behind ---

def test_finished_and_failed_runs_leave_no_lock_file(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli(capsys, "-i", ckpt, "-o", out, "--no-progress")[0] == 0
    assert not (out / LOCK_FILE).exists() and (out / MANIFEST_FILE).exists()
    stop_before_committing(monkeypatch, 1)
    code, _, err = cli(capsys, "-i", ckpt, "-o", tmp_path / "out2", "--no-progress")
    assert code == 2 and "no space left" in err
    assert (tmp_path / "out2" / MANIFEST_FILE).exists() and not (tmp_path / "out2" / LOCK_FILE).exists()


def test_refused_run_leaves_no_folder_and_an_empty_folder_empty(ckpt, tmp_path, capsys, monkeypatch):
    from kt_convert.convert import preflight

    monkeypatch.setattr(preflight, "disk_free", lambda path: 1000)
    created = tmp_path / "a" / "b" / "out"
    code, _, err = cli(capsys, "-i", ckpt, "-o", created, "--no-progress")
    assert code == 2 and "not enough disk space" in err
    assert not (tmp_path / "a").exists()  # every folder the run made is gone
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "-i", ckpt, "-o", empty, "--no-progress")[0] == 2
    assert empty.is_dir() and list(empty.iterdir()) == []  # the user's folder stays, without our lock


def test_lock_taken_over_after_the_holder_removed_it(tmp_path):
    """A converter that opened the lock file just before its holder removed it must not hold a lock
    on the removed file while a third one locks the new file."""
    import fcntl

    from kt_convert.convert.errors import UserError
    from kt_convert.convert.output_dir import OutputLock

    first = OutputLock(tmp_path)
    stale_fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)  # what a second converter opened
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the second one gets the lock on the removed file ...
    second = OutputLock(tmp_path)  # ... and OutputLock checks the name: this one made a new file and holds it
    with pytest.raises(UserError, match="another converter"):
        OutputLock(tmp_path)
    os.close(stale_fd)
    second.release()


def test_json_dash_is_standard_output(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "-i", ckpt, "-o", tmp_path / "out", "--no-progress", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["layers_converted"] == 2 and not (tmp_path / "-").exists()


# --- progress ---

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_zero_column_terminal_gets_plain_lines(monkeypatch):
    from kt_convert.convert import progress

    monkeypatch.setattr(progress, "terminal_columns", lambda stream: 0)
    stream = FakeTerminal()
    p = progress.Progress(1000, 6, stream=stream, done_layers=4)
    assert p.bar is None
    p.layer_start(5)
    p.advance(1000)
    p.layer_done(5, 1000)
    p.close()
    assert stream.getvalue().startswith("layer 5 done (5/6): 1 kB in ")


def test_bar_says_finishing_after_the_last_layer(monkeypatch):
    from kt_convert.convert import progress

    monkeypatch.setattr(progress, "terminal_columns", lambda stream: 120)
    stream = FakeTerminal()
    p = progress.Progress(1000, 6, stream=stream, done_layers=5)
    assert p.bar is not None
    p.layer_start(5)
    assert "layer 5 (6/6)" in p.bar.desc
    p.advance(1000)
    p.layer_done(5, 1000)
    p.stage("finishing: fsync of the last layer, model files, index")
    assert p.bar.desc.startswith("finishing: fsync of the last layer, model files, index")
    p.close()


def test_units():
    from kt_convert.convert.units import memory, plural, rate, size

    assert [size(0), size(999), size(2_510_000), size(4.83e9), size(1.234e12)] == \
        ["0 B", "999 B", "2.51 MB", "4.83 GB", "1.23 TB"]
    assert [memory(64 << 20), memory(1536), memory(3 << 30)] == ["64 MiB", "1.5 KiB", "3 GiB"]
    assert [plural(0, "layer"), plural(1, "layer"), plural(2, "layer")] == ["0 layers", "1 layer", "2 layers"]
    assert rate(1e9, 2) == "500 MB/s" and rate(1, 0) == "-"


# --- the device probe ---

def test_device_auto_finds_no_gpu_without_importing_torch(tmp_path):
    fake = tmp_path / "site"
    (fake / "triton").mkdir(parents=True)
    (fake / "triton" / "__init__.py").write_text("")  # triton "installed": the probe goes on to the GPU
    code = textwrap.dedent("""
        import sys, time
        from kt_convert.convert.pipeline import resolve_device
        t = time.perf_counter()
        print(resolve_device("auto"), "torch" in sys.modules, f"{time.perf_counter() - t:.3f}")
        from kt_convert.quant.gpu import gpu_unavailable_reason
        print(gpu_unavailable_reason())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)]), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    device, imported, seconds = first.split()
    assert device == "cpu" and imported == "False" and float(seconds) < 0.5
    assert second == "CUDA_VISIBLE_DEVICES='' hides every GPU"


def test_no_gpu_device_nodes(tmp_path, monkeypatch):
    from kt_convert.quant.gpu import no_gpu_device_reason

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nodes = (str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "kfd"))
    assert no_gpu_device_reason(nodes) == f"there is no CUDA device here (none of {nodes[0]}, {nodes[1]})"
    (tmp_path / "nvidia0").touch()
    assert no_gpu_device_reason(nodes) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert no_gpu_device_reason(nodes) == "CUDA_VISIBLE_DEVICES='-1' hides every GPU"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert no_gpu_device_reason(nodes) is None


@pytest.mark.parametrize("damage", ["bit", "truncate"])
def test_a_damaged_layer_is_repaired_by_a_rerun_as_the_loader_says(ckpt, tmp_path, capsys, damage):
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.format.errors import PackedWeightsError

    out = tmp_path / "out"
    assert cli(capsys, "-i", ckpt, "-o", out, "--no-progress")[0] == 0
    before = tree_hashes(out)
    shard = out / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data) if damage == "bit" else bytes(data[:-10]))
    with pytest.raises(PackedWeightsError, match=r"layer 1 .*the output is damaged; re-run the conversion command that "
                                                 r"wrote it \(it converts this layer again\)"):
        kt_runtime.load_experts(out, verify=True)
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress")  # the same command, nothing deleted
    assert code == 0 and "1 layer converted, 1 already done" in err, err
    assert tree_hashes(out) == before
    kt_runtime.load_experts(out, verify=True)


def test_device_cuda_without_a_gpu_says_so_before_triton(ckpt, tmp_path, monkeypatch, capsys):
    import importlib.util

    from kt_convert.quant import gpu

    nodes = (str(tmp_path / "nvidia[0-9]*"),)  # none there: no GPU, whatever this machine has
    monkeypatch.setattr(gpu, "no_gpu_device_reason", lambda real=gpu.no_gpu_device_reason: real(nodes))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # triton absent as well
    code, _, err = cli(capsys, "-i", ckpt, "-o", tmp_path / "out", "--device", "cuda")
    assert code == 2 and err.startswith("error: --device cuda: there is no CUDA device here (none of "), err
    assert "triton" not in err and not (tmp_path / "out").exists()


def test_reported_seconds_leave_the_device_probe_out(ckpt, tmp_path, monkeypatch):
    import time

    from kt_convert.convert import pipeline

    def slow_probe(device):
        time.sleep(0.5)
        return "cpu"

    monkeypatch.setattr(pipeline, "resolve_device", slow_probe)
    report = pipeline.convert(pipeline.ConvertOptions(input_path=str(ckpt), output=tmp_path / "out", progress=False))
    assert report.startup_seconds >= 0.5 and report.seconds < report.startup_seconds + 5
    assert report.to_dict()["startup_seconds"] == report.startup_seconds
    assert f"(and {report.startup_seconds:.1f} s finding the device)" in report.summary()


def test_progress_forced_into_a_pipe_still_draws_a_bar():
    from kt_convert.convert.progress import Progress

    p = Progress(1000, 2, enabled=True, stream=io.StringIO())  # --progress 2>&1 | tee log
    assert p.bar is not None
    p.close()


# --- kt's scripts and flags ---

@pytest.mark.parametrize("flags,needle", [
    (["--profile"], "--profile (a torch profiler trace"),
    (["--save-backward-weights"], "--save-backward-weights (transposed *_bwd_* weights"),
    (["--input-type", "awq"], "AWQ checkpoints are not supported (supported: MXFP4"),
    (["--quant-method", "awq"], "--quant-method awq (kt's AWQ repacking"),
    (["--quant-method=moe_int4"], "moe_int4 is kt-kernel's ARM (KML) backend"),
    (["--quant-method", "moe_int8"], "use --quant-method int8 (AMXINT8)"),
    (["convert", "--profile"], "--profile (a torch profiler trace"),
])
def test_kt_flags_that_are_not_supported_say_what_to_use(ckpt, tmp_path, capsys, flags, needle):
    head = flags[:1] if flags[0] == "convert" else []
    code, _, err = cli(capsys, *head, "-i", ckpt, "-o", tmp_path / "out", *flags[len(head):])
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert "No such option" not in err and "Did you mean" not in err and "invalid choice" not in err
    assert not (tmp_path / "out").exists()


def test_ds4_script_runs_kt_tutorial_command_with_gpu_flag(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_cpu_weights_ds4.py"), "--input-path",
                           str(ckpt), "--input-type", "fp4", "--output", str(tmp_path / "out"), "--quant-method", "int4",
                           "--cpuinfer-threads", "2", "--threadpool-count", "2", "--gpu"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("note: --gpu (kt's flag) is accepted: --device auto")
    assert "2 layers converted" in proc.stderr and (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_help_names_kt_flags_and_an_example(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    assert "convert-cpu-weights -i /models/DeepSeek-V4-Flash -o" in out and "are detected" in out
    text = " ".join(out.split())
    assert "Not supported, each with a message saying what to use instead: --profile" in text
    assert "keeps its layers before L if they match a fresh conversion" in text


def test_help_lists_every_command_near_its_head(capsys):
    from kt_convert.convert.cli import COMMANDS

    code, out, _ = cli(capsys, "--help")
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == ["Usage: convert-cpu-weights [OPTIONS]", "       convert-cpu-weights COMMAND [ARGS]..."]
    start = lines.index("Commands (convert-cpu-weights COMMAND --help for each):")
    assert start < lines.index("Options:") and start < 20  # before the options, within a screen
    listed = [line.split()[0] for line in lines[start + 1:lines.index("Options:")] if line.startswith("  ") and
              not line.startswith("   ")]
    assert listed == [c.name for c in COMMANDS if c.name != "convert"] and {"verify", "finalize", "families"} <= set(listed)
    assert "  families  List the supported checkpoint families and source formats." in lines
    assert cli(capsys, "-h")[1] == out and cli(capsys, "convert", "--help")[1].count("COMMAND --help for each") == 1


@pytest.mark.parametrize("word, needle", [
    ("verfiy", "no such command 'verfiy'; did you mean 'verify'?"),
    ("finalise", "did you mean 'finalize'?"),
    ("family", "did you mean 'families'?"),
    ("Verify", "did you mean 'verify'?"),
    ("/models/DeepSeek-V3", "'/models/DeepSeek-V3' is not a command (the commands: convert, verify, finalize, families"),
    ("hello", "'hello' is not a command"),
])
def test_a_word_that_names_no_command_suggests_the_nearest(ckpt, tmp_path, capsys, word, needle):
    code, out, err = cli(capsys, word, "-i", ckpt, "-o", tmp_path / "out")
    assert code == 2 and needle in err, err
    assert "Missing option" not in err and not (tmp_path / "out").exists()
    if word.startswith("/"):
        assert "pass it with -i: convert-cpu-weights -i /models/DeepSeek-V3 -o OUT" in err
    elif word == "hello":
        assert "a conversion takes options only: convert-cpu-weights -i SRC -o OUT; --help lists the options" in err


def kt_started_output(ckpt, out, capsys, done_layers):
    """What kt's script leaves when stopped after `done_layers` layers with --no-merge-safetensor: its
    _layer_L folders (this converter writes kt's names and bytes), no manifest, no copied files."""
    import shutil

    assert cli(capsys, "-i", ckpt, "-o", out, "--no-progress", "--no-merge-safetensor")[0] == 0
    for p in out.iterdir():
        if p.is_file() or int(p.name.split("_")[-1]) >= done_layers:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_resume_layer_keeps_layers_of_kts_script_that_match(ckpt, tmp_path, capsys):
    from helpers.outputs import tree_hashes

    ref = tmp_path / "ref"
    assert cli(capsys, "-i", ckpt, "-o", ref, "--no-progress", "--no-merge-safetensor")[0] == 0
    out = tmp_path / "kt"
    kt_started_output(ckpt, out, capsys, done_layers=2)
    assert sorted(p.name for p in out.iterdir()) == ["_layer_0", "_layer_1"]
    kept = (out / "_layer_0" / "_numa_0").stat().st_ino
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress", "--no-merge-safetensor", "--resume-layer", "1")
    assert code == 0, err
    assert "removing kt's _layer_L folders of layers 1 (from the resume layer on, converted again)" in err
    assert "--resume-layer 1: kt's layer 0 matches a fresh conversion byte for byte: kept" in err
    assert "1 layer converted, 1 already done" in err
    assert (out / "_layer_0" / "_numa_0").stat().st_ino == kept  # kept, not written again
    assert tree_hashes(out) == tree_hashes(ref) and not (out / ".kt_resume_check").exists()


def test_resume_layer_says_why_kts_layers_cannot_be_kept(ckpt, tmp_path, capsys):
    out = tmp_path / "kt"
    kt_started_output(ckpt, out, capsys, done_layers=2)
    victim = sorted((out / "_layer_1" / "_numa_1").iterdir())[3]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    args = ["-i", ckpt, "-o", out, "--no-progress", "--no-merge-safetensor"]
    code, _, err = cli(capsys, *args, "--resume-layer", "2")
    assert code == 2
    assert (f"layer 1 in {out} cannot be kept: the bytes of _layer_1/_numa_1/{victim.name} differ from a fresh "
            "conversion's") in err and "pass --overwrite" in err
    assert not (out / MANIFEST_FILE).exists() and not (out / ".kt_resume_check").exists()
    import shutil

    shutil.rmtree(out / "_layer_0")
    code, _, err = cli(capsys, *args, "--resume-layer", "2")
    assert code == 2 and f"says the layers before 2 are done, but {out} has no _layer_L folder for layer(s) 0" in err
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress", "--resume-layer", "1")
    assert code == 2 and "add --no-merge-safetensor to resume them" in err


def test_resume_layer_explains_kts_merged_shards(ckpt, tmp_path, capsys):
    out = tmp_path / "kt"
    out.mkdir()
    (out / "model-00001-of-PLACEHOLDER.safetensors").write_bytes(b"\0" * 16)
    code, _, err = cli(capsys, "-i", ckpt, "-o", out, "--no-progress", "--resume-layer", "1")
    assert code == 2 and "numbers them from 1 again" in err and "pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-PLACEHOLDER.safetensors"]


# --- loading: cheap and safe by default ---

@pytest.fixture
def converted(ckpt, tmp_path):
    from kt_convert.convert.pipeline import ConvertOptions, convert

    out = tmp_path / "out"
    convert(ConvertOptions(input_path=str(ckpt), output=out, progress=False))
    return out


def count_hashing(monkeypatch):
    """Counts the layers hashed, by the loader and by the converter (one call per layer)."""
    from kt_convert.convert import output_job
    from kt_convert.kt_runtime.format import reader

    calls = []
    real = reader.tree_sha256_files
    counted = lambda paths, *a: calls.append(len(paths)) or real(paths, *a)  # noqa: E731
    monkeypatch.setattr(reader, "tree_sha256_files", counted)
    monkeypatch.setattr(output_job, "tree_sha256_files", counted)
    return calls


def flip_in_place(path, offset=-5):
    """Changes one byte without changing the size, as an editor or a bad copy would, a moment after the
    conversion (file mtimes have a granularity of a clock tick: a write in the same tick keeps the time)."""
    time.sleep(0.05)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    with open(path, "r+b") as f:
        f.write(data)


def test_a_converted_output_is_trusted_until_a_file_changes(converted, monkeypatch):
    from kt_convert import kt_runtime

    manifest = read_json(converted / "kt_manifest.json")
    record = read_json(converted / ".kt_verified.json")["layers"]  # written by the converter as it committed
    assert sorted(record) == ["0", "1"]
    for layer, rec in manifest["completed"].items():
        assert record[layer]["sha256"] == rec["sha256"] and list(record[layer]["files"]) == rec["files"]
        st = os.stat(converted / rec["files"][0])
        assert record[layer]["files"][rec["files"][0]] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    calls = count_hashing(monkeypatch)
    assert kt_runtime.load_experts(converted).num_experts == 4
    assert calls == []  # the first load: the converter's digests, nothing hashed
    kt_runtime.load_experts(converted, verify=True)
    assert len(calls) == 2  # verify=True always hashes
    calls.clear()
    kt_runtime.load_experts(converted, verify=False)
    assert calls == []
    flip_in_place(converted / "model-00002-of-00002.safetensors")  # a packed byte: the mtime changes
    with pytest.raises(kt_runtime.PackedWeightsError, match="layer 1 files do not match their sha256"):
        kt_runtime.load_experts(converted)
    assert calls == [1]  # layer 0 still trusted, layer 1 hashed again


def touch(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, another mtime


def test_a_touched_file_is_hashed_again_then_trusted(ckpt, converted, monkeypatch, capsys):
    from kt_convert import kt_runtime

    touch(converted / "model-00001-of-00002.safetensors")
    calls = count_hashing(monkeypatch)
    kt_runtime.load_experts(converted)
    assert calls == [1]  # layer 0 hashed (equal to its digest) and recorded again; layer 1 trusted
    kt_runtime.load_experts(converted)
    assert calls == [1]
    touch(converted / "model-00002-of-00002.safetensors")  # the converter's re-run: the same
    code, out, err = cli(capsys, "-i", ckpt, "-o", converted, "--no-progress")
    assert code == 0 and calls == [1, 1] and "converting it again" not in out + err
    calls.clear()
    kt_runtime.load_experts(converted)
    assert calls == []


def test_a_resumed_finished_output_is_not_hashed_again(ckpt, converted, monkeypatch, capsys):
    calls = count_hashing(monkeypatch)
    before = tree_hashes(converted)
    code, out, err = cli(capsys, "-i", ckpt, "-o", converted, "--no-progress")
    assert code == 0 and calls == []  # both layers recorded at commit: nothing hashed, nothing converted
    assert tree_hashes(converted) == before
    record = read_json(converted / ".kt_verified.json")["layers"]
    flip_in_place(converted / "model-00002-of-00002.safetensors")
    code, out, err = cli(capsys, "-i", ckpt, "-o", converted, "--no-progress")
    assert code == 0 and calls == [1]  # layer 1 hashed, found changed, converted again; layer 0 trusted
    assert "layer 1: output missing or damaged; converting it again" in out + err
    assert tree_hashes(converted) == before
    after = read_json(converted / ".kt_verified.json")["layers"]
    assert after["0"] == record["0"] and after["1"] != record["1"]  # the new file, recorded at its commit
    assert after["1"]["sha256"] == record["1"]["sha256"]
    calls.clear()
    assert cli(capsys, "-i", ckpt, "-o", converted, "--no-progress")[0] == 0 and calls == []


def test_a_resume_hashes_the_unrecorded_layers_and_records_them(ckpt, converted, monkeypatch, capsys):
    (converted / ".kt_verified.json").unlink()  # e.g. an output written before the converter recorded
    calls = count_hashing(monkeypatch)
    assert cli(capsys, "-i", ckpt, "-o", converted, "--no-progress")[0] == 0
    assert calls == [1, 1]
    assert sorted(read_json(converted / ".kt_verified.json")["layers"]) == ["0", "1"]
    calls.clear()
    from kt_convert import kt_runtime
    kt_runtime.load_experts(converted)
    assert calls == []


def test_large_outputs_are_not_hashed_by_default(converted, monkeypatch):
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.format import reader

    monkeypatch.setattr(reader, "AUTO_VERIFY_BYTES", 1000)
    (converted / ".kt_verified.json").unlink()  # no record (an output written before the converter made one)
    calls = count_hashing(monkeypatch)
    kt_runtime.load_experts(converted)
    assert calls == [] and not (converted / ".kt_verified.json").exists()
    kt_runtime.load_experts(converted, verify=True)
    assert len(calls) == 2
    calls.clear()
    kt_runtime.load_experts(converted)  # hashed by verify=True: recorded, not hashed again
    assert calls == []


def test_a_damaged_or_unwritable_record_only_costs_a_hash(converted, monkeypatch):
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.format import fsio

    (converted / ".kt_verified.json").write_text('{"version": 1, "layers": {"0": "garbage"}}')
    calls = count_hashing(monkeypatch)
    kt_runtime.load_experts(converted)
    assert len(calls) == 2
    (converted / ".kt_verified.json").unlink()

    def refuse(*a, **k):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(fsio, "atomic_write_text", refuse)
    calls.clear()
    w = kt_runtime.load_experts(converted)
    assert w.num_experts == 4 and len(calls) == 2 and not (converted / ".kt_verified.json").exists()


def test_overwrite_removes_the_record_and_a_rerun_keeps_it(ckpt, converted, capsys):
    from kt_convert import kt_runtime

    kt_runtime.load_experts(converted)
    assert cli(capsys, "-i", ckpt, "-o", converted, "--no-progress")[0] == 0  # nothing to do: kept
    assert (converted / ".kt_verified.json").exists()
    old = read_json(converted / ".kt_verified.json")["layers"]
    assert cli(capsys, "-i", ckpt, "-o", converted, "--no-progress", "--overwrite", "--quant-method", "int8")[0] == 0
    new = read_json(converted / ".kt_verified.json")["layers"]  # removed, then written by the new conversion
    completed = read_json(converted / "kt_manifest.json")["completed"]
    assert {k: v["sha256"] for k, v in new.items()} == {k: v["sha256"] for k, v in completed.items()}
    assert all(new[k]["sha256"] != old[k]["sha256"] for k in old)
