"""The two seams of the per-layer loop (convert.pipeline.convert_layer): where a layer's source bytes come
from (LayerReader) and where its packed tensors go (LayerOutput).

One LayerReader serves a whole run: every read of routed-expert bytes goes through it, layer by layer in
plan order, one batch ahead (convert.source_reader.SourceStream). A step that must wait for a layer's
source files (a download in progress) waits here, before the layer's first read.

A layer is read once and packed into every LayerOutput given for it (a run of the command line gives
one: its method, NUMA split and layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from kt_convert.kt_runtime.format.digest import source_digest
from kt_convert.kt_runtime.format.names import PROJECTIONS
from kt_convert.kt_runtime.format.methods import QuantMethod

from .plan import ConversionPlan, LayerPlan, source_slabs
from .source import Checkpoint
from .source_reader import ReadBatch, Slab, SourceStream
from .timings import Timings


@dataclass
class LayerOutput:
    """One packed output of a layer: the method and NUMA split its tensors are packed for, and the writer
    (kt_runtime.format.writer: MergedShardWriter or KtFolderWriter) that takes them pair by pair
    (write_pair), then the layer's source identity (set_source) before it commits."""

    method: QuantMethod
    threadpool_count: int
    writer: object


class LayerReader:
    """The source bytes of `layers` (in this order), in batches of `experts_per_batch` experts."""

    def __init__(self, ckpt: Checkpoint, plan: ConversionPlan, layers: list[LayerPlan], experts_per_batch: int,
                 threads: int, timings: Timings | None = None, ahead: int = 1, memory=None):
        """ahead, memory: batches read ahead and where they are read into (the packer's read_ahead and
        host_memory: pinned buffers for the GPU)."""
        self.ckpt = ckpt
        self.num_experts = plan.num_experts
        self.experts_per_batch = experts_per_batch
        self._order = [lp.layer for lp in layers]
        self.timings = timings or Timings()
        self._source_sha256: dict[int, str] = {}
        self._stream = SourceStream(ckpt, [b for lp in layers for b in self.batch_slabs(lp)], ahead=ahead,
                                    threads=threads, timings=self.timings, memory=memory)

    def start(self) -> None:
        """Starts reading the first batches now (else the first batches() call does)."""
        self._stream.start()

    def batch_ranges(self) -> list[range]:
        """The experts of each pack batch of a layer."""
        step = self.experts_per_batch
        return [range(e0, min(self.num_experts, e0 + step)) for e0 in range(0, self.num_experts, step)]

    def batch_slabs(self, lp: LayerPlan) -> list[list[Slab]]:
        """The source slabs of each pack batch of a layer, in order (what the stream reads)."""
        return [list({s: None for e in experts for proj in PROJECTIONS for s in source_slabs(lp.experts[e][proj])})
                for experts in self.batch_ranges()]

    def batches(self, lp: LayerPlan) -> Iterator[tuple[range, ReadBatch]]:
        """(experts, their source slabs) of each pack batch of `lp`; the caller releases each batch when
        packed. Layers must be asked for in the order given."""
        if not self._order or self._order[0] != lp.layer:
            raise RuntimeError(f"layer {lp.layer} read out of order (next: {self._order[:1]})")
        self._order.pop(0)
        batches = []
        for experts in self.batch_ranges():
            with self.timings.timed("read_wait_s"):
                batch = self._stream.next()
            batches.append(batch)
            yield experts, batch
        sums = {slab: sha for batch in batches for slab, sha in batch.sha256().items()}
        self._source_sha256[lp.layer] = source_digest(self._slab_row(slab, sha) for slab, sha in sums.items())

    def _slab_row(self, slab: Slab, sha256: str) -> tuple:
        info = self.ckpt.info(slab.key)
        shape = tuple(info.shape) if slab.expert is None else tuple(info.shape[1:])
        return slab.key, slab.expert, info.dtype, shape, sha256

    def source_sha256(self, layer: int) -> str:
        """The source identity of a layer whose batches() were all read: the digest of the sha256 of every
        source slab it read (kt_runtime.format.digest.source_digest), whatever the batching."""
        return self._source_sha256[layer]

    def where(self, key: str) -> str:
        """The source file holding tensor `key` (for messages)."""
        return self.ckpt.where(key)

    def close(self) -> None:
        self._stream.close()
