"""Batch conversion jobs: several outputs from one read of the source (--output-template), and --shard
processes writing one output directory at once (claims, records, finalize), against single runs."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from helpers import ROOT
from helpers.outputs import read_json, tree_hashes
from kt_convert.convert import claims as claims_mod
from kt_convert.convert import output_job, pipeline
from kt_convert.convert.claims import Claim, ClaimDir, Held, Owner, process_start_time
from kt_convert.convert.cli import main
from kt_convert.convert.errors import UserError
from kt_convert.convert.output_dir import SHARD_DIR
from kt_convert.convert.shards import ShardSpec, parse_shard, resolve_shard, shard_layers
from kt_convert.kt_runtime.format.names import INDEX_FILE, MANIFEST_FILE, VERIFIED_FILE
from kt_convert.kt_runtime.format.manifest import LayerRecord
from kt_convert.kt_runtime.format.verified import is_verified, read_verified
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

LAYERS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """8 layers x 16 experts (H=384, I=512), 3 source shards."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("batch") / "ck", "v4-flash-tiny", num_layers=LAYERS,
                                    num_experts=16, num_shards=3).path


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    """One uninterrupted single-process run per (method, threadpool count): the reference bytes."""
    refs = {}
    for method in ("int4", "int8"):
        for count in (1, 2):
            out = tmp_path_factory.mktemp("single") / f"{method}-T{count}"
            assert main(args(ckpt, "-o", str(out), "--quant-method", method, "--threadpool-count", str(count))) == 0
            refs[method, count] = tree_hashes(out)
    return refs


def args(ckpt, *extra):
    return ["-i", str(ckpt), "--no-progress", "--device", "cpu", *extra]


# --- one read, many outputs ------------------------------------------------------------------------


def test_multi_output_pass_equals_separate_runs_and_resumes_each_output(ckpt, single, tmp_path, capsys):
    template = str(tmp_path / "{method}-T{threadpool_count}")
    report = tmp_path / "report.json"
    assert main(args(ckpt, "--output-template", template, "--quant-method", "int4,int8", "--threadpool-count", "1,2",
                     "--json", str(report))) == 0
    reports = json.loads(report.read_text())
    assert [(r["method"], r["threadpool_count"]) for r in reports] == [("int4", 1), ("int4", 2), ("int8", 1), ("int8", 2)]
    for method, count in single:
        out = tmp_path / f"{method}-T{count}"
        assert tree_hashes(out) == single[method, count], (method, count)
        manifest = read_json(out / MANIFEST_FILE)
        assert (manifest["method"], manifest["threadpool_count"], manifest["complete"]) == (method, count, True)
    # int8 packs a byte per weight, int4 half a byte: the int8 shards are about twice as large
    int4 = (tmp_path / "int4-T1" / "model-00001-of-00008.safetensors").stat().st_size
    int8 = (tmp_path / "int8-T1" / "model-00001-of-00008.safetensors").stat().st_size
    assert 1.8 < int8 / int4 < 2.1

    # each output resumes on its own: damage one layer of one output, re-run the same command
    damaged = tmp_path / "int8-T2" / "model-00003-of-00008.safetensors"
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    capsys.readouterr()
    assert main(args(ckpt, "--output-template", template, "--quant-method", "int4,int8", "--threadpool-count", "1,2",
                     "--json", str(report))) == 0
    reports = {(r["method"], r["threadpool_count"]): r for r in json.loads(report.read_text())}
    assert reports["int8", 2]["layers_converted"] == 1 and reports["int8", 2]["layers_resumed"] == LAYERS - 1
    assert all(r["layers_converted"] == 0 for k, r in reports.items() if k != ("int8", 2))
    assert reports["int8", 2]["input_bytes"] == reports["int8", 2]["input_bytes"] > 0
    assert tree_hashes(tmp_path / "int8-T2") == single["int8", 2]


@pytest.mark.gpu
def test_multi_output_pass_on_the_gpu_equals_cpu_runs(ckpt, single, tmp_path):
    """--device cuda packs every output of the pass (one upload per output and batch): the CPU's bytes."""
    argv = ["-i", str(ckpt), "--no-progress", "--device", "cuda", "--output-template",
            str(tmp_path / "{method}-T{threadpool_count}"), "--quant-method", "int4,int8", "--threadpool-count", "1,2"]
    assert main(argv) == 0
    for method, count in single:
        assert tree_hashes(tmp_path / f"{method}-T{count}") == single[method, count], (method, count)


def test_multi_output_reads_the_source_once(ckpt, tmp_path, monkeypatch):
    """Every source batch is read once for all outputs: the reader is asked for each layer once."""
    from kt_convert.convert import layer_io

    asked = []
    real = layer_io.LayerReader.batches

    def batches(self, lp):
        asked.append(lp.layer)
        return real(self, lp)

    monkeypatch.setattr(layer_io.LayerReader, "batches", batches)
    assert main(args(ckpt, "--output-template", str(tmp_path / "{kt_method}_{threadpool_count}"),
                     "--quant-method", "int4,int8", "--threadpool-count", "2")) == 0
    assert asked == list(range(LAYERS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["AMXINT4_2", "AMXINT8_2"]


def test_job_file_lists_the_outputs(ckpt, single, tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"outputs": [{"output": "a", "quant_method": "int8", "threadpool_count": 1},
                                           {"output": str(tmp_path / "b"), "quant_method": "int4",
                                            "threadpool_count": 2}]}))
    assert main(args(ckpt, "--job-file", str(job))) == 0
    assert tree_hashes(tmp_path / "a") == single["int8", 1]
    assert tree_hashes(tmp_path / "b") == single["int4", 2]
    for body, message in [({"outputs": []}, "expected {\"outputs\""),
                          ({"outputs": [{"output": "c", "quant_method": "int3"}]}, "outputs[0]: quant_method 'int3'"),
                          ({"outputs": [{"output": "c", "threadpool_count": 0}]}, "threadpool_count 0 must be a positive"),
                          ({"outputs": [{"output": "c", "method": "int4"}]}, "'method' is not a field of an output"),
                          ({"outputs": [{"output": "c"}, {"output": "c"}]}, "is named twice")]:
        job.write_text(json.dumps(body))
        assert main(args(ckpt, "--job-file", str(job))) == 2
        assert message in capsys.readouterr().err, message
    job.write_text("{not json")
    assert main(args(ckpt, "--job-file", str(job))) == 2
    assert str(job) in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def write_job(path, *outputs):
    path.write_text(json.dumps({"outputs": list(outputs)}))
    return path


def single_run(ckpt, out, *flags):
    """A single-output run of the command line: the bytes a job file's output must equal."""
    assert main(args(ckpt, "-o", str(out), *flags)) == 0
    return tree_hashes(out)


def test_job_file_says_every_per_output_option(ckpt, single, tmp_path):
    """Each field of an output (OutputSpec) in a job file gives the output its command-line option gives: an
    entry with only an output takes the command line's defaults; merge, include_non_expert and
    kt_sft_manifest make the files of --no-merge-safetensor, --include-non-expert and --kt-sft-manifest."""
    cases = {  # output -> (job file entry, the single run's flags)
        "plain": ({}, []),
        "folders": ({"quant_method": "int8", "threadpool_count": 1, "merge": False},
                    ["--quant-method", "int8", "--threadpool-count", "1", "--no-merge-safetensor"]),
        "non-expert": ({"include_non_expert": True}, ["--include-non-expert"]),
        "sft": ({"quant_method": "int8", "merge": False, "kt_sft_manifest": True},
                ["--quant-method", "int8", "--no-merge-safetensor", "--kt-sft-manifest"]),
    }
    job = write_job(tmp_path / "job.json", *({"output": name, **entry} for name, (entry, _) in cases.items()))
    assert main(args(ckpt, "--job-file", str(job))) == 0
    assert tree_hashes(tmp_path / "plain") == single["int4", 2]
    for name, (_, flags) in cases.items():
        ref = tmp_path / "ref" / name
        assert tree_hashes(tmp_path / name) == single_run(ckpt, ref, *flags), name
    # the options took effect: kt's folders, a last shard of non-expert tensors, kt's SFT manifest beside records
    assert (tmp_path / "folders" / "_layer_0" / "_numa_0").is_dir()
    assert read_json(tmp_path / "non-expert" / INDEX_FILE)["weight_map"].keys() > read_json(
        tmp_path / "plain" / INDEX_FILE)["weight_map"].keys()
    assert (tmp_path / "sft" / "kt-weight-manifest.json").is_file()
    assert read_json(tmp_path / "sft.kt-convert" / MANIFEST_FILE)["method"] == "int8"
    assert tree_hashes(tmp_path / "sft.kt-convert") == tree_hashes(tmp_path / "ref" / "sft.kt-convert")


def test_job_file_overwrite_and_resume_layer_are_per_output(ckpt, single, tmp_path, capsys):
    """overwrite replaces an output made with other settings (refused without it); resume_layer keeps the
    layers kt's own script left in an output, as --overwrite and --resume-layer do."""
    other = tmp_path / "other"
    assert main(args(ckpt, "-o", str(other), "--quant-method", "int8")) == 0
    job = write_job(tmp_path / "job.json", {"output": "other"})
    assert main(args(ckpt, "--job-file", str(job))) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert read_json(other / MANIFEST_FILE)["method"] == "int8"  # untouched
    # kt's script stopped after two layers of a --no-merge-safetensor output: its _layer_L folders only
    ref = tmp_path / "ref"
    assert main(args(ckpt, "-o", str(ref), "--no-merge-safetensor")) == 0
    kt = tmp_path / "kt"
    kt.mkdir()
    for layer in (0, 1):
        shutil.copytree(ref / f"_layer_{layer}", kt / f"_layer_{layer}")
    kept = (kt / "_layer_0" / "_numa_0").stat().st_ino
    capsys.readouterr()
    job = write_job(tmp_path / "job.json", {"output": "other", "overwrite": True},
                    {"output": "kt", "merge": False, "resume_layer": 1})
    assert main(args(ckpt, "--job-file", str(job))) == 0
    assert "--resume-layer 1: kt's layer 0 matches a fresh conversion byte for byte: kept" in capsys.readouterr().err
    assert tree_hashes(other) == single["int4", 2]
    assert tree_hashes(kt) == tree_hashes(ref) and (kt / "_layer_0" / "_numa_0").stat().st_ino == kept


def test_job_file_entries_default_to_the_command_lines_options(ckpt, single, tmp_path, capsys):
    """The command line's per-output options are the base of every entry; an entry's field wins."""
    job = write_job(tmp_path / "job.json", {"output": "a"}, {"output": "b", "merge": True, "threadpool_count": 1})
    assert main(args(ckpt, "--job-file", str(job), "--quant-method", "int8", "--no-merge-safetensor")) == 0
    assert tree_hashes(tmp_path / "a") == single_run(ckpt, tmp_path / "ref", "--quant-method", "int8",
                                                     "--no-merge-safetensor")
    assert tree_hashes(tmp_path / "b") == single["int8", 1]
    # a list of values is one output per value: not the base of a job file's entries
    assert main(args(ckpt, "--job-file", str(job), "--quant-method", "int4,int8")) == 2
    assert "give each output of the job file its own" in capsys.readouterr().err


def test_job_file_group_size_per_output(tmp_path):
    """group_size of a group-wise method, per output: the bytes of --quant-method rawint4 --group-size G."""
    from kt_convert.synthetic.families import make_family_checkpoint

    src = make_family_checkpoint(tmp_path / "qwen", "qwen3_moe_bf16").path
    job = write_job(tmp_path / "job.json", {"output": "g64", "quant_method": "rawint4", "group_size": 64},
                    {"output": "g-default", "quant_method": "rawint4"})
    assert main(args(src, "--job-file", str(job))) == 0
    assert tree_hashes(tmp_path / "g64") == single_run(src, tmp_path / "ref64", "--quant-method", "rawint4",
                                                       "--group-size", "64")
    assert tree_hashes(tmp_path / "g-default") == single_run(src, tmp_path / "ref", "--quant-method", "rawint4")
    assert read_json(tmp_path / "g64" / MANIFEST_FILE)["method"] == "rawint4-g64"
    assert read_json(tmp_path / "g-default" / MANIFEST_FILE)["method"] == "rawint4-g32"


BAD_FIELD_VALUES = {  # an output field -> values a job file may not give it
    "quant_method": ["int3", 4, None, ["int4"], "rawint4-g32"],
    "group_size": [48, "64", 64.0, True, 0],
    "threadpool_count": [0, -1, "2", 2.5, True, None, [2]],
    "merge": ["false", 0, None, {}],
    "include_non_expert": ["yes", 1],
    "kt_sft_manifest": [1, None],
    "overwrite": ["true", 0],
    "resume_layer": [-1, "1", 1.5, True],
}


def test_bad_field_values_cover_every_output_field():
    from kt_convert.convert.options import OUTPUT_FIELDS

    assert set(BAD_FIELD_VALUES) == set(OUTPUT_FIELDS) - {"output"}


@pytest.mark.parametrize("name, value", [(n, v) for n, vs in BAD_FIELD_VALUES.items() for v in vs],
                         ids=lambda x: repr(x))
def test_job_file_refuses_a_bad_value_of_each_field(ckpt, tmp_path, capsys, name, value):
    job = write_job(tmp_path / "job.json", {"output": "o"}, {"output": "p", name: value})
    assert main(args(ckpt, "--job-file", str(job))) == 2
    err = capsys.readouterr().err
    assert f"{job}: outputs[1]: {name} {value!r} " in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["job.json"]


@pytest.mark.parametrize("body, words", [
    ({"outputs": [{"output": "o", "group_size": 64}]}, ["outputs[0]: quant_method 'int4', group_size 64",
                                                        "applies to rawint4"]),
    ({"outputs": [{"output": "o", "quant_method": "rawint4", "group_size": 32}], "device": "cpu"},
     ["expected {\"outputs\"", "nothing else"]),
    ({"outputs": ["o"]}, ["outputs[0]: an object with an output"]),
    ({"outputs": [{"quant_method": "int8"}]}, ["outputs[0]: output must be a directory path"]),
    ({"outputs": {"output": "o"}}, ["expected {\"outputs\""]),
    ([{"output": "o"}], ["expected {\"outputs\""]),
])
def test_job_file_structure_is_checked(ckpt, tmp_path, capsys, body, words):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(body))
    assert main(args(ckpt, "--job-file", str(job))) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["job.json"]


def test_the_python_api_runs_several_outputs_and_one(ckpt, single, tmp_path):
    """convert_outputs(RunOptions, [OutputSpec, ...]) writes what the command line does; ConvertOptions is one
    run's options and one output's, field for field (each field in exactly one of them)."""
    from dataclasses import fields

    from kt_convert.convert.options import ConvertOptions, OutputSpec, RunOptions
    from kt_convert.convert.pipeline import convert, convert_outputs

    run_fields, spec_fields = {f.name for f in fields(RunOptions)}, {f.name for f in fields(OutputSpec)}
    assert not run_fields & spec_fields and {f.name for f in fields(ConvertOptions)} == run_fields | spec_fields
    run = RunOptions(input_path=str(ckpt), device="cpu", progress=False)
    reports = convert_outputs(run, [OutputSpec(output=tmp_path / "a", quant_method="int8", threadpool_count=1),
                                    OutputSpec(output=tmp_path / "b")])
    assert [(r.method, r.threadpool_count) for r in reports] == [("int8", 1), ("int4", 2)]
    assert tree_hashes(tmp_path / "a") == single["int8", 1] and tree_hashes(tmp_path / "b") == single["int4", 2]
    opts = ConvertOptions(input_path=str(ckpt), output=tmp_path / "c", quant_method="int8", device="cpu",
                          progress=False)
    assert (opts.run, opts.spec) == (RunOptions(input_path=str(ckpt), device="cpu", progress=False),
                                     OutputSpec(output=tmp_path / "c", quant_method="int8"))
    assert convert(opts).method == "int8" and tree_hashes(tmp_path / "c") == single["int8", 2]
    with pytest.raises(UserError, match="no output to convert"):
        convert_outputs(run, [])


def test_a_shard_of_a_job_file_with_a_kt_sft_output_is_refused(ckpt, tmp_path, capsys):
    job = write_job(tmp_path / "job.json", {"output": "a"},
                    {"output": "b", "quant_method": "int8", "merge": False, "kt_sft_manifest": True})
    assert main(args(ckpt, "--job-file", str(job), "--shard", "1/2")) == 2
    assert "--kt-sft-manifest is written by a single process" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["job.json"]


def test_the_job_file_of_the_docs_reads_as_shown_and_its_table_names_every_field(tmp_path):
    """docs/BATCH.md: its job file is read as the outputs it describes; its table lists each OutputSpec field."""
    import re

    from kt_convert.convert.cli.batch_options import read_job_file
    from kt_convert.convert.options import OUTPUT_FIELDS, OutputSpec

    text = (ROOT / "docs" / "BATCH.md").read_text()
    job = tmp_path / "job.json"
    job.write_text(re.search(r"```json\n(.*?)```", text, flags=re.S)[1])
    specs = read_job_file(job, {})
    assert specs[0] == OutputSpec(output=tmp_path / "ds3-int4-T2")
    assert (specs[2].quant_method, specs[2].group_size) == ("rawint4", 64)
    assert (specs[3].merge, specs[4].kt_sft_manifest, specs[5].include_non_expert) == (False, True, True)
    table = re.findall(r"^\| `(\w+)` \|", text, flags=re.M)
    assert table == list(OUTPUT_FIELDS)


def test_job_file_with_the_group_size_of_the_command_line(ckpt, tmp_path, capsys):
    """--group-size is the base of every entry: an int4 entry must then say group_size null."""
    job = write_job(tmp_path / "job.json", {"output": "o"})
    assert main(args(ckpt, "--job-file", str(job), "--group-size", "64")) == 2
    assert "outputs[0]: quant_method 'int4', group_size 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--quant-method", "int4,int8", "-o", "OUT"], "name them with --output-template"),
    (["--output-template", "OUT/{method}", "--threadpool-count", "1,2"], "same directory: use {threadpool_count}"),
    (["--output-template", "OUT/{meth}"], "unknown field {meth}"),
    (["--quant-method", "int4,int4", "-o", "OUT"], "names a value twice"),
    ([], "pass either --output"),
    (["-o", "OUT", "--output-template", "OUT/{method}"], "pass either --output"),
])
def test_bad_output_lists_exit_2(ckpt, tmp_path, capsys, extra, message):
    extra = [e.replace("OUT", str(tmp_path / "o")) for e in extra]
    assert main(args(ckpt, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- shards: which layers, from where --------------------------------------------------------------


def test_shard_layers_split_contiguously_and_cover_every_layer_once():
    layers = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]
    parts = [shard_layers(layers, ShardSpec(i, 4)) for i in range(4)]
    assert parts == [[1, 2, 3], [5, 8, 13], [21, 34], [55, 89]]
    for n in range(1, 13):
        parts = [shard_layers(layers, ShardSpec(i, n)) for i in range(n)]
        assert sum(parts, []) == layers  # every layer once, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_from_the_environment():
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    spec = resolve_shard(None, None, slurm)  # --array=5-8, task 7: the third of four
    assert (str(spec), spec.index, spec.origin) == ("3/4", 2, "SLURM_ARRAY_TASK_ID 7 of the array 5..8")
    stepped = {**slurm, "SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_STEP": "2"}  # --array=5-11:2
    assert str(resolve_shard(None, None, stepped)) == "3/4"
    assert resolve_shard(None, None, stepped).tasks.of([0, 3]) == "SLURM array task 5, 11"
    k8s = {"JOB_COMPLETION_INDEX": "3"}  # Kubernetes numbers its pods from 0: the fourth shard
    spec = resolve_shard(None, 8, k8s)
    assert (str(spec), spec.index, spec.origin) == ("4/8", 3, "JOB_COMPLETION_INDEX 3")
    assert str(resolve_shard(None, 8, {"JOB_COMPLETION_INDEX": "0"})) == "1/8"
    assert str(resolve_shard(None, None, {**slurm, "SLURM_ARRAY_TASK_ID": "5"})) == "1/4"  # the array's first task
    assert resolve_shard(None, None, {}) is None
    flag = resolve_shard("1/3", None, slurm)  # the flag wins over the environment; it counts from 1
    assert (str(flag), flag.index, flag.count, flag.tasks) == ("1/3", 0, 3, None)
    assert [str(parse_shard(f"{i}/2")) for i in (1, 2)] == ["1/2", "2/2"]
    for flag, count, env, message in [
        (None, None, k8s, "pass --shard-count"),
        (None, 8, {}, "no array index is set"),
        (None, 3, slurm, "contradicts SLURM_ARRAY_TASK_COUNT=4"),
        (None, None, {"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT not"),
        (None, None, {**slurm, "SLURM_ARRAY_TASK_ID": "x"}, "not a non-negative integer"),
        (None, None, {**slurm, "SLURM_ARRAY_TASK_ID": "9"}, "the task is outside the array"),
        (None, None, {**stepped, "SLURM_ARRAY_TASK_ID": "8"}, "not MIN 5 plus a multiple of STEP 2"),
        (None, 2, {"JOB_COMPLETION_INDEX": "2"}, "outside 0..1"),
        ("5/4", None, {}, "there are 4 shards, numbered 1 to 4"),
        ("0/4", None, {}, "shards are numbered from 1: the first of 4 is --shard 1/4, the last --shard 4/4"),
        ("0/1", None, {}, "numbered from 1"),
        ("1/0", None, {}, "between 1 and"),
        ("1-4", None, {}, "write NUMBER/COUNT with NUMBER counted from 1"),
        ("1/4", 3, {}, "disagree"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_shard(flag, count, env)
    assert parse_shard(" 1 / 1 ") == ShardSpec(0, 1)


def test_shard_index_from_slurm_environment_on_the_command_line(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert main(args(ckpt, "-o", str(out), "--json", str(tmp_path / "r.json"))) == 0
    report = read_json(tmp_path / "r.json")
    assert report["shard"] == "2/4" and report["layers_converted"] == 2 and report["complete"] is False
    assert sorted(os.listdir(out / SHARD_DIR / "done")) == ["layer_2.json", "layer_3.json"]


def test_shard_zero_is_refused_with_the_numbering_rule(ckpt, tmp_path, capsys):
    assert main(args(ckpt, "-o", str(tmp_path / "out"), "--shard", "0/2")) == 2
    err = capsys.readouterr().err
    assert "--shard 0/2: shards are numbered from 1: the first of 2 is --shard 1/2, the last --shard 2/2" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_finalize_names_the_slurm_tasks_of_the_missing_shards(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # sbatch --array=1-4: task ids are the shard numbers
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    for task in ("2", "4"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1")) == 0
    assert sorted(os.listdir(out / SHARD_DIR / "done")) == [f"layer_{x}.json" for x in (2, 3, 6, 7)]
    capsys.readouterr()
    assert main(["finalize", str(out)]) == 2
    err = capsys.readouterr().err
    assert "4 layers not converted yet (0, 1, 4, 5); re-run --shard 1/4, --shard 3/4 (SLURM array task 1, 3)" in err


# --- shards: one output directory, several processes ------------------------------------------------


def test_finalize_before_every_shard_is_done_exits_2_naming_the_missing_layers(ckpt, single, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1", "--shard", "2/4")) == 0
    assert main(["finalize", str(out)]) == 2
    err = capsys.readouterr().err
    assert "6 layers not converted yet (0, 1, 4, 5, 6, 7); re-run --shard 1/4, --shard 3/4, --shard 4/4 " in err, err
    assert not (out / INDEX_FILE).exists() and read_json(out / MANIFEST_FILE)["complete"] is False
    for i in (1, 3):
        assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1", "--shard", f"{i}/4")) == 0
    assert main(["finalize", str(out)]) == 2
    assert "2 layers not converted yet (6, 7); re-run --shard 4/4 " in capsys.readouterr().err
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1", "--shard", "4/4")) == 0  # the last completes
    assert "is complete" in capsys.readouterr().err
    assert tree_hashes(out) == single["int4", 1]
    assert main(["finalize", str(out)]) == 0  # idempotent
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1", "--shard", "1/4")) == 0
    assert tree_hashes(out) == single["int4", 1]
    assert main(["finalize", str(tmp_path / "nothing")]) == 2


def test_killed_shard_rerun_redoes_only_its_unfinished_layers(ckpt, single, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shard = ["-o", str(out), "--threadpool-count", "2", "--json", str(tmp_path / "r.json")]
    real, calls = pipeline.convert_layer, []

    def crash_on_third_layer(reader, plan, lp, outputs, *a, **kw):
        calls.append(lp.layer)
        last_write = real(reader, plan, lp, outputs, *a, **kw)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the data, before the shard is committed
        return last_write

    monkeypatch.setattr(pipeline, "convert_layer", crash_on_third_layer)
    assert main(args(ckpt, *shard, "--shard", "2/2")) == 130
    monkeypatch.setattr(pipeline, "convert_layer", real)
    assert sorted(os.listdir(out / SHARD_DIR / "done")) == ["layer_4.json", "layer_5.json"]
    assert main(args(ckpt, *shard, "--shard", "2/2")) == 0
    report = read_json(tmp_path / "r.json")
    assert (report["layers_converted"], report["layers_resumed"]) == (2, 2)
    assert main(args(ckpt, *shard, "--shard", "1/2")) == 0
    assert read_json(tmp_path / "r.json")["complete"] is True
    assert tree_hashes(out) == single["int4", 2]


def test_single_run_resumes_what_shards_started_and_refuses_live_claims(ckpt, single, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1", "--shard", "1/2")) == 0
    held = ClaimDir(out / SHARD_DIR / "claims").acquire(6)  # as if a shard process were converting layer 6
    assert isinstance(held, Claim)
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1")) == 2
    assert "being written by --shard processes (layer_6.claim" in capsys.readouterr().err
    held.release()
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1", "--json", str(tmp_path / "r.json"))) == 0
    report = read_json(tmp_path / "r.json")
    assert (report["layers_converted"], report["layers_resumed"]) == (4, 4)
    assert tree_hashes(out) == single["int4", 1]


def test_shards_of_several_outputs(ckpt, single, tmp_path):
    """--shard with --output-template: each output gets its own claims, records and completion."""
    cmd = ["--output-template", str(tmp_path / "{method}-T{threadpool_count}"), "--quant-method", "int4,int8",
           "--threadpool-count", "1", "--json", str(tmp_path / "r.json")]
    assert main(args(ckpt, *cmd, "--shard", "2/2")) == 0
    assert [r["complete"] for r in read_json(tmp_path / "r.json")] == [False, False]
    assert main(args(ckpt, *cmd, "--shard", "1/2")) == 0
    assert [r["complete"] for r in read_json(tmp_path / "r.json")] == [True, True]
    for method in ("int4", "int8"):
        assert tree_hashes(tmp_path / f"{method}-T1") == single[method, 1]


@pytest.mark.parametrize("extra", [["--no-merge-safetensor"], ["--include-non-expert"], ["--layers", "1-6"]],
                         ids=["kt-folders", "non-expert", "partial"])
def test_shards_match_a_single_run_in_every_layout(ckpt, tmp_path, extra):
    flags = ["--threadpool-count", "2", *extra]
    assert main(args(ckpt, "-o", str(tmp_path / "single"), *flags)) == 0
    for i in (3, 1, 2):
        assert main(args(ckpt, "-o", str(tmp_path / "sharded"), *flags, "--shard", f"{i}/3")) == 0
    assert tree_hashes(tmp_path / "sharded") == tree_hashes(tmp_path / "single")
    assert recorded_layers(tmp_path / "sharded") == recorded_layers(tmp_path / "single") == \
        sorted(int(k) for k in read_json(tmp_path / "single" / MANIFEST_FILE)["completed"])


def recorded_layers(out):
    """The layers the verified record holds, each checked against the manifest and the files as they are."""
    completed = read_json(out / MANIFEST_FILE)["completed"]
    entries = read_verified(out)
    for key in entries:
        rec = completed[key]
        assert is_verified(entries, int(key), rec["sha256"], rec["files"], [out / f for f in rec["files"]]), key
    return sorted(int(k) for k in entries)


def test_concurrent_shard_records_lose_no_layer(ckpt, tmp_path):
    """--shard processes merge their layers into the one record under the output's lock: eight writers at
    once (threads: the lock is an flock per open file, as between processes) leave all eight layers."""
    out = tmp_path / "out"
    assert main(args(ckpt, "-o", str(out), "--threadpool-count", "1")) == 0
    completed = read_json(out / MANIFEST_FILE)["completed"]
    (out / VERIFIED_FILE).unlink()
    job = SimpleNamespace(out=out, shared=True, verified={})
    start = threading.Barrier(LAYERS)
    errors = []

    def record(key):
        try:
            start.wait()
            output_job._record_verified(job, LayerRecord(**completed[key]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=record, args=(key,)) for key in completed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and recorded_layers(out) == list(range(LAYERS))
    assert not (out / (VERIFIED_FILE + ".tmp")).exists()


def _once_after(monkeypatch, module, name: str, path, then):
    """Patches module.name so that its first call on `path` (an os.open of it, or an flock of an fd opened on
    it) runs `then()` right after the real call (open) or right before it (flock): the interleaving a loaded
    machine produces once in a while, forced."""
    real = getattr(module, name)
    done = []

    def patched(target, *rest, **kw):
        ours = not done and (str(target) == str(path) if name == "open" else
                             os.path.realpath(f"/proc/self/fd/{target}") == os.path.realpath(path))
        if ours and name != "open":
            done.append(then())
        result = real(target, *rest, **kw)
        if ours and name == "open":
            done.append(then())
        return result

    monkeypatch.setattr(module, name, patched)
    return done


def test_lock_file_removed_between_its_open_and_its_check_is_opened_again(tmp_path, monkeypatch):
    """Its holder releases the lock (removing the file) just after another converter opened it: the file that
    one holds has no name left, which is no planted hard link: it opens the name again and takes the lock."""
    from kt_convert.convert.output_dir import OutputLock
    from kt_convert.kt_runtime.format.names import LOCK_FILE

    holder = OutputLock(tmp_path)
    fired = _once_after(monkeypatch, os, "open", tmp_path / LOCK_FILE, holder.release)
    second = OutputLock(tmp_path)
    assert fired and (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(UserError, match="being written by another converter"):
        OutputLock(tmp_path)  # the lock the second one holds is the file at the name
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_file_removed_between_its_check_and_its_flock_is_opened_again(tmp_path, monkeypatch):
    import fcntl

    from kt_convert.convert.output_dir import OutputLock
    from kt_convert.kt_runtime.format.names import LOCK_FILE

    holder = OutputLock(tmp_path)
    fired = _once_after(monkeypatch, fcntl, "flock", tmp_path / LOCK_FILE, holder.release)
    second = OutputLock(tmp_path)
    assert fired and (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(UserError, match="being written by another converter"):
        OutputLock(tmp_path)
    second.release()


def test_shared_record_replaced_while_it_is_opened_reads_the_new_one(tmp_path, monkeypatch):
    """A record of the shared folder renamed over (another shard recorded that layer again) just after it was
    opened for reading: the one-name rule opens the name again instead of refusing the old file."""
    from kt_convert.kt_runtime.format import files, fsio

    record = tmp_path / "layer_0.json"
    fsio.atomic_write_text(record, '{"v": 1}')
    fired = _once_after(monkeypatch, os, "open", record, lambda: fsio.atomic_write_text(record, '{"v": 2}'))
    assert files.read_json(record, files.SHARED, what="layer record", max_bytes=1024) == {"v": 2} and fired


def test_a_name_removed_at_every_open_is_refused_in_the_end(tmp_path, monkeypatch):
    """Another program deleting the lock file as fast as it is made: bounded, and said."""
    from kt_convert.kt_runtime.format import fsio
    from kt_convert.kt_runtime.format.errors import UnsafePathError
    from kt_convert.kt_runtime.format.names import LOCK_FILE

    path = tmp_path / LOCK_FILE
    real_open = os.open

    def open_and_lose(target, *a, **k):
        fd = real_open(target, *a, **k)
        if str(target) == str(path):
            os.unlink(path)
        return fd

    monkeypatch.setattr(os, "open", open_and_lose)
    with pytest.raises(UnsafePathError, match="was removed each of the 100 times it was opened"):
        fsio.open_single_link(path)


def test_shard_refuses_overwrite(ckpt, tmp_path, capsys):
    assert main(args(ckpt, "-o", str(tmp_path / "o"), "--shard", "1/2", "--overwrite")) == 2
    assert "--overwrite cannot be combined with --shard" in capsys.readouterr().err


SLOW_DISK = ("import os, sys, time; import kt_convert.kt_runtime.format.writer as w; "
             "w._os_write = lambda fd, d: (time.sleep(0.002), os.write(fd, d))[1]; "
             "from kt_convert.convert.cli import main; sys.exit(main(sys.argv[1:]))")


def _start_shard(ckpt, out, i, n, slow=False):
    cmd = ["-c", SLOW_DISK] if slow else ["-m", "kt_convert"]
    cmd += args(ckpt, "-o", str(out), "--threadpool-count", "2", "--cpuinfer-threads", "1", "--shard", f"{i + 1}/{n}",
                "--json", str(out.parent / f"r{i}.json"))
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


def test_concurrent_shards_with_kills_give_the_single_run_bytes(ckpt, single, tmp_path):
    """4 processes on one directory at once; two (their disk slowed to ~2 ms per write) are SIGKILLed: one
    in the middle of its first layer, one in its second after its first is recorded, leaving their claims
    and temporaries behind. The four then run again at once: the killed shards' layers are taken over and
    redone, the others' not, the output is completed once, byte for byte the single run's."""
    out = tmp_path / "out"
    procs = [_start_shard(ckpt, out, i, 4, slow=i in (1, 3)) for i in range(4)]
    try:
        _wait_for(out / "model-00003-of-00008.safetensors.tmp", procs[1])  # shard 1 = layers 2, 3
        procs[1].send_signal(signal.SIGKILL)
        _wait_for(out / SHARD_DIR / "done" / "layer_6.json", procs[3])  # shard 3 = layers 6, 7
        _wait_for(out / "model-00008-of-00008.safetensors.tmp", procs[3])
        procs[3].send_signal(signal.SIGKILL)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes[1] == codes[3] == -signal.SIGKILL
    assert codes[0] == codes[2] == 0, [p.stderr.read() for p in procs]
    assert not (out / INDEX_FILE).exists() and read_json(out / MANIFEST_FILE)["complete"] is False
    assert (out / "model-00003-of-00008.safetensors.tmp").exists()
    claims = out / SHARD_DIR / "claims"
    for layer, proc in ((2, procs[1]), (7, procs[3])):  # a dead process's claims, unlocked, still naming it
        assert Owner.parse((claims / f"layer_{layer}.claim").read_bytes()).pid == proc.pid
    assert sorted(os.listdir(out / SHARD_DIR / "done")) == [f"layer_{x}.json" for x in (0, 1, 4, 5, 6)]

    procs = [_start_shard(ckpt, out, i, 4) for i in range(4)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errs
    reports = [read_json(tmp_path / f"r{i}.json") for i in range(4)]
    assert [r["layers_converted"] for r in reports] == [0, 2, 0, 1]  # only the unfinished layers
    assert sum("is complete" in e for e in errs) == 1  # completed exactly once
    assert tree_hashes(out) == single["int4", 2]
    assert not (out / SHARD_DIR).exists()
    # the record is whole and every entry true; the layers of the first round's surviving shards are in it
    # (later ones too unless a finalize held the lock past RECORD_LOCK_WAIT_S, or their process was killed)
    assert set(recorded_layers(out)) >= {0, 1, 4, 5}


# --- claims ---------------------------------------------------------------------------------------


def test_claim_is_exclusive_and_released(tmp_path):
    claims = ClaimDir(tmp_path)
    first = claims.acquire(3)
    assert isinstance(first, Claim)
    again = ClaimDir(tmp_path).acquire(3)  # another open file description: another holder
    assert isinstance(again, Held) and again.owner.pid == os.getpid() and again.checked
    first.release()
    assert (tmp_path / "layer_3.claim").read_bytes() == b""  # a released claim reads free
    second = claims.acquire(3)
    assert isinstance(second, Claim)
    second.release()


def test_claim_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "layer_0.claim").write_bytes(Owner(socket.gethostname(), dead.pid, "", "1").to_bytes())
    claim = ClaimDir(tmp_path).acquire(0)
    assert isinstance(claim, Claim)
    assert Owner.parse((tmp_path / "layer_0.claim").read_bytes()).pid == os.getpid()
    claim.release()


def test_claims_without_flock_judge_by_owner_record(tmp_path, monkeypatch):
    monkeypatch.setattr(claims_mod, "_try_flock", lambda fd: None)  # a filesystem without flock
    here = Owner.me()
    live = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not process_start_time(live.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        cases = {
            0: (Owner(here.host, live.pid, here.boot_id, process_start_time(live.pid)), "held"),
            1: (Owner(here.host, live.pid, here.boot_id, "1"), "taken"),  # the pid was recycled
            2: (Owner(here.host, live.pid, "another-boot", process_start_time(live.pid)), "taken"),  # rebooted
            3: (Owner("another-host", live.pid, "b", "1"), "unknown"),
        }
        for layer, (owner, want) in cases.items():
            (tmp_path / f"layer_{layer}.claim").write_bytes(owner.to_bytes())
            got = ClaimDir(tmp_path).acquire(layer)
            if want == "taken":
                assert isinstance(got, Claim), layer
                got.release()
            else:
                assert isinstance(got, Held) and got.checked == (want == "held"), layer
        assert "delete " + str(tmp_path / "layer_3.claim") in ClaimDir(tmp_path).acquire(3).describe()
    finally:
        live.kill()
        live.wait()
