"""--device auto: the decision from what the machine can do (convert.device_choice), with the machine's
capabilities given (no GPU needed), the probes behind them, and the choice said in the run's first lines."""
import os
import sys
import types

import numpy as np
import pytest

from helpers.outputs import tree_hashes
from kt_convert.convert import device_choice, packers, pipeline
from kt_convert.convert.device_choice import (COPY_BYTES_PER_CORE_S, GPU_START_CORE_S, Capabilities, choose_device,
                                              estimate_seconds)
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.quant.source_formats import SOURCE_FORMATS

def host(cores=16, threads=None, write=None, gpu=None, scale=1.0) -> Capabilities:
    """The accelerator host's conversion (docs/BENCHMARKS.md): 256 experts x 3 layers of V4-Flash MXFP4 to
    int4, 10.27 GB in, 9.70 GB out, the C++ packer about 1.2 G weights/s per core, sha256 1.3 GB/s."""
    return Capabilities(cores=cores, pack_threads=threads or cores, pack_weights_per_core_s=1.2e9,
                        sha256_bytes_per_core_s=1.3e9, weights=int(19.33e9 * scale), input_bytes=int(10.27e9 * scale),
                        output_bytes=int(9.70e9 * scale), gpu_unavailable=gpu,
                        **({"write_bytes_s": write, "write_rate_measured": True} if write else {}))


def test_sixteen_cores_keep_up_with_the_disk_two_do_not():
    choice = choose_device(host(16))
    assert choice.device == "cpu"
    assert choice.reason.startswith("16 cores pack faster than this disk writes (")
    assert "against about 2 GB/s, assumed)" in choice.reason
    two = choose_device(host(2))
    assert two.device == "cuda" and two.reason.startswith("2 cores pack ") and "slower than this disk" in two.reason
    four = choose_device(host(4))
    assert four.device == "cuda" and four.gpu_s < four.cpu_s


def test_estimates_worked_by_hand():
    # 2 cores: packing 19.33 G weights at 1.2 G/s per core = 16.1 core-s; hashing and copying 19.97 GB at
    # 1.3 and 4 GB/s = 15.36 + 4.99 core-s; the disk 9.7 GB at 2 GB/s = 4.85 s
    cpu, gpu = estimate_seconds(host(2))
    pack, common = 19.33e9 / 1.2e9, 19.97e9 / 1.3e9 + 19.97e9 / COPY_BYTES_PER_CORE_S
    assert cpu == pytest.approx((pack + common) / 2) and cpu == pytest.approx(18.23, abs=0.01)
    assert gpu == pytest.approx((common + GPU_START_CORE_S) / 2) and gpu == pytest.approx(11.18, abs=0.01)
    cpu16, gpu16 = estimate_seconds(host(16))
    assert cpu16 == gpu16 == pytest.approx(9.70 / 2.0)  # both wait for the disk


def test_cpuinfer_threads_limit_the_packer_not_the_cores():
    choice = choose_device(host(16, threads=2))
    assert choice.device == "cuda" and choice.reason.startswith("2 packing threads (--cpuinfer-threads 2) pack ")
    assert choose_device(host(16, threads=12)).device == "cpu"


def test_a_slow_disk_makes_any_cpu_fast_enough():
    choice = choose_device(host(4, write=0.15e9))
    assert choice.device == "cpu" and "about 150 MB/s)" in choice.reason and "assumed" not in choice.reason


def test_a_short_conversion_stays_on_the_cpu():
    choice = choose_device(host(2, scale=0.01))  # 100 MB: done before CUDA would be up
    assert choice.device == "cpu" and "before a GPU would have started" in choice.reason


def test_no_gpu_no_choice():
    choice = choose_device(host(1, gpu="there is no CUDA device here"))
    assert choice == device_choice.DeviceChoice("cpu", "no GPU to pack on: there is no CUDA device here")


def test_close_calls_go_to_the_cpu():
    """The GPU is chosen only when estimated more than PREFER_CPU faster: it costs memory and start-up."""
    for cores in range(1, 33):
        c = choose_device(host(cores))
        cpu, gpu = estimate_seconds(host(cores))
        assert (c.device == "cuda") == (cpu > gpu * device_choice.PREFER_CPU), cores


def test_the_probes_are_the_source_formats():
    assert sorted(device_choice.PROBES) == sorted(SOURCE_FORMATS)


@pytest.mark.parametrize("kind", sorted(SOURCE_FORMATS))
def test_every_source_format_has_a_packer_probe(kind):
    """Each format is probed on rows of its own, of ordinary values (no NaN, no Inf), as a checkpoint holds."""
    from kt_convert.kt_runtime.format.methods import INT4
    from kt_convert.quant.cpu import PackTarget, pack_cpu
    from kt_convert.quant.decoders import decode_source

    block = {"fp8_block": (128, 128), "int4_group": (1, 32)}.get(kind)
    src = device_choice.probe_source(kind, block, 64, 512, np.random.default_rng(0))
    assert src.kind == kind and src.shape == (64, 512)
    values = decode_source(src).float()
    assert bool(values.isfinite().all()) and 0 < float(values.abs().max()) < 1e4
    assert float((values == 0).float().mean()) < 0.5  # mostly non-zero: the packer's ordinary work
    counts = pack_cpu(INT4, [(src, 0, 512, PackTarget.empty(INT4, 64, 512))])
    assert counts == [0]


def test_probes_measure_this_machine(tiny_checkpoint):
    from kt_convert.convert.options import OutputSpec, RunOptions
    from kt_convert.convert.output_job import plan_output
    from kt_convert.convert.source import open_checkpoint

    ckpt = open_checkpoint(str(tiny_checkpoint.path))
    try:
        plan, _ = plan_output(ckpt, RunOptions(input_path=str(tiny_checkpoint.path)), OutputSpec(output=None))
    finally:
        ckpt.close()
    rate = device_choice.pack_rate_probe(plan)
    assert 1e6 < rate < 1e11  # weights per second on one core: from a portable build on a slow core to AMX
    assert 1e7 < device_choice.sha256_probe(1 << 20) < 1e11
    caps = device_choice.measure_capabilities(plan, plan.layers, 1, None)
    assert caps.pack_threads == 1 and caps.cores == device_choice.usable_cores() >= 1
    assert caps.weights == 3 * plan.hidden_size * plan.moe_intermediate_size * plan.num_experts * len(plan.layers)
    assert caps.input_bytes == sum(lp.input_bytes for lp in plan.layers)


@pytest.mark.parametrize("forced", ["portable", "avx2", None])
def test_the_pack_probe_runs_at_the_forced_isa_level(tiny_checkpoint, monkeypatch, forced):
    """KT_PACK_ISA forces the level a run packs at, so the probe measures that level, not the CPU's best."""
    from kt_convert import kt_kernels

    import kt_convert.quant.cpu
    from kt_convert import quant
    from helpers.numerics import available_isas
    from kt_convert.convert.options import OutputSpec, RunOptions
    from kt_convert.convert.output_job import plan_output
    from kt_convert.convert.source import open_checkpoint

    if forced is not None and forced not in available_isas():
        pytest.skip(f"this CPU has no {forced}")
    if forced is None:
        monkeypatch.delenv("KT_PACK_ISA", raising=False)
    else:
        monkeypatch.setenv("KT_PACK_ISA", forced.upper())
    ckpt = open_checkpoint(str(tiny_checkpoint.path))
    try:
        plan, _ = plan_output(ckpt, RunOptions(input_path=str(tiny_checkpoint.path)), OutputSpec(output=None))
    finally:
        ckpt.close()
    levels, real = [], quant.cpu.pack_cpu
    monkeypatch.setattr(quant.cpu, "pack_cpu", lambda *a, **kw: levels.append(kw["isa"]) or real(*a, **kw))
    assert device_choice.pack_rate_probe(plan, repeats=2) > 0
    assert levels == [forced or kt_kernels.resolve_isa("auto")] * 2


def run(ckpt, out, **kw):
    return convert(ConvertOptions(input_path=str(ckpt), output=out, progress=False, **kw))


def test_auto_without_a_gpu_says_why_in_the_first_lines(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from kt_convert.quant import gpu

    monkeypatch.setattr(gpu, "gpu_unavailable_reason", lambda: "no CUDA GPU is available")
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cpu")
    report = run(tiny_checkpoint.path, tmp_path / "out", threadpool_count=2)
    assert report.device == "cpu" and report.device_reason == "no GPU to pack on: no CUDA GPU is available"
    assert "packed on the cpu (no GPU to pack on: no CUDA GPU is available) -> " in capsys.readouterr().err


@pytest.mark.parametrize("cores,device", [(16, "cpu"), (2, "cuda")])
def test_auto_with_a_gpu_packs_where_the_capabilities_say(tiny_checkpoint, tmp_path, capsys, monkeypatch, cores,
                                                          device):
    """A machine with a GPU (the stand-in device of tests/helpers/fake_cuda.py): --device auto measures, chooses, says
    why, and converts there; the bytes are the CPU run's either way."""
    from helpers.fake_cuda import fake_launch, fake_torch
    from kt_convert.quant import gpu

    run(tiny_checkpoint.path, tmp_path / "cpu", threadpool_count=2, device="cpu")
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    monkeypatch.setitem(sys.modules, "kt_convert.quant.triton_kernels",
                        types.ModuleType("kt_convert.quant.triton_kernels"))
    monkeypatch.setattr(gpu, "launch", fake_launch)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(packers, "PINNED_BYTES", 16 << 20)
    seen = []

    def measured(plan, todo, threads, why):
        seen.append((len(todo), threads, why))
        scale = sum(lp.input_bytes for lp in todo) / 10.27e9 * 2000  # as big as the host's conversion
        return host(cores, scale=scale)

    monkeypatch.setattr(pipeline, "measure_capabilities", measured)
    report = run(tiny_checkpoint.path, tmp_path / "auto", threadpool_count=2)
    err = capsys.readouterr().err
    assert seen == [(2, 0, None)] and report.device == device
    assert f"packed on the {device} ({report.device_reason}) -> " in err
    assert report.device_reason.startswith(f"{cores} cores pack ")
    assert ("device_init_s" in report.timings) == (device == "cuda") and report.timings["device_choice_s"] >= 0
    assert tree_hashes(tmp_path / "auto") == tree_hashes(tmp_path / "cpu")


def test_auto_keeps_cpu_only_methods_on_the_cpu(monkeypatch):
    from kt_convert.convert.errors import UserError
    from kt_convert.kt_runtime.format.methods import INT4, method_for

    rawint4 = method_for("rawint4", None)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")  # a GPU is there
    choice = pipeline._explicit_device("auto", [INT4, rawint4])
    assert choice == device_choice.DeviceChoice("cpu", "--quant-method rawint4 is packed on the CPU only")
    with pytest.raises(UserError, match="--device cuda: --quant-method rawint4 is packed on the CPU only"):
        pipeline._explicit_device("cuda", [rawint4])
    assert pipeline._explicit_device("auto", [INT4]) is None  # measured once planned
    assert pipeline._explicit_device("cuda", [INT4]) == device_choice.DeviceChoice("cuda", "")


# -- scripts/bench_convert.py: the paths on a few cores, and --device auto's choice against them ------------------

def _bench():
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "scripts" / "bench_convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_limited_cores_table_and_targets():
    bench = _bench()

    def conv(seconds, pinned=0):
        return {"process_s": seconds, "peak_rss_bytes": 3 << 30, "report": {"timings": {"gpu_pinned_mib": pinned}}}

    res = {"copy_warm": {"seconds": 7.0}, "copy_cold": {"seconds": 11.0},
           "cuda_warm": conv(6.0, 512), "cpu_warm": conv(5.9), "cuda_cold": conv(11.0, 512), "cpu_cold": conv(12.0),
           "limited": {"all": {"auto": {"device": "cpu", "reason": "16 cores pack faster than this disk writes"}},
                       "2": {"cuda_warm": conv(8.0, 512), "cpu_warm": conv(20.0), "cuda_cold": conv(12.0, 512),
                             "cpu_cold": conv(22.0),
                             "auto": {"device": "cuda", "reason": "2 cores pack 532 MB/s, slower than ..."}},
                       "4": {"cuda_warm": conv(6.5, 512), "cpu_warm": conv(10.0),
                             "auto": {"device": "cpu", "reason": "4 cores pack faster ..."}}}}
    lines = bench.limited_table(res).splitlines()
    assert "targets:" in lines
    row = next(x for x in lines if x.split()[:2] == ["2", "GPU"])
    assert row.split()[2:] == ["8.00", "1.14", "12.00", "1.09", "3.00", "512"]  # / the copy of the same cache state
    assert any(x.split()[:2] == ["4", "CPU"] and x.split()[4:6] == ["-", "-"] for x in lines)  # no cold run there
    targets = {name: {"value": value, "met": met} for name, value, _, met in bench.limited_checks(res)}
    assert targets["GPU / CPU on every core, warm"]["value"] == pytest.approx(6.0 / 5.9)
    assert targets["GPU / CPU on every core, warm"]["met"]
    assert targets["GPU / CPU on every core, cold"]["value"] == pytest.approx(11 / 12)
    two_warm = targets["CPU on 2 cores / GPU on 2 cores, warm"]
    assert two_warm["value"] == 2.5 and two_warm["met"]
    assert targets["CPU on 2 cores / GPU on 2 cores, cold"]["value"] == pytest.approx(22 / 12)
    assert not targets["CPU on 2 cores / GPU on 2 cores, cold"]["met"]
    assert targets["--device auto on all cores picks the faster (or a 5% tie)"]["met"]  # 5.9 vs 6.0: a tie
    assert targets["--device auto on 2 cores picks the faster (or a 5% tie)"]["met"]
    assert not targets["--device auto on 4 cores picks the faster (or a 5% tie)"]["met"]  # 10 s against 6.5
    assert any("CPU on 2 cores / GPU on every core, warm: 3.33" in x for x in lines)


def test_bench_runs_children_on_fewer_cpus_and_gives_them_back():
    bench = _bench()
    allowed = os.sched_getaffinity(0)
    with bench.on_cpus(1) as cpus:
        assert os.sched_getaffinity(0) == set(cpus) and len(cpus) == 1
    assert os.sched_getaffinity(0) == allowed
    with bench.on_cpus(None):
        assert os.sched_getaffinity(0) == allowed
    with pytest.raises(SystemExit, match="may run on"):
        with bench.on_cpus(len(allowed) + 1):
            pass
    assert bench.parse_cores("4, 2") == [2, 4]
    with pytest.raises(Exception, match="--cores"):
        bench.parse_cores("0")


def test_a_cpu_close_to_the_gpu_says_so():
    """Neither path waits for the disk and the GPU would save less than PREFER_CPU: the CPU, said as such."""
    c = host(6, write=50e9)
    fast_pack = Capabilities(**{**c.__dict__, "pack_weights_per_core_s": 8e9})  # packing ~ the GPU's start-up
    cpu, gpu = estimate_seconds(fast_pack)
    assert gpu < cpu <= gpu * device_choice.PREFER_CPU
    choice = choose_device(fast_pack)
    assert choice.device == "cpu" and "the GPU would not be faster (about" in choice.reason
