"""Pre-flight: what a run will write and how much memory it needs, checked against free disk space
and available RAM before any layer is converted, so a run that cannot finish is refused early
with numbers instead of failing hours later."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kt_convert.kt_runtime.format.digest import BLOCK
from kt_convert.kt_runtime.format.files import read_system_text

from . import units
from .errors import UserError

BASE_MEMORY = 256 << 20  # interpreter, numpy, the extension, mapped headers: measured ~150 MB
DISK_MARGIN = 16 << 20  # manifest, index, temp names


@dataclass(frozen=True)
class Estimate:
    output_bytes: int  # packed bytes this run writes (layers still to do, plus a last non-expert shard)
    disk_bytes: int  # what must be free: output + copied model files + margin
    batch_bytes: int  # packed bytes of one pack call
    peak_memory_bytes: int  # a bound on this process's resident memory, independent of model size
    source_batch_bytes: int = 0  # source bytes of one pack call (read into a buffer)
    held_bytes: int = 0  # packed bytes held for the digests of shard headers completed at commit

    def describe(self) -> str:
        return (f"pre-flight: writing {_gb(self.output_bytes)}, peak memory about {_mb(self.peak_memory_bytes)} "
                f"(packing batches of {_mb(self.batch_bytes)} from {_mb(self.source_batch_bytes)} of source)")


def _gb(n: int) -> str:
    return units.size(n)


def _mb(n: int) -> str:
    return units.memory(n)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    for line in (read_system_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) * 1024
            except (ValueError, IndexError):
                return None
    return None


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def estimate(plan, todo, batch_experts: int, threads: int, extra_bytes: int = 0) -> Estimate:
    """plan: ConversionPlan; todo: the LayerPlans still to convert; batch_experts: experts per pack call."""
    output = sum(lp.output_bytes for lp in todo) + extra_bytes
    per_expert = max((lp.output_bytes for lp in plan.layers), default=0) // max(1, plan.num_experts)
    batch = per_expert * max(1, batch_experts)
    source_per_expert = max((lp.input_bytes for lp in plan.layers), default=0) // max(1, plan.num_experts)
    source_batch = source_per_expert * max(1, batch_experts)
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    # per packing thread: one source row as float32, its int8 codes and one tile block (kernels_cpp Scratch)
    k = max(plan.hidden_size, plan.moe_intermediate_size)
    scratch = threads * (k * 4 + k + 128 * k)
    # merged shards: the first digest block of the layer being written and of the one committing, held
    # until the shard's header names the layer's source (kt_runtime.format.writer.MergedShardWriter)
    largest = max((lp.output_bytes for lp in plan.layers), default=0)
    held = 2 * min(BLOCK, largest) if plan.layout == "merged" else 0
    # the batch being packed and the previous one being written, both held until written; the
    # source buffers of the batch being packed and of the next one being read (convert.source_reader)
    peak = BASE_MEMORY + 2 * batch + 2 * source_batch + scratch + held
    return Estimate(output, output + DISK_MARGIN, batch, peak, source_batch, held)


def check(est: Estimate, out: Path, copied_bytes: int = 0) -> None:
    """Refuses (UserError) when the disk or the memory cannot hold the run."""
    need_disk = est.disk_bytes + copied_bytes
    free = disk_free(out)
    if need_disk > free:
        raise UserError(f"not enough disk space in {out}: this run writes {_gb(need_disk)}, {_gb(free)} are free; "
                        f"free {_gb(need_disk - free)} or choose another output directory, then re-run "
                        "(completed layers are kept)")
    avail = mem_available()
    if avail is not None and est.peak_memory_bytes > avail:
        raise UserError(f"not enough memory: converting needs about {_mb(est.peak_memory_bytes)} (two packing "
                        f"batches of {_mb(est.batch_bytes)}, two source buffers of {_mb(est.source_batch_bytes)} "
                        f"plus {_mb(BASE_MEMORY)} for the process), "
                        f"{_mb(avail)} are available (MemAvailable); close other programs, then re-run")


def non_expert_bytes(ckpt, tensors) -> int:
    """Bytes of the last shard that --include-non-expert copies: tensors are (source key, name)."""
    return sum(ckpt.info(src).nbytes for src, _ in tensors)


def copied_bytes(root: Path, names: tuple[str, ...]) -> int:
    return sum((root / n).stat().st_size for n in names if (root / n).is_file())


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_source_disk(source_bytes: int, cache: Path, out: Path, out_bytes: int) -> None:
    """Refuses a download whose source shards cannot fit beside the output (one disk or two)."""
    where = _existing(cache)
    same = os.stat(where).st_dev == os.stat(out).st_dev
    need = source_bytes + (out_bytes if same else 0)
    free = disk_free(where)
    if need > free:
        both = f" plus the output's {_gb(out_bytes)} on the same disk" if same else ""
        raise UserError(f"not enough disk space in the Hugging Face cache {cache}: the download needs up to "
                        f"{_gb(source_bytes)}{both}, {_gb(free)} are free; pass --max-source-disk GB (with "
                        "--delete-source-after-use the converted shards are removed), free space, or set "
                        "HF_HUB_CACHE to another disk, then re-run")


def describe_source(source_bytes: int, gate) -> str:
    cap = f" (cap --max-source-disk {_gb(gate.max_source_disk)})" if gate.max_source_disk is not None else ""
    gone = ", each removed once its layers are converted" if gate.delete_after_use else ""
    return f"pre-flight: downloading into {gate.cache}, peak source on disk about {_gb(source_bytes)}{cap}{gone}"
