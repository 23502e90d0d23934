"""Threads can be refused: under an address-space limit (RLIMIT_AS, no room for a thread's stack) or
a process limit (RLIMIT_NPROC), both C++ pools (the packer's and the MoE engine's) stop the threads
they had started and raise kt_kernels.ThreadStartError naming the thread that failed; the process
goes on working with fewer threads; the converter exits 2 with what to do. Every case runs in a
child process with a timeout, so a pool that deadlocks while unwinding fails the test. Thread counts
outside [0, MAX_THREADS] are refused up front with a ValueError naming the range."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kt_convert import kt_kernels
from helpers import ROOT
from helpers.engine_knobs import knobs
from helpers.outputs import read_json
from kt_convert.kt_kernels import _testing
from kt_convert.kt_runtime.format.names import INDEX_FILE, MANIFEST_FILE

TIMEOUT = 120

PRELUDE = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from kt_convert import kt_kernels

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    def limit(kind):
        if kind == "none":
            return
        if kind == "as":  # room for a few 8 MiB thread stacks, not for hundreds
            room = vm_size() + (48 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (room, room))
        else:  # the threads this user runs now, plus a few
            n = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if os.stat("/proc/" + pid).st_uid == os.getuid():
                        n += len(os.listdir("/proc/%s/task" % pid))
                except OSError:
                    pass
            resource.setrlimit(resource.RLIMIT_NPROC, (n + 4, n + 4))

    def attempt(fn):
        try:
            return {"ok": fn()}
        except Exception as e:
            return {"error": type(e).__name__, "message": str(e), "runtime_error": isinstance(e, RuntimeError)}
""")

POOLS = PRELUDE + textwrap.dedent("""
    from kt_convert.kt_runtime.cpu_moe import CPUMoE
    sys.path.insert(0, sys.argv[2])
    from helpers.moe import FakeExperts

    experts = FakeExperts("int8", hidden=128, inter=128, experts=4, threadpool_count=1)
    x = np.linspace(-1, 1, 2 * 128, dtype=np.float32).reshape(2, 128)
    ids = np.array([[0, 1], [2, 3]], np.int64)
    w = np.full((2, 2), 0.5, np.float32)
    shards = [[tuple(np.asarray(a) for p in ("gate", "up", "down") for a in experts.expert_tensors(0, e, p, 0))]
              for e in range(4)]
    layer = kt_kernels.MoELayer("int8", shards, 128, 128, 1, None)  # the engine's binding itself
    before = CPUMoE(experts, 0, num_threads=1, isa="portable").forward_f32(x, ids, w)
    limit(sys.argv[1])
    res = {
        "pack_pool": attempt(lambda: kt_kernels.start_pack_pool(256)),
        "moe_pool": attempt(lambda: kt_kernels.start_moe_pool(256)),
        "cpumoe": attempt(lambda: CPUMoE(experts, 0, num_threads=256) and None),
        "forward": attempt(lambda: layer.forward(x, ids, w, "auto", 256)),
        # the same process still works with the threads it can have
        "pack_pool_small": attempt(lambda: kt_kernels.start_pack_pool(2)),
        "moe_small": attempt(lambda: bool(np.array_equal(
            CPUMoE(experts, 0, num_threads=2).forward_f32(x, ids, w), before))),
    }
    print(json.dumps(res))
""")


def run_child(code, *argv, timeout=TIMEOUT):
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # a deadlocked pool raises TimeoutExpired: the test fails
    return proc


def limits():
    kinds = [pytest.param("as", id="RLIMIT_AS")]
    kinds.append(pytest.param("nproc", id="RLIMIT_NPROC", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root is exempt from RLIMIT_NPROC")))
    return kinds


@pytest.mark.parametrize("kind", limits())
def test_both_pools_fail_cleanly_and_the_process_goes_on(kind):
    proc = run_child(POOLS, kind, str(ROOT / "tests"))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, pool in (("pack_pool", "packing thread pool"), ("moe_pool", "MoE thread pool"),
                       ("cpumoe", "MoE thread pool"), ("forward", "MoE thread pool")):
        r = res[name]
        assert r.get("error") == "ThreadStartError" and r["runtime_error"], (name, r)
        assert "of 256" in r["message"] and pool in r["message"], (name, r)
        started = int(r["message"].split("cannot start thread ")[1].split()[0])
        assert 1 < started <= 256, r  # the number of the thread that failed
    assert res["pack_pool_small"] == {"ok": 2}
    assert res["moe_small"] == {"ok": True}


@pytest.mark.parametrize("bad", [2**40, 2**70, -1, 4097, True, 2.0])
def test_thread_counts_out_of_range_are_refused_at_construction(bad):
    from kt_convert.kt_runtime.cpu_moe import CPUMoE
    from helpers.moe import FakeExperts

    experts = FakeExperts("int8", hidden=128, inter=128, experts=4, threadpool_count=1)
    with pytest.raises(ValueError, match=r"num_threads must be an int in \[0, 4096\]"):
        CPUMoE(experts, 0, num_threads=bad)
    from kt_convert.kt_runtime.format.methods import get_method
    from kt_convert.quant.cpu import pack_cpu

    with pytest.raises(ValueError, match=r"\[0, 4096\]"):
        pack_cpu(get_method("int4"), [], num_threads=bad)


@pytest.mark.parametrize("bad", [2**40, -1, 4097])
def test_kernel_entry_points_check_the_range(bad):
    assert kt_kernels.MAX_THREADS == 4096
    for fn in (kt_kernels.start_pack_pool, kt_kernels.start_moe_pool,
               lambda n: kt_kernels.pack("int4", [], "auto", n)):
        with pytest.raises(ValueError, match=r"num_threads must be in \[0, 4096\]"):
            fn(bad)
    buf = np.zeros(1 << 21, np.uint8)
    buf = buf[(-buf.ctypes.data) % 64:][: 1 << 20]
    with pytest.raises(ValueError, match=r"\[0, 4096\]"):
        _testing.read_bandwidth(buf, bad, 1)


CONVERT = PRELUDE + textwrap.dedent("""
    from kt_convert.convert.cli import main
    limit(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
""")


def test_converter_exits_2_when_packing_threads_are_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    argv = ["-i", str(tiny_checkpoint.path), "-o", str(out), "--no-progress", "--device", "cpu",
            "--threadpool-count", "2"]
    proc = run_child(CONVERT, "as", *argv, "--cpuinfer-threads", "256")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("error: cannot start thread ") and "of 256 for the packing thread pool" in last, last
    assert "--cpuinfer-threads" in last and "ulimit" in last, last
    assert not (out / INDEX_FILE).exists() and read_json(out / MANIFEST_FILE)["complete"] is False
    # the limit lifted: the same command finishes
    proc = run_child(CONVERT, "none", *argv, "--cpuinfer-threads", "256")
    assert proc.returncode == 0, proc.stderr
    assert read_json(out / MANIFEST_FILE)["complete"] is True


def test_spin_pool_gives_the_same_results_sleeping_or_spinning():
    """The MoE pool's workers spin tuning().spin_us after a call, then sleep: calls that find them
    asleep (spin 0, pauses between calls) or spinning give the portable reference's bytes."""
    import time

    import torch

    from kt_convert.kt_runtime.cpu_moe import CPUMoE
    from helpers.moe import FakeExperts

    w = FakeExperts("int8", hidden=256, inter=256, experts=8, threadpool_count=2, seed=4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 256, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(5)]).to(torch.int64)
    tw = torch.rand(5, 3, generator=g)
    ref = CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw)
    old = _testing.knob("spin_us")
    with knobs(spin_us=0):
        assert _testing.knob("spin_us") == 0
        for spin_us in (0, 100000):
            _testing.knob("spin_us", spin_us)
            for threads in (2, 5):
                moe = CPUMoE(w, 0, num_threads=threads)
                for _ in range(3):
                    assert torch.equal(moe.forward(x, ids, tw), ref)
                    time.sleep(0.005)
    assert _testing.knob("spin_us") == old
