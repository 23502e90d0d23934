"""The conversion: plan, then stream layer by layer (read source with pread, one batch ahead ->
pack -> write), resuming from the manifest of an earlier run into the same output directory."""
from __future__ import annotations

import contextlib
import errno
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kt_runtime.format import fsio
from kt_runtime.format.errors import ManifestError
from kt_runtime.format.names import FORMAT_VERSION, KT_SFT_MANIFEST_FILE, MANIFEST_FILE, PROJECTIONS, shard_file_name
from kt_runtime.format.spec import shard_slice
from kt_runtime.format.digest import tree_sha256_files
from kt_runtime.format.manifest import Manifest, read_manifest, shard_metadata, write_manifest
from kt_runtime.format.methods import method_for
from kt_runtime.format.verified import add_verified, is_verified, read_verified, record_verified
from kt_runtime.format.writer import KtFolderWriter, MergedShardWriter, write_index, write_quantization_config

from . import __version__, kt_sft_output, preflight
from .announce import plan_lines, resume_line
from .kt_resume import adopt_kt_layers, kt_started_layout
from .errors import NonFiniteError, UserError
from .non_expert import non_expert_tensors
from .claims import Claim, Held
from .device_choice import DeviceChoice, choose_device, measure_capabilities
from .output_dir import (SHARD_DIR, OutputLock, copy_model_files, created_dirs, prepare_output, records_dir,
                         remove_if_empty, resolve_output_dir)
from .packers import make_packer, pack_isa, pinned_bytes
from .layer_io import LayerOutput, LayerReader
from .plan import ConversionPlan, LayerPlan, build_plan, layer_spec, read_source_matrix
from .progress import Progress
from .quant_notes import grid_lines
from .shards import ShardSpec, shard_layers
from .shared_output import SharedOutput, check_no_live_shards, read_records
from .source import COPIED_FILES, Checkpoint, describe_source_change, open_checkpoint
from .source_reader import default_read_threads
from .timings import Timings
from .units import plural, rate, size

BATCH_BYTES = 64 << 20  # packed bytes per pack call: enough tasks for every core, bounded memory
GPU_BATCH_BYTES = 32 << 20  # source or packed bytes per GPU batch: a few read buffers and arenas in its pinned block


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
    # a hub id not (fully) in the cache: convert while downloading (convert.download)
    download: bool = False
    delete_source_after_use: bool = False  # remove shards this run downloaded once converted
    max_source_disk: int | None = None  # bytes of downloaded source on disk at once (implies deletion)
    dry_run: bool = False  # plan only: print it, write nothing
    download_workers: int = 4  # shards downloaded at once (convert.download.DOWNLOAD_WORKERS)
    kt_sft_manifest: bool = False  # kt's SFT input: kt-weight-manifest.json, our files in OUT.kt-convert


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
    startup_seconds: float = 0.0  # finding the device (--device auto), not counted in `seconds`
    shard: str = ""  # --shard I/N: this process converted shard I's layers only (I from 1)
    layers_held: list[int] = field(default_factory=list)  # of our shard, being converted by other processes
    complete: bool = True  # the output is complete (a --shard run: once every shard's layers are)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (convert.timings.STAGES)
    records: str = ""  # --kt-sft-manifest: the folder of this converter's manifest and records (OUT.kt-convert)
    device_reason: str = ""  # why --device auto chose the device ("" when it was given)

    @property
    def input_gb_per_s(self) -> float:
        return self.input_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_gb_per_s"] = round(self.input_gb_per_s, 4)
        return d

    def nonfinite_warning(self, shown: int = 10) -> str:
        """The NaN/Inf source values the output holds as 0 (--allow-nonfinite), the first `shown` tensors named."""
        if not self.nonfinite:
            return ""
        items = list(self.nonfinite.items())
        lines = [f"warning: {sum(self.nonfinite.values())} NaN/Inf source values packed as 0 (--allow-nonfinite) in "
                 f"{plural(len(items), 'tensor')}; kt_manifest.json keeps the list:"]
        lines += [f"  {key}: {n}" for key, n in items[:shown]]
        if len(items) > shown:
            lines.append(f"  ... and {len(items) - shown} more tensors (every one in kt_manifest.json and the --json "
                         "report)")
        return "\n".join(lines)

    def summary(self) -> str:
        tail = ((f"\nthis output is partial: {self.layers} of the model's {self.model_layers} MoE layers "
                 "(--layers); kt_manifest.json says so" if self.partial else "")
                + (f"\nshard {self.shard}: layers {', '.join(map(str, self.layers_held))} of this shard are being "
                   "converted by other processes" if self.layers_held else "")
                + ("\nnot complete yet: other shards' layers are missing; the last shard to finish (or "
                   f"`convert-cpu-weights finalize {self.output}`) completes it" if not self.complete else "")
                + (f"\nkt-kernel SFT: kt_weight_path {self.output} ({KT_SFT_MANIFEST_FILE}); this converter's "
                   f"manifest and records: {self.records}" if self.records and self.complete else ""))
        if not self.layers_converted:
            return (f"nothing to convert: all {plural(self.layers_resumed, 'layer')} were converted by an earlier run "
                    f"-> {self.output}" + tail)
        return (f"{plural(self.layers_converted, 'layer')} converted, {self.layers_resumed} already done, "
                f"{plural(self.experts_per_layer, 'expert')} each ({self.method}, threadpool count {self.threadpool_count}, "
                f"{self.device}): {size(self.input_bytes)} in, {size(self.output_bytes)} out, "
                f"{self.seconds:.1f} s, {rate(self.input_bytes, self.seconds)} -> {self.output}"
                + (f" (and {self.startup_seconds:.1f} s finding the device)" if self.startup_seconds >= 0.5 else "")
                + (f"\nGPU start-up {self.timings['device_init_s']:.1f} s on a background thread (the CPU packed "
                   f"{self.timings.get('cpu_batches_while_device_starts', 0):.0f} batches meanwhile; main thread waited "
                   f"{self.timings.get('device_init_wait_s', 0):.1f} s)" if "device_init_s" in self.timings else "")
                + tail)


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
    source = {"path": os.path.realpath(ckpt.root), "family": plan.family, "input_type": plan.input_type, **plan.source_info,
              "mtp_tensors_skipped": plan.skipped_mtp_keys, **ckpt.fingerprint()}
    return Manifest(method=plan.method.name, threadpool_count=plan.threadpool_count, hidden_size=plan.hidden_size,
                    moe_intermediate_size=plan.moe_intermediate_size, num_experts=plan.num_experts,
                    num_experts_per_tok=plan.num_experts_per_tok, layers=[lp.layer for lp in plan.layers],
                    layout="merged" if opts.merge else "kt-folders", activation=plan.activation,
                    swiglu_limit=plan.swiglu_limit, num_shards=plan.num_shards,
                    model_layers=list(plan.model_layers), partial=plan.partial,
                    source=source, options={"include_non_expert": opts.include_non_expert,
                                            **({"kt_sft_manifest": True} if opts.kt_sft_manifest else {})},
                    converter_version=__version__, format_version=FORMAT_VERSION)


def experts_per_batch(plan: ConversionPlan, others: tuple[ConversionPlan, ...] = (), device: str = "cpu") -> int:
    """Experts per pack batch: BATCH_BYTES of packed bytes, over every output packed from the batch. On the GPU
    GPU_BATCH_BYTES of source or packed bytes, whichever is more, so that batches fit its pinned block."""
    if not plan.layers:
        return 1
    per_expert = sum(max(1, p.layers[0].output_bytes // max(1, plan.num_experts)) for p in (plan, *others))
    limit = BATCH_BYTES
    if device == "cuda":
        per_expert = max(per_expert, plan.layers[0].input_bytes // max(1, plan.num_experts))
        limit = GPU_BATCH_BYTES
    return max(1, min(plan.num_experts, limit // per_expert))


def started_executor(name: str) -> ThreadPoolExecutor:
    """A one-thread executor whose thread already runs. ThreadPoolExecutor starts its thread inside the
    first submit() and registers it only after start() returns; an interrupt (SIGINT/SIGTERM unwinding)
    that lands in between leaves a thread shutdown() cannot wait for, still writing or committing
    while the run unwinds (and closes the files it writes). So the thread is started with a no-op."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    executor.submit(int).result()
    return executor


def convert_layer(reader: LayerReader, plan: ConversionPlan, lp: LayerPlan, outputs: list[LayerOutput],
                  opts: ConvertOptions, progress: Progress, nonfinite: dict[str, int], packer,
                  timings: Timings | None = None, io: ThreadPoolExecutor | None = None,
                  pending: Future | None = None) -> Future | None:
    """Reads layer `lp` once, batch by batch (reader), packs every batch for each output (packer: from
    convert.packers.make_packer, CPU or CUDA, the same bytes) and hands the packed pairs to each output's
    writer on a writer thread while the next batch is packed. NaN/Inf counts come from the first output
    (every output reads the same source values).

    On the GPU a batch is submitted before the previous one's counts are taken and it is handed to the
    writer: one batch is packed while the next is read and uploaded. Its read buffer goes back
    to the reader once the packer is done reading it; its PackTargets come from the packer (pinned memory
    on the GPU, written from in place).

    Without `io`, the layer's writes are done when this returns. With `io` (the run's writer thread) and
    `pending` (the previous layer's last write, still running), the last write of this layer is returned
    still running, so the next layer is packed while it is written: one batch is written while the next
    is packed, across layers too."""
    if io is None:
        with started_executor("kt-writer") as own_io:
            last = convert_layer(reader, plan, lp, outputs, opts, progress, nonfinite, packer, timings, own_io)
            if last is not None:
                last.result()
        return None
    timings = timings or Timings()
    H, I = plan.hidden_size, plan.moe_intermediate_size
    bytes_per_expert = lp.input_bytes // plan.num_experts

    def write_batch(packed):
        with timings.timed("write_s"):
            for out, pairs in zip(outputs, packed):
                for expert, proj, t, dst in pairs:
                    out.writer.write_pair(proj, expert, t, dst.weight, dst.scales)

    def submit(experts, data) -> tuple:
        """Packs one read batch for every output: (experts, handles, packed pairs, source keys)."""
        handles = []
        try:
            shards = [[] for _ in outputs]  # per output: (expert, proj, t, source rows, col0, k)
            keys = []
            for expert in experts:
                for proj in PROJECTIONS:
                    src_ref = lp.experts[expert][proj]
                    src = read_source_matrix(src_ref, data)
                    for out, out_shards in zip(outputs, shards):
                        for t in range(out.threadpool_count):
                            s = shard_slice(proj, H, I, out.threadpool_count, t)
                            out_shards.append((expert, proj, t, src.rows(s.row0, s.n), s.col0, s.k))
                    keys += [src_ref.weight_key] * outputs[0].threadpool_count
            packed = []
            with timings.timed("pack_s"):
                for out, out_shards in zip(outputs, shards):
                    shapes = [(src.shape[0], k) for *_, src, _, k in out_shards]
                    targets = packer.host_memory.targets(out.method, shapes)
                    jobs = [(src, col0, k, dst) for (*_, src, col0, k), dst in zip(out_shards, targets)]
                    handles.append(packer.submit(out.method, jobs))
                    packed.append([(expert, proj, t, dst) for (expert, proj, t, *_), dst in zip(out_shards, targets)])
        except BaseException:
            for h in handles:
                h.wait()  # the device is done with their targets before they can go back to their block
            raise
        finally:
            data.release(after=[h.sources_free for h in handles])  # refilled once the packer has read it
        return experts, handles, packed, keys

    def finish(batch, pending: Future | None) -> Future:
        """Takes a submitted batch's NaN/Inf counts and hands its pairs to the writer after the previous write."""
        experts, handles, packed, keys = batch
        with timings.timed("pack_s"):
            counts = [h.result() for h in handles][0]  # the first output's
        for key, count in zip(keys, counts):
            if count:
                nonfinite[key] = nonfinite.get(key, 0) + count
                if not opts.allow_nonfinite:
                    raise NonFiniteError(
                        f"{reader.where(key)}: tensor {key} holds {nonfinite[key]} NaN/Inf values (layer {lp.layer}); "
                        "the checkpoint is damaged: re-download that file, or pass --allow-nonfinite to pack "
                        "them as 0 (they are listed in the report)")
        if pending is not None:
            with timings.timed("write_wait_s"):
                pending.result()
        pending = io.submit(write_batch, packed)
        progress.advance(bytes_per_expert * len(experts))
        return pending

    in_flight = None  # a batch still on the device, not yet handed to the writer
    try:
        for experts, data in reader.batches(lp):
            batch = submit(experts, data)
            if in_flight is not None:
                pending, in_flight = finish(in_flight, pending), None
            if all(h.done() for h in batch[1]):  # packed already (the CPU): written at once, as before
                pending = finish(batch, pending)
            else:
                in_flight = batch
        if in_flight is not None:
            pending, in_flight = finish(in_flight, pending), None
        for out in outputs:  # every batch is read: the layer's source identity is known (read at commit)
            out.writer.set_source(reader.source_sha256(lp.layer))
    except BaseException:
        for h in in_flight[1] if in_flight is not None else ():
            h.wait()  # the device is done with its targets before they can go back to their block
        if pending is not None:  # never abort a writer (close its file) under a write in flight
            try:
                pending.result()
            except BaseException:  # noqa: S110 - the first error is already propagating
                pass
        raise
    return pending


def layer_writer(out: Path, plan: ConversionPlan, manifest: Manifest, lp: LayerPlan, timings: Timings | None = None):
    """The writer of one layer in the run's layout (MergedShardWriter or KtFolderWriter)."""
    on_hashed = (lambda seconds: timings.add("digest_s", seconds)) if timings is not None else None
    if plan.layout == "merged":
        return MergedShardWriter(out, lp.shard_name, lp.layer, plan.spec.layer_entries(lp.layer),
                                 lambda source_sha256: shard_metadata(manifest, lp.layer, source_sha256),
                                 spec=plan.spec, on_hashed=on_hashed)
    return KtFolderWriter(out, lp.layer, plan.method.name, on_hashed,
                          file_digests=bool(manifest.options.get("kt_sft_manifest")))


def _verify_completed(out: Path, state: Path, manifest: Manifest, progress: Progress) -> dict:
    """Drops completed layers whose files are missing or changed, so they are converted again. Layers
    whose files are the ones recorded as verified (format/verified.py, in `state`: same size, mtime, inode,
    device) are not hashed again; those hashed here and found intact are recorded. Returns the record's entries."""
    entries = read_verified(state)
    hashed = {}
    for layer, rec in sorted(manifest.completed.items()):
        if not _layer_intact(out, rec, entries):
            progress.note(f"layer {layer}: output missing or damaged; converting it again")
            del manifest.completed[layer]
        elif not _recorded(out, rec, entries):
            hashed[layer] = (rec.sha256, rec.files, [out / f for f in rec.files])
    if hashed:
        record_verified(state, entries, hashed)
    return entries


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


def open_source(opts: ConvertOptions, note=print):
    """(checkpoint, download plan or None): a hub id with --download through convert.download, else
    a local folder, file or fully cached hub id."""
    if opts.download or opts.dry_run:
        from .download import open_hub_checkpoint
        from .source import HUB_ID

        m = HUB_ID.match(opts.input_path)
        if m and not Path(opts.input_path).expanduser().exists() and not opts.input_path.startswith((".", "/", "~")):
            if not opts.download:  # a dry run of a cached hub id reads the cache only
                return open_checkpoint(opts.input_path), None
            return open_hub_checkpoint(m["repo"], m["rev"], include_non_expert=opts.include_non_expert,
                                       delete_after_use=opts.delete_source_after_use,
                                       max_source_disk=opts.max_source_disk, dry_run=opts.dry_run, note=note,
                                       workers=opts.download_workers)
    return open_checkpoint(opts.input_path), None


def method_or_exit(opts: ConvertOptions):
    """The method row of --quant-method and --group-size (a FixableError naming what is accepted), after the
    options it needs (--kt-sft-manifest: AMXINT8 .kt folders of every layer)."""
    method = method_for(opts.quant_method, opts.group_size)
    why = kt_sft_output.refusal(method, opts.merge, opts.layers, opts.resume_layer) if opts.kt_sft_manifest else None
    if why:
        raise UserError(why)
    return method


def plan_conversion(ckpt: Checkpoint, opts: ConvertOptions) -> tuple[ConversionPlan, list[tuple[str, str]]]:
    method = method_or_exit(opts)
    layout = "merged" if opts.merge else "kt-folders"
    plan = build_plan(ckpt, method, opts.threadpool_count, layout, opts.input_type,
                      extra_shards=1 if opts.include_non_expert and opts.merge else 0, layers=opts.layers)
    non_expert = (non_expert_tensors(ckpt.key_file, plan.family, plan.routed_keys, str(ckpt.root))
                  if opts.include_non_expert and opts.merge else [])
    return plan, non_expert


def convert(opts: ConvertOptions, shard: ShardSpec | None = None) -> ConversionReport:
    return convert_outputs([opts], shard)[0]


# What every output of one run shares: they are made from one read of the source.
SHARED_OPTIONS = ("input_path", "input_type", "device", "cpuinfer_threads", "allow_nonfinite", "progress", "layers",
                  "download", "delete_source_after_use", "max_source_disk", "dry_run", "download_workers")


def convert_outputs(opts_list: list[ConvertOptions], shard: ShardSpec | None = None) -> list[ConversionReport]:
    """Converts one checkpoint into every output of opts_list (each exactly what convert() alone would write),
    reading each layer once (the decode runs fused into each output's pack call); shard: only that part of
    the layers, beside other processes."""
    probe = time.perf_counter()
    first = opts_list[0]
    for o in opts_list[1:]:
        differ = [k for k in SHARED_OPTIONS if getattr(o, k) != getattr(first, k)]
        if differ:
            raise UserError(f"the outputs of one run share {', '.join(differ)}; run separately to change them")
    check_cpu_threads(first.cpuinfer_threads)
    pack_isa()  # a bad KT_PACK_ISA stops the run before anything is read or written
    methods = [method_or_exit(o) for o in opts_list]  # before a download starts
    if shard is not None and any(o.kt_sft_manifest for o in opts_list):
        raise UserError(kt_sft_output.refusal(methods[0], False, None, None, shard=True))
    choice = _explicit_device(first.device, methods)  # None: --device auto with a GPU, chosen once planned
    start = time.perf_counter()  # the reports' seconds are the conversion's, not the device probe's
    timings = Timings()
    # --device cuda: the GPU starts on a background thread now, while the plan is made and the first
    # batch is read (convert.packers.StartingPacker); otherwise _run makes the packer, after pre-flight
    cuda_now = choice is not None and choice.device == "cuda"
    packer = make_packer("cuda", first.cpuinfer_threads, timings, start) if cuda_now else None
    try:
        reports = _convert_outputs(opts_list, shard, choice, probe, start, packer, timings)
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
        from quant.gpu import NO_GPU_DEVICE, gpu_unavailable_reason

        why = gpu_unavailable_reason()  # a machine without a GPU is told so briefly, one with a GPU why it is unused
        return DeviceChoice("cpu", "no GPU here" if why.startswith(NO_GPU_DEVICE) else f"no GPU to pack on: {why}")
    return None


def auto_device(opts: ConvertOptions) -> DeviceChoice:
    """What --device auto chooses for this conversion, found as a run finds it, without converting
    (scripts/bench_convert.py asks on each machine setting it measures)."""
    choice = _explicit_device("auto", [method_or_exit(opts)])
    if choice is not None:
        return choice
    ckpt = open_checkpoint(opts.input_path)
    try:
        plan, _ = plan_conversion(ckpt, opts)
        return choose_auto(plan, opts, Timings())
    finally:
        ckpt.close()


def choose_auto(plan: ConversionPlan, opts: ConvertOptions, timings: Timings) -> DeviceChoice:
    """--device auto on a machine with a GPU: the CPU or the GPU, whichever converts faster here
    (convert.device_choice, from probes of this machine)."""
    with timings.timed("device_choice_s"):
        return choose_device(measure_capabilities(plan, plan.layers, opts.cpuinfer_threads, None))


def _convert_outputs(opts_list: list[ConvertOptions], shard: ShardSpec | None, choice: DeviceChoice | None,
                     probe: float, start: float, packer, timings: Timings) -> list[ConversionReport]:
    """Opens the source once (a hub download starts here), plans every output from it and runs them."""
    ckpt, _ = open_source(opts_list[0], note=lambda m: Progress(0, 0, False).note(m))
    try:
        jobs = [plan_output(ckpt, o) for o in opts_list]
        seen: dict[Path, int] = {}
        for i, job in enumerate(jobs):
            job.out = resolve_output_dir(job.opts.output, ckpt.root)
            job.state = records_dir(job.out, ckpt.root) if job.opts.kt_sft_manifest else job.out
            for folder in dict.fromkeys((job.out, job.state)):  # an output, or the records folder of one
                if folder in seen:
                    raise UserError(f"output {folder} is named twice (outputs {seen[folder] + 1} and {i + 1}): "
                                    "give each output its own directory (e.g. a template with {method} and "
                                    "{threadpool_count})")
                seen[folder] = i
        for job in jobs[1:]:
            if [(lp.layer, lp.experts) for lp in job.plan.layers] != [(lp.layer, lp.experts) for lp in jobs[0].plan.layers]:
                raise RuntimeError("the outputs of one run planned different source layers")
        if choice is None:
            choice = choose_auto(jobs[0].plan, jobs[0].opts, timings)
        reports = _run(ckpt, jobs, choice, start, shard, packer, timings)
        for report in reports:
            report.startup_seconds = start - probe
        return reports
    finally:
        ckpt.close()


@dataclass
class OutputJob:
    """One output of a run: its options and plan, then its directory and where it stands."""

    opts: ConvertOptions
    plan: ConversionPlan
    non_expert: list[tuple[str, str]]
    out: Path | None = None
    state: Path | None = None  # where the manifest, lock and records go: `out`, or OUT.kt-convert (--kt-sft-manifest)
    manifest: Manifest | None = None
    lock: OutputLock | None = None  # a single process: held for the whole run
    shared: SharedOutput | None = None  # --shard: per-layer claims instead
    verified: dict = field(default_factory=dict)  # a single process: the record of verified layers (format/verified.py)
    todo: list[int] = field(default_factory=list)
    claims: dict[int, Claim] = field(default_factory=dict)
    held: dict[int, Held] = field(default_factory=dict)  # layers of our shard other processes are converting
    resumed: int = 0
    complete: bool = False
    adopted: bool = False  # --resume-layer: layers of kt's own script kept (byte-identical to ours)
    created: list[Path] = field(default_factory=list)  # folders this run made: removed again if still empty

    def layer_plan(self, layer: int) -> LayerPlan:
        return next(lp for lp in self.plan.layers if lp.layer == layer)

    def release(self) -> None:
        for claim in self.claims.values():
            claim.release()
        self.claims.clear()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def plan_output(ckpt: Checkpoint, opts: ConvertOptions) -> OutputJob:
    return OutputJob(opts, *plan_conversion(ckpt, opts))


SHARED_LOCK_WAIT_S = 600.0  # --shard processes hold the output's lock for moments; a single run for its whole length


def _open_single(ckpt: Checkpoint, job: OutputJob, device: str, progress: Progress) -> None:
    """The run-long lock, the manifest to continue from, the layers still to do."""
    out, state, opts = job.out, job.state, job.opts
    job.lock = OutputLock(state)
    planned = planned_manifest(job.plan, ckpt, opts)
    job.adopted = opts.resume_layer is not None and not opts.overwrite and kt_started_layout(out) is not None
    if job.adopted:  # kt's own script started this output: keep its layers if they are ours byte for byte
        _adopt_kt_layers(ckpt, job.plan, out, planned, opts, device, progress)
    _refuse_changed_source(state, planned, opts.overwrite)
    check_no_live_shards(state)
    job.manifest = prepare_output(out, ckpt.root, planned, opts.overwrite, state=state)
    job.manifest.completed.update(read_records(state, job.manifest))  # layers --shard processes finished here
    job.verified = _verify_completed(out, state, job.manifest, progress)
    job.todo = [lp.layer for lp in job.plan.layers if lp.layer not in job.manifest.completed]
    job.resumed = len(job.plan.layers) - len(job.todo)


def _open_shared(ckpt: Checkpoint, job: OutputJob, shard: ShardSpec, progress: Progress) -> None:
    """Sets the shared directory up (once, under the lock held for a moment), then claims the layers of
    our shard that are neither recorded done nor claimed by a live process."""
    out, opts = job.out, job.opts
    if opts.overwrite:
        raise UserError("--overwrite cannot be combined with --shard (each process would erase the others' "
                        "layers): empty the output directory before starting the shards")
    planned = planned_manifest(job.plan, ckpt, opts)
    lock = OutputLock(out, wait_s=SHARED_LOCK_WAIT_S)
    try:
        _refuse_changed_source(out, planned, False)
        job.manifest = prepare_output(out, ckpt.root, planned, False, shared=True)
        if job.manifest is planned:
            write_manifest(out, planned)
        elif job.manifest.complete:
            fsio.remove(out / SHARD_DIR)  # a finalize that stopped just before this
    finally:
        lock.release()
    mine = shard_layers([lp.layer for lp in job.plan.layers], shard)
    progress.note(f"{job.out}: shard {shard} (from {shard.origin}): layers {layer_spec(mine) or 'none'}")
    if job.manifest.complete:
        job.complete, job.resumed = True, len(mine)
        return
    job.shared = SharedOutput(out)
    job.shared.record_split(shard)
    job.manifest.completed.update(job.shared.records(job.manifest))
    verified = read_verified(out)  # read only: a shard writes the record under the lock (_record_verified)
    for layer in mine:
        rec = job.manifest.completed.get(layer)
        if rec is not None and _layer_intact(out, rec, verified):
            job.resumed += 1
            continue
        claim = job.shared.claim(layer)
        if isinstance(claim, Held):
            job.held[layer] = claim
            continue
        job.claims[layer] = claim
    # a layer recorded between our look and our claim is done: give its claim back
    job.manifest.completed.update(job.shared.records(job.manifest))
    for layer in list(job.claims):
        rec = job.manifest.completed.get(layer)
        if rec is not None and _layer_intact(out, rec, read_verified(out)):
            job.claims.pop(layer).release()
            job.resumed += 1
        elif rec is not None:
            progress.note(f"layer {layer}: output missing or damaged; converting it again")
            job.shared.drop_record(layer)
            del job.manifest.completed[layer]
    job.todo = [layer for layer in mine if layer in job.claims]
    for layer, held in sorted(job.held.items()):
        progress.note(f"layer {layer}: skipped, {held.describe()}")


def _preflight(ckpt: Checkpoint, jobs: list[OutputJob], batch_experts: int, progress: Progress,
               gate=None, layer_files=None, pinned_bytes: int = 0) -> None:
    """Disk per output directory (outputs on one filesystem add up), memory for every output's batch and the
    GPU's pinned block (pinned_bytes); with a download in progress (gate, convert.download), the source's disk
    beside the outputs."""
    estimates = []
    by_device: dict[int, list] = {}
    for job in jobs:
        todo = [job.layer_plan(layer) for layer in job.todo]
        est = preflight.estimate(job.plan, todo, batch_experts, job.opts.cpuinfer_threads,
                                 preflight.non_expert_bytes(ckpt, job.non_expert) if not job.shared else 0)
        copied = preflight.copied_bytes(ckpt.root, COPIED_FILES)
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
    if gate is not None:
        source_peak = gate.peak_source_bytes(layer_files)
        preflight.check_source_disk(source_peak, gate.cache, jobs[0].out, sum(e.disk_bytes for e in estimates))
        progress.note(preflight.describe_source(source_peak, gate))


def _run(ckpt: Checkpoint, jobs: list[OutputJob], choice: DeviceChoice, start: float, shard: ShardSpec | None,
         packer, timings: Timings) -> list[ConversionReport]:
    """The run itself; `packer` is the one started by convert_outputs() (--device cuda) or None (made here)."""
    device = choice.device
    opts = jobs[0].opts  # the options every output shares (SHARED_OPTIONS)
    plan = jobs[0].plan  # the source side: the same for every output
    progress = Progress(0, len(plan.layers), opts.progress)
    shown: set[str] = set()
    try:
        for job in jobs:
            for line in plan_lines(job.plan, ckpt.root, job.out, device, job.state if job.state != job.out else None,
                                   default_group=job.opts.group_size is None, reason=choice.reason):
                if line not in shown:  # several outputs: the source and model lines once
                    shown.add(line)
                    progress.note(line)
            try:
                job.created = created_dirs(job.out)
                fsio.make_dirs(job.out)
                if job.state != job.out:  # removed first if still empty
                    job.created[:0] = created_dirs(job.state)
                    fsio.real_dir(job.state)
                if shard is None:
                    _open_single(ckpt, job, device, progress)
                else:
                    _open_shared(ckpt, job, shard, progress)
            except OSError as e:
                raise _os_error(e, job.out) from None
            if shard is None:
                done = [lp.layer for lp in job.plan.layers if lp.layer not in job.todo]
                if resume_line(done, len(job.plan.layers)):
                    progress.note((f"{job.out}: " if len(jobs) > 1 else "") + resume_line(done, len(job.plan.layers)))
        if opts.resume_layer is not None and not any(job.adopted for job in jobs):
            progress.note("--resume-layer is not needed: completed layers are found in kt_manifest.json; "
                          "every missing layer is converted")
        needed = {layer: [job for job in jobs if layer in job.todo] for layer in (lp.layer for lp in plan.layers)}
        todo = [lp for lp in plan.layers if needed[lp.layer]]
        batch_experts = experts_per_batch(plan, tuple(job.plan for job in jobs[1:]), device)
        gate = getattr(ckpt, "gate", None)  # a hub download in progress (convert.download)
        if gate is not None:
            layer_files = ckpt.layer_files(todo)
            pinned = {ckpt.key_file[src] for job in jobs for src, _ in job.non_expert}
            gate.check_cap(layer_files)
        _preflight(ckpt, jobs, batch_experts, progress, gate, layer_files if gate is not None else None,
                   pinned_bytes(device))
        for job in jobs:
            if job.lock is not None:
                write_manifest(job.state, job.manifest)
                if job.todo and job.state != job.out:  # kt must not load a tree whose layers are being replaced
                    fsio.remove(job.out / KT_SFT_MANIFEST_FILE)
        if gate is not None:
            gate.schedule(layer_files, pinned)
        progress.close()
        # a resumed single run counts layers over the whole model; a shard over its own layers to do
        progress = (Progress(sum(lp.input_bytes for lp in todo), len(plan.layers), opts.progress,
                             done_layers=len(plan.layers) - len(todo)) if shard is None else
                    Progress(sum(lp.input_bytes for lp in todo), len(todo), opts.progress))
        own_packer = packer is None
        if own_packer:
            packer = make_packer(device, opts.cpuinfer_threads, timings, start)
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
                        writers.append((job, layer_writer(job.out, job.plan, job.manifest, job.layer_plan(lp.layer), timings)))
                    last_write = convert_layer(
                        reader, plan, lp, [LayerOutput(job.plan.method, job.plan.threadpool_count, w) for job, w in writers],
                        opts, progress, nonfinite, packer, timings, io, last_write)
                except BaseException:
                    io.submit(int).result()  # the writes in flight end before the writers close their files
                    for _, w in writers:
                        w.abort()
                    raise
                # handed to the commit thread at once (it commits after the layer's last write), then
                # the previous layer's commit is awaited: an interrupt there finds the writers committing
                commit = committer.submit(_commit_layer, writers, lp.layer, last_write, timings,
                                          gate.layer_committed if gate is not None else None, nonfinite)
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
                    if job.lock is not None:
                        _finish(ckpt, job.plan, job.out, job.manifest, job.opts, job.non_expert, job.state)
                        fsio.remove(job.state / SHARD_DIR)  # records of --shard runs it resumed, now in the manifest
                        job.complete = True
                    elif job.shared is not None:
                        job.complete = finalize_shared(ckpt, job, progress) is None
            if gate is not None:
                gate.finished()
        finally:
            io.shutdown(wait=True)  # never leave a write or commit running past the lock
            committer.shutdown(wait=True)
            if gate is not None:
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
    return [_report(job, choice, seconds, shard, timings) for job in jobs]


def _report(job: OutputJob, choice: DeviceChoice, seconds: float, shard: ShardSpec | None,
            timings: Timings) -> ConversionReport:
    plan, done = job.plan, set(job.todo)
    # the output's NaN/Inf values packed as 0: of this run's layers and of those an earlier run converted
    nonfinite = {key: n for _, rec in sorted(job.manifest.completed.items()) for key, n in rec.nonfinite.items()}
    lps = [lp for lp in plan.layers if lp.layer in done]
    return ConversionReport(
        output=str(job.out), family=plan.family, input_type=plan.input_type, method=plan.method.name,
        kt_method=plan.method.kt_method, threadpool_count=plan.threadpool_count, device=choice.device,
        device_reason=choice.reason,
        layers=len(plan.layers), layers_converted=len(lps), layers_resumed=job.resumed,
        experts_per_layer=plan.num_experts, mtp_tensors_skipped=plan.skipped_mtp_keys,
        input_bytes=sum(lp.input_bytes for lp in lps), output_bytes=sum(lp.output_bytes for lp in lps),
        seconds=seconds, nonfinite=nonfinite, partial=plan.partial, model_layers=len(plan.model_layers),
        shard=str(shard) if shard else "", layers_held=sorted(job.held), complete=job.complete,
        timings=timings.to_dict(), records=str(job.state) if job.state != job.out else "")


def _recorded(out: Path, rec, entries: dict) -> bool:
    """The layer's files are those recorded as verified with this sha256 (nothing to hash)."""
    return is_verified(entries, rec.layer, rec.sha256, rec.files, [out / f for f in rec.files])


def _layer_intact(out: Path, rec, entries: dict) -> bool:
    """Sizes always; sha256 unless the files are the ones recorded as verified (`entries`)."""
    sizes = [fsio.regular_size_below(out, f) for f in rec.files]  # never read through a link
    return None not in sizes and sum(sizes) == rec.nbytes and (
        _recorded(out, rec, entries) or tree_sha256_files([out / f for f in rec.files]) == rec.sha256)


RECORD_LOCK_WAIT_S = 2.0  # a --shard process waits this long for the output's lock to record a layer verified


def _record_verified(job: OutputJob, record) -> None:
    """Records a committed layer as verified (its digest was computed from the bytes as they were written):
    a single process adds it to the entries it holds, under its run-long lock; a --shard process merges it
    into the record on disk under the output's lock, so concurrent shards never lose each other's layers.
    When that lock stays taken (another process finalizing), the layer goes unrecorded: the record is a
    cache, and the loader or a later run hashes that layer instead."""
    layers = {record.layer: (record.sha256, record.files, [job.out / f for f in record.files])}
    if job.shared is None:
        record_verified(job.state, job.verified, layers)
        return
    try:
        lock = OutputLock(job.out, wait_s=RECORD_LOCK_WAIT_S)
    except (UserError, OSError):
        return
    try:
        add_verified(job.out, layers)
    finally:
        lock.release()


def finalize_shared(ckpt: Checkpoint, job: OutputJob, progress: Progress | None = None) -> list[int] | None:
    """Completes a shared output once every layer is recorded: merges the records into the manifest, writes
    the copied files, the non-expert shard and the index, marks it complete, removes OUT/.kt_shards.
    Idempotent and exclusive (under the output's lock): None when the output is (now or already)
    complete, else the layers still missing (nothing written)."""
    out = job.out
    lock = OutputLock(out, wait_s=SHARED_LOCK_WAIT_S)
    try:
        manifest = read_manifest(out)
        if manifest is None:
            raise UserError(f"{out}: no {MANIFEST_FILE}; this is not a conversion output")
        if not manifest.complete:
            manifest.completed.update(read_records(out, manifest))
            missing = [layer for layer in manifest.layers if layer not in manifest.completed]
            if missing:
                return missing
            for layer, rec in sorted(manifest.completed.items()):
                sizes = [fsio.regular_size_below(out, f) for f in rec.files]
                if None in sizes or sum(sizes) != rec.nbytes:
                    raise UserError(f"{out}: layer {layer} is recorded done but its files are missing or of the "
                                    "wrong size; re-run its shard (it converts the layer again), then finalize")
            planned = planned_manifest(job.plan, ckpt, job.opts)
            _refuse_changed_source(out, planned, False)
            prepare_output(out, ckpt.root, planned, False)  # no layer is being written: every temporary is stale
            write_manifest(out, manifest)  # the records are in the manifest before their folder goes
            _finish(ckpt, job.plan, out, manifest, job.opts, job.non_expert)
            if progress is not None:
                progress.note(f"every layer is converted: {out} is complete")
        fsio.remove(out / SHARD_DIR)
        return None
    finally:
        lock.release()


def _adopt_kt_layers(ckpt: Checkpoint, plan: ConversionPlan, out: Path, manifest: Manifest, opts: ConvertOptions,
                     device: str, progress: Progress) -> None:
    packer = make_packer(device, opts.cpuinfer_threads)
    try:
        adopt_kt_layers(out, plan, manifest, opts.resume_layer, convert_layer, opts, progress, packer,
                        default_read_threads(), experts_per_batch(plan), ckpt)
    finally:
        packer.close()


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


def _commit_layer(writers: list, layer: int, last_write: Future | None = None, timings: Timings | None = None,
                  on_commit=None, nonfinite: dict[str, int] | None = None) -> None:
    """Commits layer `layer` in each output (job, writer) once its last write (on the writer thread) is
    done, and records it there: in the manifest (a single process) or in its own record file, releasing
    its claim (--shard). A failed write or commit aborts the writers not yet committed. on_commit(layer): called once the
    layer is safe on disk in every output (a downloaded source may go). nonfinite: the layer's NaN/Inf
    counts, kept in its record."""
    try:
        if last_write is not None:
            last_write.result()
    except BaseException:
        for _, w in writers:
            w.abort()
        raise
    for i, (job, writer) in enumerate(writers):
        try:
            with timings.timed("commit_s") if timings is not None else contextlib.nullcontext():
                record = writer.commit()
            record.nonfinite = dict(nonfinite or {})
        except BaseException:
            for _, w in writers[i:]:
                w.abort()
            raise
        job.manifest.completed[layer] = record
        if job.shared is not None:
            job.shared.record(record)
            job.claims.pop(layer).release()
        else:
            write_manifest(job.state, job.manifest)
        _record_verified(job, record)
    if on_commit is not None:  # the layer is safe on disk: its source may go
        on_commit(layer)


def _finish(ckpt: Checkpoint, plan: ConversionPlan, out: Path, manifest: Manifest, opts: ConvertOptions,
            non_expert: list[tuple[str, str]], state: Path | None = None) -> None:
    """state: where the manifest and the copied model files go (OUT.kt-convert with --kt-sft-manifest)."""
    # the index (kt's SFT manifest) is what kt-kernel loads: it is written last, after every shard and copied file
    state = state or out
    copy_model_files(ckpt.root, state, COPIED_FILES)
    write_quantization_config(state, plan.method)
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
    if opts.kt_sft_manifest:
        kt_sft_output.write_weight_manifest(out, manifest)
    manifest.complete = True
    write_manifest(state, manifest)


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
