"""The order of a batch's work on the GPU's three streams, as data (convert.packers.CudaPacker runs it).

Batch b uses device slot b % slots: its input buffer (written by the upload, read by the kernel) and its
output buffer (written by the kernel, read by the download). Each stream runs its steps in batch order; a
step first waits for the events named here, then records its own. So batch b's upload overlaps batch b-1's
kernel and batch b-2's download, and a slot's buffers are overwritten only after the batch that used them
before (b - slots) is done with them. The host side: the slot's host buffers (tables, counts) are refilled
only after that batch's results were taken (CudaPacker.submit waits for them).
"""
from __future__ import annotations

from dataclasses import dataclass

STREAMS = ("h2d", "compute", "d2h")


@dataclass(frozen=True)
class Step:
    stream: str  # one of STREAMS
    action: str  # upload | kernel | download
    waits: tuple[tuple[str, int], ...]  # (event, batch) recorded on other streams, waited for first
    records: str  # the event this step records (for this batch) when it is done


def batch_steps(batch: int, slots: int) -> list[Step]:
    """The steps of `batch` with `slots` device slots, in the order they are enqueued."""
    if slots < 2:
        raise ValueError("the GPU pipeline needs at least 2 slots")
    before = batch - slots  # the batch that used this slot last
    reuse = before >= 0
    return [
        Step("h2d", "upload", (("computed", before),) if reuse else (), "uploaded"),
        Step("compute", "kernel", (("uploaded", batch),) + ((("downloaded", before),) if reuse else ()), "computed"),
        Step("d2h", "download", (("computed", batch),), "downloaded"),
    ]
