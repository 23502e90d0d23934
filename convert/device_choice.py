"""--device auto: the device that converts faster here, decided from what this machine can do.

A conversion reads the source, packs it, hashes the source and the output (sha256) and writes the output
durably. On the CPU path the cores do all of it; on the GPU path the GPU packs and the cores do the rest;
either way the disk must take the output. So the CPU path is the one when its cores convert at least as fast
as the disk writes (the GPU would wait for the same disk, after seconds of start-up), and the GPU path when
they cannot keep up: few cores, or --cpuinfer-threads holding the packer back.

choose_device is a pure function of Capabilities, whose inputs are explicit; measure_capabilities finds them
here: the CPUs this process may run on (its affinity), the C++ packer's rate on one core for the plan's source
format and method at the ISA level the run packs at (a probe of a few milliseconds on synthetic rows of that
format), sha256 on one core (a probe), and whether
a GPU can pack. The disk's write rate is assumed (DISK_WRITE_BYTES_S): what a device reports of itself
(/sys/block/*/queue/rotational) is not used, as virtual disks report "rotational" whatever backs them, and
writing a probe file into the user's output before the run is not worth it: a disk slower than assumed only
makes both paths wait for it alike, while one wrongly taken as slow would keep a few cores packing alone.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from kt_convert.quant.cpu import SourceMatrix

from .units import rate

# The model's constants: CPU work besides packing and hashing, the GPU's own costs, the disk (the accelerator
# host's virtual NVMe disk took 1.5 GB/s with fsync; docs/BENCHMARKS.md).
COPY_BYTES_PER_CORE_S = 4e9  # pread into the batch buffer and os.write of the output: one memcpy per byte
GPU_START_CORE_S = 2.0  # CPU seconds of the GPU's start-up (torch and triton imports, CUDA context)
GPU_START_S = 1.5  # its wall time; the CPU packs meanwhile, so no GPU run is shorter
GPU_SOURCE_BYTES_S = 10e9  # upload + kernel + download (kernel alone 33 GB/s, PCIe 55 GB/s each way)
DISK_WRITE_BYTES_S = 2e9  # durable writes of an NVMe drive
PREFER_CPU = 1.05  # the GPU is chosen only when estimated more than 5% faster (it costs memory and start-up)
PROBE_WEIGHTS = 1 << 21  # weights packed per probe repetition (about 2 ms on one AVX-512 core)


@dataclass(frozen=True)
class Capabilities:
    """What decides --device auto, for one conversion."""

    cores: int  # CPUs this process may run on
    pack_threads: int  # the C++ packer's threads (--cpuinfer-threads, else the cores)
    pack_weights_per_core_s: float  # the packer on one core, this source format and method
    sha256_bytes_per_core_s: float
    weights: int  # to convert
    input_bytes: int
    output_bytes: int
    write_bytes_s: float = DISK_WRITE_BYTES_S  # the output disk's durable write rate
    write_rate_measured: bool = False  # else assumed
    gpu_unavailable: str | None = None  # why no GPU can pack here (None: one can)


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # cpu | cuda
    reason: str  # said in the run's first lines: "packed on the cpu (...)"
    cpu_s: float | None = None  # the estimates the choice was made from
    gpu_s: float | None = None


def _core_seconds(c: Capabilities) -> tuple[float, float]:
    """(packing, the rest: hashing and copying the input and output bytes) in seconds of one core."""
    moved = c.input_bytes + c.output_bytes
    return c.weights / c.pack_weights_per_core_s, moved / c.sha256_bytes_per_core_s + moved / COPY_BYTES_PER_CORE_S


def estimate_seconds(c: Capabilities) -> tuple[float, float]:
    """(CPU path, GPU path) seconds: each path's CPU work over the cores, the packer over its threads, the
    disk, the GPU's start-up and throughput; whichever bounds the path."""
    pack, common = _core_seconds(c)
    disk = c.output_bytes / c.write_bytes_s
    cpu = max(disk, pack / max(1, min(c.pack_threads, c.cores)), (pack + common) / c.cores)
    gpu = max(disk, (common + GPU_START_CORE_S) / c.cores, GPU_START_S, c.input_bytes / GPU_SOURCE_BYTES_S)
    return cpu, gpu


def choose_device(c: Capabilities) -> DeviceChoice:
    if c.gpu_unavailable is not None:
        return DeviceChoice("cpu", f"no GPU to pack on: {c.gpu_unavailable}")
    cpu_s, gpu_s = estimate_seconds(c)
    pack, common = _core_seconds(c)
    threads = max(1, min(c.pack_threads, c.cores))
    by_threads = pack / threads > (pack + common) / c.cores  # the packer's threads are the limit, not the cores
    who = f"{threads} packing threads (--cpuinfer-threads {threads})" if by_threads else f"{c.cores} cores"
    cpu_rate = rate(c.output_bytes, max(pack / threads, (pack + common) / c.cores))
    disk = f"about {rate(c.write_bytes_s, 1)}" + ("" if c.write_rate_measured else ", assumed")
    if cpu_s > gpu_s * PREFER_CPU:
        return DeviceChoice("cuda", f"{who} pack {cpu_rate}, slower than this disk writes ({disk})", cpu_s, gpu_s)
    if cpu_s <= GPU_START_S:
        reason = f"{who}: done before a GPU would have started"
    elif cpu_s <= c.output_bytes / c.write_bytes_s:
        reason = f"{who} pack faster than this disk writes ({cpu_rate} against {disk})"
    else:
        reason = f"{who} pack {cpu_rate}; the GPU would not be faster (about {gpu_s:.0f} s against {cpu_s:.0f} s)"
    return DeviceChoice("cpu", reason, cpu_s, gpu_s)


# -- finding the capabilities ---------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bf16(n, k, rng):
    return (rng.standard_normal((n, k), dtype=np.float32) * 0.02).view(np.uint32) >> 16


def _e4m3(n, k, rng):
    """F8_E4M3 codes of ordinary values: any sign and exponent, no NaN code (0x7F, 0xFF)."""
    return rng.integers(0, 0x7F, (n, k), dtype=np.uint8) | (rng.integers(0, 2, (n, k), dtype=np.uint8) << 7)


# Rows of each source format (quant.source_formats.SOURCE_FORMATS, every one) with ordinary values, what the
# packer's speed depends on: (n, k, block, rng) -> SourceMatrix. A format's decoder is part of its cost (NVFP4's
# two-level scales, FP8's block grid), so each is probed on its own rows.
PROBES = {
    "mxfp4": lambda n, k, block, rng: SourceMatrix("mxfp4", rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                                                   np.full((n, k // 32), 122, np.uint8)),
    "bf16": lambda n, k, block, rng: SourceMatrix("bf16", _bf16(n, k, rng).astype(np.uint16)),
    "f32": lambda n, k, block, rng: SourceMatrix("f32", (_bf16(n, k, rng) << 16).view(np.float32)),
    "f16": lambda n, k, block, rng: SourceMatrix(
        "f16", (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16).view(np.uint16)),
    "fp8_block": lambda n, k, block, rng: SourceMatrix(
        "fp8_block", _e4m3(n, k, rng), np.full((-(-n // block[0]), -(-k // block[1])), 1e-3, np.float32), block),
    "int4_group": lambda n, k, block, rng: SourceMatrix(
        "int4_group", rng.integers(0, 2**31, (n, k // 8), dtype=np.int64).astype(np.int32),
        np.full((n, k // block[1]), 0x3A83, np.uint16), block),
    # E2M1 codes, E4M3 group scales of 2^-4 .. 2^3 (no NaN code), a per-tensor scale as ModelOpt writes it
    "nvfp4": lambda n, k, block, rng: SourceMatrix(
        "nvfp4", rng.integers(0, 256, (n, k // 2), dtype=np.uint8), rng.integers(0x20, 0x58, (n, k // 16), dtype=np.uint8),
        global_scale=float(np.float32(1 / (6 * 448)))),
    "mxfp8": lambda n, k, block, rng: SourceMatrix("mxfp8", _e4m3(n, k, rng), np.full((n, k // 32), 122, np.uint8)),
}


def probe_source(kind: str, block: tuple[int, int] | None, n: int, k: int, rng: np.random.Generator) -> SourceMatrix:
    return PROBES[kind](n, k, block, rng)


def pack_rate_probe(plan, repeats: int = 3) -> float:
    """Weights per second the C++ packer packs on one thread, for the plan's first projection's source format and
    the plan's method (best of `repeats`, on rows of the projection's width), at the ISA level the run packs at
    (KT_PACK_ISA, else the best this CPU has)."""
    from kt_convert.kt_runtime.format.spec import full_shape
    from kt_convert.quant.cpu import PackTarget, pack_cpu

    from .packers import pack_isa

    ref = plan.layers[0].experts[0]["gate"]
    n_all, k = full_shape("gate", plan.hidden_size, plan.moe_intermediate_size)
    n = max(32, min(n_all, PROBE_WEIGHTS // k) // 32 * 32)
    src = probe_source(ref.kind, ref.block, n, k, np.random.default_rng(0))
    job = (src, 0, k, PackTarget.empty(plan.method, n, k))
    isa = pack_isa()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pack_cpu(plan.method, [job], isa=isa, num_threads=1)
        best = min(best, time.perf_counter() - t0)
    return n * k / best


def sha256_probe(nbytes: int = 8 << 20, repeats: int = 2) -> float:
    data = np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_capabilities(plan, todo, cpuinfer_threads: int, gpu_unavailable: str | None) -> Capabilities:
    """plan: the first output's ConversionPlan; todo: its LayerPlans to convert. The probes run only when a GPU
    could pack (otherwise there is nothing to choose)."""
    cores = usable_cores()
    threads = min(cpuinfer_threads, cores) if cpuinfer_threads > 0 else cores
    weights = 3 * plan.hidden_size * plan.moe_intermediate_size * plan.num_experts * len(todo)
    measured = gpu_unavailable is None and todo
    return Capabilities(cores, threads, pack_rate_probe(plan) if measured else 1.0,
                        sha256_probe() if measured else 1.0, weights, sum(lp.input_bytes for lp in todo),
                        sum(lp.output_bytes for lp in todo), gpu_unavailable=gpu_unavailable)
