"""Sources: hub ids resolved offline from a Hugging Face cache layout built here (relative blob
symlinks, refs without newline, HF_HUB_CACHE / HF_HOME), `--local-dir` download folders, single files."""
import hashlib
import shutil

import numpy as np
import pytest

from kt_convert import kt_runtime
from kt_convert.convert.cli import main
from kt_convert.convert.errors import UserError
from kt_convert.convert.source import hub_cache_dir, open_checkpoint, resolve_input
from kt_convert.synthetic.families import make_family_checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("src") / "ck", "qwen3_moe_bf16", num_layers=1,
                                  num_experts=2)


def build_cache(cache, repo, ck_path, sha=SHA, symlinks=True, ref="main"):
    """The hub cache layout (formats.md §1.6): blobs named by content hash, snapshot files as
    relative symlinks ../../blobs/<hash>, refs/<ref> holding the sha with no trailing newline."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in sorted(ck_path.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        if symlinks:
            (snap / f.name).symlink_to(f"../../blobs/{blob}")
        else:
            shutil.copyfile(f, snap / f.name)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(sha)
    (base / ".no_exist" / sha).mkdir(parents=True)
    (base / ".no_exist" / sha / "tokenizer.model").write_text("")
    return snap


def test_hub_id_resolves_through_hf_hub_cache_symlinks(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = build_cache(cache, "org/tiny-moe", tiny.path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (snap / "config.json").is_symlink()
    assert resolve_input("org/tiny-moe") == snap
    assert resolve_input(f"org/tiny-moe@{SHA}") == snap
    assert resolve_input("org/tiny-moe@main") == snap
    assert main(["-i", "org/tiny-moe", "-o", str(tmp_path / "out"), "--threadpool-count", "1", "--no-progress"]) == 0
    w = kt_runtime.load_experts(tmp_path / "out")
    assert w.layers == [0] and w.num_experts == 2
    # the output is independent of how the same files were reached
    assert main(["-i", str(tiny.path), "-o", str(tmp_path / "direct"), "--threadpool-count", "1", "--no-progress"]) == 0
    direct = kt_runtime.load_experts(tmp_path / "direct")
    for key in w._tensors:
        assert np.array_equal(w._tensors[key][0], direct._tensors[key][0])


def test_hf_home_selects_the_cache_and_plain_files_work(tiny, tmp_path, monkeypatch):
    home = tmp_path / "hfhome"
    snap = build_cache(home / "hub", "org/plain", tiny.path, symlinks=False, ref="v1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub_cache_dir() == home / "hub"
    assert resolve_input("org/plain@v1") == snap
    ck = open_checkpoint("org/plain@v1")
    assert ck.root == snap and "model.layers.0.mlp.experts.1.down_proj.weight" in ck.key_file
    ck.close()


def fake_path_with(tmp_path, monkeypatch, *commands):
    """PATH holding only these (empty, executable) commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in commands:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_revision_not_in_cache_and_missing_repo_say_how_to_download(tiny, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    build_cache(cache, "org/tiny-moe", tiny.path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_path_with(tmp_path, monkeypatch, "hf")
    with pytest.raises(UserError, match=r"\n  hf download org/tiny-moe --revision " + OTHER_SHA):
        resolve_input(f"org/tiny-moe@{OTHER_SHA}")
    assert main(["-i", "deepseek-ai/Not-Downloaded", "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "  hf download deepseek-ai/Not-Downloaded\n" in err and str(cache) in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("on_path,version,expected", [
    (("hf", "huggingface-cli"), "0.36.0", "hf download"),  # both: the current name
    (("huggingface-cli",), "0.30.2", "huggingface-cli download"),  # an older hub: only the old name works
    ((), "1.2.0", "hf download"),  # neither on PATH: the name this huggingface_hub installs
    ((), "0.33.1", "huggingface-cli download"),
])
def test_download_hint_names_the_command_that_exists(tmp_path, monkeypatch, on_path, version, expected):
    import importlib.metadata

    from kt_convert.convert import source

    fake_path_with(tmp_path, monkeypatch, *on_path)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert source.hub_download_command() == expected


def test_local_dir_download_folder_ignores_its_cache_metadata(tiny, tmp_path):
    # huggingface-cli download ... --local-dir DIR: files at the top, per-file metadata in .cache/
    local = tmp_path / "local"
    shutil.copytree(tiny.path, local)
    meta = local / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    for f in tiny.path.iterdir():
        (meta / (f.name + ".metadata")).write_text(f"{SHA}\n{'ab' * 20}\n1700000000.0\n")
    (meta / "model-00001-of-00002.safetensors.lock").write_text("")
    ck = open_checkpoint(str(local))
    assert sorted(ck.files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    ck.close()
    assert main(["-i", str(local), "-o", str(tmp_path / "out"), "--threadpool-count", "1", "--no-progress"]) == 0


def test_single_safetensors_file_of_a_family(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "mixtral_bf16", num_layers=1, num_experts=2, num_shards=1)
    assert main(["-i", str(ck.path / "model.safetensors"), "-o", str(tmp_path / "out"), "--threadpool-count", "1",
                 "--no-progress"]) == 0
    assert kt_runtime.load_experts(tmp_path / "out").layers == [0]
