"""--kt-sft-manifest: kt-kernel's SFT input. OUT holds kt-weight-manifest.json and the _layer_L folders only, this
converter's files go to OUT.kt-convert. Its fields and sha256s (computed here from the files), the .kt bytes
(those of a plain AMXINT8 folder output), resume, verify, load_experts, the refusals, a tampered tree; and
kt-kernel's own validator where its module is at hand (KT_SFT_MANIFEST_PY: the path of kt-kernel's
python/sft/weight_manifest.py, with backend.py beside it)."""
import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kt_convert import kt_runtime
from helpers.outputs import read_json, tree_hashes
from kt_convert.kt_runtime.format import writer as writer_mod
from kt_convert.convert.cli import main
from kt_convert.kt_runtime.format import digest as digest_mod
from kt_convert.kt_runtime.format import kt_sft_manifest as sft_mod
from kt_convert.kt_runtime.format.errors import ManifestError
from kt_convert.kt_runtime.format.manifest import Manifest
from kt_convert.synthetic.families import make_family_checkpoint

H, I, E, T = 384, 256, 4, 2
MOE_LAYERS = [1, 2]  # deepseek_v3: layer 0 is dense
KT_MANIFEST = "kt-weight-manifest.json"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("sft") / "src", "deepseek_v3_fp8", hidden_size=H,
                                  intermediate_size=I, num_experts=E, num_layers=3).path


def base_args(src, out, *extra):
    return ["-i", str(src), "-o", str(out), "--no-progress", "--device", "cpu", "--threadpool-count", str(T),
            *map(str, extra)]


def args(src, out, *extra):
    return base_args(src, out, "--quant-method", "int8", "--no-merge-safetensor", *extra)


def records(out: Path) -> Path:
    return out.with_name(out.name + ".kt-convert")


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("sftout") / "out"
    assert main(args(src, out, "--kt-sft-manifest")) == 0
    return out


@pytest.fixture(scope="module")
def plain(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    assert main(args(src, out)) == 0
    return out


def copy_output(out: Path, where: Path) -> Path:
    """A copy of an output and its records folder, named alike."""
    shutil.copytree(out, where / out.name)
    shutil.copytree(records(out), records(where / out.name))
    return where / out.name


def files_below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- what is written -------------------------------------------------------------------------------

def test_the_root_holds_kt_manifest_and_layer_folders_only(converted):
    assert sorted(os.listdir(converted)) == ["_layer_1", "_layer_2", KT_MANIFEST]
    for layer in MOE_LAYERS:
        assert sorted(os.listdir(converted / f"_layer_{layer}")) == ["_numa_0", "_numa_1"]
    kept = sorted(os.listdir(records(converted)))
    assert "kt_manifest.json" in kept and "config.json" in kept
    assert not {".kt_convert.lock"} & set(kept)  # released with the run


def test_fields_sizes_and_sha256_are_kts(converted):
    """Each field as kt-kernel's validator requires it; sizes from kt's formula (int8 [n, k] = n*k bytes, fp32
    scales), sha256 computed here from the files."""
    m = read_json(converted / KT_MANIFEST)
    assert (m["schema_version"], m["state"], m["expert_weight_format"], m["layout"]) == \
        (2, "ready", "int8", "kt-int8-n32-k64-vnni-v1")
    assert (m["threadpool_count"], m["expert_num"], m["hidden_size"], m["intermediate_size"]) == (T, E, H, I)
    assert "backend" not in m  # kt accepts none, or a hardware-neutral one
    assert [layer["index"] for layer in m["layers"]] == MOE_LAYERS
    per_numa = I // T
    want_size = {("gate", "quant"): H * per_numa, ("up", "quant"): H * per_numa, ("down", "quant"): H * per_numa,
                 ("gate", "scale"): per_numa * 4, ("up", "scale"): per_numa * 4, ("down", "scale"): H * 4}
    listed = set()
    for layer in m["layers"]:
        assert (layer["numa_count"], layer["state"]) == (T, "ready")
        assert len(layer["files"]) == T * E * 3 * 2
        for f in layer["files"]:
            name = Path(f["path"]).name  # INT8_{proj}_{E}_{bytes}Byte_{kind}_.kt
            prefix, proj, expert, nbytes, kind, _ = name.split("_")
            assert prefix == "INT8" and 0 <= int(expert) < E
            assert f["size_bytes"] == want_size[(proj, kind)] == int(nbytes.removesuffix("Byte"))
            data = (converted / f["path"]).read_bytes()
            assert len(data) == f["size_bytes"]
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
            listed.add(f["path"])
        assert layer["bytes"] == sum(f["size_bytes"] for f in layer["files"])
    assert m["bytes"] == sum(layer["bytes"] for layer in m["layers"]) == 2 * E * T * (3 * H * per_numa + 4 * (2 * per_numa + H))
    assert listed == files_below(converted) - {KT_MANIFEST}


def test_kt_files_are_the_plain_amxint8_folder_bytes(converted, plain):
    ours = {k: v for k, v in tree_hashes(converted).items() if k.startswith("_layer_")}
    theirs = {k: v for k, v in tree_hashes(plain).items() if k.startswith("_layer_")}
    assert ours == theirs and len(ours) == len(MOE_LAYERS) * T * E * 3 * 2


def test_the_manifests_of_other_outputs_are_unchanged(plain):
    """No per-file sha256 and no new option in a conversion without the flag (its bytes stay what they were)."""
    m = read_json(plain / "kt_manifest.json")
    assert m["options"] == {"include_non_expert": False}
    assert all(set(rec) == {"layer", "files", "nbytes", "sha256", "source_sha256"} for rec in m["completed"].values())
    assert not records(plain).exists() and not (plain / KT_MANIFEST).exists()


def test_records_hold_per_file_sha256(converted):
    m = read_json(records(converted) / "kt_manifest.json")
    assert m["options"] == {"include_non_expert": False, "kt_sft_manifest": True}
    for rec in m["completed"].values():
        assert rec["file_sha256"] == [hashlib.sha256((converted / f).read_bytes()).hexdigest() for f in rec["files"]]


def test_files_longer_than_a_digest_block_are_hashed_whole(src, tmp_path, monkeypatch):
    """A .kt file of several 64 MiB blocks has no block digest equal to its sha256: it is read back (the block
    is made 4 KiB here, so that the quant files span 12 blocks)."""
    monkeypatch.setattr(digest_mod, "BLOCK", 4096)
    monkeypatch.setattr(sft_mod, "BLOCK", 4096)
    out = tmp_path / "out"
    assert main(args(src, out, "--kt-sft-manifest")) == 0
    m = read_json(out / KT_MANIFEST)
    for layer in m["layers"]:
        for f in layer["files"]:
            assert f["sha256"] == hashlib.sha256((out / f["path"]).read_bytes()).hexdigest()
    assert main(["verify", str(out)]) == 0


def test_file_sha256_must_be_one_digest_per_file():
    base = {"method": "int8", "threadpool_count": 1, "hidden_size": 128, "moe_intermediate_size": 128,
            "num_experts": 1, "num_experts_per_tok": 1, "layers": [0], "layout": "kt-folders", "format_version": 1}
    rec = {"layer": 0, "files": ["a", "b"], "nbytes": 2, "sha256": "0" * 64}
    Manifest.from_json(json.dumps({**base, "completed": {"0": {**rec, "file_sha256": ["1" * 64, "2" * 64]}}}))
    for bad in (["1" * 64], ["1" * 64, "XYZ"], "1" * 64, [1, 2], ["1" * 63, "2" * 64]):
        with pytest.raises(ManifestError, match="file_sha256"):
            Manifest.from_json(json.dumps({**base, "completed": {"0": {**rec, "file_sha256": bad}}}))


# -- resume, load, verify ----------------------------------------------------------------------------

def test_a_rerun_changes_nothing(src, converted, capsys):
    before = tree_hashes(converted), tree_hashes(records(converted))
    assert main(args(src, converted, "--kt-sft-manifest")) == 0
    assert "nothing to convert" in capsys.readouterr().err
    assert (tree_hashes(converted), tree_hashes(records(converted))) == before
    assert sorted(os.listdir(converted)) == ["_layer_1", "_layer_2", KT_MANIFEST]


def test_a_failed_run_leaves_no_kt_manifest_and_resumes_to_the_same_bytes(src, converted, tmp_path, monkeypatch,
                                                                          capsys):
    """The disk fails in layer 2: OUT holds no kt-weight-manifest.json (kt refuses it), and the same command then
    ends with the bytes of an uninterrupted run, in both folders."""
    layer_files = T * E * 3 * 2
    calls = {"n": 0}

    def failing(fd, data):
        calls["n"] += 1
        if calls["n"] > layer_files + layer_files // 2:
            raise OSError(28, "No space left on device")
        return os.write(fd, data)

    out = tmp_path / "out"
    monkeypatch.setattr(writer_mod, "_os_write", failing)
    assert main(args(src, out, "--kt-sft-manifest")) == 2
    assert "no space left" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["_layer_1"]
    assert read_json(records(out) / "kt_manifest.json")["complete"] is False
    monkeypatch.setattr(writer_mod, "_os_write", os.write)
    assert main(args(src, out, "--kt-sft-manifest")) == 0
    assert tree_hashes(out) == tree_hashes(converted)
    assert tree_hashes(records(out)) == tree_hashes(records(converted))


def test_a_missing_layer_is_converted_again_and_the_kt_manifest_rewritten(src, converted, tmp_path):
    out = copy_output(converted, tmp_path)
    shutil.rmtree(out / "_layer_2")
    assert main(args(src, out, "--kt-sft-manifest")) == 0
    assert tree_hashes(out) == tree_hashes(converted)


def test_load_experts_reads_the_records_beside_the_tree(converted, plain):
    w = kt_runtime.load_experts(converted, verify=True)
    p = kt_runtime.load_experts(plain, verify=True)
    assert (w.method, w.threadpool_count, w.layers, w.hidden_size) == ("int8", T, MOE_LAYERS, H)
    assert w.manifest is not None and w.manifest.complete
    assert torch.equal(w.dequantize(2, 3, "down"), p.dequantize(2, 3, "down"))
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kt_runtime.CPUMoE(w, 1).forward(x, ids, weights), kt_runtime.CPUMoE(p, 1).forward(x, ids, weights))
    with pytest.raises(kt_runtime.PackedWeightsError, match=f"load {converted}"):
        kt_runtime.load_experts(records(converted))


def test_verify_passes(converted, capsys):
    assert main(["verify", str(converted), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["integrity"]["kt_sft_manifest"] is True and report["integrity"]["files"] == 2 * T * E * 3 * 2


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_kt_manifest(out: Path, edit) -> None:
    m = read_json(out / KT_MANIFEST)
    edit(m)
    (out / KT_MANIFEST).write_text(json.dumps(m))


def _edit_records(out: Path, edit) -> None:
    path = records(out) / "kt_manifest.json"
    m = read_json(path)
    edit(m)
    path.write_text(json.dumps(m))


SOME_FILE = "_layer_2/_numa_1/INT8_up_3_49152Byte_quant_.kt"


def _tamper_kt_sha(m):
    m["layers"][1]["files"][5]["sha256"] = "0" * 64


def _forge_both(out: Path) -> None:
    """A file changed, and both manifests' per-file sha256 updated to match it: the layer digest still differs."""
    _flip_byte(out / SOME_FILE)
    new = hashlib.sha256((out / SOME_FILE).read_bytes()).hexdigest()

    def kt(m):
        for f in m["layers"][1]["files"]:
            if f["path"] == SOME_FILE:
                f["sha256"] = new

    def ours(m):
        rec = m["completed"]["2"]
        rec["file_sha256"][rec["files"].index(SOME_FILE)] = new
    _edit_kt_manifest(out, kt)
    _edit_records(out, ours)


def _forge_records_only(out: Path) -> None:
    """Both manifests agree on a wrong per-file sha256 of an intact file: the records no longer give the layer
    digest, which the files still match (kt would refuse that file)."""
    def kt(m):
        m["layers"][0]["files"][0]["sha256"] = "1" * 64

    def ours(m):
        m["completed"]["1"]["file_sha256"][0] = "1" * 64
    _edit_kt_manifest(out, kt)
    _edit_records(out, ours)


TAMPERING = {
    "a .kt byte flipped": (lambda out: _flip_byte(out / SOME_FILE), "sha256"),
    "a sha256 in kt's manifest": (lambda out: _edit_kt_manifest(out, _tamper_kt_sha), "layers differs"),
    "a field of kt's manifest": (lambda out: _edit_kt_manifest(out, lambda m: m.update(hidden_size=H * 2)),
                                 "hidden_size differs"),
    "an extra field": (lambda out: _edit_kt_manifest(out, lambda m: m.update(backend="AMXINT8")), "unexpected fields"),
    "kt's manifest not JSON": (lambda out: (out / KT_MANIFEST).write_text("{"), "not valid JSON"),
    "kt's manifest missing": (lambda out: (out / KT_MANIFEST).unlink(), f"lacks {KT_MANIFEST}"),
    "kt's manifest a link": (lambda out: ((out / KT_MANIFEST).unlink(), (out / KT_MANIFEST).symlink_to("/etc/hostname")),
                             "not a real regular file"),
    "a file beside the layers": (lambda out: (out / "README.txt").write_text("x"), "holds README.txt"),
    "a file in a NUMA folder": (lambda out: (out / "_layer_1/_numa_0/extra.kt").write_bytes(b"x"), "holds extra.kt"),
    "a file changed and both manifests forged": (_forge_both, "sha256"),
    "both manifests agree on a wrong sha256": (_forge_records_only, "per-file sha256s recorded do not match"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_finds_a_tampered_tree(converted, tmp_path, capsys, case):
    tamper, needle = TAMPERING[case]
    out = copy_output(converted, tmp_path)
    tamper(out)
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


# -- refused combinations and directories ------------------------------------------------------------

FOLDERS = "--no-merge-safetensor"
REFUSED = {
    "int4": (["--quant-method", "int4", FOLDERS], "pass --quant-method int8"),
    "default int4": ([FOLDERS], "pass --quant-method int8"),
    "rawint4": (["--quant-method", "rawint4", FOLDERS], "pass --quant-method int8"),
    "merged": (["--quant-method", "int8"], "add --no-merge-safetensor"),
    "--layers": (["--quant-method", "int8", FOLDERS, "--layers", "1"], "every MoE layer"),
    "--resume-layer": (["--quant-method", "int8", FOLDERS, "--resume-layer", "1"], "drop --resume-layer"),
    "--shard": (["--quant-method", "int8", FOLDERS, "--shard", "1/2"], "without --shard"),
    "an int4 output of a template": (["--quant-method", "int8,int4", FOLDERS], "pass --quant-method int8"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_combinations_write_nothing(src, tmp_path, capsys, case):
    extra, needle = REFUSED[case]
    argv = base_args(src, tmp_path / "o", "--kt-sft-manifest", *extra)
    if case == "an int4 output of a template":
        i = argv.index("-o")
        argv[i:i + 2] = ["--output-template", str(tmp_path / "o-{method}")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--kt-sft-manifest" in err and needle in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == []


def test_the_dry_run_refuses_them_too(src, tmp_path, capsys):
    assert main(args(src, tmp_path / "o", "--kt-sft-manifest", "--layers", "1", "--dry-run")) == 2
    assert "every MoE layer" in capsys.readouterr().err


def test_a_foreign_file_in_the_output_is_refused_before_anything_is_written(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(args(src, out, "--kt-sft-manifest", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "kt-kernel's SFT" in err, err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not records(out).exists()


def test_an_earlier_plain_output_is_replaced_only_with_overwrite(src, plain, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(plain, out)
    assert main(args(src, out, "--kt-sft-manifest")) == 2
    assert "kt_manifest.json" in capsys.readouterr().err
    assert main(args(src, out, "--kt-sft-manifest", "--overwrite")) == 0
    assert sorted(os.listdir(out)) == ["_layer_1", "_layer_2", KT_MANIFEST]


def test_a_run_without_the_flag_points_to_it(src, converted, tmp_path, capsys):
    out = copy_output(converted, tmp_path)
    assert main(args(src, out)) == 2
    assert "--kt-sft-manifest" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["_layer_1", "_layer_2", KT_MANIFEST]


@pytest.mark.parametrize("planted", ["link", "dangling link", "file"])
def test_a_planted_records_folder_is_refused(src, tmp_path, capsys, planted):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    if planted == "link":
        records(out).symlink_to(elsewhere)
    elif planted == "dangling link":
        records(out).symlink_to(tmp_path / "nowhere")
    else:
        records(out).write_text("x")
    assert main(args(src, out, "--kt-sft-manifest")) == 2
    err = capsys.readouterr().err
    assert str(records(out)) in err and "Traceback" not in err, err
    assert os.listdir(elsewhere) == [] and not out.exists()


def test_the_loader_refuses_a_linked_records_folder(converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    shutil.copytree(records(converted), tmp_path / "real")
    records(out).symlink_to(tmp_path / "real")
    with pytest.raises(kt_runtime.PackedWeightsError, match="not a real directory"):
        kt_runtime.load_experts(out)


def test_two_converters_on_one_output(src, converted, tmp_path, capsys):
    """The lock is in the records folder: a second run is refused while the first holds it."""
    from kt_convert.convert.output_dir import OutputLock

    out = copy_output(converted, tmp_path)
    lock = OutputLock(records(out))
    try:
        assert main(args(src, out, "--kt-sft-manifest")) == 2
        assert "another converter" in capsys.readouterr().err
    finally:
        lock.release()
    assert sorted(os.listdir(out)) == ["_layer_1", "_layer_2", KT_MANIFEST]


# -- kt-kernel's own validator -------------------------------------------------------------------------

def kt_validator(tmp_path):
    """kt-kernel's python/sft/weight_manifest.py (and backend.py beside it, whose INT8_WEIGHT_LAYOUT it imports)
    copied into a package of their own: neither imports a compiled extension at import time."""
    given = os.environ.get("KT_SFT_MANIFEST_PY")
    if not given or not Path(given).is_file():
        pytest.skip("KT_SFT_MANIFEST_PY does not name kt-kernel's python/sft/weight_manifest.py")
    package = tmp_path / "ktsft_copy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("weight_manifest.py", "backend.py"):
        shutil.copy(Path(given).with_name(name), package / name)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("ktsft_copy.weight_manifest")
    finally:
        sys.path.remove(str(tmp_path))
    return module


def kt_validate(module, out, **kwargs):
    return module.validate_persistent_int8_weights(out, layer_indices=MOE_LAYERS, numa_count=T, expert_num=E,
                                                   hidden_size=H, intermediate_size=I, **kwargs)


def test_kt_kernels_validator_accepts_the_output(converted, tmp_path):
    module = kt_validator(tmp_path)
    for hashes in (None, True):
        result = kt_validate(module, converted, verify_hashes=hashes)
        assert (result.schema_version, result.layout, result.layer_indices) == (2, "kt-int8-n32-k64-vnni-v1", (1, 2))
        assert result.file_count == 2 * T * E * 3 * 2
        assert result.size_bytes == read_json(converted / KT_MANIFEST)["bytes"]


@pytest.mark.parametrize("case", ["a .kt byte flipped", "a file beside the layers", "a sha256 in kt's manifest"])
def test_kt_kernels_validator_refuses_what_verify_refuses(converted, tmp_path, case):
    module = kt_validator(tmp_path)
    out = copy_output(converted, tmp_path)
    TAMPERING[case][0](out)
    with pytest.raises(ValueError):
        kt_validate(module, out, verify_hashes=None)


def test_the_dry_run_names_both_folders(src, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(src, out, "--kt-sft-manifest", "--dry-run")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kt-kernel SFT:")]
    assert len(lines) == 1 and f"{out}/{KT_MANIFEST}" in lines[0] and str(records(out)) in lines[0]
    assert os.listdir(tmp_path) == []


def test_an_output_in_the_records_folder_of_another_is_refused(src, tmp_path, capsys):
    """Two outputs of one run (a job file): the second is the first's records folder."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"outputs": [{"output": str(tmp_path / "a"), "quant_method": "int8", "threadpool_count": 2},
                                           {"output": str(tmp_path / "a.kt-convert"), "quant_method": "int8",
                                            "threadpool_count": 1}]}))
    argv = ["-i", str(src), "--job-file", str(job), "--no-merge-safetensor", "--kt-sft-manifest", "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"output {tmp_path / 'a.kt-convert'} is named twice" in err, err
    assert sorted(os.listdir(tmp_path)) == ["job.json"]


@pytest.mark.parametrize("kind", ["link", "fifo", "directory"])
def test_a_planted_kt_manifest_is_never_written_through(src, tmp_path, capsys, kind):
    target = tmp_path / "target.json"
    target.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    planted = out / KT_MANIFEST
    if kind == "link":
        planted.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.mkdir()
    assert main(args(src, out, "--kt-sft-manifest", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert str(planted) in err and "Traceback" not in err, err
    assert target.read_text() == "keep" and sorted(os.listdir(out)) == [KT_MANIFEST]


def test_load_experts_from_a_relative_path(converted, monkeypatch):
    monkeypatch.chdir(converted)
    assert kt_runtime.load_experts(".").manifest.options["kt_sft_manifest"] is True
    monkeypatch.chdir(converted / "_layer_1")
    assert kt_runtime.load_experts("..").layers == MOE_LAYERS
