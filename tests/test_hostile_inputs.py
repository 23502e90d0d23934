"""Hostile inputs: checkpoints and packed outputs built to escape their folder, to block the
reader, to break the JSON parsers, to pass for a whole model when they are not, or that change
under the converter. Every converter case ends with exit 2, a message naming the file and the
entry or field and what to do, no traceback, and nothing that looks complete; every loader case
with a ValueError subclass. Every test runs under a deadline (SIGALRM) so that a hang fails it,
and the security cases check that the file outside the checkpoint is never opened (it is a FIFO:
a blocking open would hang) or never read (its access time stays put)."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from kt_convert import kt_runtime
from helpers import ROOT
from helpers.outputs import read_json
from kt_convert.convert.cli import main
from kt_convert.convert.errors import UserError
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.synthetic.families import make_family_checkpoint
from kt_convert.kt_runtime.format.errors import InputFileError, SafetensorsChangedError
from kt_convert.kt_runtime.format.names import INDEX_FILE, MANIFEST_FILE
from kt_convert.kt_runtime.format.input_files import (CONFIG_MAX_BYTES, INDEX_MAX_BYTES, MANIFEST_MAX_BYTES,
                                                      containment_root, read_json as read_json_file,
                                                      relative_name_problem, resolve_inside)
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from helpers.checkpoints import assert_nothing_complete, drop, rewrite, set_config
from helpers.hangs import DEADLINE_S, Hung, deadline  # noqa: F401 - autouse: a hang fails the test

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
W1 = "layers.1.ffn.experts.2.w1.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 layers, 4 experts, H=384, I=512, 2 shards (layer 1's experts in the second)."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("hostile") / "base", "v4-flash-tiny", num_experts=4,
                                    num_shards=2).path


@pytest.fixture(scope="module")
def converted(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-out") / "out"
    assert main(["-i", str(base), "-o", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def ck(base, tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(base, path)
    return path


def set_index(ck, fn):
    index = read_json(ck / INDEX_FILE)
    fn(index["weight_map"]) if callable(fn) else None
    (ck / INDEX_FILE).write_text(json.dumps(index))


def convert_fails(ck, out, capsys, *needles, extra=()):
    """Runs the CLI; asserts exit 2, one clean message with every needle, nothing complete."""
    code = main(["-i", str(ck), "-o", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.splitlines()[-1].startswith(("error: ", "Error: ")), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert_nothing_complete(out)
    return err


def outside_fifo(tmp_path) -> Path:
    """A FIFO outside the checkpoint: opening it for reading (without O_NONBLOCK) would block."""
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    fifo = other / "x.safetensors"
    os.mkfifo(fifo)
    return fifo


def atime_works(tmp_path) -> bool:
    probe = tmp_path / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (0, time.time()))
    probe.read_bytes()
    return os.stat(probe).st_atime > 1


def link_to_outside_copy(tmp_path, path: Path) -> Path:
    """Replaces `path` of the checkpoint by a symlink to an outside copy of it (outside_copy), returned."""
    outside = outside_copy(tmp_path, path)
    path.unlink()
    path.symlink_to(outside)
    return outside


def outside_copy(tmp_path, src: Path) -> Path:
    """A regular file outside the checkpoint, its access time set to 1970: any read moves it."""
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    dst = other / src.name
    shutil.copyfile(src, dst)
    os.utime(dst, (0, os.stat(dst).st_mtime))
    return dst


def assert_never_read(path: Path, tmp_path) -> None:
    if atime_works(tmp_path):
        assert os.stat(path).st_atime == 0, f"{path} was read"


# ------------------------------------------------------------------------------------------------
# 2. every path an input names stays inside the checkpoint
# ------------------------------------------------------------------------------------------------

def test_index_entry_climbing_out_is_refused_before_opening(ck, tmp_path, capsys):
    fifo = outside_fifo(tmp_path)
    set_index(ck, lambda wm: wm.update({W1: "../other/x.safetensors"}))
    err = convert_fails(ck, tmp_path / "out", capsys, INDEX_FILE, W1, "../other/x.safetensors", "'..'",
                        "re-download the index")
    assert "FIFO" not in err  # refused for its name, not because the FIFO was looked at
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("target", ["absolute-fifo", "/etc/passwd", "/dev/zero"])
def test_index_entry_with_an_absolute_path_is_refused(ck, tmp_path, capsys, target):
    name = str(outside_fifo(tmp_path)) if target == "absolute-fifo" else target
    set_index(ck, lambda wm: wm.update({W1: name}))
    convert_fails(ck, tmp_path / "out", capsys, INDEX_FILE, W1, repr(name), "absolute path")


@pytest.mark.parametrize("name,problem", [("", "is empty"), (".", "plain relative"), ("./" + SHARD2, "plain relative"),
                                          ("sub//x.safetensors", "plain relative"),
                                          ("sub/../" + SHARD2, "'..'"), ("a\\b.safetensors", "backslash")])
def test_index_entry_that_is_not_a_plain_name_is_refused(ck, tmp_path, capsys, name, problem):
    set_index(ck, lambda wm: wm.update({W1: name}))
    convert_fails(ck, tmp_path / "out", capsys, INDEX_FILE, W1, problem)


def test_shard_symlinked_to_a_fifo_outside_is_refused(ck, tmp_path, capsys):
    fifo = outside_fifo(tmp_path)
    (ck / SHARD2).unlink()
    (ck / SHARD2).symlink_to(fifo)
    err = convert_fails(ck, tmp_path / "out", capsys, SHARD2, "symlink", str(fifo), "outside", "copy the file")
    assert "FIFO" not in err


def test_shard_symlinked_to_a_valid_copy_outside_is_neither_read_nor_converted(ck, tmp_path, capsys):
    outside = link_to_outside_copy(tmp_path, ck / SHARD2)
    convert_fails(ck, tmp_path / "out", capsys, SHARD2, "symlink", "outside")
    assert_never_read(outside, tmp_path)


def test_globbed_shard_symlinked_outside_is_refused(ck, tmp_path, capsys):
    # no index: the *.safetensors of the folder are read; a link among them must not lead out
    (ck / INDEX_FILE).unlink()
    outside = link_to_outside_copy(tmp_path, ck / SHARD2)
    convert_fails(ck, tmp_path / "out", capsys, SHARD2, "outside")
    assert_never_read(outside, tmp_path)


@pytest.mark.parametrize("name", ["config.json", INDEX_FILE, "tokenizer.json", "generation_config.json"])
def test_json_file_symlinked_outside_is_refused(ck, tmp_path, capsys, name):
    outside = link_to_outside_copy(tmp_path, ck / name)
    convert_fails(ck, tmp_path / "out", capsys, name, "symlink", "outside")
    assert_never_read(outside, tmp_path)


def test_symlink_loop_is_refused(ck, tmp_path, capsys):
    (ck / SHARD2).unlink()
    (ck / SHARD2).symlink_to(ck / SHARD2)
    convert_fails(ck, tmp_path / "out", capsys, SHARD2)


def test_a_symlink_inside_the_checkpoint_and_a_subfolder_are_fine(ck, tmp_path):
    (ck / "sub").mkdir()
    os.replace(ck / SHARD2, ck / "sub" / SHARD2)
    (ck / SHARD2).symlink_to(Path("sub") / SHARD2)  # a link that stays inside
    assert main(["-i", str(ck), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    set_index(ck, lambda wm: wm.update({k: "sub/" + SHARD2 for k, v in wm.items() if v == SHARD2}))
    (ck / SHARD2).unlink()
    assert main(["-i", str(ck), "-o", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert kt_runtime.load_experts(tmp_path / "out2").layers == [0, 1]


def _hub_cache(base: Path, cache: Path, repo="org--tiny", sha="0" * 40, absolute=False) -> Path:
    """A Hugging Face cache repo folder: blobs named by hash, snapshot files linking into them."""
    import hashlib

    repo_dir = cache / f"models--{repo}"
    (repo_dir / "blobs").mkdir(parents=True)
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in sorted(base.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo_dir / "blobs" / blob)
        (snap / f.name).symlink_to((repo_dir / "blobs" / blob) if absolute else Path("../../blobs") / blob)
    return snap


def test_hub_cache_snapshot_reads_through_its_blobs_but_not_beyond(base, tmp_path, capsys):
    snap = _hub_cache(base, tmp_path / "hub")
    assert containment_root(snap) == (tmp_path / "hub" / "models--org--tiny").resolve()
    assert main(["-i", str(snap), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert kt_runtime.load_experts(tmp_path / "out").layers == [0, 1]
    # a link out of the repo folder is refused all the same
    outside = outside_copy(tmp_path, base / SHARD2)
    (snap / SHARD2).unlink()
    (snap / SHARD2).symlink_to(outside)
    convert_fails(snap, tmp_path / "out2", capsys, SHARD2, "outside", str(tmp_path / "hub" / "models--org--tiny"))
    assert_never_read(outside, tmp_path)


def test_local_dir_of_links_into_a_hub_cache_works(base, tmp_path):
    # huggingface-cli download --local-dir before huggingface_hub 0.23: absolute links to cache blobs
    snap = _hub_cache(base, tmp_path / "hub")
    local = tmp_path / "local"
    local.mkdir()
    for f in snap.iterdir():
        (local / f.name).symlink_to(os.path.realpath(f))
    assert main(["-i", str(local), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert kt_runtime.load_experts(tmp_path / "out").layers == [0, 1]


def test_containment_rules_directly(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    assert resolve_inside(folder, "a.txt") == (folder / "a.txt").resolve()
    for name in ("", ".", "..", "../x", "/x", "a/./b", "a//b", "a/", "x\0y", 5, None):
        assert relative_name_problem(name) is not None, name
    assert relative_name_problem("sub/dir/x.safetensors") is None
    (folder / "out").symlink_to("/etc")
    with pytest.raises(InputFileError, match="outside"):
        resolve_inside(folder, "out/passwd")
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ("a" * 64)).write_text("x")
    (folder / "blob").symlink_to(tmp_path / "blobs" / ("a" * 64))  # a blobs/ folder not in a hub cache
    with pytest.raises(InputFileError, match="outside"):
        resolve_inside(folder, "blob")


# the loader: manifest-named files and kt files


def _copy_output(converted, tmp_path) -> Path:
    out = tmp_path / "packed"
    shutil.copytree(converted, out, symlinks=True)
    return out


def test_loader_refuses_an_output_shard_linked_outside(converted, tmp_path):
    out = _copy_output(converted, tmp_path)
    outside = outside_copy(tmp_path, out / SHARD2)
    (out / SHARD2).unlink()
    (out / SHARD2).symlink_to(outside)
    with pytest.raises(kt_runtime.PackedWeightsError, match=r"(?s)model-00002.*outside"):
        kt_runtime.load_experts(out)
    assert_never_read(outside, tmp_path)


def test_loader_refuses_a_manifest_naming_paths_outside(converted, tmp_path):
    out = _copy_output(converted, tmp_path)
    fifo = outside_fifo(tmp_path)
    m = read_json(out / MANIFEST_FILE)
    for files in (["../other/x.safetensors"], [str(fifo)], ["."], [""], ["sub/../" + SHARD2]):
        m["completed"]["1"]["files"] = files
        (out / MANIFEST_FILE).write_text(json.dumps(m))
        with pytest.raises(kt_runtime.PackedWeightsError, match="inside the output directory"):
            kt_runtime.load_experts(out)


def test_loader_refuses_a_manifest_linked_outside(converted, tmp_path):
    out = _copy_output(converted, tmp_path)
    outside = outside_copy(tmp_path, out / MANIFEST_FILE)
    (out / MANIFEST_FILE).unlink()
    (out / MANIFEST_FILE).symlink_to(outside)
    with pytest.raises(kt_runtime.PackedWeightsError, match="outside"):
        kt_runtime.load_experts(out)
    assert_never_read(outside, tmp_path)


def test_loader_refuses_kt_files_linked_outside(base, tmp_path):
    out = tmp_path / "kt"
    assert main(["-i", str(base), "-o", str(out), "--no-progress", "--no-merge-safetensor"]) == 0
    kt_file = sorted((out / "_layer_1" / "_numa_0").iterdir())[0]
    outside = outside_copy(tmp_path, kt_file)
    kt_file.unlink()
    kt_file.symlink_to(outside)
    with pytest.raises(kt_runtime.PackedWeightsError, match="outside"):
        kt_runtime.load_experts(out, verify=False)
    assert_never_read(outside, tmp_path)
    (out / MANIFEST_FILE).unlink()  # a kt-kernel output without a manifest: inferred, checked the same way
    with pytest.raises(kt_runtime.PackedWeightsError, match="outside"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kt_runtime.load_experts(out)


def test_loader_reads_an_output_in_a_hub_cache(converted, tmp_path):
    snap = _hub_cache(converted, tmp_path / "hub", repo="org--tiny-kt")
    w = kt_runtime.load_experts(snap)
    assert w.layers == [0, 1] and not w.partial


# ------------------------------------------------------------------------------------------------
# 3. only regular files are read, never blocking; JSON files have a size cap
# ------------------------------------------------------------------------------------------------

def _make_special(path: Path, kind: str):
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(path))
        except OSError as e:  # AF_UNIX path length limit
            pytest.skip(f"cannot bind a socket at {path}: {e}")
        return s
    elif kind == "device":
        try:
            os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
        except PermissionError:
            pytest.skip("creating a device node needs root")
    return None


KIND_WORDS = {"fifo": "FIFO", "dir": "directory", "socket": "socket", "device": "character device"}


@pytest.mark.parametrize("kind", ["fifo", "dir", "socket", "device"])
@pytest.mark.parametrize("name", ["config.json", INDEX_FILE, SHARD2, "tokenizer.json"])
def test_special_file_where_a_checkpoint_file_should_be(ck, tmp_path, capsys, name, kind):
    keep = _make_special(ck / name, kind)
    try:
        convert_fails(ck, tmp_path / "out", capsys, name, KIND_WORDS[kind], "regular file")
    finally:
        if keep is not None:
            keep.close()


def test_fifo_among_globbed_shards(ck, tmp_path, capsys):
    (ck / INDEX_FILE).unlink()
    _make_special(ck / "model-00003-of-00003.safetensors", "fifo")
    convert_fails(ck, tmp_path / "out", capsys, "model-00003-of-00003.safetensors", "FIFO", "regular file")


def test_fifo_as_the_input_itself(tmp_path, capsys):
    os.mkfifo(tmp_path / "in.safetensors")
    code = main(["-i", str(tmp_path / "in.safetensors"), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "FIFO" in err and "checkpoint directory" in err, err


@pytest.mark.parametrize("name,cap", [("config.json", CONFIG_MAX_BYTES), (INDEX_FILE, INDEX_MAX_BYTES)])
def test_json_bigger_than_its_cap(ck, tmp_path, capsys, name, cap):
    with open(ck / name, "r+b") as f:  # sparse: costs no disk
        f.truncate(cap + 1)
    convert_fails(ck, tmp_path / "out", capsys, name, f"{cap >> 20} MiB")


def test_copied_model_file_bigger_than_its_cap(ck, tmp_path, capsys):
    with open(ck / "tokenizer.json", "r+b") as f:
        f.truncate((256 << 20) + 1)
    convert_fails(ck, tmp_path / "out", capsys, "tokenizer.json", "256 MiB")


@pytest.mark.parametrize("kind", ["fifo", "dir", "device"])
def test_loader_special_files(converted, tmp_path, kind):
    for name in (MANIFEST_FILE, SHARD2):
        out = _copy_output(converted, tmp_path / f"{kind}-{name}")
        _make_special(out / name, kind)
        with pytest.raises(kt_runtime.PackedWeightsError, match=KIND_WORDS[kind]):
            kt_runtime.load_experts(out)


def test_loader_fifo_as_a_kt_file_and_an_oversized_manifest(base, tmp_path):
    out = tmp_path / "kt"
    assert main(["-i", str(base), "-o", str(out), "--no-progress", "--no-merge-safetensor"]) == 0
    kt_file = sorted((out / "_layer_0" / "_numa_1").iterdir())[-1]
    _make_special(kt_file, "fifo")
    with pytest.raises(kt_runtime.PackedWeightsError, match="FIFO"):
        kt_runtime.load_experts(out, verify=False)
    with open(out / MANIFEST_FILE, "r+b") as f:
        f.truncate(MANIFEST_MAX_BYTES + 1)
    with pytest.raises(kt_runtime.PackedWeightsError, match=f"{MANIFEST_MAX_BYTES >> 20} MiB"):
        kt_runtime.load_experts(out)


def test_safetensors_file_never_blocks_on_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="FIFO"):
        SafetensorsFile(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------------
# 4. structured JSON is validated by type
# ------------------------------------------------------------------------------------------------

def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("value,words", [([SHARD2], "found a list"), (3, "found 3"), (None, "found null"),
                                          ({"a": 1}, "found an object")])
def test_weight_map_values_of_the_wrong_type(ck, tmp_path, capsys, value, words):
    set_index(ck, lambda wm: wm.update({W1: value}))
    convert_fails(ck, tmp_path / "out", capsys, INDEX_FILE, W1, "must be a file name", words)


@pytest.mark.parametrize("text,words", [
    ('{"weight_map": [1, 2]}', ["weight_map must be a JSON object"]),
    ('{"weight_map": {}}', ["weight_map is empty"]),
    ('{"weight_map": ' + _deep(200_000) + "}", ["not valid JSON", "nested too deeply"]),
    ('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}', ["not valid JSON", "too many digits"]),
    ('[1]', ["must be a JSON object", "found a list of 1 item"]),
])
def test_broken_index_json(ck, tmp_path, capsys, text, words):
    (ck / INDEX_FILE).write_text(text)
    convert_fails(ck, tmp_path / "out", capsys, INDEX_FILE, *words)


@pytest.mark.parametrize("change,words", [
    ({"hidden_size": "384"}, ["hidden_size must be an integer", "'384'"]),
    ({"hidden_size": True}, ["hidden_size must be an integer", "true"]),
    ({"hidden_size": 384.0}, ["hidden_size must be an integer", "384.0"]),
    ({"hidden_size": -384}, ["hidden_size must be an integer between 1 and"]),
    ({"hidden_size": 2**70}, ["hidden_size must be an integer", "digits"]),
    ({"n_routed_experts": [4]}, ["n_routed_experts must be an integer", "a list of 1 item"]),
    ({"num_experts_per_tok": 0}, ["num_experts_per_tok must be an integer between 1"]),
    ({"num_experts_per_tok": 5}, ["num_experts_per_tok 5 exceeds the 4 routed experts"]),
    ({"num_hidden_layers": 2**70}, ["num_hidden_layers must be an integer"]),
    ({"num_hidden_layers": None}, ["num_hidden_layers is null", "add it"]),
    ({"swiglu_limit": "inf"}, ["swiglu_limit must be a finite number > 0"]),
    ({"swiglu_limit": -1.0}, ["swiglu_limit must be a finite number > 0", "-1.0"]),
    ({"swiglu_limit": 0}, ["swiglu_limit must be a finite number > 0"]),
    ({"swiglu_limit": 1e400}, ["swiglu_limit must be a finite number > 0", "inf"]),
    ({"model_type": 7}, ["model_type must be a string", "found 7"]),
    ({"text_config": "x"}, ["text_config must be a JSON object"]),
    ({"expert_dtype": ["fp4"]}, ["expert_dtype must be a string"]),
    ({"torch_dtype": {"a": 1}}, ["torch_dtype must be a string"]),
])
def test_config_values_of_the_wrong_type_or_range(ck, tmp_path, capsys, change, words):
    set_config(ck, **change)
    convert_fails(ck, tmp_path / "out", capsys, "config.json", *words)


def _config_text(ck, kind: str) -> bytes:
    if kind == "deep":
        return _deep(200_000).encode()
    if kind == "long int":
        return ('{"hidden_size": ' + "1" * 5000 + "}").encode()
    if kind == "NaN":  # Python's json reads the non-standard NaN literal
        return json.dumps({**read_json(ck / "config.json"), "swiglu_limit": "@@"}).replace('"@@"', "NaN").encode()
    return b"\xff\xfe{}"


@pytest.mark.parametrize("kind,words", [("deep", ["not valid JSON", "nested too deeply"]),
                                        ("long int", ["not valid JSON", "too many digits"]),
                                        ("NaN", ["swiglu_limit must be a finite number", "nan"]),
                                        ("latin-1", ["not UTF-8"])])
def test_broken_config_json(ck, tmp_path, capsys, kind, words):
    (ck / "config.json").write_bytes(_config_text(ck, kind))
    convert_fails(ck, tmp_path / "out", capsys, "config.json", *words)


@pytest.fixture(scope="module")
def fp8_ck(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("fp8") / "ck", "deepseek_v3_fp8", num_layers=2,
                                  num_experts=2).path


@pytest.fixture(scope="module")
def int4_ck(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("int4") / "ck", "kimi_k2_int4", num_layers=2,
                                  num_experts=2).path


@pytest.mark.parametrize("block,words", [([2**70, 128], ["weight_block_size[0]", "digits"]),
                                          ([0, 128], ["weight_block_size[0] must be an integer between 1"]),
                                          ([128, -128], ["weight_block_size[1]", "-128"]),
                                          ("128", ["weight_block_size must be a list of 2 integers"]),
                                          ([128], ["weight_block_size must be a list of 2 integers"]),
                                          ([128, 128.5], ["weight_block_size[1] must be an integer"])])
def test_fp8_block_size_of_the_wrong_type(fp8_ck, tmp_path, capsys, block, words):
    ck = tmp_path / "ck"
    shutil.copytree(fp8_ck, ck)
    cfg = read_json(ck / "config.json")
    cfg["quantization_config"]["weight_block_size"] = block
    (ck / "config.json").write_text(json.dumps(cfg))
    convert_fails(ck, tmp_path / "out", capsys, "config.json", "quantization_config", *words)


@pytest.mark.parametrize("edit,words", [
    (lambda qc: qc.update(config_groups=["group_0"]), ["config_groups must be a JSON object"]),
    (lambda qc: qc["config_groups"].update(group_0=[1]), ["config_groups.group_0", "must be a JSON object"]),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=2**70), ["group_size", "digits"]),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=0), ["group_size must be an integer"]),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size="32"), ["group_size", "'32'"]),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy=["group"]), ["strategy must be a string"]),
    (lambda qc: qc.update(format=5), ["format must be a string"]),
])
def test_compressed_tensors_config_of_the_wrong_type(int4_ck, tmp_path, capsys, edit, words):
    ck = tmp_path / "ck"
    shutil.copytree(int4_ck, ck)
    cfg = read_json(ck / "config.json")
    edit(cfg["quantization_config"])
    (ck / "config.json").write_text(json.dumps(cfg))
    convert_fails(ck, tmp_path / "out", capsys, "config.json", *words)


def test_quantization_config_that_is_not_an_object(fp8_ck, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(fp8_ck, ck)
    cfg = read_json(ck / "config.json")
    cfg["quantization_config"] = "fp8"
    (ck / "config.json").write_text(json.dumps(cfg))
    convert_fails(ck, tmp_path / "out", capsys, "config.json", "quantization_config must be a JSON object")


def test_key_with_a_5000_digit_layer_number(ck, tmp_path, capsys):
    big = "layers." + "9" * 5000 + ".ffn.experts.0.w1.weight"
    rewrite(ck, lambda name, t: {**t, big: t[W1]} if W1 in t else t)
    convert_fails(ck, tmp_path / "out", capsys, "more than 9 digits", "re-download")


@pytest.mark.parametrize("text,words", [(_deep(200_000), ["not valid JSON", "nested too deeply"]),
                                         ('{"format_version": ' + "1" * 5000 + "}", ["too many digits"]),
                                         ('{"swiglu_limit": 1e999}', None)])
def test_loader_broken_manifest_json(converted, tmp_path, text, words):
    out = _copy_output(converted, tmp_path)
    if words is None:  # a valid manifest with an infinite swiglu_limit: the runtime would refuse it later
        m = read_json(out / MANIFEST_FILE)
        m["swiglu_limit"] = "@@"
        text, words = json.dumps(m).replace('"@@"', "1e999"), ["swiglu_limit must be a finite number > 0"]
    (out / MANIFEST_FILE).write_text(text)
    with pytest.raises(kt_runtime.PackedWeightsError) as e:
        kt_runtime.load_experts(out)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_loader_config_of_an_output_without_manifest(converted, tmp_path):
    out = _copy_output(converted, tmp_path)
    (out / MANIFEST_FILE).unlink()
    cfg = read_json(out / "config.json")
    cfg["num_experts_per_tok"] = "2"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(kt_runtime.PackedWeightsError, match="num_experts_per_tok must be an integer"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kt_runtime.load_experts(out)


def test_read_json_helper_limits(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    assert read_json_file(p, what="x", max_bytes=100) == {"a": 1}
    with pytest.raises(InputFileError, match="8 bytes, more than the 7 bytes allowed"):
        read_json_file(p, what="x", max_bytes=7)


# ------------------------------------------------------------------------------------------------
# 5. exit 0 only when the output is the whole model
# ------------------------------------------------------------------------------------------------

def test_num_hidden_layers_smaller_than_the_layers_stored(ck, tmp_path, capsys):
    set_config(ck, num_hidden_layers=1, compress_ratios=[0])
    convert_fails(ck, tmp_path / "out", capsys, "layers 1 hold routed-expert tensors", "num_hidden_layers 1",
                  "num_nextn_predict_layers 0", "fix config.json", "--layers")


@pytest.fixture(scope="module")
def glm_ck(tmp_path_factory):
    """GLM-4.5 layout: layer 0 dense, layers 1-2 MoE, MTP layer 3 (with eh_proj)."""
    return make_family_checkpoint(tmp_path_factory.mktemp("glm") / "ck", "glm4_moe_bf16", num_layers=3,
                                  num_experts=2).path


def _copy(src, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def test_a_real_layer_is_not_taken_for_mtp(glm_ck, tmp_path, capsys):
    ck = _copy(glm_ck, tmp_path)
    # num_hidden_layers one too small and the MTP count raised to cover it: layer 2 has no eh_proj
    set_config(ck, num_hidden_layers=2, num_nextn_predict_layers=2)
    convert_fails(ck, tmp_path / "out", capsys, "layers 2 hold routed-expert tensors", "num_hidden_layers 2",
                  "num_nextn_predict_layers 2", "eh_proj")
    set_config(ck, num_hidden_layers=3, num_nextn_predict_layers=0)  # MTP layer present, count says none
    convert_fails(ck, tmp_path / "out", capsys, "layers 3 hold routed-expert tensors", "num_nextn_predict_layers 0")
    set_config(ck, num_hidden_layers=3, num_nextn_predict_layers=1)  # as written: converts, MTP skipped
    assert main(["-i", str(ck), "-o", str(tmp_path / "ok"), "--threadpool-count", "1", "--no-progress"]) == 0
    assert read_json(tmp_path / "ok" / MANIFEST_FILE)["layers"] == [1, 2]


def test_first_k_dense_replace_disagreeing_with_the_tensors(glm_ck, tmp_path, capsys):
    ck = _copy(glm_ck, tmp_path)
    set_config(ck, first_k_dense_replace=0)  # says layer 0 is MoE: it has no experts
    convert_fails(ck, tmp_path / "out", capsys, "layers 0 have no routed-expert tensors", "first_k_dense_replace 0",
                  "incomplete")
    set_config(ck, first_k_dense_replace=2)  # says layer 1 is dense: it has experts
    convert_fails(ck, tmp_path / "out", capsys, "layers 1 hold routed-expert tensors", "makes them dense",
                  "first_k_dense_replace 2")
    set_config(ck, first_k_dense_replace=-1)
    convert_fails(ck, tmp_path / "out", capsys, "first_k_dense_replace must be an integer between 0 and 3")


def test_dense_layers_by_decoder_sparse_step_and_mlp_only_layers_are_not_missing(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "q", "qwen3_moe_bf16", num_layers=3, num_experts=2).path
    drop(ck, lambda k: ".layers.0.mlp.experts." in k)  # make layer 0 dense
    convert_fails(ck, tmp_path / "o1", capsys, "layers 0 have no routed-expert tensors", "decoder_sparse_step 1")
    set_config(ck, mlp_only_layers=[0])
    assert main(["-i", str(ck), "-o", str(tmp_path / "o2"), "--threadpool-count", "1", "--no-progress"]) == 0
    assert kt_runtime.load_experts(tmp_path / "o2").layers == [1, 2]
    drop(ck, lambda k: ".layers.2.mlp.experts." in k)  # layers 0 and 2 dense: (L + 1) % 2 == 0 -> only 1
    set_config(ck, mlp_only_layers=[], decoder_sparse_step=2)
    assert main(["-i", str(ck), "-o", str(tmp_path / "o3"), "--threadpool-count", "1", "--no-progress"]) == 0
    assert kt_runtime.load_experts(tmp_path / "o3").layers == [1]
    set_config(ck, mlp_only_layers="0")
    convert_fails(ck, tmp_path / "o4", capsys, "mlp_only_layers must be a list of integers")


def test_index_that_omits_a_shard(ck, tmp_path, capsys):
    set_index(ck, lambda wm: [wm.pop(k) for k in [k for k, v in wm.items() if v == SHARD2]])
    convert_fails(ck, tmp_path / "out", capsys, "have no routed-expert tensors", SHARD2, "not named by",
                  "index incomplete", "fetch the missing files")


def test_every_expert_of_a_layer_removed(ck, tmp_path, capsys):
    drop(ck, lambda k: k.startswith("layers.1.ffn.experts."))
    convert_fails(ck, tmp_path / "out", capsys, "layers 1 have no routed-expert tensors", "makes them MoE",
                  "incomplete")


def test_index_naming_a_tensor_its_shard_lacks(ck, tmp_path, capsys):
    set_index(ck, lambda wm: wm.update({"layers.1.ffn.experts.99.w1.weight": SHARD2}))
    convert_fails(ck, tmp_path / "out", capsys, INDEX_FILE, "layers.1.ffn.experts.99.w1.weight", "no file holds it",
                  "re-download")


def test_layers_narrows_the_job_and_the_output_says_partial(ck, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-i", str(ck), "-o", str(out), "--no-progress", "--layers", "1"]) == 0
    assert "this output is partial: 1 of the model's 2 MoE layers" in capsys.readouterr().err
    m = read_json(out / MANIFEST_FILE)
    assert (m["layers"], m["model_layers"], m["partial"], m["complete"]) == ([1], [0, 1], True, True)
    with pytest.warns(UserWarning, match=r"partial output.*not \[0\]"):
        w = kt_runtime.load_experts(out)
    assert w.partial and w.layers == [1] and w.model_layers == [0, 1] and "partial" in repr(w)
    # the same command resumes; other layers are another job
    assert main(["-i", str(ck), "-o", str(out), "--no-progress", "--layers", "1"]) == 0
    code = main(["-i", str(ck), "-o", str(out), "--no-progress", "--layers", "0-1"])
    assert code == 2 and "layers differ" in capsys.readouterr().err
    # a whole conversion is not partial
    full = tmp_path / "full"
    assert main(["-i", str(ck), "-o", str(full), "--no-progress"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kt_runtime.load_experts(full).partial
    assert read_json(full / MANIFEST_FILE)["partial"] is False
    # --layers converts a layer although another one is incomplete
    drop(ck, lambda k: k.startswith("layers.0.ffn.experts.3."))
    assert main(["-i", str(ck), "-o", str(tmp_path / "one"), "--no-progress", "--layers", "1"]) == 0
    convert_fails(ck, tmp_path / "both", capsys, "layer 0 has no tensors for expert 3", extra=["--layers", "0-1"])


@pytest.mark.parametrize("spec,words", [("2", ["--layers: layer 2 is not a MoE layer", "makes layers 0-1 MoE"]),
                                         ("1-3", ["--layers: layers 2-3 are not MoE layers"]),
                                         ("0-x", ["--layers", "'0-x' is not a layer number"]),
                                         ("3-1", ["runs backwards"]), ("", ["is not a layer number"])])
def test_bad_layers_spec(ck, tmp_path, capsys, spec, words):
    convert_fails(ck, tmp_path / "out", capsys, *words, extra=["--layers", spec])


def test_partial_flag_must_agree_with_the_layers(converted, tmp_path):
    out = _copy_output(converted, tmp_path)
    m = read_json(out / MANIFEST_FILE)
    m["partial"] = True
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(kt_runtime.PackedWeightsError, match="partial is true but layers equal model_layers"):
        kt_runtime.load_experts(out)
    m["partial"], m["model_layers"] = False, [0, 1, 2]
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(kt_runtime.PackedWeightsError, match="partial is false but layers differ"):
        kt_runtime.load_experts(out)


# ------------------------------------------------------------------------------------------------
# 7. a source that changes or shrinks during the run
# ------------------------------------------------------------------------------------------------

CHILD = """
import os, sys
sys.path.insert(0, {root!r})
from kt_convert.convert import layer_pack, pipeline
from kt_convert.convert.cli import main
layer_pack.BATCH_BYTES = 1  # one expert per batch: reads are still in flight when the file changes
real, calls = pipeline.convert_layer, []
def hook(reader, plan, lp, *a, **kw):
    calls.append(lp.layer)
    if len(calls) == 2:  # the second layer: cut or rewrite the shard holding its experts
        path = reader.ckpt.file_of(lp.experts[0]["gate"].weight_key).path
        if {mode!r} == "shrink":
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) - 64)
                f.write(bytes(64))
            os.utime(path, ns=(0, 10**18))
    return real(reader, plan, lp, *a, **kw)
pipeline.convert_layer = hook
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["shrink", "rewrite"])
def test_source_changed_during_the_run_is_exit_2_not_sigbus(ck, tmp_path, mode):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), mode=mode), "-i", str(ck), "-o", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=DEADLINE_S - 5)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # -7 would be SIGBUS
    assert "Traceback" not in proc.stderr and SHARD2 in proc.stderr, proc.stderr
    assert ("shrank" if mode == "shrink" else "changed") in proc.stderr, proc.stderr
    assert "--overwrite" in proc.stderr
    # the layers already committed stay (they were read before the change and a re-run refuses to
    # resume them: the fingerprint differs), but nothing says the output is complete
    assert not (out / INDEX_FILE).exists() and not list(out.glob("*.tmp"))
    assert read_json(out / MANIFEST_FILE)["complete"] is False
    code = main(["-i", str(ck), "-o", str(out), "--no-progress"])
    assert code == 2


def test_pread_of_a_shrunk_file_is_an_error(base, tmp_path):
    from kt_convert.convert.source import open_checkpoint
    from kt_convert.convert.source_reader import Slab, SourceStream

    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    c = open_checkpoint(str(ck))
    try:
        stream = SourceStream(c, [[Slab(W1)]], ahead=0)
        os.truncate(ck / SHARD2, 4096)
        with pytest.raises(UserError, match=f"{SHARD2}: the file shrank while it was being read"):
            stream.next()
        stream.close()
        with pytest.raises(SafetensorsChangedError, match=r"shrank while it was being read \(\d+ -> 4096 bytes\)"):
            c.file_of(W1).check_unchanged()
    finally:
        c.close()


def test_resume_from_a_changed_source_is_refused_naming_the_file(ck, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-i", str(ck), "-o", str(out), "--no-progress"]) == 0
    files = read_json(out / MANIFEST_FILE)["source"]["files"]
    assert [f["name"] for f in files] == [SHARD1, SHARD2]
    assert all(f["mtime_ns"] == os.stat(ck / f["name"]).st_mtime_ns for f in files)
    os.utime(ck / SHARD2, ns=(0, os.stat(ck / SHARD2).st_mtime_ns + 10**9))  # rewritten: same bytes, new mtime
    code = main(["-i", str(ck), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{SHARD2} (modification time)" in err and "--overwrite" in err, err
    assert main(["-i", str(ck), "-o", str(out), "--no-progress", "--overwrite"]) == 0


def test_describe_source_change():
    from kt_convert.convert.source import describe_source_change

    old = {"fingerprint": "a", "files": [{"name": "x", "size": 1, "mtime_ns": 5, "header_sha256": "h"}]}
    assert describe_source_change(old, old) is None
    new = {"fingerprint": "b", "files": [{"name": "x", "size": 2, "mtime_ns": 6, "header_sha256": "h"},
                                         {"name": "y", "size": 1, "mtime_ns": 1, "header_sha256": "g"}]}
    assert describe_source_change(old, new) == "y is new; x (size, modification time)"
    assert describe_source_change(new, old) == "y is gone; x (size, modification time)"
    # an older converter recorded no mtime: not reported as a change (the fingerprints still differ)
    older = {"fingerprint": "c", "files": [{"name": "x", "size": 1, "header_sha256": "h"}]}
    assert describe_source_change(older, old) is None


def test_pread_conversion_gives_the_mapped_bytes(base, converted):
    """The pread path reads exactly the bytes a mapping of the file shows."""
    from kt_convert.convert.source import open_checkpoint
    from kt_convert.convert.source_reader import Slab, SourceStream

    c = open_checkpoint(str(base))
    try:
        keys = [k for k in c.key_file if ".experts." in k][:8]
        stream = SourceStream(c, [[Slab(k) for k in keys[:4]], [Slab(k) for k in keys[4:]]])
        for part in (keys[:4], keys[4:]):
            batch = stream.next()
            for k in part:
                assert np.array_equal(batch[Slab(k)], SafetensorsFile(c.files[c.key_file[k]].path).array(k)), k
            batch.release()
        stream.close()
    finally:
        c.close()


# ------------------------------------------------------------------------------------------------
# 9. thread counts given on the command line
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", str(2**40), "100000"])
def test_cpuinfer_threads_out_of_range(ck, tmp_path, capsys, value):
    convert_fails(ck, tmp_path / "out", capsys, "--cpuinfer-threads must be between 0", value,
                  extra=["--cpuinfer-threads", value])
    assert not (tmp_path / "out").exists()


def test_deadline_catches_a_blocking_open(tmp_path):
    """The guard the tests above rely on: a blocking FIFO open does hang and is caught."""
    os.mkfifo(tmp_path / "f")
    signal.alarm(1)
    with pytest.raises(Hung):
        open(tmp_path / "f", "rb")
    signal.alarm(DEADLINE_S)


def test_outside_fifo_stays_unopened_while_converting(ck, tmp_path, capsys):
    """A watcher holds the FIFO's write end ready: had anything opened it for reading, the open would
    have succeeded; it never does."""
    fifo = outside_fifo(tmp_path)
    set_index(ck, lambda wm: wm.update({W1: "../other/x.safetensors"}))
    opened = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
                opened.append(True)
                os.close(fd)
            except OSError:
                pass
            time.sleep(0.0005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        convert_fails(ck, tmp_path / "out", capsys, "'..'")
    finally:
        stop.set()
        t.join()
    assert not opened
