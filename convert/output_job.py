"""One output of a run (convert.pipeline runs them): planned from the source and its OutputSpec, then prepared
(a single process: the run-long lock, the manifest to continue from; a --shard process: per-layer claims
beside the other processes), a writer per layer, each layer committed and recorded, the output finished (a
shared one finalized by whichever process completes it), and its report."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.digest import tree_sha256_files
from kt_convert.kt_runtime.format.errors import ManifestError
from kt_convert.kt_runtime.format.names import FORMAT_VERSION, KT_SFT_MANIFEST_FILE, MANIFEST_FILE, shard_file_name
from kt_convert.kt_runtime.format.manifest import Manifest, read_manifest, shard_metadata, write_manifest
from kt_convert.kt_runtime.format.methods import QuantMethod, method_for
from kt_convert.kt_runtime.format.verified import add_verified, is_verified, read_verified, record_verified
from kt_convert.kt_runtime.format.writer import (KtFolderWriter, MergedShardWriter, write_index,
                                                 write_quantization_config)

from . import __version__, kt_sft_output, preflight
from .claims import Claim, Held
from .device_choice import DeviceChoice
from .errors import UserError
from .kt_resume import adopt_kt_layers, kt_started_layout
from .non_expert import non_expert_tensors
from .options import OutputSpec, RunOptions
from .output_dir import (SHARD_DIR, OutputLock, copy_model_files, created_dirs, prepare_output, records_dir,
                         resolve_output_dir)
from .packers import make_packer
from .plan import ConversionPlan, LayerPlan, build_plan, layer_spec
from .progress import Progress
from .report import ConversionReport
from .shards import ShardSpec, shard_layers
from .shared_output import SharedOutput, check_no_live_shards, read_records
from .source import COPIED_FILES, Checkpoint, describe_source_change
from .timings import Timings

SHARED_LOCK_WAIT_S = 600.0  # --shard processes hold the output's lock for moments; a single run for its whole length
RECORD_LOCK_WAIT_S = 2.0  # a --shard process waits this long for the output's lock to record a layer verified


def method_or_exit(run: RunOptions, spec: OutputSpec) -> QuantMethod:
    """The method row of the output's quant method and group size (a FixableError naming what is accepted),
    after the options it needs (--kt-sft-manifest: AMXINT8 .kt folders of every layer)."""
    method = method_for(spec.quant_method, spec.group_size)
    if spec.kt_sft_manifest:
        why = kt_sft_output.refusal(method, spec.merge, run.layers, spec.resume_layer)
        if why:
            raise UserError(why)
    return method


def plan_output(ckpt: Checkpoint, run: RunOptions, spec: OutputSpec) -> tuple[ConversionPlan, list[tuple[str, str]]]:
    """The output's plan and the non-expert tensors it copies ((source key, kt's name); --include-non-expert)."""
    method = method_or_exit(run, spec)
    layout = "merged" if spec.merge else "kt-folders"
    with_non_expert = spec.include_non_expert and spec.merge
    plan = build_plan(ckpt, method, spec.threadpool_count, layout, run.input_type,
                      extra_shards=1 if with_non_expert else 0, layers=run.layers)
    if not with_non_expert:
        return plan, []
    return plan, non_expert_tensors(ckpt.key_file, plan.family, plan.routed_keys, str(ckpt.root))


@dataclass
class OutputJob:
    """One output of a run: its options and plan, then its directory and where it stands."""

    ckpt: Checkpoint
    run: RunOptions
    spec: OutputSpec
    plan: ConversionPlan
    non_expert: list[tuple[str, str]]
    out: Path
    state: Path  # where the manifest, lock and records go: `out`, or OUT.kt-convert (--kt-sft-manifest)
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

    @classmethod
    def planned(cls, ckpt: Checkpoint, run: RunOptions, spec: OutputSpec) -> OutputJob:
        """The output planned from the source, its folders found (nothing created yet)."""
        plan, non_expert = plan_output(ckpt, run, spec)
        out = resolve_output_dir(spec.output, ckpt.root)
        state = records_dir(out, ckpt.root) if spec.kt_sft_manifest else out
        return cls(ckpt, run, spec, plan, non_expert, out, state)

    def layer_plan(self, layer: int) -> LayerPlan:
        return next(lp for lp in self.plan.layers if lp.layer == layer)

    # -- prepare ------------------------------------------------------------------------------------

    def prepare(self, device: str, progress: Progress, shard: ShardSpec | None) -> None:
        """Creates the output's folders and takes the output: a single process its run-long lock (resuming what
        an earlier run committed), a --shard process the claims of its layers still to do."""
        self.created = created_dirs(self.out)
        fsio.make_dirs(self.out)
        if self.state != self.out:  # removed first if still empty
            self.created[:0] = created_dirs(self.state)
            fsio.real_dir(self.state)
        if shard is None:
            self._prepare_single(device, progress)
        else:
            self._prepare_shared(shard, progress)

    def _prepare_single(self, device: str, progress: Progress) -> None:
        """The run-long lock, the manifest to continue from, the layers still to do."""
        out, state, spec = self.out, self.state, self.spec
        self.lock = OutputLock(state)
        planned = self.planned_manifest()
        self.adopted = spec.resume_layer is not None and not spec.overwrite and kt_started_layout(out) is not None
        if self.adopted:  # kt's own script started this output: keep its layers if they are ours byte for byte
            self._adopt_kt_layers(planned, device, progress)
        _refuse_changed_source(state, planned, spec.overwrite)
        check_no_live_shards(state)
        self.manifest = prepare_output(out, self.ckpt.root, planned, spec.overwrite, state=state)
        self.manifest.completed.update(read_records(state, self.manifest))  # layers --shard processes finished here
        self.verified = _verify_completed(out, state, self.manifest, progress)
        self.todo = [lp.layer for lp in self.plan.layers if lp.layer not in self.manifest.completed]
        self.resumed = len(self.plan.layers) - len(self.todo)

    def _adopt_kt_layers(self, planned: Manifest, device: str, progress: Progress) -> None:
        packer = make_packer(device, self.run.cpuinfer_threads)
        try:
            adopt_kt_layers(self.out, self.plan, planned, self.spec.resume_layer, self.run, progress, packer, self.ckpt)
        finally:
            packer.close()

    def _prepare_shared(self, shard: ShardSpec, progress: Progress) -> None:
        """Sets the shared directory up (once, under the lock held for a moment), then claims the layers of
        our shard that are neither recorded done nor claimed by a live process."""
        out = self.out
        if self.spec.overwrite:
            raise UserError("--overwrite cannot be combined with --shard (each process would erase the others' "
                            "layers): empty the output directory before starting the shards")
        planned = self.planned_manifest()
        lock = OutputLock(out, wait_s=SHARED_LOCK_WAIT_S)
        try:
            _refuse_changed_source(out, planned, False)
            self.manifest = prepare_output(out, self.ckpt.root, planned, False, shared=True)
            if self.manifest is planned:
                write_manifest(out, planned)
            elif self.manifest.complete:
                fsio.remove(out / SHARD_DIR)  # a finalize that stopped just before this
        finally:
            lock.release()
        mine = shard_layers([lp.layer for lp in self.plan.layers], shard)
        progress.note(f"{out}: shard {shard} (from {shard.origin}): layers {layer_spec(mine) or 'none'}")
        if self.manifest.complete:
            self.complete, self.resumed = True, len(mine)
            return
        self.shared = SharedOutput(out)
        self.shared.record_split(shard)
        self.manifest.completed.update(self.shared.records(self.manifest))
        verified = read_verified(out)  # read only: a shard writes the record under the lock (_record_verified)
        for layer in mine:
            rec = self.manifest.completed.get(layer)
            if rec is not None and _layer_intact(out, rec, verified):
                self.resumed += 1
                continue
            claim = self.shared.claim(layer)
            if isinstance(claim, Held):
                self.held[layer] = claim
                continue
            self.claims[layer] = claim
        # a layer recorded between our look and our claim is done: give its claim back
        self.manifest.completed.update(self.shared.records(self.manifest))
        for layer in list(self.claims):
            rec = self.manifest.completed.get(layer)
            if rec is not None and _layer_intact(out, rec, read_verified(out)):
                self.claims.pop(layer).release()
                self.resumed += 1
            elif rec is not None:
                progress.note(f"layer {layer}: output missing or damaged; converting it again")
                self.shared.drop_record(layer)
                del self.manifest.completed[layer]
        self.todo = [layer for layer in mine if layer in self.claims]
        for layer, held in sorted(self.held.items()):
            progress.note(f"layer {layer}: skipped, {held.describe()}")

    def planned_manifest(self) -> Manifest:
        plan, ckpt, spec = self.plan, self.ckpt, self.spec
        source = {"path": os.path.realpath(ckpt.root), "family": plan.family, "input_type": plan.input_type,
                  **plan.source_info, "mtp_tensors_skipped": plan.skipped_mtp_keys, **ckpt.fingerprint()}
        return Manifest(method=plan.method.name, threadpool_count=plan.threadpool_count, hidden_size=plan.hidden_size,
                        moe_intermediate_size=plan.moe_intermediate_size, num_experts=plan.num_experts,
                        num_experts_per_tok=plan.num_experts_per_tok, layers=[lp.layer for lp in plan.layers],
                        layout=plan.layout, activation=plan.activation,
                        swiglu_limit=plan.swiglu_limit, num_shards=plan.num_shards,
                        model_layers=list(plan.model_layers), partial=plan.partial,
                        source=source, options={"include_non_expert": spec.include_non_expert,
                                                **({"kt_sft_manifest": True} if spec.kt_sft_manifest else {})},
                        converter_version=__version__, format_version=FORMAT_VERSION)

    def estimate(self, batch_experts: int) -> preflight.Estimate:
        """Disk and memory of what this output still writes, in pack batches of `batch_experts` experts."""
        todo = [self.layer_plan(layer) for layer in self.todo]
        extra = preflight.non_expert_bytes(self.ckpt, self.non_expert) if not self.shared else 0
        return preflight.estimate(self.plan, todo, batch_experts, self.run.cpuinfer_threads, extra)

    def start(self) -> None:
        """Past the pre-flight: a single process writes its manifest (the layers it resumes), and takes kt's
        SFT manifest away while layers are replaced (kt must not load such a tree)."""
        if self.lock is None:
            return
        write_manifest(self.state, self.manifest)
        if self.todo and self.state != self.out:
            fsio.remove(self.out / KT_SFT_MANIFEST_FILE)

    # -- write and commit ---------------------------------------------------------------------------

    def writer(self, lp: LayerPlan, timings: Timings | None = None):
        """The writer of one layer in the output's form (MergedShardWriter or KtFolderWriter)."""
        on_hashed = (lambda seconds: timings.add("digest_s", seconds)) if timings is not None else None
        if self.plan.layout == "merged":
            return MergedShardWriter(self.out, lp.shard_name, lp.layer, self.plan.spec.layer_entries(lp.layer),
                                     lambda source_sha256: shard_metadata(self.manifest, lp.layer, source_sha256),
                                     spec=self.plan.spec, on_hashed=on_hashed)
        return KtFolderWriter(self.out, lp.layer, self.plan.method.name, on_hashed,
                              file_digests=bool(self.manifest.options.get("kt_sft_manifest")))

    def commit(self, layer: int, writer, nonfinite: dict[str, int], timings: Timings) -> None:
        """Commits the layer's files (writer; its last write done) and records the layer: in the manifest (a
        single process) or in its own record file, releasing its claim (--shard); then as verified. nonfinite:
        the layer's NaN/Inf counts, kept in its record."""
        with timings.timed("commit_s"):
            record = writer.commit()
        record.nonfinite = dict(nonfinite)
        self.manifest.completed[layer] = record
        if self.shared is not None:
            self.shared.record(record)
            self.claims.pop(layer).release()
        else:
            write_manifest(self.state, self.manifest)
        _record_verified(self, record)

    # -- finish -------------------------------------------------------------------------------------

    def finish(self, progress: Progress) -> None:
        """Every layer of this run is committed: a single process completes the output; a --shard process
        completes it if every shard's layers are recorded (finalize)."""
        if self.lock is not None:
            self._complete(self.manifest)
            fsio.remove(self.state / SHARD_DIR)  # records of --shard runs it resumed, now in the manifest
            self.complete = True
        elif self.shared is not None:
            self.complete = self.finalize(progress) is None

    def finalize(self, progress: Progress | None = None) -> list[int] | None:
        """Completes a shared output once every layer is recorded: merges the records into the manifest, writes
        the copied files, the non-expert shard and the index, marks it complete, removes OUT/.kt_shards.
        Idempotent and exclusive (under the output's lock): None when the output is (now or already)
        complete, else the layers still missing (nothing written)."""
        out = self.out
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
                planned = self.planned_manifest()
                _refuse_changed_source(out, planned, False)
                prepare_output(out, self.ckpt.root, planned, False)  # no layer is being written: temporaries are stale
                write_manifest(out, manifest)  # the records are in the manifest before their folder goes
                self._complete(manifest)
                if progress is not None:
                    progress.note(f"every layer is converted: {out} is complete")
            fsio.remove(out / SHARD_DIR)
            return None
        finally:
            lock.release()

    def _complete(self, manifest: Manifest) -> None:
        """Model files copied, the index (kt's SFT manifest) written last, after every shard and copied file (it
        is what kt-kernel loads), the manifest marked complete."""
        ckpt, plan, out, state = self.ckpt, self.plan, self.out, self.state
        copy_model_files(ckpt.root, state, COPIED_FILES)
        write_quantization_config(state, plan.method)
        if self.spec.merge:
            spec = plan.spec
            weight_map = {key: lp.shard_name for lp in plan.layers for key, _, _ in spec.layer_entries(lp.layer)}
            total = plan.output_bytes
            if self.spec.include_non_expert:
                count = plan.num_shards
                extra_map, extra_bytes = _write_non_expert_shard(ckpt, out, shard_file_name(count, count),
                                                                 self.non_expert)
                weight_map.update(extra_map)
                total += extra_bytes
        ckpt.check_unchanged()  # every byte converted was read from the source files as they were when opened
        if self.spec.merge:
            write_index(out, weight_map, total)
        if self.spec.kt_sft_manifest:
            kt_sft_output.write_weight_manifest(out, manifest)
        manifest.complete = True
        write_manifest(state, manifest)

    # -- report and release -------------------------------------------------------------------------

    def report(self, choice: DeviceChoice, seconds: float, shard: ShardSpec | None, timings: Timings) -> ConversionReport:
        plan, done = self.plan, set(self.todo)
        # the output's NaN/Inf values packed as 0: of this run's layers and of those an earlier run converted
        nonfinite = {key: n for _, rec in sorted(self.manifest.completed.items()) for key, n in rec.nonfinite.items()}
        lps = [lp for lp in plan.layers if lp.layer in done]
        return ConversionReport(
            output=str(self.out), family=plan.family, input_type=plan.input_type, method=plan.method.name,
            kt_method=plan.method.kt_method, threadpool_count=plan.threadpool_count, device=choice.device,
            device_reason=choice.reason,
            layers=len(plan.layers), layers_converted=len(lps), layers_resumed=self.resumed,
            experts_per_layer=plan.num_experts, mtp_tensors_skipped=plan.skipped_mtp_keys,
            input_bytes=sum(lp.input_bytes for lp in lps), output_bytes=sum(lp.output_bytes for lp in lps),
            seconds=seconds, nonfinite=nonfinite, partial=plan.partial, model_layers=len(plan.model_layers),
            shard=str(shard) if shard else "", layers_held=sorted(self.held), complete=self.complete,
            timings=timings.to_dict(), records=str(self.state) if self.state != self.out else "")

    def release(self) -> None:
        for claim in self.claims.values():
            claim.release()
        self.claims.clear()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _recorded(out: Path, rec, entries: dict) -> bool:
    """The layer's files are those recorded as verified with this sha256 (nothing to hash)."""
    return is_verified(entries, rec.layer, rec.sha256, rec.files, [out / f for f in rec.files])


def _layer_intact(out: Path, rec, entries: dict) -> bool:
    """Sizes always; sha256 unless the files are the ones recorded as verified (`entries`)."""
    sizes = [fsio.regular_size_below(out, f) for f in rec.files]  # never read through a link
    return None not in sizes and sum(sizes) == rec.nbytes and (
        _recorded(out, rec, entries) or tree_sha256_files([out / f for f in rec.files]) == rec.sha256)


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
