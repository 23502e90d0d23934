"""Crash-safe writers for one converted layer.

Both write into a temporary name (`*.tmp`), hash what they write, fsync, and rename into place
only when the layer is complete, so a killed run never leaves a file that looks finished.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kt_runtime.format import fsio
from kt_runtime.format.digest import TreeHasher, file_sha256
from kt_runtime.format.layout import kt_file_names, layer_dir_name, numa_dir_name
from kt_runtime.format.manifest import LayerRecord
from kt_runtime.format.safetensors_file import plan_layout


_os_write = os.write  # tests replace it to simulate a full or failing disk


def write_all(fd: int, data, path: Path) -> None:
    fsio.write_all(fd, data, path, write=_os_write)


def write_all_at(fd: int, data, offset: int, path: Path) -> None:
    """write_all at a file offset (pwrite), the file position unchanged."""
    def pwrite(fd: int, view) -> int:
        nonlocal offset
        n = os.pwrite(fd, view, offset)
        offset += n
        return n

    fsio.write_all(fd, data, path, write=pwrite)


SOURCE_PLACEHOLDER = "0" * 64  # as long as the sha256 hex digest written over it at commit


class MergedShardWriter:
    """One layer -> one safetensors shard, tensors streamed in layout order.

    metadata: the header's __metadata__, or a function of the layer's source identity (given by set_source()
    once every batch is read) giving it: then the header is written with a placeholder of the same length and
    rewritten in place at commit, and the digest's first block is held until then."""

    def __init__(self, out_dir: Path, name: str, layer: int, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata, spec=None, on_hashed=None):
        self.out_dir, self.name, self.layer = out_dir, name, layer
        self.spec = spec  # PackedSpec: the tensors of a pair (write_pair); None: only write() is used
        self.final = out_dir / name
        self.tmp = out_dir / (name + ".tmp")
        self._entries = entries
        self._metadata_for = metadata if callable(metadata) else None
        self.source_sha256: str | None = None
        header, offsets = plan_layout(entries, metadata(SOURCE_PLACEHOLDER) if callable(metadata) else metadata)
        self._order = iter([(key, offsets[key]) for key, _, _ in entries])
        fsio.entry(self.final, fsio.FILE)  # refuse a link or special file under the final name now
        self._digest = TreeHasher(max_pending=4, on_hashed=on_hashed,  # bounds the packed buffers held for hashing
                                  first_piece_later=callable(metadata))
        self._fd = -1
        self._pos = len(header)
        try:  # an interrupt from here on still removes the temporary
            self._fd = fsio.create_new(self.tmp)
            self._digest.start_file()
            self._digest.update(header)
            write_all(self._fd, header, self.tmp)
        except BaseException:
            self.abort()
            raise

    def write_pair(self, proj: str, expert: int, numa: int, weight: np.ndarray, scale: np.ndarray) -> None:
        """One NUMA shard of one expert's projection: its tensors in the spec's order (PackedSpec.pair_arrays)."""
        for key, data in self.spec.pair_arrays(self.layer, proj, expert, numa, weight, scale):
            self.write(key, data)

    def write(self, key: str, data: np.ndarray) -> None:
        want_key, (offset, nbytes) = next(self._order)
        if key != want_key or offset != self._pos or data.nbytes != nbytes:
            raise RuntimeError(f"writer out of order: got {key} ({data.nbytes} B) at {self._pos}, "
                               f"expected {want_key} ({nbytes} B) at {offset}")
        buf = np.ascontiguousarray(data).view(np.uint8)
        write_all(self._fd, buf, self.tmp)
        self._digest.update(buf)
        self._pos += nbytes

    def set_source(self, source_sha256: str) -> None:
        """The identity of the source bytes the layer was packed from (before commit)."""
        self.source_sha256 = source_sha256

    def _final_header(self) -> bytes | None:
        """The header naming the source, to be written over the placeholder (None: it was final already)."""
        if self._metadata_for is None:
            return None
        if self.source_sha256 is None:
            raise RuntimeError(f"layer {self.layer}: shard committed before its source identity was set")
        header, _ = plan_layout(self._entries, self._metadata_for(self.source_sha256))
        placeholder, _ = plan_layout(self._entries, self._metadata_for(SOURCE_PLACEHOLDER))
        if len(header) != len(placeholder):
            raise RuntimeError(f"layer {self.layer}: source identity {self.source_sha256!r} is not a sha256 hex digest")
        return header

    def commit(self) -> LayerRecord:
        if next(self._order, None) is not None:
            raise RuntimeError(f"layer {self.layer}: shard closed before every tensor was written")
        header = self._final_header()
        self._digest.end_file()  # the last block is hashed during the fsync (and its buffers freed), not after
        if header is not None:
            write_all_at(self._fd, header, 0, self.tmp)
        fsio.fsync_fd(self._fd, self.tmp)
        os.close(self._fd)
        self._fd = -1
        fsio.replace(self.tmp, self.final)
        fsio.fsync_dir(self.out_dir)
        return LayerRecord(self.layer, [self.name], self._pos, self._digest.hexdigest(header),
                           source_sha256=self.source_sha256)

    def abort(self) -> None:
        self._digest.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        fsio.discard(self.tmp)


class KtFolderWriter:
    """One layer -> `_layer_L/_numa_t/*.kt` files (kt's --no-merge-safetensor layout), built in
    `_layer_L.tmp/` and renamed when complete."""

    def __init__(self, out_dir: Path, layer: int, method: str, on_hashed=None, file_digests: bool = False):
        """file_digests: also record each file's plain sha256 (LayerRecord.file_sha256; kt's SFT manifest)."""
        self.out_dir, self.layer, self.method, self.file_digests = out_dir, layer, method, file_digests
        self.final = out_dir / layer_dir_name(layer)
        self.tmp = out_dir / (layer_dir_name(layer) + ".tmp")
        fsio.entry(self.final, fsio.DIR)  # refuse a link or special file under the final name now
        self._folders: set[int] = set()
        self._digest = TreeHasher(max_pending=4, on_hashed=on_hashed)
        self.source_sha256: str | None = None
        self._files: list[str] = []
        self._nbytes = 0
        try:
            fsio.make_dir_new(self.tmp)
        except BaseException:
            self.abort()
            raise

    def write_pair(self, proj: str, expert: int, numa: int, weight: np.ndarray, scale: np.ndarray) -> None:
        folder = self.tmp / numa_dir_name(numa)
        if numa not in self._folders:  # created by us inside our fresh folder, once
            fsio.make_dir(folder)
            self._folders.add(numa)
        for name, data in zip(kt_file_names(self.method, proj, expert, weight.nbytes, scale.size), (weight, scale)):
            buf = np.ascontiguousarray(data).view(np.uint8)
            fd = fsio.create_new(folder / name)
            try:
                write_all(fd, buf, folder / name)
            finally:
                os.close(fd)
            self._digest.start_file()
            self._digest.update(buf)
            self._nbytes += buf.nbytes
            self._files.append(f"{layer_dir_name(self.layer)}/{folder.name}/{name}")

    def set_source(self, source_sha256: str) -> None:
        """The identity of the source bytes the layer was packed from (recorded in the manifest)."""
        self.source_sha256 = source_sha256

    def commit(self) -> LayerRecord:
        # Thousands of small files: fsynced together on a few threads (the journal batches
        # concurrent syncs) rather than one by one as they are written.
        paths = [self.tmp / Path(f).relative_to(layer_dir_name(self.layer)) for f in self._files]
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="kt-fsync") as pool:
            list(pool.map(fsio.fsync_file, paths))
        for numa in sorted(self._folders):
            fsio.fsync_dir(self.tmp / numa_dir_name(numa))
        fsio.fsync_dir(self.tmp)
        if fsio.entry(self.final, fsio.DIR) is not None:  # an unrecorded earlier copy: moved aside whole,
            old = self.out_dir / (self.final.name + ".old")  # never half-deleted in place
            fsio.remove(old)
            fsio.replace(self.final, old, fsio.DIR)
            fsio.replace(self.tmp, self.final, fsio.DIR)
            fsio.fsync_dir(self.out_dir)
            fsio.remove(old)
        else:
            fsio.replace(self.tmp, self.final, fsio.DIR)
        fsio.fsync_dir(self.out_dir)
        record = LayerRecord(self.layer, self._files, self._nbytes, self._digest.hexdigest(),
                             source_sha256=self.source_sha256)
        if self.file_digests:  # a file of one 64 MiB block has its block's digest; a longer one is read back
            record.file_sha256 = [h or file_sha256(self.out_dir / f)
                                  for h, f in zip(self._digest.file_digests(), self._files)]
        return record

    def abort(self) -> None:
        self._digest.close()
        fsio.discard(self.tmp)
