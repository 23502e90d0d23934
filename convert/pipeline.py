"""The conversion: plan, then stream layer by layer (read source with pread, one batch ahead -> pack -> write),
resuming from the manifest of an earlier run into the same output directory. One run reads the source once for
every output it makes (convert.output_job.OutputJob each); convert.layer_pack packs one layer.

The Python API: convert(ConvertOptions) for one output, convert_outputs(RunOptions, [OutputSpec, ...]) for
several from one read (convert.options), each giving a ConversionReport (convert.report)."""
from __future__ import annotations

import errno
import os
import time
from concurrent.futures import Future
from pathlib import Path

from . import kt_sft_output, preflight
from .announce import plan_lines, resume_line
from .device_choice import DeviceChoice, choose_device, measure_capabilities
from .errors import UserError
from .layer_io import LayerOutput, LayerReader
from .layer_pack import convert_layer, experts_per_batch, started_executor
from .options import ConvertOptions, OutputSpec, RunOptions, check_cpu_threads
from .output_dir import remove_if_empty
from .output_job import OutputJob, method_or_exit, plan_output
from .packers import make_packer, pack_isa, pinned_bytes
from .plan import ConversionPlan
from .progress import Progress
from .quant_notes import grid_lines
from .report import ConversionReport
from .shards import ShardSpec
from .source import COPIED_FILES, Checkpoint, open_checkpoint
from .source_reader import default_read_threads
from .timings import Timings

__all__ = ["ConvertOptions", "RunOptions", "OutputSpec", "ConversionReport", "convert", "convert_outputs"]


def convert(opts: ConvertOptions, shard: ShardSpec | None = None) -> ConversionReport:
    """Converts one checkpoint into one output (shard: only that part of its layers, beside other processes)."""
    return convert_outputs(opts.run, [opts.spec], shard)[0]


def convert_outputs(run: RunOptions, outputs: list[OutputSpec],
                    shard: ShardSpec | None = None) -> list[ConversionReport]:
    """Converts one checkpoint into every output (each exactly what convert() alone would write), reading each
    layer once (the decode runs fused into each output's pack call); shard: only that part of the layers,
    beside other processes."""
    probe = time.perf_counter()
    if not outputs:
        raise UserError("no output to convert: give convert_outputs at least one OutputSpec")
    check_cpu_threads(run.cpuinfer_threads)
    pack_isa()  # a bad KT_PACK_ISA stops the run before anything is read or written
    methods = [method_or_exit(run, spec) for spec in outputs]  # before a download starts
    sft = [m for m, spec in zip(methods, outputs) if spec.kt_sft_manifest]
    if shard is not None and sft:
        raise UserError(kt_sft_output.refusal(sft[0], False, None, None, shard=True))
    choice = _explicit_device(run.device, methods)  # None: --device auto with a GPU, chosen once planned
    start = time.perf_counter()  # the reports' seconds are the conversion's, not the device probe's
    timings = Timings()
    # --device cuda: the GPU starts on a background thread now, while the plan is made and the first
    # batch is read (convert.packers.StartingPacker); otherwise _run makes the packer, after pre-flight
    cuda_now = choice is not None and choice.device == "cuda"
    packer = make_packer("cuda", run.cpuinfer_threads, timings, start) if cuda_now else None
    try:
        reports = _convert_outputs(run, outputs, shard, choice, probe, start, packer, timings)
    finally:
        if packer is not None:
            packer.close()  # waits for a GPU start-up still running (a run shorter than it)
    for report in reports:
        report.timings = timings.to_dict()  # with the start-up's time, whenever it ended
    return reports


def _explicit_device(device: str, methods) -> DeviceChoice | None:
    """--device cpu or cuda (checked), or auto where no GPU can pack; None: auto with a GPU (choose_auto)."""
    found = resolve_device(device)
    cpu_only = next((m.choice for m in methods if not m.byte_order.cuda_packer), None)  # byte orders Triton writes
    if found == "cuda" and cpu_only is not None:
        if device == "cuda":
            raise UserError(f"--device cuda: --quant-method {cpu_only} is packed on the CPU only; use --device "
                            "cpu or auto")
        return DeviceChoice("cpu", f"--quant-method {cpu_only} is packed on the CPU only")
    if device != "auto":
        return DeviceChoice(found, "")
    if found == "cpu":
        from kt_convert.quant.gpu import NO_GPU_DEVICE, gpu_unavailable_reason

        why = gpu_unavailable_reason()  # a machine without a GPU is told so briefly, one with a GPU why it is unused
        return DeviceChoice("cpu", "no GPU here" if why.startswith(NO_GPU_DEVICE) else f"no GPU to pack on: {why}")
    return None


def auto_device(opts: ConvertOptions) -> DeviceChoice:
    """What --device auto chooses for this conversion, found as a run finds it, without converting
    (scripts/bench_convert.py asks on each machine setting it measures)."""
    run, spec = opts.run, opts.spec
    choice = _explicit_device("auto", [method_or_exit(run, spec)])
    if choice is not None:
        return choice
    ckpt = open_checkpoint(run.input_path)
    try:
        plan, _ = plan_output(ckpt, run, spec)
        return choose_auto(plan, run, Timings())
    finally:
        ckpt.close()


def choose_auto(plan: ConversionPlan, run: RunOptions, timings: Timings) -> DeviceChoice:
    """--device auto on a machine with a GPU: the CPU or the GPU, whichever converts faster here
    (convert.device_choice, from probes of this machine)."""
    with timings.timed("device_choice_s"):
        return choose_device(measure_capabilities(plan, plan.layers, run.cpuinfer_threads, None))


def _convert_outputs(run: RunOptions, outputs: list[OutputSpec], shard: ShardSpec | None,
                     choice: DeviceChoice | None, probe: float, start: float, packer,
                     timings: Timings) -> list[ConversionReport]:
    """Opens the source once (a hub download starts here), plans every output from it and runs them."""
    ckpt, _ = open_source(run, any(spec.include_non_expert for spec in outputs),
                          note=lambda m: Progress(0, 0, False).note(m))
    try:
        jobs = []
        seen: dict[Path, int] = {}
        for i, spec in enumerate(outputs):
            job = OutputJob.planned(ckpt, run, spec)
            for folder in dict.fromkeys((job.out, job.state)):  # an output, or the records folder of one
                if folder in seen:
                    raise UserError(f"output {folder} is named twice (outputs {seen[folder] + 1} and {i + 1}): "
                                    "give each output its own directory (e.g. a template with {method} and "
                                    "{threadpool_count})")
                seen[folder] = i
            jobs.append(job)
        for job in jobs[1:]:
            if [(lp.layer, lp.experts) for lp in job.plan.layers] != [(lp.layer, lp.experts) for lp in jobs[0].plan.layers]:
                raise RuntimeError("the outputs of one run planned different source layers")
        if choice is None:
            choice = choose_auto(jobs[0].plan, run, timings)
        reports = _run(ckpt, run, jobs, choice, start, shard, packer, timings)
        for report in reports:
            report.startup_seconds = start - probe
        return reports
    finally:
        ckpt.close()


def open_source(run: RunOptions, include_non_expert: bool, note=print):
    """(checkpoint, download plan or None): a hub id with --download through convert.download (every shard
    when an output copies the non-expert tensors), else a local folder, file or fully cached hub id."""
    if run.download or run.dry_run:
        from .download import open_hub_checkpoint
        from .source import HUB_ID

        m = HUB_ID.match(run.input_path)
        if m and not Path(run.input_path).expanduser().exists() and not run.input_path.startswith((".", "/", "~")):
            if not run.download:  # a dry run of a cached hub id reads the cache only
                return open_checkpoint(run.input_path), None
            return open_hub_checkpoint(m["repo"], m["rev"], include_non_expert=include_non_expert,
                                       delete_after_use=run.delete_source_after_use,
                                       max_source_disk=run.max_source_disk, dry_run=run.dry_run, note=note,
                                       workers=run.download_workers)
    return open_checkpoint(run.input_path), None


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    from kt_convert.quant.gpu import gpu_unavailable_reason  # imports neither triton nor the GPU kernels

    why = gpu_unavailable_reason()
    if device == "cuda" and why:
        raise UserError(f"--device cuda: {why}; use --device cpu (or auto)")
    return "cpu" if why else "cuda"


def _preflight(ckpt: Checkpoint, jobs: list[OutputJob], batch_experts: int, progress: Progress,
               layer_files: list[tuple[int, set[str]]], pinned_bytes: int) -> None:
    """Disk per output directory (outputs on one filesystem add up), memory for every output's batch and the
    GPU's pinned block (pinned_bytes); the source's disk beside the outputs (a download: its gate)."""
    estimates = []
    by_device: dict[int, list] = {}
    copied = preflight.copied_bytes(ckpt.root, COPIED_FILES)
    for job in jobs:
        est = job.estimate(batch_experts)
        estimates.append(est)
        by_device.setdefault(os.stat(job.out).st_dev, []).append((job.out, est.disk_bytes + copied))
    for outs in by_device.values():
        need = sum(n for _, n in outs)
        preflight.check(preflight.Estimate(need, need, 0, 0), outs[0][0])
    peak = (max(e.peak_memory_bytes for e in estimates) + sum(2 * e.batch_bytes + e.held_bytes for e in estimates[1:])
            + pinned_bytes)
    combined = preflight.Estimate(sum(e.output_bytes for e in estimates), 0, sum(e.batch_bytes for e in estimates),
                                  peak, estimates[0].source_batch_bytes)
    preflight.check(combined, jobs[0].out)
    progress.note(combined.describe())
    shown = set()
    for job in jobs:
        for line in grid_lines(job.plan, ckpt):
            if line not in shown:
                shown.add(line)
                progress.note(line)
    source_line = ckpt.gate.preflight(layer_files, jobs[0].out, sum(e.disk_bytes for e in estimates))
    if source_line:
        progress.note(source_line)


def _run(ckpt: Checkpoint, run: RunOptions, jobs: list[OutputJob], choice: DeviceChoice, start: float,
         shard: ShardSpec | None, packer, timings: Timings) -> list[ConversionReport]:
    """The run itself; `packer` is the one started by convert_outputs() (--device cuda) or None (made here)."""
    device = choice.device
    plan = jobs[0].plan  # the source side: the same for every output
    gate = ckpt.gate  # a local checkpoint's does nothing; a hub download's fetches and removes shards
    progress = Progress(0, len(plan.layers), run.progress)
    shown: set[str] = set()
    try:
        for job in jobs:
            for line in plan_lines(job.plan, ckpt.root, job.out, device, job.state if job.state != job.out else None,
                                   default_group=job.spec.group_size is None, reason=choice.reason):
                if line not in shown:  # several outputs: the source and model lines once
                    shown.add(line)
                    progress.note(line)
            try:
                job.prepare(device, progress, shard)
            except OSError as e:
                raise _os_error(e, job.out) from None
            if shard is None:
                done = [lp.layer for lp in job.plan.layers if lp.layer not in job.todo]
                if resume_line(done, len(job.plan.layers)):
                    progress.note((f"{job.out}: " if len(jobs) > 1 else "") + resume_line(done, len(job.plan.layers)))
        if any(job.spec.resume_layer is not None for job in jobs) and not any(job.adopted for job in jobs):
            progress.note("--resume-layer is not needed: completed layers are found in kt_manifest.json; "
                          "every missing layer is converted")
        needed = {layer: [job for job in jobs if layer in job.todo] for layer in (lp.layer for lp in plan.layers)}
        todo = [lp for lp in plan.layers if needed[lp.layer]]
        batch_experts = experts_per_batch(plan, tuple(job.plan for job in jobs[1:]), device)
        layer_files = ckpt.layer_files(todo)
        gate.check_cap(layer_files)
        _preflight(ckpt, jobs, batch_experts, progress, layer_files, pinned_bytes(device))
        for job in jobs:
            job.start()
        gate.schedule(layer_files, {ckpt.key_file[src] for job in jobs for src, _ in job.non_expert})
        progress.close()
        # a resumed single run counts layers over the whole model; a shard over its own layers to do
        progress = (Progress(sum(lp.input_bytes for lp in todo), len(plan.layers), run.progress,
                             done_layers=len(plan.layers) - len(todo)) if shard is None else
                    Progress(sum(lp.input_bytes for lp in todo), len(todo), run.progress))
        own_packer = packer is None
        if own_packer:
            packer = make_packer(device, run.cpuinfer_threads, timings, start)
        reader = LayerReader(ckpt, plan, todo, batch_experts, threads=default_read_threads(), timings=timings,
                             ahead=packer.read_ahead, memory=packer.host_memory)
        reader.start()  # the first batch is read while the GPU (if any) is still starting
        timings.add("plan_s", time.perf_counter() - start)
        # One writer thread for the run: a layer's last batch is written while the next layer is packed.
        # A layer's fsync, rename and manifest update run on the commit thread, after its last write,
        # while the next layers are packed; one at a time and in order, so the manifest only ever lists
        # committed layers.
        io = started_executor("kt-writer")
        committer = started_executor("kt-commit")
        pending = None  # the previous layer's commit
        last_write = None
        try:
            for lp in todo:
                progress.layer_start(lp.layer)
                writers = []
                nonfinite: dict[str, int] = {}  # of this layer's tensors, recorded with the layer
                try:
                    for job in needed[lp.layer]:
                        writers.append((job, job.writer(job.layer_plan(lp.layer), timings)))
                    last_write = convert_layer(
                        reader, plan, lp, [LayerOutput(job.plan.method, job.plan.threadpool_count, w) for job, w in writers],
                        run, progress, nonfinite, packer, timings, io, last_write)
                except BaseException:
                    io.submit(int).result()  # the writes in flight end before the writers close their files
                    for _, w in writers:
                        w.abort()
                    raise
                # handed to the commit thread at once (it commits after the layer's last write), then
                # the previous layer's commit is awaited: an interrupt there finds the writers committing
                commit = committer.submit(_commit_layer, writers, lp.layer, last_write, timings, gate.layer_committed,
                                          nonfinite)
                if pending is not None:
                    with timings.timed("commit_wait_s"):
                        pending.result()
                pending = commit
                progress.layer_done(lp.layer, lp.input_bytes)
            progress.stage("finishing: fsync of the last layer, model files, index")
            if pending is not None:
                with timings.timed("commit_wait_s"):
                    pending.result()
            with timings.timed("finish_s"):
                for job in jobs:
                    job.finish(progress)
            gate.finished()
        finally:
            io.shutdown(wait=True)  # never leave a write or commit running past the lock
            committer.shutdown(wait=True)
            gate.close()  # wakes a read waiting for a download before the reader waits for it
            reader.close()
            if own_packer:
                packer.close()
            progress.close()
    except OSError as e:
        raise _os_error(e, jobs[0].out) from None
    finally:
        for job in jobs:
            job.release()
            remove_if_empty(job.created)  # only folders still empty: a run that wrote anything keeps them
    seconds = time.perf_counter() - start
    return [job.report(choice, seconds, shard, timings) for job in jobs]


def _commit_layer(writers: list, layer: int, last_write: Future | None, timings: Timings, on_commit,
                  nonfinite: dict[str, int]) -> None:
    """Commits layer `layer` in each output (job, writer) once its last write (on the writer thread) is done
    (OutputJob.commit); a failed write or commit aborts the writers not yet committed. on_commit(layer):
    called once the layer is safe on disk in every output (a downloaded source may go). nonfinite: the
    layer's NaN/Inf counts, kept in its record."""
    try:
        if last_write is not None:
            last_write.result()
    except BaseException:
        for _, w in writers:
            w.abort()
        raise
    for i, (job, writer) in enumerate(writers):
        try:
            job.commit(layer, writer, nonfinite, timings)
        except BaseException:
            for _, w in writers[i:]:
                w.abort()
            raise
    on_commit(layer)


def _os_error(e: OSError, out: Path) -> UserError:
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the device while writing {where}: free space and re-run the same "
                         "command; completed layers are kept and resumed")
    if e.errno == errno.EIO:
        return UserError(f"I/O error on {where}: check the disk; completed layers are kept, re-run to resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {where}: {e.strerror}; choose an output directory you can write")
    return UserError(f"{where}: {e.strerror or e}")
