"""The GPU path's host side, without a GPU: the pinned block's leases (convert.host_memory), the device
layout with in-place windows (quant.gpu.plan_batch), the three-stream schedule (convert.gpu_schedule,
checked by simulation), and convert.packers.CudaPacker run on a stand-in device whose streams run lazily
and in an adversarial order (tests/helpers/fake_cuda.py), against the C++ packer's bytes."""
import gc
import random
import sys
import types

import numpy as np
import pytest

from kt_convert.convert import packers
from kt_convert.convert.gpu_schedule import STREAMS, batch_steps
from kt_convert.convert.host_memory import HostBlock, PageableMemory, RangeAllocator, plan_ring, target_layout
from helpers.fake_cuda import fake_launch, fake_torch, install_for_conversion
from helpers.fake_cuda import install as install_fake_cuda
from kt_convert.kt_runtime.format.spec import full_shape, shard_slice
from kt_convert.kt_runtime.format.methods import INT4, INT8
from kt_convert.quant import gpu as quant_gpu
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.gpu import META, plan_batch
from kt_convert.quant.source_formats import SOURCE_FORMATS


# -- the pinned block ------------------------------------------------------------------------------------------

def test_range_allocator_first_fit_alignment_and_merging():
    r = RangeAllocator(10 * 4096)
    a, b, c = r.take(1), r.take(4097), r.take(4096)
    assert (a, b, c) == (0, 4096, 3 * 4096)  # one page, two pages (rounded up), one page
    assert r.take(6 * 4096 + 1) is None and r.free_bytes() == 6 * 4096
    r.give(b, 4097)
    assert r.take(3 * 4096) == 4 * 4096  # the two freed pages are too few: first fit goes past them
    r.give(a, 1)
    assert r.take(3 * 4096) == 0  # pages 0-2 merged
    with pytest.raises(RuntimeError, match="twice"):
        r.give(c, 4096) or r.give(c, 4096)


def test_host_block_leases_come_back_when_no_view_is_left():
    block = HostBlock(np.zeros(64 * 4096, np.uint8))
    lease = block.lease(10 * 4096)
    assert block.offset_of(lease) == 0 and block.free_bytes() == 54 * 4096
    scales = lease[4096:8192].view(np.float32)[10:20]  # a view of a view: still keeps the lease
    piece = memoryview(lease[:100]).cast("B")  # what the layer digest holds
    del lease
    gc.collect()
    assert block.free_bytes() == 54 * 4096
    del scales
    assert block.free_bytes() == 54 * 4096
    del piece
    assert block.free_bytes() == 64 * 4096
    assert block.lease(65 * 4096) is None and block.refused == 1
    plain = np.zeros(100, np.uint8)
    assert block.offset_of(plain) is None and block.suits(plain) is False
    assert block.empty(65 * 4096).nbytes == 65 * 4096  # no room: a plain buffer instead
    inside = block.empty(4096)
    assert block.suits(inside) and block.offset_of(inside[10:20]) == 10
    strided = block.array[: 8 * 4096].reshape(8, 4096)[::2, :64]
    assert block.offset_of(strided) == 0  # rows 0, 2, 4, 6: all inside


def test_targets_tile_one_arena_in_job_order():
    block = HostBlock(np.zeros(1 << 22, np.uint8))
    shapes = [(64, 256), (32, 128), (96, 384)]
    targets = block.targets(INT4, shapes)
    layout = target_layout(INT4, shapes)
    starts = [block.offset_of(t.weight) for t in targets]
    assert starts[0] == 0 and starts == sorted(starts)
    for t, (n, k), (w, wn, s, sn) in zip(targets, shapes, layout.offsets):
        assert t.weight.nbytes == INT4.weight_bytes(n, k) == wn and t.scales.size == n == sn
        assert block.offset_of(t.scales) - block.offset_of(t.weight) == s - w and s % 64 == 0
        assert t.weight.flags.c_contiguous and t.scales.dtype == np.float32 and t.weight.flags.writeable
    assert layout.nbytes == 64 * 128 + 256 + 32 * 64 + 128 + 96 * 192 + 384
    rawint4 = next(m for m in __import__("kt_convert.kt_runtime.format.methods", fromlist=["METHODS"]).METHODS.values()
                   if m.scale_dtype != "F32")
    assert block.offset_of(block.targets(rawint4, [(32, rawint4.k_align)])[0].weight) is None  # not for the GPU
    full = HostBlock(np.zeros(4096, np.uint8))
    assert full.offset_of(full.targets(INT4, shapes)[0].weight) is None  # no room: plain arrays
    assert PageableMemory().suits(np.zeros(1)) and PageableMemory().targets(INT8, [(32, 64)])[0].scales.size == 32


def test_plan_ring_states_the_budget_split():
    ring = plan_ring(512 << 20, source_batch_bytes=30 << 20, packed_batch_bytes=28 << 20, read_buffers=3)
    assert ring.read_buffer_bytes == (30 << 20) + (30 << 20) // 8
    assert ring.arenas == (512 - 3 * 33.75) * (1 << 20) // (28 << 20) == 14
    assert "3 read buffers of 33.8 MiB, room for 14 output batches of 28.0 MiB" in ring.describe()
    assert plan_ring(64 << 20, 30 << 20, 28 << 20, 3).arenas == 0


# -- the device layout --------------------------------------------------------------------------------------------

def _mxfp4(rng, n, k):
    return SourceMatrix("mxfp4", rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                        rng.integers(118, 133, (n, k // 32), dtype=np.uint8))


def _in_block(block: HostBlock, a: np.ndarray) -> np.ndarray:
    lease = block.lease(a.nbytes)
    out = lease.view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_plan_reads_sources_in_place_with_their_row_strides_and_stages_the_rest():
    rng = np.random.default_rng(1)
    block = HostBlock(np.zeros(1 << 22, np.uint8))
    src = _mxfp4(rng, 128, 512)
    pinned = SourceMatrix("mxfp4", _in_block(block, src.weight), _in_block(block, src.scales))
    strided = pinned.weight[::2]  # every other row: a stride of two rows, as a fused tensor's projection
    other = _mxfp4(rng, 64, 256)  # a copy made outside the block (a transposed source)
    jobs = [(pinned.rows(32, 64), 0, 512, PackTarget.empty(INT4, 64, 512)),
            (SourceMatrix("mxfp4", strided, pinned.scales[::2]), 128, 256, PackTarget.empty(INT4, 64, 256)),
            (other, 0, 256, PackTarget.empty(INT4, 64, 256))]
    plan = plan_batch(INT4, jobs, block)
    first, nbytes = plan.window
    assert first == 0 and nbytes == block.offset_of(pinned.scales) + 126 * 16 + 16  # to the last strided row
    table = plan.tables[: 3 * META].reshape(3, META)
    assert table[0, 0] == 32 * 256 and table[0, 1] == 256  # row 32 of the window, dense rows
    assert table[1, 0] == 0 and table[1, 1] == 512  # stride of two rows, read in place
    assert table[2, 0] >= plan.stage_offset >= nbytes  # staged after the window
    assert [rows.shape for rows, _ in plan.copies[:-1]] == [(64, 128), (64, 8)]  # `other` only, then tables
    assert plan.input_bytes == src.weight.nbytes + src.scales.nbytes + other.weight.nbytes + other.scales.nbytes
    assert plan.out_window is None  # plain targets: dense outputs, scattered
    assert plan_batch(INT4, jobs).window is None  # without the block everything is staged


def test_plan_writes_targets_in_place_only_when_they_tile_one_arena():
    rng = np.random.default_rng(2)
    block = HostBlock(np.zeros(1 << 22, np.uint8))
    srcs = [_mxfp4(rng, 64, 256) for _ in range(3)]
    targets = block.targets(INT4, [(64, 256)] * 3)
    plan = plan_batch(INT4, [(s, 0, 256, t) for s, t in zip(srcs, targets)], block)
    first, nbytes = plan.out_window
    assert first == block.offset_of(targets[0].weight) and nbytes == target_layout(INT4, [(64, 256)] * 3).nbytes
    assert [o[0] for o in plan.outputs] == [block.offset_of(t.weight) - first for t in targets]
    assert plan.counts_offset >= nbytes
    far = block.targets(INT4, [(64, 256)])  # another batch's arena: downloading the span would overwrite it
    mixed = [(srcs[0], 0, 256, targets[0]), (srcs[1], 0, 256, far[0])]
    assert plan_batch(INT4, mixed, block).out_window is None


def test_in_place_plans_give_the_cpu_packers_bytes_through_the_kernel_contract():
    """quant.gpu.pack_gpu with a host block (windows in and out, as the streaming packer does) on the stand-in
    device, against pack_cpu: what the Triton kernel is checked against under TRITON_INTERPRET in test_gpu."""
    rng = np.random.default_rng(3)
    block = HostBlock(np.zeros(1 << 23, np.uint8))
    H, I, T = 256, 512, 2
    jobs_cpu, shapes, sources = [], [], []
    for e in range(2):
        for proj in ("gate", "up", "down"):
            n, k = full_shape(proj, H, I)
            s = _mxfp4(rng, n, k)
            s = SourceMatrix("mxfp4", _in_block(block, s.weight), _in_block(block, s.scales))
            for t in range(T):
                sl = shard_slice(proj, H, I, T, t)
                sources.append((s.rows(sl.row0, sl.n), sl.col0, sl.k))
                shapes.append((sl.n, sl.k))
                jobs_cpu.append((s.rows(sl.row0, sl.n), sl.col0, sl.k, PackTarget.empty(INT4, sl.n, sl.k)))
    targets = block.targets(INT4, shapes)
    jobs = [(s, c, k, t) for (s, c, k), t in zip(sources, targets)]
    fake = fake_torch()
    launched = []

    def launch(method, plan, dev_in, dev_out):
        launched.append(plan)
        fake_launch(method, plan, types.SimpleNamespace(array=dev_in.numpy(), cuda=fake.cuda),
                    types.SimpleNamespace(array=dev_out.numpy(), cuda=fake.cuda))
        fake.cuda.synchronize()

    import torch

    real = quant_gpu.launch
    quant_gpu.launch = launch
    try:
        counts = quant_gpu.pack_gpu(INT4, jobs, device="cpu", host=block)
    finally:
        quant_gpu.launch = real
    assert torch is not None and launched[0].window is not None and launched[0].out_window is not None
    assert counts == pack_cpu(INT4, jobs_cpu)
    for a, b in zip(jobs, jobs_cpu):
        assert np.array_equal(a[3].weight, b[3].weight) and np.array_equal(a[3].scales, b[3].scales)


# -- the schedule ---------------------------------------------------------------------------------------------

def _simulate(batches: int, slots: int, seed: int) -> dict:
    """Runs batch_steps on three streams with random step times (each stream in order, a step starting when
    its stream is free and its waits are recorded); returns (start, end) per (action, batch)."""
    rng = random.Random(seed)
    queues = {s: [] for s in STREAMS}
    for b in range(batches):
        for step in batch_steps(b, slots):
            queues[step.stream].append((b, step))
    recorded, times, free = {}, {}, {s: 0.0 for s in STREAMS}
    while any(queues.values()):
        progressed = False
        for s in STREAMS:
            if not queues[s]:
                continue
            b, step = queues[s][0]
            if any(w not in recorded for w in step.waits):
                continue
            start = max([free[s]] + [recorded[w] for w in step.waits])
            end = start + rng.uniform(0.5, 2.0)
            times[(step.action, b)] = (start, end)
            recorded[(step.records, b)] = free[s] = end
            queues[s].pop(0)
            progressed = True
        assert progressed, "the schedule deadlocks"
    return times


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_schedule_never_overwrites_a_slot_before_it_is_read_and_overlaps_batches(slots):
    """Each slot's device input is written by an upload and read by the kernel, its output written by the
    kernel and read by the download: every write of a slot's buffer comes after the previous batch's read of
    it, every read after the same batch's write; and an upload runs while an earlier batch's kernel does."""
    uses = {("upload", "in", "w"), ("kernel", "in", "r"), ("kernel", "out", "w"), ("download", "out", "r")}
    overlapped = False
    for seed in range(20):
        t = _simulate(24, slots, seed)
        for b in range(24):
            for action, buf, mode in uses:
                start, _ = t[(action, b)]
                for action2, buf2, mode2 in uses:
                    if buf2 != buf:
                        continue
                    if mode == "r" and mode2 == "w":  # read after this batch's write
                        assert t[(action2, b)][1] <= start, (action, action2, b)
                    if mode == "w" and mode2 == "r" and b >= slots:  # write after the slot's last read
                        assert t[(action2, b - slots)][1] <= start, (action, action2, b)
        overlapped |= any(t[("upload", b + 1)][0] < t[("kernel", b)][1] and
                          t[("kernel", b)][0] < t[("upload", b + 1)][1] for b in range(23))
    assert overlapped
    with pytest.raises(ValueError):
        batch_steps(0, 1)


# -- the streaming packer on the stand-in device ---------------------------------------------------------------

@pytest.fixture
def cuda_packer(monkeypatch):
    fake = install_fake_cuda(monkeypatch)
    made = []

    def make(**kw):
        made.append(packers.CudaPacker(device="cuda", **kw))
        return made[-1], fake

    yield make
    for p in made:
        p.close()


def _batch(rng, H, I, T, experts, memory=None):
    """A batch as convert_layer builds it (gate/up split by rows, down by columns), sources in `memory`'s
    buffer when given (as the source stream reads them), and the same jobs for pack_cpu."""
    sources = []
    for e in range(experts):
        for proj in ("gate", "up", "down"):
            n, k = full_shape(proj, H, I)
            if e % 2:
                s = _mxfp4(rng, n, k)
            else:
                s = SourceMatrix("bf16", (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16)
                                 .astype(np.uint16))
            if memory is not None:
                s = SourceMatrix(s.kind, _in_block(memory, s.weight),
                                 None if s.scales is None else _in_block(memory, s.scales))
            for t in range(T):
                sl = shard_slice(proj, H, I, T, t)
                sources.append((s.rows(sl.row0, sl.n), sl.col0, sl.k))
    return sources


@pytest.mark.parametrize("slots", [2, 3])
def test_streaming_packer_overlaps_batches_and_gives_the_cpu_bytes(cuda_packer, slots):
    """Batches in the pinned block (read and unpacked in place) and batches outside it (staged, scattered),
    several submitted before the first result is taken: the C++ packer's bytes and counts, the device's work
    run lazily with uploads as far ahead as the waits allow."""
    packer, fake = cuda_packer(slots=slots, pinned_bytes=32 << 20)
    rng = np.random.default_rng(5)
    H, I, T = 256, 512, 2
    handles = []
    for i, experts in enumerate((3, 1, 2, 3, 2, 1, 3, 2)):
        in_block = i % 3 != 2
        sources = _batch(rng, H, I, T, experts, packer.host_memory if in_block else None)
        shapes = [(s.shape[0], k) for s, _, k in sources]
        targets = packer.host_memory.targets(INT4, shapes) if in_block else PageableMemory().targets(INT4, shapes)
        jobs = [(s, c, k, t) for (s, c, k), t in zip(sources, targets)]
        expected = [(s, c, k, PackTarget.empty(INT4, n, k)) for (s, c, k), (n, _) in zip(sources, shapes)]
        handles.append((packer.submit(INT4, jobs), jobs, pack_cpu(INT4, expected), expected))
        if len(handles) == slots + 2:  # more batches in flight than slots before results are taken
            check(handles.pop(0))
    for h in handles:
        check(h)
    t = packer.timings.to_dict()
    assert t["gpu_batches_staged"] == t["gpu_batches_scattered"] == 2  # batches 2 and 5
    assert packer.host_memory.refused == 0
    uploads = [i for i, (stream, what) in enumerate(fake.cuda.ran) if stream == "h2d"]
    kernels = [i for i, (stream, what) in enumerate(fake.cuda.ran) if what == "kernel"]
    assert uploads[3] < kernels[1]  # uploads ran ahead of kernels: the waits, not luck, kept the bytes right
    assert packer.stats["device_allocations"] <= 2 * slots + 2


def check(entry):
    handle, jobs, counts, expected = entry
    assert handle.result() == counts and handle.sources_free.result(timeout=5) is None
    for a, b in zip(jobs, expected):
        assert np.array_equal(a[3].weight, b[3].weight) and np.array_equal(a[3].scales, b[3].scales)


def test_streaming_packer_without_room_in_the_block_still_packs(cuda_packer):
    packer, _ = cuda_packer(slots=2, pinned_bytes=8192)  # room for the tables of one batch at most
    rng = np.random.default_rng(6)
    for experts in (2, 1):
        sources = _batch(rng, 256, 512, 2, experts)
        jobs = [(s, c, k, PackTarget.empty(INT4, s.shape[0], k)) for s, c, k in sources]
        expected = [(s, c, k, PackTarget.empty(INT4, s.shape[0], k)) for s, c, k in sources]
        assert packer(INT4, jobs) == pack_cpu(INT4, expected)
        assert all(np.array_equal(a[3].weight, b[3].weight) for a, b in zip(jobs, expected))
    refused = packer.host_memory.refused
    packer.close()
    assert refused > 0 and packer.timings.get("gpu_pageable_buffers") == refused
    packer.close()  # once only
    assert packer.timings.get("gpu_pageable_buffers") == refused


def test_an_error_in_a_batch_leaves_no_copy_running(cuda_packer, monkeypatch):
    packer, fake = cuda_packer(slots=2, pinned_bytes=1 << 22)
    rng = np.random.default_rng(7)
    sources = _batch(rng, 256, 512, 2, 1, packer.host_memory)
    targets = packer.host_memory.targets(INT4, [(s.shape[0], k) for s, _, k in sources])
    jobs = [(s, c, k, t) for (s, c, k), t in zip(sources, targets)]
    handle = packer.submit(INT4, jobs)
    handle.wait()  # what convert_layer does when it unwinds
    assert not any(s.ops for s in fake.cuda.streams)
    bad = [(SourceMatrix("bf16", np.zeros((48, 128), np.uint16)), 0, 128, PackTarget.empty(INT4, 48, 128))]
    with pytest.raises(ValueError, match="multiple of 32"):
        packer.submit(INT4, bad)


def test_reads_move_into_the_pinned_block_once_it_is_there(tiny_checkpoint):
    """The source stream reads into plain buffers until the GPU's block comes up, then into leases of it,
    replacing each buffer as it comes back; a block with no room leaves the plain buffer in use (not a new
    one per batch). The bytes read are the file's either way."""
    from kt_convert.convert.layer_io import LayerReader
    from kt_convert.convert.plan import build_plan
    from kt_convert.convert.source import open_checkpoint
    from kt_convert.convert.source_reader import slab_extent

    class Switch:  # as StartingPacker: plain memory, then the block
        def __init__(self, block):
            self.block, self.on = block, False

        def empty(self, nbytes):
            return self.block.empty(nbytes) if self.on else np.empty(nbytes, np.uint8)

        def suits(self, buffer):
            return self.block.suits(buffer) if self.on else True

    ckpt = open_checkpoint(str(tiny_checkpoint.path))
    try:
        plan = build_plan(ckpt, INT4, 2, "merged")
        for room, expect_inside in ((1 << 22, True), (4096, False)):
            block = HostBlock(np.zeros(room, np.uint8))
            memory = Switch(block)
            reader = LayerReader(ckpt, plan, plan.layers, 1, threads=2, ahead=2, memory=memory)
            seen = []
            try:
                for lp in plan.layers:
                    for i, (experts, batch) in enumerate(reader.batches(lp)):
                        memory.on = memory.on or (lp is plan.layers[0] and i == 2)
                        slab, a = next(iter(batch.arrays.items()))
                        seen.append((block.offset_of(a) is not None, batch._buffer.__array_interface__["data"][0]))
                        ext = slab_extent(ckpt, slab)
                        with open(ext.file.path, "rb") as f:
                            f.seek(ext.offset)
                            assert a.tobytes() == f.read(ext.nbytes)
                        batch.release()
            finally:
                reader.close()
            assert not any(inside for inside, _ in seen[:3])  # read before the switch
            assert all(inside == expect_inside for inside, _ in seen[6:])  # every buffer replaced by then
            if not expect_inside:
                assert len({addr for _, addr in seen}) == 3  # the three plain buffers, kept
    finally:
        ckpt.close()


def test_a_conversion_keeps_one_batch_on_the_device_while_the_next_is_submitted(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    """convert_layer on the stand-in device: batch k+1 is submitted before batch k's results are taken (and
    every batch's results before the layer ends), the read buffers and the arenas are the pinned block's, and
    the files are the CPU run's."""
    from helpers.outputs import tree_hashes
    from kt_convert.convert import layer_pack, pipeline
    from kt_convert.convert.pipeline import ConvertOptions, convert

    def run(out, **kw):
        return convert(ConvertOptions(input_path=str(tiny_checkpoint.path), output=out, progress=False,
                                      threadpool_count=2, **kw))

    run(tmp_path / "cpu", device="cpu")
    install_for_conversion(monkeypatch)  # one expert per batch: 8 batches a layer
    log, real_submit, real_result = [], packers.CudaPacker.submit, packers._GpuBatch.result

    def submit(self, method, jobs):
        handle = real_submit(self, method, jobs)
        inside = [self.host_memory.offset_of(a) is not None for src, _, _, dst in jobs for a in (src.weight, dst.weight)]
        log.append(("submit", handle, all(inside)))
        return handle

    def result(self):
        if not self.done():
            log.append(("result", self, None))
        return real_result(self)

    monkeypatch.setattr(packers.CudaPacker, "submit", submit)
    monkeypatch.setattr(packers._GpuBatch, "result", result)
    report = run(tmp_path / "gpu", device="cuda")
    assert report.device == "cuda" and tree_hashes(tmp_path / "gpu") == tree_hashes(tmp_path / "cpu")
    submits = [i for i, (what, _, _) in enumerate(log) if what == "submit"]
    assert len(submits) == 16 and sum(1 for what, *_ in log if what == "result") == 16
    ahead = 0
    for i in submits:
        handle = log[i][1]
        taken = next(j for j, (what, h, _) in enumerate(log) if what == "result" and h == handle)
        ahead += any(what == "submit" for what, *_ in log[i + 1:taken])  # another batch submitted meanwhile
    assert ahead == 14  # all but each layer's last batch
    assert sum(inside for what, _, inside in log if what == "submit") >= 16 - packers.READ_AHEAD - 1


@pytest.mark.parametrize("variant", ["qwen3_moe_nvfp4_modelopt", "qwen3_moe_nvfp4_ct", "minimax_m2_mxfp8"])
def test_nvfp4_and_mxfp8_conversions_on_the_stand_in_device(tmp_path, monkeypatch, variant):
    """NVFP4 (a multiplying and a dividing per-tensor scale) and MXFP8 checkpoints through the GPU path: every
    batch read into the pinned block and packed by the stand-in kernel, which takes the per-tensor scale from
    the job table as the Triton kernel does; the files are the CPU run's."""
    from helpers.outputs import tree_hashes
    from kt_convert.convert import pipeline
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.synthetic.families import make_family_checkpoint

    ckpt = make_family_checkpoint(tmp_path / "ckpt", variant)

    def run(out, **kw):
        return convert(ConvertOptions(input_path=str(ckpt.path), output=out, progress=False, threadpool_count=2, **kw))

    run(tmp_path / "cpu", device="cpu")
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    monkeypatch.setitem(sys.modules, "kt_convert.quant.triton_kernels",
                        types.ModuleType("kt_convert.quant.triton_kernels"))
    kinds = []

    def launch(method, plan, dev_in, dev_out):
        kinds.extend(code for code, _, _ in plan.launches)
        fake_launch(method, plan, dev_in, dev_out)

    monkeypatch.setattr(quant_gpu, "launch", launch)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(packers, "PACK_ON_CPU_WHILE_DEVICE_STARTS", False)
    monkeypatch.setattr(packers, "PINNED_BYTES", 16 << 20)
    report = run(tmp_path / "gpu", device="cuda")
    t = report.timings
    assert report.device == "cuda" and t["gpu_kernel_s"] > 0 and "cpu_batches_while_device_starts" not in t, t
    code = SOURCE_FORMATS["mxfp8" if "mxfp8" in variant else "nvfp4"].gpu_code + variant.endswith("_ct")
    assert set(kinds) == {code}  # 7: nvfp4 multiplied, 8: divided, 9: mxfp8
    assert tree_hashes(tmp_path / "gpu") == tree_hashes(tmp_path / "cpu")
