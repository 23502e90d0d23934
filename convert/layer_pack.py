"""One layer of a run: its source read once, batch by batch, packed for every output and written pair by pair
on the run's writer thread while the next batch is packed (convert.pipeline runs it layer after layer)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from kt_convert.kt_runtime.format.names import PROJECTIONS
from kt_convert.kt_runtime.format.spec import shard_slice

from .errors import NonFiniteError
from .layer_io import LayerOutput, LayerReader
from .options import RunOptions
from .plan import ConversionPlan, LayerPlan, read_source_matrix
from .progress import Progress
from .timings import Timings

BATCH_BYTES = 64 << 20  # packed bytes per pack call: enough tasks for every core, bounded memory
GPU_BATCH_BYTES = 32 << 20  # source or packed bytes per GPU batch: a few read buffers and arenas in its pinned block


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
                  run: RunOptions, progress: Progress, nonfinite: dict[str, int], packer,
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
