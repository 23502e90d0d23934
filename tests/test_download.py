"""Converting while downloading (--download): a real HTTP server in this process (synthetic.hub_server)
serves a synthetic repository through the hub endpoints huggingface_hub calls, selected with
HF_ENDPOINT; the command runs in a subprocess with a controlled environment (no Xet, no token, no
offline mode unless asked), so the real huggingface_hub code downloads. Covered: the output equals a
local conversion; kill -9 mid-download and mid-conversion, then resume (byte-identical, completed
shards never fetched again); the disk cap and deletion of only the files this tool downloaded; a
corrupted download; the server going away; offline mode; --dry-run; the families table."""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kt_convert import kt_runtime
from helpers import ROOT
from helpers.hub import REPO, base_env, cli, hub_env, served  # noqa: F401 - served: the local hub (a fixture)
from helpers.outputs import published_hashes
from kt_convert.synthetic import make_v4_flash_checkpoint
from kt_convert.synthetic.hub_server import LocalHub

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Four MoE layers over three ~5 MB shards (layers 1 and 2 each span two shards)."""
    ck = make_v4_flash_checkpoint(tmp_path_factory.mktemp("repo") / "src", "v4-flash-tiny", num_layers=4,
                                  num_shards=3)
    return ck.path


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """Shards of ~19 MB: more than huggingface_hub's 10 MiB write chunk, so a killed download leaves
    a partial .incomplete blob that the next run resumes with a Range request."""
    ck = make_v4_flash_checkpoint(tmp_path_factory.mktemp("repo") / "big", "v4-flash-tiny", num_layers=4,
                                  num_experts=32, num_shards=3)
    return ck.path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = subprocess.run([sys.executable, "-m", "kt_convert", "-i", str(source), "-o", str(out), "--threadpool-count",
                        "1", "--no-progress"], cwd=ROOT, capture_output=True, text=True, env=base_env())
    assert r.returncode == 0, r.stderr
    return kt_runtime.load_experts(out)


def start_cli(env, out, *args):
    cmd = [sys.executable, "-m", "kt_convert", "-i", REPO, "-o", str(out), "--threadpool-count", "1", "--no-progress",
           "--download", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def repo_dir(cache: Path) -> Path:
    return cache / ("models--" + REPO.replace("/", "--"))


def file_digests(out: Path) -> dict[str, str]:
    """Every output file's sha256; of the manifest, its layer records (it also names the source path,
    here a different cache per run); the lock file holds nothing; the verification record is a cache
    keyed by inodes and times."""
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
               if p.is_file() and p.name not in ("kt_manifest.json", ".kt_convert.lock", ".kt_verified.json")}
    manifest = json.loads((out / "kt_manifest.json").read_text())
    digests["completed"] = json.dumps(manifest["completed"], sort_keys=True)
    digests["complete"] = manifest["complete"]
    return digests


def same_tensors(out: Path, reference) -> bool:
    got = kt_runtime.load_experts(out)
    return got._tensors.keys() == reference._tensors.keys() and all(
        np.array_equal(got._tensors[k][0], reference._tensors[k][0]) for k in reference._tensors)


def wait_until(predicate, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def incomplete_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (repo_dir(cache) / "blobs").glob("*.incomplete")) \
        if (repo_dir(cache) / "blobs").is_dir() else 0


def completed_layers(out: Path) -> int:
    try:
        return len(json.loads((out / "kt_manifest.json").read_text()).get("completed", {}))
    except (OSError, ValueError):
        return 0


def test_download_converts_like_a_local_checkpoint(served, reference, tmp_path):
    cache, out = tmp_path / "hub", tmp_path / "out"
    r = cli(hub_env(served.endpoint, cache), "--download", out=out)
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]  # the detected family and format, first
    assert "family deepseek_v4" in first and "MXFP4" in first, first
    assert same_tensors(out, reference)
    # the files of a conversion of the local copy, byte for byte (only the manifest names the source)
    assert published_hashes(out) == published_hashes(reference.path)
    # a valid huggingface_hub cache: refs/main names the commit, snapshot files link to sha256 blobs
    assert (repo_dir(cache) / "refs" / "main").read_text() == served.commit
    snap = repo_dir(cache) / "snapshots" / served.commit
    for name in SHARDS:
        assert (snap / name).is_symlink()
        assert Path(os.readlink(snap / name)).name == served.files[name].sha256
        assert served.lfs_downloads(name) == [None]  # fetched once, whole
    # the files kt-convert downloaded are recorded (and only they may be deleted)
    state = json.loads((repo_dir(cache) / "kt-convert-downloads.json").read_text())
    assert sorted(state["downloaded"].values()) == SHARDS
    # a second run finds the output complete and fetches nothing
    r = cli(hub_env(served.endpoint, cache), "--download", out=out)
    assert r.returncode == 0, r.stderr
    assert "all 4 layers were converted by an earlier run" in r.stderr
    assert all(len(served.lfs_downloads(n)) == 1 for n in SHARDS)


def test_kill9_mid_download_and_mid_conversion_resumes_byte_identical(big_source, tmp_path):
    served = LocalHub(REPO, big_source)
    served.start()
    try:
        _kill_and_resume(served, tmp_path)
    finally:
        served.stop()


def _kill_and_resume(served, tmp_path):
    fresh_cache, fresh = tmp_path / "hub-fresh", tmp_path / "fresh"
    assert cli(hub_env(served.endpoint, fresh_cache), "--download", out=fresh).returncode == 0
    want = file_digests(fresh)
    cache, out = tmp_path / "hub", tmp_path / "out"
    env = hub_env(served.endpoint, cache)
    served.requests.clear()
    # 1: killed while the first shard is half downloaded, before any layer (a slow link: the kill lands
    # mid-download even when this machine is slow to notice the partial file)
    served.bytes_per_s = 2e6
    proc = start_cli(env, out, "--download-workers", "1")
    # the first shard's own partial blob has bytes (not a small file's partial, nor a header read)
    first = served.files[SHARDS[0]].sha256

    def first_shard_partial() -> bool:
        for p in (repo_dir(cache) / "blobs").glob(first + ".*.incomplete"):
            try:
                if os.stat(p).st_size > 0:
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return False

    assert wait_until(lambda: (repo_dir(cache) / "blobs").is_dir() and first_shard_partial(), proc), \
        proc.communicate()
    proc.kill()
    proc.wait()
    assert completed_layers(out) == 0
    served.bytes_per_s = 15e6  # ~1.3 s per shard, one shard at a time
    # 2: killed after a layer is committed, while a later shard downloads
    proc = start_cli(env, out, "--download-workers", "1")
    assert wait_until(lambda: completed_layers(out) >= 1 and incomplete_bytes(cache) > 0, proc), \
        proc.communicate()
    proc.kill()
    proc.wait()
    done = completed_layers(out)
    assert 1 <= done < 4
    partial = {p.name.split(".")[0] for p in (repo_dir(cache) / "blobs").glob("*.incomplete")}
    assert partial and served.files[SHARDS[0]].sha256 not in partial
    served.bytes_per_s = None
    r = cli(env, "--download", out=out)
    assert r.returncode == 0, r.stderr
    left = 4 - done
    assert f"{left} layer{'s' if left != 1 else ''} converted, {done} already done" in r.stderr
    assert file_digests(out) == want  # byte-identical to an uninterrupted run
    # huggingface_hub (2.x) restarts an interrupted file (its partial is process-private): the first
    # shard was fetched twice (killed, then whole in run 2), never again once complete and verified
    assert served.lfs_downloads(SHARDS[0]) == [None, None]
    for name in SHARDS[1:]:
        assert len(served.lfs_downloads(name)) <= 2
    # the killed runs' partial files were removed, the cache holds the three verified blobs
    blobs = repo_dir(cache) / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    assert {served.files[n].sha256 for n in SHARDS} <= {p.name for p in blobs.iterdir()}


def _disk_sampler(path: Path, stop: threading.Event, peak: list[int], blobs: set[str]):
    """The largest total size seen of these blobs (complete or partial) while the run goes."""
    while not stop.is_set():
        total = 0
        for p in path.rglob("*"):
            try:
                if p.is_file() and not p.is_symlink() and p.name.split(".")[0] in blobs:
                    total += p.stat().st_size
            except OSError:
                pass
        peak[0] = max(peak[0], total)
        time.sleep(0.01)


def test_disk_cap_deletes_only_what_this_tool_downloaded(served, reference, tmp_path):
    cache, out = tmp_path / "hub", tmp_path / "out"
    env = hub_env(served.endpoint, cache)
    # the user already has shard 2 in the cache (downloaded by huggingface_hub, not by kt-convert)
    r = subprocess.run([sys.executable, "-c", "import sys; from huggingface_hub import hf_hub_download; "
                        f"hf_hub_download({REPO!r}, {SHARDS[1]!r})"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    user_blob = repo_dir(cache) / "blobs" / served.files[SHARDS[1]].sha256
    assert user_blob.is_file()
    served.requests.clear()
    sizes = {n: served.files[n].size for n in SHARDS}
    cap = max(sizes[SHARDS[0]], sizes[SHARDS[2]]) + 1000  # one downloaded shard at a time
    # too small for a layer: refused before any shard is fetched
    r = cli(env, "--download", "--max-source-disk", str((sizes[SHARDS[0]] // 2) / 1e9), out=tmp_path / "small")
    assert r.returncode == 2 and "--max-source-disk" in r.stderr and "too small" in r.stderr, r.stderr
    assert not any(served.lfs_downloads(n) for n in SHARDS)
    served.bytes_per_s = 20e6
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_disk_sampler,
                               args=(repo_dir(cache) / "blobs", stop, peak, {served.files[n].sha256 for n in (SHARDS[0], SHARDS[2])}))
    sampler.start()
    try:
        r = cli(env, "--download", "--max-source-disk", str(cap / 1e9), out=out)
    finally:
        stop.set()
        sampler.join()
    assert r.returncode == 0, r.stderr
    assert same_tensors(out, reference)
    assert 0 < peak[0] <= cap, (peak[0], cap)
    assert user_blob.is_file() and (repo_dir(cache) / "snapshots" / served.commit / SHARDS[1]).exists()
    for name in (SHARDS[0], SHARDS[2]):  # downloaded by this run, converted, removed
        assert not (repo_dir(cache) / "blobs" / served.files[name].sha256).exists()
        assert not os.path.lexists(repo_dir(cache) / "snapshots" / served.commit / name)
    assert served.lfs_downloads(SHARDS[1]) == []


def test_delete_source_after_use_keeps_a_users_files(served, reference, tmp_path):
    cache, out = tmp_path / "hub", tmp_path / "out"
    env = hub_env(served.endpoint, cache)
    r = cli(env, "--download", "--delete-source-after-use", out=out)
    assert r.returncode == 0, r.stderr
    assert same_tensors(out, reference)
    blobs = repo_dir(cache) / "blobs"
    assert not any((blobs / served.files[n].sha256).exists() for n in SHARDS)
    assert (repo_dir(cache) / "snapshots" / served.commit / "config.json").is_file()  # small files stay


def test_corrupted_download_is_fetched_again_then_refused(served, reference, tmp_path):
    env = hub_env(served.endpoint, tmp_path / "hub")
    served.corrupt[SHARDS[1]] = 1  # wrong bytes once: downloaded again, the run succeeds
    r = cli(env, "--download", out=tmp_path / "once")
    assert r.returncode == 0, r.stderr
    assert "sha256 does not match" in r.stderr and SHARDS[1] in r.stderr
    assert len(served.lfs_downloads(SHARDS[1])) == 2
    assert same_tensors(tmp_path / "once", reference)
    env = hub_env(served.endpoint, tmp_path / "hub2")
    served.corrupt[SHARDS[0]] = 2  # wrong bytes every time: exit 2 naming the file, nothing damaged kept
    r = cli(env, "--download", out=tmp_path / "twice")
    assert r.returncode == 2, r.stderr
    assert SHARDS[0] in r.stderr and "sha256" in r.stderr and "Traceback" not in r.stderr
    assert not (repo_dir(tmp_path / "hub2") / "blobs" / served.files[SHARDS[0]].sha256).exists()


def test_server_going_away_is_a_clear_error_and_resumable(source, reference, tmp_path):
    hub = LocalHub(REPO, source, bytes_per_s=4e6)
    hub.start()
    port = hub.port
    cache, out = tmp_path / "hub", tmp_path / "out"
    env = hub_env(hub.endpoint, cache)
    proc = start_cli(env, out)
    try:
        assert wait_until(lambda: sum(hub.sent.values()) > 1_000_000, proc, 60)
        hub.stop()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert f"http://127.0.0.1:{port}" in err and "re-run" in err and "Traceback" not in err
    # the hub is back: the same command finishes
    hub2 = LocalHub(REPO, source)
    hub2.start(port)
    try:
        r = cli(env, "--download", out=out)
    finally:
        hub2.stop()
    assert r.returncode == 0, r.stderr
    assert same_tensors(out, reference)
    # unreachable from the start: exit 2 naming the endpoint
    r = cli(hub_env(f"http://127.0.0.1:{port}", tmp_path / "hub3"), "--download", out=tmp_path / "out3")
    assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_offline_mode_with_a_partial_cache(served, reference, tmp_path):
    cache = tmp_path / "hub"
    env = hub_env(served.endpoint, cache)
    r = subprocess.run([sys.executable, "-c", "from huggingface_hub import hf_hub_download\n"
                        f"for n in ['config.json', 'model.safetensors.index.json', {SHARDS[0]!r}]:\n"
                        f"    hf_hub_download({REPO!r}, n)"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    offline = hub_env(served.endpoint, cache, HF_HUB_OFFLINE="1")
    r = cli(offline, "--download", out=tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert "HF_HUB_OFFLINE=1" in r.stderr and SHARDS[1] in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "kt_manifest.json").exists()
    # online: the rest is downloaded; offline again: everything is in the cache, it converts
    assert cli(env, "--download", out=tmp_path / "online").returncode == 0
    r = cli(offline, "--download", out=tmp_path / "offline")
    assert r.returncode == 0, r.stderr
    assert same_tensors(tmp_path / "offline", reference)


def test_dry_run_prints_the_plan_and_writes_nothing(served, source, tmp_path):
    cache, out = tmp_path / "hub", tmp_path / "out"
    r = cli(hub_env(served.endpoint, cache), "--download", "--dry-run", "--max-source-disk", "0.02", out=out)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for want in ("family        deepseek_v4", "source format fp4", "layers        4 MoE layers (0-3)",
                 "MTP           0 expert tensors skipped", "experts       8 per layer", "H / I         384 / 512",
                 "int4", "T=1", "T that work", "peak memory", "peak disk", "3 of 3 shards to fetch", SHARDS[2]):
        assert want in text, (want, text)
    assert not out.exists() and not cache.exists()
    assert not any(served.lfs_downloads(n) for n in SHARDS)  # headers only (range requests on the resolve URL)
    r = subprocess.run([sys.executable, "-m", "kt_convert", "-i", str(source), "-o", str(out), "--dry-run",
                        "--quant-method", "int8", "--threadpool-count", "2"], cwd=ROOT, capture_output=True, text=True,
                       env=base_env())
    assert r.returncode == 0, r.stderr
    assert "family        deepseek_v4" in r.stdout and "int8" in r.stdout and "T=2" in r.stdout
    assert "to fetch" not in r.stdout and not out.exists()


def test_dry_run_json_is_a_plan_object(served, source, tmp_path):
    """--dry-run --json -: one JSON object on standard output (the text plan on standard error), for a local
    and a hub source; several outputs give a list."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kt_convert", "-i", str(source), "-o", str(out), "--dry-run", "--json",
                        "-",
                        "--quant-method", "int8", "--threadpool-count", "2"], cwd=ROOT, capture_output=True, text=True,
                       env=base_env())
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["family"] == "deepseek_v4" and plan["source_format"] == "fp4"
    assert (plan["layers"], plan["method"], plan["kt_method"], plan["threadpool_count"]) == ([0, 1, 2, 3], "int8",
                                                                                             "AMXINT8", 2)
    assert (plan["hidden_size"], plan["moe_intermediate_size"], plan["num_experts"]) == (384, 512, 8)
    weights = 4 * 8 * 3 * 384 * 512  # int8: a byte per weight of 4 layers x 8 experts x 3 projections
    assert weights < plan["output_bytes"] < weights * 1.02 and plan["input_bytes"] > 0 and plan["download"] is None
    assert "family        deepseek_v4" in r.stderr and "0.00 GB" not in r.stderr and not out.exists()
    template = str(tmp_path / "{method}")
    r = subprocess.run([sys.executable, "-m", "kt_convert", "-i", str(source), "--output-template", template,
                        "--dry-run",
                        "--json", "-", "--quant-method", "int4,int8"], cwd=ROOT, capture_output=True, text=True,
                       env=base_env())
    assert r.returncode == 0, r.stderr
    assert [p["method"] for p in json.loads(r.stdout)] == ["int4", "int8"]
    cache = tmp_path / "hub"
    r = cli(hub_env(served.endpoint, cache), "--download", "--dry-run", "--json", "-", out=out)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["source"] == f"hub {REPO}" and plan["peak_source_bytes"] > 0
    assert [f["name"] for f in plan["download"]["to_download"]] == SHARDS and plan["download"]["repo"] == REPO
    assert plan["download"]["download_bytes"] == sum(f["size"] for f in plan["download"]["to_download"])
    assert not out.exists() and not cache.exists()


def test_families_json():
    r = subprocess.run([sys.executable, "-m", "kt_convert", "families", "--json", "-"], cwd=ROOT, capture_output=True,
                       text=True, env=base_env())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    from kt_convert.convert.families import FAMILIES

    assert [f["name"] for f in doc["families"]] == [f.name for f in FAMILIES]
    assert {"name": "gpt_oss", "model_types": ["gpt_oss"], "layout": "gpt-oss-interleaved"}.items() <= \
        next(f for f in doc["families"] if f["name"] == "gpt_oss").items()
    assert [f["input_type"] for f in doc["source_formats"]] == ["fp4", "fp8", "bf16", "fp16", "int4", "nvfp4", "mxfp8"]


def test_families_command_and_flag():
    for args in (["families"], ["-i", "x", "-o", "y", "--list-families"], ["--list-families"]):
        r = subprocess.run([sys.executable, "-m", "kt_convert", *args], cwd=ROOT, capture_output=True, text=True,
                           env=base_env())
        assert r.returncode == 0, (args, r.stderr)
        assert "deepseek_v4" in r.stdout and "qwen3_moe" in r.stdout and "gpt_oss" in r.stdout


def test_needed_shards_skip_shards_without_routed_experts():
    from kt_convert.convert.download import needed_shards

    config = {"model_type": "qwen3_moe"}
    wm = {"model.embed_tokens.weight": "a.safetensors",
          "model.layers.0.mlp.experts.0.gate_proj.weight": "b.safetensors",
          "model.layers.0.mlp.experts.0.up_proj.weight": "c.safetensors",
          "lm_head.weight": "d.safetensors"}
    assert needed_shards(config, wm, [], include_non_expert=False) == ["b.safetensors", "c.safetensors"]
    assert needed_shards(config, wm, [], include_non_expert=True) == ["a.safetensors", "b.safetensors",
                                                                      "c.safetensors", "d.safetensors"]


def test_include_non_expert_downloads_every_shard_and_removes_them_at_the_end(served, source, tmp_path):
    cache, out, ref = tmp_path / "hub", tmp_path / "out", tmp_path / "ref"
    r = cli(hub_env(served.endpoint, cache), "--download", "--include-non-expert", "--delete-source-after-use",
            out=out)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "kt_convert", "-i", str(source), "-o", str(ref), "--threadpool-count",
                        "1", "--no-progress", "--include-non-expert"], cwd=ROOT, capture_output=True, text=True,
                       env=base_env())
    assert r.returncode == 0, r.stderr
    last = "model-00005-of-00005.safetensors"  # the non-expert tensors, kt's last shard
    assert (out / last).read_bytes() == (ref / last).read_bytes()
    assert published_hashes(out) == published_hashes(ref)  # every shard, the index and the copied files too
    assert not any((repo_dir(cache) / "blobs" / served.files[n].sha256).exists() for n in SHARDS)


def test_unknown_repository_and_options_without_download(served, tmp_path):
    env = hub_env(served.endpoint, tmp_path / "hub")
    r = subprocess.run([sys.executable, "-m", "kt_convert", "-i", "org/not-there", "-o", str(tmp_path / "out"),
                        "--download"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "no such repository" in r.stderr and served.endpoint in r.stderr, r.stderr
    r = cli(env, "--max-source-disk", "1", out=tmp_path / "out")
    assert r.returncode == 2 and "only with --download" in r.stderr, r.stderr
