"""A hostile hub and a tampered cache: the local hub (synthetic.hub_server) on 127.0.0.1 answering what a
broken or malicious hub (or a mirror, or a proxy) could, and Hugging Face cache folders planted with
links, FIFOs and bad references. Classes of input, several cases each:

1. identifiers from a hub answer used in paths (file names, sha256, blob ids, commits, ETags, index values);
   removal of source files only inside the repository's cache folder;
2. references and snapshots of the cache that point elsewhere (whoever resolves them);
3. the download record (a link, a FIFO, a folder, a hard link, garbage) and failures on the download and
   checker threads;
4. bodies longer than announced (small files, shards, endless, a lying Content-Length);
5. model-info answers of the wrong type or shape.

Every converter case: exit 2, a message naming the file / field and the endpoint or entry with what to do, no
traceback, nothing that looks complete, and watched files outside every root untouched and never read. The
CLI runs in a subprocess (the real huggingface_hub, HF_ENDPOINT pointing at the local hub), with a timeout
so that a hang fails."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kt_convert.kt_runtime.format.hub_cache import RepoCache
from kt_convert.synthetic import make_v4_flash_checkpoint
from kt_convert.synthetic.hub_server import OVERFLOW_CAP, LocalHub
from helpers.checkpoints import assert_nothing_complete
from helpers import ROOT
from helpers.hub import REPO, cli, hub_env, served  # noqa: F401 - the fixture: the local hub
from helpers.hangs import deadline  # noqa: F401 - autouse: a hang fails the test
from helpers.watch import Watched

STATE = "kt-convert-downloads.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two MoE layers of 4 experts over two shards (~2.5 MB each)."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("hostile-hub") / "src", "v4-flash-tiny", num_layers=2,
                                    num_experts=4, num_shards=2).path


@pytest.fixture
def victim(tmp_path, source):
    return Watched(tmp_path / "outside", source / SHARD1)


@pytest.fixture(scope="module")
def cached(source, tmp_path_factory):
    """A cache holding the model, as one download by the converter leaves it (record included)."""
    work = tmp_path_factory.mktemp("hostile-cache")
    with LocalHub(REPO, source) as h:
        r = cli(hub_env(h.endpoint, work / "hub"), "--download", out=work / "out")
        assert r.returncode == 0, r.stderr
        commit = h.commit
    return work / "hub", commit


def copy_cache(cached, tmp_path) -> tuple[Path, RepoCache, str]:
    cache, commit = cached
    mine = tmp_path / "hub"
    shutil.copytree(cache, mine, symlinks=True)
    return mine, RepoCache(mine, REPO), commit


def refused(r, out, *words):
    err = r.stderr
    assert r.returncode == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert any(line.startswith("error: ") for line in err.splitlines()[-2:]), err  # a download thread may note last
    for w in words:
        assert w in err, (w, err)
    assert_nothing_complete(out)
    return err


def download(served, tmp_path, *extra, cache=None, **env):
    cache = tmp_path / "hub" if cache is None else cache
    return cli(hub_env(served.endpoint, cache, **env), "--download", *extra, out=tmp_path / "out")


def siblings(edit):
    """A model_info answer whose siblings pass through edit(sibling) -> sibling."""
    return lambda info: {**info, "siblings": [edit(dict(s)) for s in info["siblings"]]}


def for_file(name, **changes):
    return siblings(lambda s: {**s, **changes} if s["rfilename"] == name else s)


def lfs_of(name, **changes):
    return siblings(lambda s: {**s, "lfs": {**s["lfs"], **changes}} if s["rfilename"] == name else s)


# -- 1. identifiers from the hub, checked for their form before any path is made of them -------------------

IDENTIFIERS = [
    ("shard name climbing out", lambda v: for_file(SHARD1, rfilename=v.climbing("model.safetensors")),
     ["siblings[", "climbs out of the folder"]),
    ("absolute shard name", lambda v: for_file(SHARD1, rfilename=str(v.path("model.safetensors"))),
     ["is an absolute path"]),
    ("config name climbing out", lambda v: for_file("config.json", rfilename="../../../config.json"),
     ["climbs out of the folder"]),
    ("name with a NUL", lambda v: for_file(SHARD2, rfilename="model\u0000.safetensors"), ["NUL"]),
    ("sha256 that is a path", lambda v: lfs_of(SHARD1, sha256=v.climbing()), ["is not a sha256"]),
    ("sha256 of 63 digits", lambda v: lfs_of(SHARD1, sha256="a" * 63), ["is not a sha256"]),
    ("sha256 in capitals", lambda v: lfs_of(SHARD2, sha256="A" * 64), ["is not a sha256"]),
    ("blob id that is a path", lambda v: for_file("config.json", blobId="../../blobs/x"), ["is not a git blob id"]),
    ("commit that is a path", lambda v: (lambda info: {**info, "sha": v.climbing()}), ["is not a commit hash"]),
    ("commit of 7 digits", lambda v: (lambda info: {**info, "sha": "abc1234"}), ["is not a commit hash"]),
    ("a file listed twice", lambda v: (lambda info: {**info, "siblings": info["siblings"] + info["siblings"][-1:]}),
     ["is listed twice"]),
]


@pytest.mark.parametrize("make,words", [c[1:] for c in IDENTIFIERS], ids=[c[0] for c in IDENTIFIERS])
def test_identifiers_of_a_model_info_answer_are_checked(served, tmp_path, victim, make, words):
    served.model_info_answer = make(victim)
    err = refused(download(served, tmp_path), tmp_path / "out", f"the hub at {served.endpoint}", "not valid", *words)
    assert "check HF_ENDPOINT" in err
    victim.assert_untouched()
    assert not (tmp_path / "hub").exists() or not list((tmp_path / "hub").rglob("*.safetensors"))


HEADERS = [
    ("LFS ETag that is a path", SHARD1, lambda v: {"X-Linked-Etag": f'"{v.climbing()}"'}, "header ETag"),
    ("small file ETag that is a path", "config.json", lambda v: {"ETag": f'"{v.climbing()}"'}, "header ETag"),
    ("weak ETag of the wrong form", "tokenizer.json", lambda v: {"ETag": 'W/"xyz"'}, "header ETag"),
    ("commit header that is a path", "config.json", lambda v: {"X-Repo-Commit": v.climbing()}, "X-Repo-Commit"),
    ("commit header of the wrong length", INDEX, lambda v: {"X-Repo-Commit": "0" * 39}, "X-Repo-Commit"),
]


@pytest.mark.parametrize("name,make,words", [c[1:] for c in HEADERS], ids=[c[0] for c in HEADERS])
def test_identifiers_in_file_headers_are_checked_before_huggingface_hub_uses_them(served, tmp_path, victim, name,
                                                                                   make, words):
    """huggingface_hub makes blobs/<ETag> and snapshots/<commit> paths of these headers: refused as they
    arrive, so nothing is created outside the cache."""
    served.file_headers[name] = make(victim)
    refused(download(served, tmp_path), tmp_path / "out", name, f"the hub at {served.endpoint}", words)
    victim.assert_untouched()


def test_index_naming_a_file_outside_the_repository(source, tmp_path, victim):
    repo = tmp_path / "repo"
    shutil.copytree(source, repo)
    index = json.loads((repo / INDEX).read_text())
    key = next(k for k, v in index["weight_map"].items() if v == SHARD2)
    index["weight_map"][key] = victim.climbing("model.safetensors")
    (repo / INDEX).write_text(json.dumps(index))
    with LocalHub(REPO, repo) as h:
        refused(download(h, tmp_path), tmp_path / "out", INDEX, "which the repository does not hold")
    victim.assert_untouched()


def test_removal_touches_only_recorded_downloads_inside_the_repository(served, cached, tmp_path, victim):
    """Planted record entries (a path for an etag, a name outside) are dropped; the snapshot entry of a
    shard replaced by a link to an outside file is unlinked, never followed; nothing outside changes."""
    cache, repo, commit = copy_cache(cached, tmp_path)
    record = json.loads((repo.path / STATE).read_text())
    sha1 = served.files[SHARD1].sha256
    record["downloaded"][victim.climbing()] = "secret.txt"
    record["downloaded"]["b" * 64] = victim.climbing()
    (repo.path / STATE).write_text(json.dumps(record))
    (repo.path / "snapshots" / commit / SHARD2).unlink()  # fetched again, then removed after use
    r = download(served, tmp_path, "--delete-source-after-use", cache=cache)
    assert r.returncode == 0, r.stderr
    assert not (repo.path / "snapshots" / commit / SHARD2).exists()
    kept = json.loads((repo.path / STATE).read_text())["downloaded"]
    assert victim.climbing() not in kept and "b" * 64 not in kept and kept[sha1] == SHARD1
    victim.assert_untouched()


def test_a_cached_shard_linked_outside_is_neither_read_nor_removed(served, cached, tmp_path, victim):
    cache, repo, commit = copy_cache(cached, tmp_path)
    entry = repo.path / "snapshots" / commit / SHARD1
    entry.unlink()
    entry.symlink_to(victim.path("model.safetensors"))  # the same size as the shard: "present"
    refused(download(served, tmp_path, "--delete-source-after-use", cache=cache), tmp_path / "out",
            SHARD1, "outside")
    assert entry.is_symlink()
    victim.assert_untouched()


def test_a_blobs_folder_linked_outside_is_never_written_or_emptied(served, cached, tmp_path, victim):
    cache, repo, commit = copy_cache(cached, tmp_path)
    shutil.rmtree(repo.path / "blobs")
    (repo.path / "blobs").symlink_to(victim.folder, target_is_directory=True)
    r = download(served, tmp_path, "--delete-source-after-use", cache=cache)
    refused(r, tmp_path / "out", "outside")
    victim.assert_untouched()


# -- 2. references and snapshots of the cache ---------------------------------------------------------


REFERENCES = [
    ("ref that is a path", lambda repo, commit, v: _write(repo.path / "refs" / "main", v.climbing("")),
     ["refs/main", "is not a commit hash"]),
    ("ref of a short hash", lambda repo, commit, v: _write(repo.path / "refs" / "main", commit[:12]),
     ["refs/main", "is not a commit hash"]),
    ("ref with trailing words", lambda repo, commit, v: _write(repo.path / "refs" / "main", commit + " x"),
     ["refs/main", "is not a commit hash"]),
    ("ref that is a FIFO", lambda repo, commit, v: _fifo(repo.path / "refs" / "main"), ["refs/main", "FIFO"]),
    ("ref linked outside", lambda repo, commit, v: _link(repo.path / "refs" / "main", v.add("ref", commit.encode())),
     ["refs/main", "outside the cache folder"]),
    ("snapshot linked outside", lambda repo, commit, v: _snapshot_outside(repo, commit, v),
     ["snapshot", "outside"]),
]


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def _snapshot_outside(repo: RepoCache, commit: str, v: Watched) -> None:
    """snapshots/<commit> made a link to a complete copy of the model outside the cache (reading it would
    convert it)."""
    snap = repo.path / "snapshots" / commit
    names = [p.name for p in snap.iterdir()]
    data = {n: (snap / n).resolve().read_bytes() for n in names}
    copy = v.add_folder("snapshot")
    for n in names:
        v.add(f"snapshot-{n}", data[n])
        (copy / n).symlink_to(v.folder / f"snapshot-{n}")
    v.settle()
    shutil.rmtree(snap)
    snap.symlink_to(copy, target_is_directory=True)


@pytest.mark.parametrize("how", ["cached id", "offline download"])
@pytest.mark.parametrize("plant,words", [c[1:] for c in REFERENCES], ids=[c[0] for c in REFERENCES])
def test_cache_references_that_lead_elsewhere(served, cached, tmp_path, victim, plant, words, how):
    """Whoever resolves the reference (huggingface_hub for a cached id, the converter offline), a snapshot
    outside the repository's cache folder is refused before anything in it is read."""
    cache, repo, commit = copy_cache(cached, tmp_path)
    plant(repo, commit, victim)
    extra = ("--download",) if how == "offline download" else ()
    refused(cli(hub_env(served.endpoint, cache, HF_HUB_OFFLINE="1"), *extra, out=tmp_path / "out"), tmp_path / "out",
            *words)
    victim.assert_untouched()


def run_spec(spec: str, env: dict, out: Path, *extra):
    cmd = [sys.executable, "-m", "kt_convert", "-i", spec, "-o", str(out), "--no-progress", "--threadpool-count", "1",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("revision,words", [("../../../../etc", "climbs out"), ("main/../../x", "climbs out"),
                                            ("/abs", "absolute")])
@pytest.mark.parametrize("how", ["cached id", "offline download", "download"])
def test_a_revision_that_is_a_path(served, cached, tmp_path, revision, words, how):
    """The revision becomes refs/<revision> in the cache (huggingface_hub writes it): refused before any
    request or lookup."""
    cache, _, _ = copy_cache(cached, tmp_path)
    extra = ("--download",) if how != "cached id" else ()
    env = hub_env(served.endpoint, cache, **({} if how == "download" else {"HF_HUB_OFFLINE": "1"}))
    refused(run_spec(f"{REPO}@{revision}", env, tmp_path / "out", *extra), tmp_path / "out", "revision", words)
    assert not served.requests


# -- 3. the download record and the worker threads ------------------------------------------------------


def _plant_record(repo: RepoCache, v: Watched, kind: str) -> None:
    path = repo.path / STATE
    repo.path.mkdir(parents=True, exist_ok=True)
    if kind == "link":
        path.symlink_to(v.path("secret.txt"))
    elif kind == "hard link":
        os.link(v.path("secret.txt"), path)  # replaced by the run: the secret's own name alone again
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"\xff\xfe{not json")
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "huge":
        path.write_text(json.dumps({"downloaded": {}, "pad": "x" * (20 << 20)}))
    elif kind == "wrong types":
        path.write_text(json.dumps({"downloaded": ["a"], "verified": {"x": "y", "c" * 64: [1, 2, 3, "4"]}}))


@pytest.mark.parametrize("kind", ["link", "fifo", "folder"])
def test_a_download_record_that_cannot_be_written_stops_the_run_with_its_name(served, tmp_path, victim, kind):
    """The record is written before the first byte of a shard, on a download thread: its failure reaches
    the waiting conversion (exit 2 naming the entry), never a hang; a link is never followed."""
    _plant_record(RepoCache(tmp_path / "hub", REPO), victim, kind)
    refused(download(served, tmp_path), tmp_path / "out", STATE)
    victim.assert_untouched()


@pytest.mark.parametrize("kind", ["hard link", "garbage", "deep", "huge", "wrong types"])
def test_a_download_record_that_cannot_be_read_is_ignored_and_written_again(served, tmp_path, victim, kind):
    repo = RepoCache(tmp_path / "hub", REPO)
    _plant_record(repo, victim, kind)
    r = download(served, tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads((repo.path / STATE).read_text())
    assert set(record["downloaded"].values()) == {SHARD1, SHARD2} and os.stat(repo.path / STATE).st_nlink == 1
    victim.assert_untouched()


class _Remote:
    """A RemoteRepo-like stand-in for the thread tests (no hub)."""

    def __init__(self, files):
        from kt_convert.convert.hub import RemoteRepo

        self.repo = RemoteRepo(REPO, None, "c" * 40, "http://127.0.0.1:9", files)


@pytest.mark.parametrize("where", ["download", "checker", "record", "note"])
def test_any_failure_on_a_worker_thread_reaches_the_waiting_run(tmp_path, monkeypatch, where):
    """An exception of any type on a download or checker thread ends the wait with a UserError naming its
    cause (exit 2), within seconds."""
    from kt_convert.convert import download as dl
    from kt_convert.convert.errors import UserError
    from kt_convert.convert.hub_answers import RemoteFile

    name = "model-00001-of-00001.safetensors"
    remote = _Remote({name: RemoteFile(name, 10, "d" * 64, None)}).repo
    cache = tmp_path / "hub"
    RepoCache(cache, REPO).path.mkdir(parents=True)
    blob = tmp_path / "blob"
    blob.write_bytes(b"0123456789")
    if where == "download":
        monkeypatch.setattr(dl.hub, "download_file", lambda *a, **k: (_ for _ in ()).throw(KeyError("boom")))
    else:
        monkeypatch.setattr(dl.hub, "download_file", lambda *a, **k: blob)
    if where == "checker":
        monkeypatch.setattr(dl, "file_sha256", lambda p: (_ for _ in ()).throw(MemoryError("boom")))
    if where == "record":
        monkeypatch.setattr(dl._State, "save", lambda self: (_ for _ in ()).throw(PermissionError(13, "boom")))
    def note(message):
        if where == "note":
            raise BrokenPipeError(32, "boom")

    if where == "note":
        monkeypatch.setattr(dl, "file_sha256", lambda p: "d" * 64)
    gate = dl.ShardDownloader(remote, cache, RepoCache(cache, REPO).snapshot(remote.commit), False, None, note, 2)
    f = dl.PendingFile(tmp_path / name, {}, {}, 10, gate)
    gate.add(f)
    if where == "note":
        monkeypatch.setattr(dl.PendingFile, "attach", lambda self: None)
    gate.schedule([(0, {name})])
    started = time.monotonic()
    with pytest.raises(UserError, match="boom"):
        gate.wait_for(f)
    assert time.monotonic() - started < 10
    gate.close()


# -- 4. bodies longer than announced ------------------------------------------------------------------------

OVERFLOWS = [
    ("small file, 1000 bytes more", "config.json", "overflow", 1000),
    ("index, 1 byte more", INDEX, "overflow", 1),
    ("shard, 1 byte more", SHARD1, "overflow", 1),
    ("shard without end", SHARD2, "overflow", None),
    ("shard with a Content-Length too large", SHARD1, "lying_length", 4096),
    ("small file with a Content-Length too large", "tokenizer.json", "lying_length", 10),
]


@pytest.mark.parametrize("name,mode,extra", [c[1:] for c in OVERFLOWS], ids=[c[0] for c in OVERFLOWS])
def test_a_body_longer_than_announced_is_cut_at_once(served, tmp_path, name, mode, extra):
    getattr(served, mode)[name] = extra
    started = time.monotonic()
    r = download(served, tmp_path)
    refused(r, tmp_path / "out", name, f"the hub at {served.endpoint}", "sent more than the", "bytes it announced")
    assert time.monotonic() - started < 60
    assert served.sent.get(name, 0) < 64 << 20 < OVERFLOW_CAP  # stopped long before the endless body's cap
    f, repo = served.files[name], RepoCache(tmp_path / "hub", REPO)
    etag = f.sha256 if f.lfs else f.git_sha1
    assert not repo.partial_downloads(etag) and not (repo.path / "blobs" / etag).exists()  # nothing of it kept


# -- 5. model-info answers of the wrong type or shape ----------------------------------------------------------

ANSWERS = [
    ("a list", lambda info: [info]),
    ("a string", lambda info: "siblings"),
    ("not JSON", lambda info: b"{not json"),
    ("JSON without end", lambda info: b"[" + b" " * (70 << 20)),
    ("siblings an object", lambda info: {**info, "siblings": {"a": 1}}),
    ("siblings a string", lambda info: {**info, "siblings": "config.json"}),
    ("a sibling that is a number", lambda info: {**info, "siblings": [7]}),
    ("a sibling without a name", lambda info: {**info, "siblings": [{"size": 3}]}),
    ("a name that is a number", for_file("config.json", rfilename=12)),
    ("a size that is text", for_file(SHARD1, size="2610388")),
    ("a negative size", for_file(SHARD2, size=-1)),
    ("a fractional size", for_file("config.json", size=1.5)),
    ("a size that is true", for_file("config.json", size=True)),
    ("a size of 2^70", for_file(SHARD1, size=2 ** 70)),
    ("lfs that is a string", for_file(SHARD1, lfs="sha")),
    ("lfs without its sha256", siblings(lambda s: {**s, "lfs": {"size": 1, "pointerSize": 1}} if "lfs" in s else s)),
    ("a sha256 that is a number", lfs_of(SHARD1, sha256=12345)),
    ("no commit", lambda info: {k: v for k, v in info.items() if k != "sha"}),
    ("a commit that is a number", lambda info: {**info, "sha": 1234567890}),
]


@pytest.mark.parametrize("answer", [c[1] for c in ANSWERS], ids=[c[0] for c in ANSWERS])
def test_a_model_info_answer_of_the_wrong_shape_is_a_bad_answer(served, tmp_path, answer):
    served.model_info_answer = answer
    err = refused(download(served, tmp_path), tmp_path / "out", REPO, f"the hub at {served.endpoint}")
    assert "not valid" in err or "allowed for this answer" in err or "which commit" in err, err
