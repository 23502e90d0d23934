"""The conversion's stages, testable without a GPU: per-stage timings (report, --json, --timings), the
device start-up on a background thread with the CPU packing until it is ready (a stand-in GPU packer
that packs with the C++ packer), and the writer running across layer boundaries."""
import json
import threading
import time

import numpy as np
import pytest

from helpers.outputs import tree_hashes
from kt_convert.convert import layer_pack, packers, pipeline
from kt_convert.kt_runtime.format import writer as writer_mod
from kt_convert.convert.cli import main
from kt_convert.convert.host_memory import PageableMemory
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.convert.timings import STAGES
from kt_convert.quant.cpu import pack_cpu


def run(ckpt, out, **kw):
    kw.setdefault("device", "cpu")  # the CPU path, also on a machine with a GPU
    return convert(ConvertOptions(input_path=str(ckpt), output=out, progress=False, **kw))


def test_report_times_every_stage_of_a_cpu_run(tiny_checkpoint, tmp_path):
    report = run(tiny_checkpoint.path, tmp_path / "out", threadpool_count=2)
    t = report.timings
    for stage in ("plan_s", "read_s", "pack_s", "write_s", "digest_s", "commit_s", "finish_s"):
        assert t.get(stage, 0) > 0, (stage, t)
        assert t[stage] < 10 * report.seconds, (stage, t)  # seconds, not a count or nanoseconds
    assert 0 <= t["read_wait_s"] < report.seconds and 0 <= t["commit_wait_s"] < report.seconds  # may round to 0
    assert not any(k.startswith(("device_", "gpu_")) for k in t), t  # no GPU stage on --device cpu
    assert list(t) == [k for k in STAGES if k in t]  # the documented order
    assert t["plan_s"] < report.seconds


def test_cli_timings_table_and_json(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["-i", str(tiny_checkpoint.path), "-o", str(tmp_path / "out"), "--no-progress", "--timings",
                 "--json", str(path)]) == 0
    err = capsys.readouterr().err
    assert "where the time went" in err
    timings = json.loads(path.read_text())["timings"]
    for stage in ("pack", "write", "commit", "read"):
        line = next(x for x in err.splitlines() if x.strip().startswith(stage + " "))
        assert f"{timings[stage + '_s']:.2f} s" in line, (line, timings)


def test_a_local_checkpoint_has_a_gate_that_does_nothing(tiny_checkpoint):
    from kt_convert.convert.source import SourceGate, open_checkpoint

    ckpt = open_checkpoint(str(tiny_checkpoint.path))
    try:
        assert type(ckpt.gate) is SourceGate
        files = ckpt.layer_files([])
        assert ckpt.gate.preflight(files, tiny_checkpoint.path, 1) is None and ckpt.gate.plan_facts(files) == {}
    finally:
        ckpt.close()


def test_the_run_tells_the_source_gate_each_step_in_order(tiny_checkpoint, tmp_path, monkeypatch):
    """The run's side of the gate (a download's ShardDownloader on a hub checkpoint): the layers' files are
    checked and scheduled before the first read, each layer is reported once it is on disk, then the end."""
    from kt_convert.convert.layer_io import LayerReader
    from kt_convert.convert.source import SourceGate, open_checkpoint

    steps = []
    out = tmp_path / "out"

    class Recording(SourceGate):
        def check_cap(self, layer_files):
            steps.append(("check_cap", layer_files))

        def preflight(self, layer_files, where, out_bytes):
            steps.append(("preflight", where, out_bytes > 0))
            return "pre-flight: the source gate's line"

        def schedule(self, layer_files, pinned):
            steps.append(("schedule", layer_files, pinned))

        def layer_committed(self, layer):
            steps.append(("layer_committed", layer, (out / f"model-{layer + 1:05d}-of-00002.safetensors").is_file()))

        def finished(self):
            steps.append(("finished",))

        def close(self):
            steps.append(("close",))

    def with_gate(spec):
        ckpt = open_checkpoint(spec)
        ckpt.gate = Recording()
        return ckpt

    real_batches = LayerReader.batches

    def batches(self, lp):
        steps.append(("read", lp.layer))
        return real_batches(self, lp)

    monkeypatch.setattr(pipeline, "open_checkpoint", with_gate)
    monkeypatch.setattr(LayerReader, "batches", batches)
    run(tiny_checkpoint.path, out, threadpool_count=2)
    layer_files = [(0, {"model-00001-of-00003.safetensors"}), (1, {"model-00002-of-00003.safetensors"})]
    assert steps[:3] == [("check_cap", layer_files), ("preflight", out, True), ("schedule", layer_files, set())]
    assert steps[-3:] == [("finished",), ("close",), ("close",)]  # the run's close, then the checkpoint's
    middle = steps[3:-3]  # a layer's commit (another thread) may come before or after the next layer's first read
    assert sorted(middle) == [("layer_committed", 0, True), ("layer_committed", 1, True), ("read", 0), ("read", 1)]
    assert middle.index(("read", 0)) < middle.index(("layer_committed", 0, True)) < middle.index(
        ("layer_committed", 1, True)) and middle.index(("read", 1)) < middle.index(("layer_committed", 1, True))


class _StandInGpu:
    """Stands in for CudaPacker: starts when `go` is set, packs with the C++ packer, records its calls."""

    instances = []

    def __init__(self, timings=None):
        self.go = _StandInGpu.go
        assert self.go.wait(30), "the CPU never packed its batches"
        self.calls, self.warmed_on = 0, []
        self.warmed = threading.Event()
        self.closed = False
        _StandInGpu.instances.append(self)

    host_memory = PageableMemory()

    def __call__(self, method, jobs):
        self.calls += 1
        return pack_cpu(method, jobs)

    def submit(self, method, jobs):
        return packers.Packed(self(method, jobs))

    def warm_up(self, method, sources):
        self.warmed_on = [(src.kind, src.shape[0], src.weight.flags.owndata) for src, _, _ in sources]
        self.warmed.set()

    def close(self):
        self.closed = True


def test_device_starts_in_the_background_while_the_cpu_packs(tiny_checkpoint, tmp_path, monkeypatch):
    """--device cuda without a GPU here: the start-up runs on its own thread; the CPU packs the first
    batches, the stand-in GPU every batch after its warm-up; the bytes equal a CPU run's."""
    run(tiny_checkpoint.path, tmp_path / "cpu", threadpool_count=2)
    _StandInGpu.go, _StandInGpu.instances = threading.Event(), []
    real_cpu_call = packers.CpuPacker.__call__
    cpu_calls = []

    def cpu_call(self, method, jobs):
        cpu_calls.append(threading.current_thread().name)
        if len(cpu_calls) == 2:  # the GPU may start now; this batch waits until its kernel is "compiled"
            _StandInGpu.go.set()
            assert _StandInGpu.instances or _wait(lambda: _StandInGpu.instances)
            assert _StandInGpu.instances[0].warmed.wait(30)
        return real_cpu_call(self, method, jobs)

    monkeypatch.setattr(packers, "CudaPacker", _StandInGpu)
    monkeypatch.setattr(packers.CpuPacker, "__call__", cpu_call)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(layer_pack, "GPU_BATCH_BYTES", 1)  # one expert per batch: 16 batches
    report = run(tiny_checkpoint.path, tmp_path / "gpu", threadpool_count=2, device="cuda")
    gpu = _StandInGpu.instances[0]
    assert report.device == "cuda"
    # the warm-up's future completes just after its event: a third batch may still go to the CPU
    assert len(cpu_calls) in (2, 3) and set(cpu_calls) == {"MainThread"}
    assert gpu.calls == 16 - len(cpu_calls) and gpu.closed
    assert gpu.warmed_on == [("mxfp4", 32, True)]  # one kind, 32 rows, copied out of the read buffer
    t = report.timings
    assert t["cpu_batches_while_device_starts"] == len(cpu_calls)
    assert 0 < t["device_init_s"] < report.seconds
    assert tree_hashes(tmp_path / "gpu") == tree_hashes(tmp_path / "cpu")


def _wait(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_device_start_up_failure_is_raised_not_hidden(tiny_checkpoint, tmp_path, monkeypatch):
    class Broken:
        def __init__(self, timings=None):
            raise RuntimeError("CUDA context could not be made")

    monkeypatch.setattr(packers, "CudaPacker", Broken)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(packers, "PACK_ON_CPU_WHILE_DEVICE_STARTS", False)
    with pytest.raises(RuntimeError, match="CUDA context"):
        run(tiny_checkpoint.path, tmp_path / "out", threadpool_count=2, device="cuda")
    assert not list((tmp_path / "out").glob("*.safetensors"))  # nothing committed


def test_next_layer_is_packed_while_the_last_batch_of_a_layer_is_written(tiny_checkpoint, tmp_path, monkeypatch):
    """One writer thread for the run: layer 1's first batch is packed while layer 0's last batch is still
    being written (the write is slowed down), and the layer is committed only after that write."""
    events = []
    real_write = writer_mod.MergedShardWriter.write_pair
    real_commit = writer_mod.MergedShardWriter.commit
    real_pack = packers.CpuPacker.__call__
    writes = {"n": 0}
    pairs_per_layer = 8 * 3 * 2  # experts x projections x NUMA shards of v4-flash-tiny

    def slow_write(self, proj, expert, numa, weight, scale):
        writes["n"] += 1
        if writes["n"] == pairs_per_layer:  # layer 0's last pair
            time.sleep(0.5)
            events.append(("last write of layer 0 done", self.layer))
        return real_write(self, proj, expert, numa, weight, scale)

    def commit(self):
        events.append(("commit", self.layer))
        return real_commit(self)

    def pack(self, method, jobs):
        events.append(("pack", len(events)))
        return real_pack(self, method, jobs)

    monkeypatch.setattr(writer_mod.MergedShardWriter, "write_pair", slow_write)
    monkeypatch.setattr(writer_mod.MergedShardWriter, "commit", commit)
    monkeypatch.setattr(packers.CpuPacker, "__call__", pack)
    monkeypatch.setattr(layer_pack, "BATCH_BYTES", 1)  # one expert per batch: 8 per layer
    run(tiny_checkpoint.path, tmp_path / "out", threadpool_count=2)
    names = [e[0] for e in events]
    done = names.index("last write of layer 0 done")
    assert names[:8] == ["pack"] * 8 and names[8] == "pack"  # layer 1's first pack did not wait for it
    assert names.index("commit") > done and events[names.index("commit")] == ("commit", 0)
    assert names.count("pack") == 16 and [e for e in events if e[0] == "commit"] == [("commit", 0), ("commit", 1)]
    assert tree_hashes(tmp_path / "out")  # and the run completed


def test_bench_convert_copy_floor_and_cache_labels(tmp_path):
    """scripts/bench_convert.py's copy floor (cp + fsync of the input files) and its cache labels:
    without --drop-caches a 'cold' measurement is labelled as not cold."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "scripts" / "bench_convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    src = tmp_path / "in"
    src.mkdir()
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    for i in range(2):
        (src / f"m-{i}.safetensors").write_bytes(data)
    files = sorted(src.glob("*.safetensors"))
    floor = bench.copy_floor(files, tmp_path / "copy", cold=True, drop=False)
    assert floor["cache"] == "not cold (page cache kept: no --drop-caches)"
    assert floor["bytes"] == 2 * len(data) and floor["seconds"] > 0
    assert not (tmp_path / "copy").exists()  # the copies are removed
    warm = bench.copy_floor(files, tmp_path / "copy", cold=False, drop=False)
    assert warm["cache"] == "warm"
    dropped = []
    monkey = bench.drop_caches
    bench.drop_caches = lambda: dropped.append(1) or True
    try:
        assert bench.copy_floor(files, tmp_path / "copy", cold=True, drop=True)["cache"] == "cold"
        assert dropped
    finally:
        bench.drop_caches = monkey


@pytest.mark.parametrize("cpu_while_starting", [False, True])
def test_device_cuda_run_through_the_stand_in_device(tiny_checkpoint, tmp_path, monkeypatch, cpu_while_starting):
    """A whole --device cuda conversion through StartingPacker and CudaPacker's host side (stand-in
    device as above): the same files as the CPU run, GPU stages in the report."""
    from helpers.fake_cuda import install_for_conversion

    run(tiny_checkpoint.path, tmp_path / "cpu", threadpool_count=2)
    install_for_conversion(monkeypatch, cpu_while_starting)
    report = run(tiny_checkpoint.path, tmp_path / "gpu", threadpool_count=2, device="cuda")
    t = report.timings
    assert t["device_init_s"] > 0 and t["gpu_pinned_mib"] == 16
    if not cpu_while_starting:
        assert "cpu_batches_while_device_starts" not in t and t["gpu_kernel_s"] > 0, t
        # batches read into the pinned block once it is there (not those read before: staged), uploaded from
        # there and unpacked into its arenas in place
        assert t.get("gpu_batches_staged", 0) <= packers.READ_AHEAD + 1 and "gpu_batches_scattered" not in t, t
    assert "gpu_pageable_buffers" not in t, t
    assert tree_hashes(tmp_path / "gpu") == tree_hashes(tmp_path / "cpu")


def test_bench_convert_table_puts_cpu_gpu_and_copy_side_by_side():
    """The one table the GPU host prints: copy floor, GPU and CPU conversions, warm and cold, ratios
    against the copy of the same cache state, and the stages of every run in columns."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "scripts" / "bench_convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def conv(seconds, cache, timings):
        return {"process_s": seconds, "input_gb_s": 10.0 / seconds, "cpu_s": 3.0, "cache": cache,
                "report": {"timings": timings}}

    res = {"machine": {"cpu": "Xeon", "cores": 16, "isa": "amx", "memory_gb": 128, "load_average": "0.1 0.1 0.1",
                       "gpu": "H200", "python": "3.12", "torch": "2.x", "triton": "3.x", "date": "2026-11-29"},
           "checkpoint": {"experts": 256, "layers": 3, "file_bytes": 10e9},
           "settings": {"quant_method": "int4", "threadpool_count": 2},
           "copy_warm": {"seconds": 8.0, "cpu_s": 2.0, "cache": "warm"},
           "copy_cold": {"seconds": 10.0, "cpu_s": 2.0, "cache": "cold"},
           "cuda_warm": conv(9.0, "warm", {"device_init_s": 3.0, "gpu_kernel_s": 0.4, "pack_s": 2.0}),
           "cpu_warm": conv(9.6, "warm", {"pack_s": 5.0}),
           "cuda_cold": conv(12.0, "cold", {"device_init_s": 3.1, "pack_s": 2.5})}
    table = bench.summary_table(res, ["cuda", "cpu"], 16)
    lines = table.splitlines()
    assert "H200" in lines[0] and "load average" in lines[0]
    gpu_warm = next(x for x in lines if x.strip().startswith("GPU conversion") and " warm " in x)
    assert "1.12" in gpu_warm and "(target <= 1.15: met)" in gpu_warm  # 9.0 / 8.0
    cpu_warm = next(x for x in lines if x.strip().startswith("CPU conversion (16 threads)"))
    assert "1.20" in cpu_warm and "not met" in cpu_warm  # 9.6 / 8.0
    gpu_cold = next(x for x in lines if x.strip().startswith("GPU conversion") and " cold " in x)
    assert "1.20" in gpu_cold  # 12.0 / 10.0: cold against the cold copy
    header = next(x for x in lines if "stage (busy seconds" in x)
    assert header.split()[-6:] == ["GPU", "warm", "CPU", "warm", "GPU", "cold"]
    init = next(x for x in lines if x.strip().startswith("device_init_s"))
    assert init.split()[1:] == ["3.00", "-", "3.10"]


def test_bench_convert_compares_forced_isa_levels():
    """bench_convert --isa: per level, the packer's rate on one core and the conversion's per core against
    AVX-512's, and the conversion against the copy floor."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "scripts" / "bench_convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_isas("avx512, avx2,avx2") == ["avx512", "avx2"]
    with pytest.raises(Exception, match="--isa"):
        bench.parse_isas("avx3")
    runs = ["cpu-avx512", "cpu-avx2", "cpu-portable"]
    assert [bench.label(r) for r in runs + ["cpu", "cuda"]] == ["CPU avx512", "CPU avx2", "CPU portable", "CPU", "GPU"]

    def conv(seconds, cpu_s=3.0):
        return {"process_s": seconds, "input_gb_s": 1.0 / seconds, "cpu_s": cpu_s, "cache": "warm",
                "g_params_s_per_core": 2.0 / seconds / 2, "report": {"timings": {"pack_s": seconds / 2}}}

    res = {"machine": {"cpu": "EPYC", "cores": 2, "isa": "avx512", "memory_gb": 24, "load_average": "1 1 1",
                       "python": "3.11", "torch": "2.x", "triton": None, "date": "2026-12-07"},
           "checkpoint": {"experts": 32, "layers": 2, "file_bytes": 1e9, "params": 2e9},
           "settings": {"quant_method": "int4", "threadpool_count": 2, "cpu_threads": 2},
           "copy_warm": {"seconds": 2.0, "cpu_s": 1.0, "cache": "warm"},
           "cpu-avx512_warm": conv(2.5), "cpu-avx2_warm": conv(2.8, 4.0), "cpu-portable_warm": conv(10.0),
           "pack_split": {"cpu-avx512": {"mxfp4_weights_per_core_s": 3.6e9},
                          "cpu-avx2": {"mxfp4_weights_per_core_s": 2.4e9},
                          "cpu-portable": {"mxfp4_weights_per_core_s": 0.12e9}}}
    levels = res["isa_levels"] = bench.isa_levels(res, runs)
    assert levels["avx2"]["avx512_over_this_pack_weights_per_core_s"] == pytest.approx(1.5)
    assert levels["portable"]["avx512_over_this_pack_weights_per_core_s"] == pytest.approx(30.0)
    assert levels["avx2"]["avx512_over_this_conversion_weights_per_core_s"] == pytest.approx(2.8 / 2.5)
    assert levels["avx2"]["conversion_weights_per_cpu_s"] == pytest.approx(0.5e9)  # 2e9 weights in 4 CPU-s
    assert levels["avx2"]["avx512_over_this_conversion_weights_per_cpu_s"] == pytest.approx(4.0 / 3.0)
    assert levels["avx2"]["conversion_over_copy_warm"] == pytest.approx(1.4)
    table = bench.summary_table(res, runs, 2).splitlines()
    avx2 = next(x for x in table if x.split()[:1] == ["avx2"])
    assert avx2.split() == ["avx2", "2400", "(1.50x)", "357", "(1.12x)", "500", "(1.33x)", "1.40"]
    assert any(x.strip().startswith("CPU portable conversion (2 threads)") and "5.00" in x for x in table)
