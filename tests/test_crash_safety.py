"""Crash safety: SIGKILL at random moments (several in a row), then the same command finishes with
output byte-identical to an uninterrupted run; at no moment does the output look complete when it
is not. Write failures (ENOSPC/EIO) end cleanly and resume. One converter per output directory."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from kt_convert import kt_runtime
from helpers import ROOT
from helpers.outputs import read_json, tree_hashes
from kt_convert.kt_runtime.format import writer as writer_mod
from kt_convert.convert.cli import main
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.kt_runtime.format.names import INDEX_FILE, LAYER_DIR_TEMPORARY, LOCK_FILE, MANIFEST_FILE


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """6 layers x 16 experts (H=384, I=512), 3 source shards: ~0.3 s of conversion on 2 cores."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("kill") / "ck", "v4-flash-tiny", num_layers=6,
                                    num_experts=16, num_shards=3).path


def cli_args(ck, out, layout):
    args = ["-i", str(ck), "-o", str(out), "--no-progress", "--threadpool-count", "2", "--device", "cpu"]
    return args + (["--no-merge-safetensor"] if layout == "kt-folders" else [])


def spawn(ck, out, layout):
    return subprocess.Popen([sys.executable, "-m", "kt_convert", *cli_args(ck, out, layout)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def is_temporary(rel: str) -> bool:
    """The temporary names of docs/FORMAT.md §5 (a kill between KtFolderWriter.commit's two renames leaves
    a whole earlier copy as _layer_L.old/)."""
    return any(part.endswith(".tmp") or LAYER_DIR_TEMPORARY.match(part) for part in Path(rel).parts)


def check_never_looks_complete(out: Path, reference: dict[str, str]) -> str:
    """Invariants of an output killed at any moment; returns a word for where the kill landed."""
    if not out.exists():
        return "nothing"
    here = {k: v for k, v in tree_hashes(out).items() if not is_temporary(k)}
    # every file with a final name is byte-identical to the uninterrupted run's: nothing partial
    for rel, digest in here.items():
        if rel == MANIFEST_FILE:
            continue
        assert reference.get(rel) == digest, f"{rel} has its final name but differs from a complete run's"
    manifest = read_json(out / MANIFEST_FILE) if (out / MANIFEST_FILE).exists() else None
    if (out / INDEX_FILE).exists():  # kt-kernel's sign of a complete output: everything else is there
        assert set(reference) - {MANIFEST_FILE} <= set(here), "index written before the rest"
    if manifest is not None and manifest["complete"]:
        assert here == reference
        return "complete"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no manifest yet: the loader warns, then finds nothing
            kt_runtime.load_experts(out)
        loaded = True  # every layer is done and verified (the index or copied files may still be missing)
    except kt_runtime.PackedWeightsError:
        loaded = False
    if manifest is None:
        assert not loaded
        return "no manifest"
    done = len(manifest["completed"])
    assert loaded == (done == len(manifest["layers"]))
    return f"{done} layers"


def wait_for_lock(proc, out: Path) -> float:
    """Blocks until `proc` holds the output lock (its plan is done, conversion begins); returns the time."""
    lock = out / LOCK_FILE
    while proc.poll() is None:
        try:
            if lock.read_text().strip() == str(proc.pid):
                break
        except OSError:
            pass
        time.sleep(0.001)
    return time.perf_counter()


def wait_until_complete(proc, out: Path) -> float:
    """Blocks until the manifest says complete (the process may take a while longer to exit)."""
    while proc.poll() is None:
        try:
            if read_json(out / MANIFEST_FILE)["complete"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.001)
    return time.perf_counter()


@pytest.mark.parametrize("layout,episodes", [("merged", 8), ("kt-folders", 3)])
def test_kill_9_anywhere_then_rerun_gives_identical_bytes(six_layers, tmp_path, layout, episodes):
    ref_out = tmp_path / "reference"
    t0 = time.perf_counter()
    proc = spawn(six_layers, ref_out, layout)
    t_lock = wait_for_lock(proc, ref_out)
    t_done = wait_until_complete(proc, ref_out)
    assert proc.wait() == 0, proc.stderr.read().decode()
    startup, work = t_lock - t0, t_done - t_lock  # kills land while converting, not while the process exits
    reference = tree_hashes(ref_out)
    assert read_json(ref_out / MANIFEST_FILE)["complete"] is True

    rng = random.Random(f"kill-{layout}")
    landed = []
    for episode in range(episodes):
        out = tmp_path / f"out{episode}"
        for _ in range(1 + episode % 4):  # 1..4 kills in a row before the full run
            done = len(read_json(out / MANIFEST_FILE)["completed"]) if (out / MANIFEST_FILE).exists() else 0
            proc = spawn(six_layers, out, layout)
            if rng.random() < 0.2:  # while reading the checkpoint and planning
                time.sleep(rng.uniform(0.0, startup))
            else:  # while converting what is left (a resumed run has less to do)
                wait_for_lock(proc, out)
                time.sleep(rng.uniform(0.0, 1.1 * work * (6 - done) / 6))
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
            landed.append(check_never_looks_complete(out, reference) if code == -signal.SIGKILL else "finished")
        proc = spawn(six_layers, out, layout)
        assert proc.wait() == 0, f"episode {episode} after kills at {landed}: {proc.stderr.read().decode()}"
        assert tree_hashes(out) == reference, f"episode {episode}: output differs from the uninterrupted run ({landed})"
    if layout == "merged":  # 20 kills fell at different stages (not all before the start or after the end)
        assert len(set(landed)) >= 3, landed
        assert any(x.endswith(" layers") and not x.startswith(("0 ", "6 ")) for x in landed), landed


@pytest.mark.parametrize("layout", ["merged", "kt-folders"])
def test_narrow_kill_windows(tiny_checkpoint, tmp_path, layout):
    """States a kill leaves in windows too narrow to hit reliably at random, rebuilt by hand."""
    base = cli_args(tiny_checkpoint.path, tmp_path / "ref", layout)
    assert main(base) == 0
    reference = tree_hashes(tmp_path / "ref")

    def resumed_equals_reference(out):
        assert main(cli_args(tiny_checkpoint.path, out, layout)) == 0
        assert tree_hashes(out) == reference

    # killed while writing the very first manifest: only its temp exists
    out = tmp_path / "first_manifest"
    out.mkdir()
    (out / (MANIFEST_FILE + ".tmp")).write_text('{"format_vers')
    resumed_equals_reference(out)
    # killed after a layer was renamed into place, before the manifest recorded it; temps of every kind left
    out = tmp_path / "unrecorded"
    shutil.copytree(tmp_path / "ref", out)
    manifest = read_json(out / MANIFEST_FILE)
    del manifest["completed"]["1"]
    manifest["complete"] = False
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / INDEX_FILE).unlink(missing_ok=True)
    (out / "config.json").unlink()
    (out / "config.json.tmp").write_text("{")
    (out / (INDEX_FILE + ".tmp")).write_text("{")
    (out / "model-00002-of-00002.safetensors.tmp").write_bytes(b"\0" * 100)
    (out / "_layer_1.old" / "_numa_0").mkdir(parents=True)
    (out / "_layer_0.tmp").mkdir()
    resumed_equals_reference(out)


def test_second_converter_is_refused_naming_the_holder(six_layers, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from kt_convert.convert.output_dir import "
                               "OutputLock; "
                               "lock = OutputLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(cli_args(six_layers, out, "merged"))
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"pid {holder.pid}" in err and "another converter" in err and "Traceback" not in err
        assert not (out / MANIFEST_FILE).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(cli_args(six_layers, out, "merged")) == 0  # the kernel dropped the lock with the process
    assert (out / INDEX_FILE).exists() and not (out / LOCK_FILE).exists()  # taken over, then removed at the end


# --- write failures ---

class FailingDisk:
    """Replaces os.write in kt_runtime.format.writer: fails with `err` once `budget` bytes have been written."""

    def __init__(self, budget: int, err: int = errno.ENOSPC):
        self.budget, self.err, self.written = budget, err, 0

    def __call__(self, fd, data):
        n = memoryview(data).nbytes
        if self.written + n > self.budget:
            raise OSError(self.err, os.strerror(self.err))
        self.written += n
        return os.write(fd, data)


@pytest.mark.parametrize("layout", ["merged", "kt-folders"])
@pytest.mark.parametrize("err,needle", [(errno.ENOSPC, "no space left"), (errno.EIO, "I/O error"),
                                        (errno.EDQUOT, "no space left")])
def test_write_failure_is_clean_and_a_rerun_completes(tiny_checkpoint, tmp_path, monkeypatch, capsys, layout, err,
                                                      needle):
    ref = tmp_path / "ref"
    extra = ["--no-merge-safetensor"] if layout == "kt-folders" else []
    base = ["-i", str(tiny_checkpoint.path), "--no-progress", "--threadpool-count", "2", *extra]
    assert main([*base, "-o", str(ref)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    layer_bytes = read_json(ref / MANIFEST_FILE)["completed"]["0"]["nbytes"]
    disk = FailingDisk(layer_bytes + layer_bytes // 3, err)  # layer 0 fits, layer 1 fails a third of the way in
    monkeypatch.setattr(writer_mod, "_os_write", disk)
    code = main([*base, "-o", str(out)])
    msg = capsys.readouterr().err
    assert code == 2, msg
    last = msg.splitlines()[-1]
    assert needle in last and "re-run" in last and "Traceback" not in msg, msg
    assert ("model-00002-of-00002.safetensors" in last) if layout == "merged" else ("_layer_1" in last), last
    # nothing that looks complete: no index, layer 1 absent under its final name, manifest says layer 0 only
    manifest = read_json(out / MANIFEST_FILE)
    assert manifest["complete"] is False and list(manifest["completed"]) == ["0"]
    assert not (out / INDEX_FILE).exists()
    assert not list(out.glob("*.tmp")) and not (out / "_layer_1").exists()
    assert not (out / "model-00002-of-00002.safetensors").exists()
    with pytest.raises(kt_runtime.PackedWeightsError, match="never completed"):
        kt_runtime.load_experts(out)
    # space freed: the same command finishes, byte-identical to a run that never failed
    monkeypatch.setattr(writer_mod, "_os_write", os.write)
    assert main([*base, "-o", str(out)]) == 0
    assert tree_hashes(out) == tree_hashes(ref)


def test_write_failure_in_the_manifest_keeps_the_old_one(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """ENOSPC while the manifest itself is rewritten: the previous manifest stays intact."""
    from kt_convert.kt_runtime.format import manifest as manifest_mod

    out = tmp_path / "out"
    real = manifest_mod.atomic_write_text
    calls = []

    def failing(path, text):
        calls.append(path)
        if len(calls) == 3:  # the start, layer 0 recorded, then layer 1's record fails
            Path(str(path) + ".tmp").write_text(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text)

    monkeypatch.setattr(manifest_mod, "atomic_write_text", failing)
    base = ["-i", str(tiny_checkpoint.path), "-o", str(out), "--no-progress", "--threadpool-count", "2"]
    assert main(base) == 2
    assert "no space left" in capsys.readouterr().err
    manifest = read_json(out / MANIFEST_FILE)
    assert list(manifest["completed"]) == ["0"] and manifest["complete"] is False
    monkeypatch.setattr(manifest_mod, "atomic_write_text", real)
    assert main(base) == 0
    kt_runtime.load_experts(out)
    assert not list(out.glob("*.tmp"))
