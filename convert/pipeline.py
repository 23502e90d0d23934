"""The conversion: plan, then stream layer by layer (read source with pread, one batch ahead ->
pack -> write), resuming from the manifest of an earlier run into the same output directory."""
from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kt_runtime.format import fsio
from kt_runtime.format.errors import ManifestError
from kt_runtime.format.layout import FORMAT_VERSION, PROJECTIONS, shard_file_name, shard_slice
from kt_runtime.format.digest import tree_sha256_files
from kt_runtime.format.manifest import Manifest, read_manifest, shard_metadata, write_manifest
from kt_runtime.format.methods import method_for
from quant.cpu import PackTarget

from . import __version__, preflight
from .errors import NonFiniteError, UserError
from .non_expert import non_expert_tensors
from .output_dir import (OutputLock, copy_model_files, prepare_output, resolve_output_dir, write_index,
                         write_quantization_config)
from .packers import make_packer
from .layer_io import LayerOutput, LayerReader
from .plan import ConversionPlan, LayerPlan, build_plan, read_source_matrix
from .progress import Progress
from .source import COPIED_FILES, Checkpoint, describe_source_change, open_checkpoint
from .source_reader import default_read_threads
from .writer import KtFolderWriter, MergedShardWriter

BATCH_BYTES = 64 << 20  # packed bytes per pack call: enough tasks for every core, bounded memory


@dataclass
class ConvertOptions:
    input_path: str
    output: Path
    input_type: str = "auto"
    quant_method: str = "int4"
    group_size: int | None = None  # --group-size of a group-wise method (None: its default)
    threadpool_count: int = 2
    cpuinfer_threads: int = 0  # 0: every core
    merge: bool = True
    device: str = "auto"
    include_non_expert: bool = False
    overwrite: bool = False
    allow_nonfinite: bool = False
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise
    resume_layer: int | None = None
    layers: list[int] | None = None  # --layers: convert only these MoE layers (the output says it is partial)


@dataclass
class ConversionReport:
    output: str
    family: str
    input_type: str
    method: str
    kt_method: str
    threadpool_count: int
    device: str
    layers: int
    layers_converted: int
    layers_resumed: int
    experts_per_layer: int
    mtp_tensors_skipped: int
    input_bytes: int  # source expert bytes converted in this run
    output_bytes: int  # packed bytes written in this run
    seconds: float
    nonfinite: dict[str, int] = field(default_factory=dict)
    partial: bool = False  # --layers left out MoE layers of the model
    model_layers: int = 0  # MoE layers of the whole model

    @property
    def input_gb_per_s(self) -> float:
        return self.input_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_gb_per_s"] = round(self.input_gb_per_s, 4)
        return d

    def summary(self) -> str:
        return (f"{self.layers_converted} layers converted, {self.layers_resumed} already done, "
                f"{self.experts_per_layer} experts each ({self.method}, threadpool count {self.threadpool_count}, "
                f"{self.device}): {self.input_bytes / 1e9:.2f} GB in, {self.output_bytes / 1e9:.2f} GB out, "
                f"{self.seconds:.1f} s, {self.input_gb_per_s:.2f} GB/s -> {self.output}"
                + (f"\nthis output is partial: {self.layers} of the model's {self.model_layers} MoE layers "
                   "(--layers); kt_manifest.json says so" if self.partial else ""))


def max_cpu_threads() -> int:
    """The most packing threads accepted: more than 4 per CPU only adds switching (and memory)."""
    return max(256, 4 * (os.cpu_count() or 1))


def check_cpu_threads(n) -> int:
    limit = max_cpu_threads()
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
        raise UserError(f"--cpuinfer-threads must be between 0 (every core) and {limit} (4 per CPU here), got {n!r}")
    return n


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    from quant.gpu import gpu_unavailable_reason  # imports neither triton nor the GPU kernels

    why = gpu_unavailable_reason()
    if device == "cuda" and why:
        raise UserError(f"--device cuda: {why}; use --device cpu (or auto)")
    return "cpu" if why else "cuda"


def planned_manifest(plan: ConversionPlan, ckpt: Checkpoint, opts: ConvertOptions) -> Manifest:
    source = {"path": str(ckpt.root), "family": plan.family, "input_type": plan.input_type, **plan.source_info,
              "mtp_tensors_skipped": plan.skipped_mtp_keys, **ckpt.fingerprint()}
    return Manifest(method=plan.method.name, threadpool_count=plan.threadpool_count, hidden_size=plan.hidden_size,
                    moe_intermediate_size=plan.moe_intermediate_size, num_experts=plan.num_experts,
                    num_experts_per_tok=plan.num_experts_per_tok, layers=[lp.layer for lp in plan.layers],
                    layout="merged" if opts.merge else "kt-folders", activation=plan.activation,
                    swiglu_limit=plan.swiglu_limit, num_shards=plan.num_shards,
                    model_layers=list(plan.model_layers), partial=plan.partial,
                    source=source, options={"include_non_expert": opts.include_non_expert},
                    converter_version=__version__, format_version=FORMAT_VERSION)


def experts_per_batch(plan: ConversionPlan) -> int:
    per_expert = max(1, plan.layers[0].output_bytes // max(1, plan.num_experts)) if plan.layers else 1
    return max(1, min(plan.num_experts, BATCH_BYTES // per_expert))


def started_executor(name: str) -> ThreadPoolExecutor:
    """A one-thread executor whose thread already runs. ThreadPoolExecutor starts its thread inside the
    first submit() and registers it only after start() returns; an interrupt (SIGINT/SIGTERM unwinding)
    that lands in between leaves a thread shutdown() cannot wait for, still writing or committing
    while the run unwinds (and closes the files it writes). So the thread is started with a no-op."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    executor.submit(int).result()
    return executor


def convert_layer(reader: LayerReader, plan: ConversionPlan, lp: LayerPlan, outputs: list[LayerOutput],
                  opts: ConvertOptions, progress: Progress, nonfinite: dict[str, int], packer) -> None:
    """Reads layer `lp` once, batch by batch (reader), packs every batch for each output (packer: from
    convert.packers.make_packer, CPU or CUDA, the same bytes) and hands the packed pairs to each output's
    writer on a writer thread while the next batch is packed. NaN/Inf counts come from the first output
    (every output reads the same source values)."""
    H, I = plan.hidden_size, plan.moe_intermediate_size
    bytes_per_expert = lp.input_bytes // plan.num_experts

    def write_batch(packed):
        for out, pairs in zip(outputs, packed):
            for expert, proj, t, dst in pairs:
                out.writer.write_pair(proj, expert, t, dst.weight, dst.scales)

    with started_executor("kt-writer") as io:
        pending = None
        for experts, data in reader.batches(lp):
            try:
                jobs = [[] for _ in outputs]
                packed = [[] for _ in outputs]
                keys = []
                for expert in experts:
                    for proj in PROJECTIONS:
                        src_ref = lp.experts[expert][proj]
                        src = read_source_matrix(src_ref, data)
                        for out, out_jobs, out_pairs in zip(outputs, jobs, packed):
                            for t in range(out.threadpool_count):
                                s = shard_slice(proj, H, I, out.threadpool_count, t)
                                dst = PackTarget.empty(out.method, s.n, s.k)
                                out_jobs.append((src.rows(s.row0, s.n), s.col0, s.k, dst))
                                out_pairs.append((expert, proj, t, dst))
                        keys += [src_ref.weight_key] * outputs[0].threadpool_count
                counts = [packer(out.method, out_jobs) for out, out_jobs in zip(outputs, jobs)][0]  # the first's
            finally:
                data.release()  # the packer is done with the source buffer: the stream refills it
            for key, count in zip(keys, counts):
                if count:
                    nonfinite[key] = nonfinite.get(key, 0) + count
                    if not opts.allow_nonfinite:
                        raise NonFiniteError(
                            f"{reader.where(key)}: tensor {key} holds {nonfinite[key]} NaN/Inf values (layer {lp.layer}); "
                            "the checkpoint is damaged: re-download that file, or pass --allow-nonfinite to pack "
                            "them as 0 (they are listed in the report)")
            if pending is not None:
                pending.result()
            pending = io.submit(write_batch, packed)
            progress.advance(bytes_per_expert * len(experts))
        if pending is not None:
            pending.result()


def layer_writer(out: Path, plan: ConversionPlan, manifest: Manifest, lp: LayerPlan):
    """The writer of one layer in the run's layout (MergedShardWriter or KtFolderWriter)."""
    if plan.layout == "merged":
        return MergedShardWriter(out, lp.shard_name, lp.layer, plan.spec.layer_entries(lp.layer),
                                 shard_metadata(manifest, lp.layer), plan.spec)
    return KtFolderWriter(out, lp.layer, plan.method.name)


def _verify_completed(out: Path, manifest: Manifest, progress: Progress) -> None:
    """Drops completed layers whose files are missing or changed, so they are converted again."""
    for layer, rec in sorted(manifest.completed.items()):
        sizes = [fsio.regular_size_below(out, f) for f in rec.files]  # never read through a link
        ok = None not in sizes and sum(sizes) == rec.nbytes \
            and tree_sha256_files([out / f for f in rec.files]) == rec.sha256
        if not ok:
            progress.note(f"layer {layer}: output missing or damaged; converting it again")
            del manifest.completed[layer]


def _write_non_expert_shard(ckpt: Checkpoint, out: Path, name: str,
                            tensors: list[tuple[str, str]]) -> tuple[dict[str, str], int]:
    """kt's last shard: every non-expert tensor under kt's name (convert/non_expert.py)."""
    entries = [(new, ckpt.info(src).dtype, tuple(ckpt.info(src).shape)) for src, new in tensors]
    writer = MergedShardWriter(out, name, -1, entries, {"format": "pt"})
    try:
        for src, new in tensors:
            writer.write(new, ckpt.read_tensor(src))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {new: name for _, new in tensors}, sum(ckpt.info(src).nbytes for src, _ in tensors)


def convert(opts: ConvertOptions) -> ConversionReport:
    start = time.perf_counter()
    check_cpu_threads(opts.cpuinfer_threads)
    device = resolve_device(opts.device)
    try:
        method = method_for(opts.quant_method, opts.group_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    if device == "cuda" and not method.numa_split:  # the Triton packer writes the AMX-tiled layout only
        if opts.device == "cuda":
            raise UserError(f"--device cuda: --quant-method {method.choice} is packed on the CPU only; use --device "
                            "cpu or auto")
        device = "cpu"
    ckpt = open_checkpoint(opts.input_path)
    try:
        layout = "merged" if opts.merge else "kt-folders"
        plan = build_plan(ckpt, method, opts.threadpool_count, layout, opts.input_type,
                          extra_shards=1 if opts.include_non_expert and opts.merge else 0, layers=opts.layers)
        non_expert = (non_expert_tensors(ckpt.key_file, plan.family, plan.routed_keys, str(ckpt.root))
                      if opts.include_non_expert and opts.merge else [])
        return _run(ckpt, plan, opts, device, start, non_expert)
    finally:
        ckpt.close()


def _run(ckpt: Checkpoint, plan: ConversionPlan, opts: ConvertOptions, device: str, start: float,
         non_expert: list[tuple[str, str]]) -> ConversionReport:
    out = resolve_output_dir(opts.output, ckpt.root)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out)
    except OSError as e:
        raise _os_error(e, out) from None
    try:
        planned = planned_manifest(plan, ckpt, opts)
        _refuse_changed_source(out, planned, opts.overwrite)
        manifest = prepare_output(out, ckpt.root, planned, opts.overwrite)
        progress = Progress(0, len(plan.layers), opts.progress)
        _verify_completed(out, manifest, progress)
        todo = [lp for lp in plan.layers if lp.layer not in manifest.completed]
        if opts.resume_layer is not None:
            progress.note("--resume-layer is not needed: completed layers are found in kt_manifest.json; "
                          "every missing layer is converted")
        est = preflight.estimate(plan, todo, experts_per_batch(plan), opts.cpuinfer_threads,
                                 preflight.non_expert_bytes(ckpt, non_expert))
        preflight.check(est, out, preflight.copied_bytes(ckpt.root, COPIED_FILES))
        progress.note(est.describe())
        if plan.skipped_mtp_keys:
            progress.note(f"skipping {plan.skipped_mtp_keys} MTP expert tensors (not routed experts of the main model)")
        write_manifest(out, manifest)
        progress.close()
        progress = Progress(sum(lp.input_bytes for lp in todo), len(todo), opts.progress)
        nonfinite: dict[str, int] = {}
        packer = make_packer(device, opts.cpuinfer_threads)
        reader = LayerReader(ckpt, plan, todo, experts_per_batch(plan), threads=default_read_threads())
        # A layer's fsync, rename and manifest update run on this thread while the next layer is
        # packed; one at a time and in order, so the manifest only ever lists committed layers.
        committer = started_executor("kt-commit")
        pending = None
        try:
            for lp in todo:
                progress.layer_start(lp.layer)
                writer = layer_writer(out, plan, manifest, lp)
                try:
                    convert_layer(reader, plan, lp, [LayerOutput(plan.method, plan.threadpool_count, writer)], opts,
                                  progress, nonfinite, packer)
                except BaseException:
                    writer.abort()
                    raise
                if pending is not None:
                    pending.result()
                pending = committer.submit(_commit_layer, writer, lp.layer, out, manifest)
                progress.layer_done(lp.layer, lp.input_bytes)
            if pending is not None:
                pending.result()
            _finish(ckpt, plan, out, manifest, opts, non_expert)
        finally:
            committer.shutdown(wait=True)  # never leave a commit running past the lock
            reader.close()
            packer.close()
            progress.close()
    except OSError as e:
        raise _os_error(e, out) from None
    finally:
        lock.release()
    return ConversionReport(
        output=str(out), family=plan.family, input_type=plan.input_type, method=plan.method.name,
        kt_method=plan.method.kt_method, threadpool_count=plan.threadpool_count, device=device,
        layers=len(plan.layers), layers_converted=len(todo), layers_resumed=len(plan.layers) - len(todo),
        experts_per_layer=plan.num_experts, mtp_tensors_skipped=plan.skipped_mtp_keys,
        input_bytes=sum(lp.input_bytes for lp in todo), output_bytes=sum(lp.output_bytes for lp in todo),
        seconds=time.perf_counter() - start, nonfinite=nonfinite, partial=plan.partial,
        model_layers=len(plan.model_layers))


def _refuse_changed_source(out: Path, planned: Manifest, overwrite: bool) -> None:
    """A resume from sources that changed since the output was started (a file rewritten: other
    size, modification time or header) would mix two models: stop and say which files."""
    if overwrite:
        return
    try:
        existing = read_manifest(out)
    except ManifestError:
        return  # prepare_output reports it
    what = describe_source_change(existing.source, planned.source) if existing is not None else None
    if what is None:
        return  # the same files (or not comparable: prepare_output compares the fingerprints)
    raise UserError(f"{out} was converted from source files that have changed since ({what}): its layers "
                    "cannot be resumed. Pass --overwrite to convert again from the current files, or use "
                    "another output directory")


def _commit_layer(writer, layer: int, out: Path, manifest: Manifest) -> None:
    try:
        record = writer.commit()
    except BaseException:
        writer.abort()
        raise
    manifest.completed[layer] = record
    write_manifest(out, manifest)


def _finish(ckpt: Checkpoint, plan: ConversionPlan, out: Path, manifest: Manifest, opts: ConvertOptions,
            non_expert: list[tuple[str, str]]) -> None:
    # the index is what kt-kernel loads: it is written last, after every shard and copied file
    copy_model_files(ckpt.root, out, COPIED_FILES)
    if not plan.method.numa_split:
        write_quantization_config(out, plan.method)
    if opts.merge:
        spec = plan.spec
        weight_map = {key: lp.shard_name for lp in plan.layers for key, _, _ in spec.layer_entries(lp.layer)}
        total = plan.output_bytes
        if opts.include_non_expert:
            count = plan.num_shards
            extra_map, extra_bytes = _write_non_expert_shard(ckpt, out, shard_file_name(count, count), non_expert)
            weight_map.update(extra_map)
            total += extra_bytes
    ckpt.check_unchanged()  # every byte converted was read from the source files as they were when opened
    if opts.merge:
        write_index(out, weight_map, total)
    manifest.complete = True
    write_manifest(out, manifest)


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
