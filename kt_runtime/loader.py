"""Load packed experts (merged safetensors shards or kt .kt folders) zero-copy and validated: the runtime's face
on the format's reader (kt_runtime.format.reader), with whole float matrices through quant's reference."""
from __future__ import annotations

from pathlib import Path

from .format.reader import PackedOutput, open_output


class PackedExperts(PackedOutput):
    """Packed routed experts of every converted layer, memory-mapped.

    `expert_tensors(layer, expert, proj, numa)` gives the packed bytes and scales of one NUMA shard
    (read-only views of the mapped files); `dequantize(layer, expert, proj)` the whole float matrix
    ([I, H] for gate/up, [H, I] for down).
    """

    def dequantize(self, layer: int, expert: int, proj: str) -> "torch.Tensor":
        from kt_convert.quant.reference import dequantize_expert

        return dequantize_expert(self, layer, expert, proj)


def load_experts(path: str | Path, verify: bool | None = None) -> PackedExperts:
    """Open a packed output directory (memory-mapped; nothing is copied).

    With a kt_manifest.json, the output is checked against it before use: every file's size, every
    shard's header (names, dtypes, shapes, offsets) and metadata (method, threadpool count,
    dimensions, layer). The sha256 of the files is checked as well:
      verify=None (default): for the layers not already hashed with these very files (same size,
        mtime and inode; recorded in OUT/.kt_verified.json), when they hold at most 1 GiB;
      verify=True: for every layer (a full read of the output; seconds per GB);
      verify=False: never.
    A kt-kernel output without a manifest is loaded with parameters inferred from its tensors and a
    warning. An output made with --kt-sft-manifest is loaded from its folder (kt's weight path), with its
    manifest and records from the folder beside it (kt_runtime.format.reader.records_folder). The checks and
    views are kt_runtime.format.reader.open_output's.
    """
    return open_output(path, verify, cls=PackedExperts, stacklevel=3)


def as_packed_experts(weights) -> PackedExperts:
    """`weights` itself, or the output at that path loaded (load_experts): what the engine's
    constructors accept."""
    return load_experts(weights) if isinstance(weights, (str, Path)) else weights
