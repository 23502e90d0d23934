"""Ctrl-C and SIGTERM during a conversion: the message "interrupted; completed layers are kept; re-run
the same command to resume", exit 130 / 143, the lock released, no temporary left, nothing that looks
complete; the same command then resumes (completed layers are not redone) to bytes identical to an
uninterrupted run."""
import fcntl
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from kt_convert import kt_runtime
from helpers import ROOT
from helpers.outputs import read_json, tree_hashes
from kt_convert.kt_runtime.format import writer as writer_mod
from kt_convert.convert.cli import INTERRUPTED, main
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.kt_runtime.format.names import INDEX_FILE, LOCK_FILE, MANIFEST_FILE

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
WRITES_PER_LAYER = 16 * 3 * 2 * 2  # merged shard: experts x projections x NUMA slices x (weight, scale)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """6 layers x 16 experts (H=384, I=512), 3 source shards."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("sig") / "ck", "v4-flash-tiny", num_layers=6,
                                    num_experts=16, num_shards=3).path


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """Uninterrupted runs, by layout."""
    hashes = {}
    for layout in ("merged", "kt-folders"):
        out = tmp_path_factory.mktemp("sigref") / layout
        assert main(args(ckpt, out, layout)) == 0
        hashes[layout] = tree_hashes(out)
    return hashes


def args(ckpt, out, layout):
    extra = ["--no-merge-safetensor"] if layout == "kt-folders" else []
    return ["-i", str(ckpt), "-o", str(out), "--no-progress", "--threadpool-count", "2", "--device", "cpu", *extra]


def lock_is_free(out) -> bool:
    """Nobody holds the output's lock; a run that ended removes the lock file with its lock."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def assert_interrupted_state(out, err=""):
    """Nothing looks complete, nothing temporary is left, completed layers are recorded and intact."""
    assert not (out / INDEX_FILE).exists()
    left = [p for p in out.rglob("*") if any(part.endswith((".tmp", ".old")) for part in p.parts)]
    assert not left, (left, err)
    manifest = read_json(out / MANIFEST_FILE)
    assert manifest["complete"] is False
    assert len(manifest["completed"]) < len(manifest["layers"])
    with pytest.raises(kt_runtime.PackedWeightsError, match="never completed"):
        kt_runtime.load_experts(out)
    return len(manifest["completed"])


def resume_and_compare(ckpt, out, layout, reference, capsys, done):
    assert main(args(ckpt, out, layout)) == 0
    err = capsys.readouterr().err
    assert f"{done} already done" in err, err  # completed layers were kept, not converted again
    assert tree_hashes(out) == reference[layout]


@pytest.mark.parametrize("layout", ["merged", "kt-folders"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_process_unwinds_cleanly(ckpt, reference, tmp_path, monkeypatch, capsys, layout, sig):
    """The signal arrives while layer 2 is being written (sent by the writer thread itself, so the
    moment is exact): the handler in the main thread unwinds the conversion."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    calls = {"n": 0}
    at = 2 * WRITES_PER_LAYER + WRITES_PER_LAYER // 2

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the main thread handles it while this write is in flight
        return os.write(fd, data)

    monkeypatch.setattr(writer_mod, "_os_write", write)
    out = tmp_path / "out"
    code = main(args(ckpt, out, layout))
    err = capsys.readouterr().err
    assert code == CODES[sig], err
    assert err.splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in err and "Aborted" not in err, err
    assert lock_is_free(out)
    done = assert_interrupted_state(out, err)
    assert done >= 1
    monkeypatch.setattr(writer_mod, "_os_write", os.write)
    resume_and_compare(ckpt, out, layout, reference, capsys, done)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back


SLOW_DISK = ("import os, sys, time; import kt_convert.kt_runtime.format.writer as w; "
             "w._os_write = lambda fd, d: (time.sleep(0.002), os.write(fd, d))[1]; "
             "from kt_convert.convert.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_from_outside_at_random_moments(ckpt, reference, tmp_path, capsys, sig):
    """A real converter process (its disk slowed to ~2 ms per write, so a layer takes ~0.4 s) gets
    the signal once at least one layer is recorded, at a random moment; then the same command
    resumes to identical bytes. Two episodes in one output directory."""
    out = tmp_path / "out"
    rng = random.Random(int(sig))
    done_before = 0
    for episode in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SLOW_DISK, *args(ckpt, out, "merged")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:  # wait for one more completed layer than before
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "no layer completed in 120 s"
                try:
                    if len(read_json(out / MANIFEST_FILE)["completed"]) > done_before:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(sig)
            err = proc.communicate(timeout=60)[1]  # a hang fails here
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == CODES[sig], err
        assert err.splitlines()[-1] == INTERRUPTED, err
        assert "Traceback" not in err and "Aborted" not in err, err
        assert lock_is_free(out)
        done_before = assert_interrupted_state(out, err)
    resume_and_compare(ckpt, out, "merged", reference, capsys, done_before)
