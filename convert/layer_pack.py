"""One layer of a run: its source read once, batch by batch, packed for every output and written pair by pair
on the run's writer thread while the next batch is packed (convert.pipeline runs it layer after layer)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from kt_runtime.format.layout import PROJECTIONS, shard_slice
from quant.cpu import PackTarget

from .errors import NonFiniteError
from .layer_io import LayerOutput, LayerReader
from .options import RunOptions
from .plan import ConversionPlan, LayerPlan, read_source_matrix
from .progress import Progress
from .timings import Timings

BATCH_BYTES = 64 << 20  # packed bytes per pack call: enough tasks for every core, bounded memory


def experts_per_batch(plan: ConversionPlan, others: tuple[ConversionPlan, ...] = ()) -> int:
    """Experts per pack batch: BATCH_BYTES of packed bytes, over every output packed from the batch."""
    if not plan.layers:
        return 1
    per_expert = sum(max(1, p.layers[0].output_bytes // max(1, plan.num_experts)) for p in (plan, *others))
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
                  run: RunOptions, progress: Progress, nonfinite: dict[str, int], packer,
                  timings: Timings | None = None, io: ThreadPoolExecutor | None = None,
                  pending: Future | None = None) -> Future | None:
    """Reads layer `lp` once, batch by batch (reader), packs every batch for each output (packer: from
    convert.packers.make_packer, CPU or CUDA, the same bytes) and hands the packed pairs to each output's
    writer on a writer thread while the next batch is packed. NaN/Inf counts come from the first output
    (every output reads the same source values).

    Without `io`, the layer's writes are done when this returns. With `io` (the run's writer thread) and
    `pending` (the previous layer's last write, still running), the last write of this layer is returned
    still running, so the next layer is packed while it is written: one batch is written while the next
    is packed, across layers too."""
    if io is None:
        with started_executor("kt-writer") as own_io:
            last = convert_layer(reader, plan, lp, outputs, run, progress, nonfinite, packer, timings, own_io)
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

    try:
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
                with timings.timed("pack_s"):
                    counts = [packer(out.method, out_jobs) for out, out_jobs in zip(outputs, jobs)][0]  # the first's
            finally:
                data.release()  # the packer is done with the source buffer: the stream refills it
            for key, count in zip(keys, counts):
                if count:
                    nonfinite[key] = nonfinite.get(key, 0) + count
                    if not run.allow_nonfinite:
                        raise NonFiniteError(
                            f"{reader.where(key)}: tensor {key} holds {nonfinite[key]} NaN/Inf values (layer {lp.layer}); "
                            "the checkpoint is damaged: re-download that file, or pass --allow-nonfinite to pack "
                            "them as 0 (they are listed in the report)")
            if pending is not None:
                with timings.timed("write_wait_s"):
                    pending.result()
            pending = io.submit(write_batch, packed)
            progress.advance(bytes_per_expert * len(experts))
        for out in outputs:  # every batch is read: the layer's source identity is known (read at commit)
            out.writer.set_source(reader.source_sha256(lp.layer))
    except BaseException:
        if pending is not None:  # never abort a writer (close its file) under a write in flight
            try:
                pending.result()
            except BaseException:  # noqa: S110 - the first error is already propagating
                pass
        raise
    return pending
