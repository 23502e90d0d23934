"""Strict, small, zero-copy safetensors reader and a streaming writer.

The format (huggingface/safetensors; docs/FORMAT.md §8):

    [8 bytes: N, little-endian u64] [N bytes: UTF-8 JSON header] [data buffer]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data buffer) plus an optional ``"__metadata__"`` string->string map.

The reader validates the whole header up front (the same rules as the reference implementation:
contiguous buffer, exact sizes, file ends where the last tensor ends) so that any later read is a
plain slice of a read-only mmap (no copy) or a pread into a caller's buffer (no SIGBUS when another
program truncates the file), and never past the file.  Every problem with the file is reported as
:class:`SafetensorsFormatError` whose message starts with the file path.

The writer side is :func:`plan_file` (header bytes + absolute offsets, so callers can stream
tensors to known positions) and :func:`save_file` (a convenience built on it).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NoReturn

import numpy as np

from . import fsio
from .errors import InputFileError, SafetensorsChangedError, SafetensorsFormatError
from .input_files import JsonSyntaxError, decode_json, open_regular

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_SIZE",
    "SafetensorsChangedError",
    "SafetensorsFile",
    "SafetensorsFormatError",
    "TensorInfo",
    "numpy_dtype",
    "plan_file",
    "save_file",
    "tensor_nbytes",
]

# Same cap as the reference reader (safetensors/src/tensor.rs MAX_HEADER_SIZE).
MAX_HEADER_SIZE = 100_000_000

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# numpy view used by SafetensorsFile.array(); dtypes numpy cannot express are exposed as their bits.
_NUMPY_VIEW: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(np.uint8),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E8M0": np.dtype(np.uint8),
    "F8_E4M3FNUZ": np.dtype(np.uint8),
    "F8_E5M2FNUZ": np.dtype(np.uint8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F4": np.dtype(np.uint8),  # two E2M1 codes per byte, low nibble first; last dim halved
}



def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype SafetensorsFile.array() views a safetensors dtype as (KeyError: none)."""
    return _NUMPY_VIEW[dtype]


_REDOWNLOAD = "re-download or re-create this file"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first data byte
    nbytes: int


def _is_int(x: Any) -> bool:
    # bool is an int subclass in Python but never a valid shape/offset in JSON terms.
    return isinstance(x, int) and not isinstance(x, bool)


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of `dtype` and `shape`; ValueError if unknown dtype or not whole bytes."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown safetensors dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    shape = tuple(shape)
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"shape {list(shape)} must be a list of non-negative integers")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"dtype {dtype} shape {list(shape)} is {bits} bits, not a whole number of bytes")
    return bits // 8


class HeaderError(ValueError):
    """What is wrong with a safetensors header's tensor entries (the file is named by the caller)."""


def _header_fail(message: str) -> NoReturn:
    raise HeaderError(message)


def header_tensors(header: dict, base: int, file_size: int) -> tuple[dict[str, TensorInfo], int]:
    """The tensors of a parsed header (without __metadata__) whose data buffer starts at file offset
    `base`, every entry checked (dtype, shape, offsets, exact sizes, contiguous from 0, inside a file of
    file_size bytes); and the length of the data buffer. HeaderError saying which tensor and why."""
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            _header_fail(f"{where}: header entry is not an object; {_REDOWNLOAD}")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                _header_fail(f"{where}: header entry has no {field!r}; {_REDOWNLOAD}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            _header_fail(
                f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)}); "
                "the file may be corrupt or need a newer reader"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            _header_fail(f"{where}: shape {shape!r} is not a list of non-negative integers; {_REDOWNLOAD}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            _header_fail(
                f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end; "
                f"{_REDOWNLOAD}"
            )
        begin, end = offsets
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8:
            _header_fail(
                f"{where}: dtype {dtype} shape {shape} is {bits} bits, not a whole number of "
                f"bytes; {_REDOWNLOAD}"
            )
        if end - begin != bits // 8:
            _header_fail(
                f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but dtype "
                f"{dtype} shape {shape} needs {bits // 8}; {_REDOWNLOAD}"
            )
        if base + end > file_size:
            _header_fail(
                f"{where}: data ends at file offset {base + end}, past the end of the "
                f"{file_size}-byte file (truncated); {_REDOWNLOAD}"
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), base + begin, end - begin)

    expected = 0
    prev = None
    for begin, end, name in sorted(spans):
        if begin != expected:
            if begin > expected:
                what = f"leaving a {begin - expected}-byte gap after buffer offset {expected}"
            else:
                what = f"overlapping tensor {prev!r}, which ends at buffer offset {expected}"
            _header_fail(
                f"tensor {name!r}: data_offsets start at {begin}, {what} (tensors must be "
                f"contiguous from offset 0); {_REDOWNLOAD}"
            )
        expected = end
        prev = name
    return tensors, expected


class SafetensorsFile:
    """A validated, read-only safetensors file.

    Two ways to get the bytes: :meth:`read_into` (pread into the caller's buffer: a file that
    shrinks meanwhile gives a :class:`SafetensorsChangedError`, never a SIGBUS; what the converter
    uses) and :meth:`raw` / :meth:`array` (zero-copy views of a read-only mmap made on first use;
    what the reader uses). The file is opened only if it is a regular file (stat, then O_NONBLOCK
    and fstat: a FIFO or device never blocks or is read). :meth:`close` drops this object's
    references; views still alive keep the mapping valid until they are garbage-collected.
    """

    path: pathlib.Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    size: int  # bytes, at open
    mtime_ns: int  # at open

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.metadata = {}
        self.tensors = {}
        self._mmap: mmap.mmap | None = None
        self._fd = -1
        self._closed = False
        try:
            try:
                self._fd, st = open_regular(self.path, what="a safetensors file")
            except InputFileError as e:
                self._fail(f"{str(e).removeprefix(str(self.path)).lstrip(': ')}; pass the path of a .safetensors file")
            size = self.size = st.st_size
            self.mtime_ns = st.st_mtime_ns
            if size < 8:
                self._fail(
                    f"file is {size} bytes, shorter than the 8-byte header length "
                    f"(empty or truncated); {_REDOWNLOAD}"
                )
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            if n == 0:
                self._fail(f"header length is 0 (not a safetensors file); {_REDOWNLOAD}")
            if n > MAX_HEADER_SIZE:
                self._fail(
                    f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit "
                    f"(not a safetensors file or corrupt first 8 bytes); {_REDOWNLOAD}"
                )
            if 8 + n > size:
                self._fail(
                    f"header length {n} runs past the end of the {size}-byte file "
                    f"(truncated or not a safetensors file); {_REDOWNLOAD}"
                )
            raw_header = os.pread(self._fd, n, 8)
            if len(raw_header) != n:
                self._fail(f"could read only {len(raw_header)} of {n} header bytes; {_REDOWNLOAD}")
            data_end = self._parse_header(raw_header, n, size)
            if 8 + n + data_end != size:
                what = "truncated" if 8 + n + data_end > size else "has trailing bytes"
                self._fail(
                    f"file is {size} bytes but the header describes {8 + n + data_end} "
                    f"(header 8+{n}, data {data_end}): the file {what}; {_REDOWNLOAD}"
                )
        except SafetensorsFormatError:
            self.close()
            raise
        except OSError as e:
            self.close()
            reason = e.strerror or str(e)
            raise SafetensorsFormatError(
                f"{self.path}: cannot read the file ({type(e).__name__}: {reason}); "
                f"check that the path exists, is a file and is readable"
            ) from e

    # -- parsing -------------------------------------------------------------------------------

    def _fail(self, message: str) -> NoReturn:
        raise SafetensorsFormatError(f"{self.path}: {message}")

    def _parse_header(self, raw_header: bytes, n: int, file_size: int) -> int:
        """Validate the header, fill metadata/tensors, return the length of the data buffer."""
        try:
            text = raw_header.decode("utf-8")
        except UnicodeDecodeError as e:
            self._fail(f"header is not valid UTF-8 at byte {8 + e.start}; {_REDOWNLOAD}")
        if not text.startswith("{"):
            self._fail(f"header does not start with '{{' (not a safetensors file); {_REDOWNLOAD}")
        try:
            header = decode_json(text, constants=False)
        except JsonSyntaxError as e:
            self._fail(f"header is not valid JSON ({e}); {_REDOWNLOAD}")
        if not isinstance(header, dict):
            self._fail(f"header is not a JSON object; {_REDOWNLOAD}")

        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                self._fail(
                    "__metadata__ must be a map of strings to strings "
                    f"(got {json.dumps(meta)[:200]}); {_REDOWNLOAD}"
                )
            self.metadata = dict(meta)

        try:
            self.tensors, data_end = header_tensors(header, 8 + n, file_size)
        except HeaderError as e:
            self._fail(str(e))
        return data_end

    # -- access --------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _info(self, name: str) -> TensorInfo:
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _mapping(self) -> mmap.mmap:
        if self._mmap is None:
            try:
                self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                self._fail(f"cannot map the file ({e}); {_REDOWNLOAD}")
            if len(self._mmap) != self.size:
                self._fail("file changed size since it was opened; open it again")
        return self._mmap

    def raw(self, name: str) -> np.ndarray:
        """1-D read-only uint8 view of the tensor's bytes (no copy)."""
        info = self._info(name)
        return np.frombuffer(self._mapping(), dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def array(self, name: str) -> np.ndarray:
        """Read-only typed view with the header shape (no copy).

        BF16 -> uint16 bits, every F8_* -> uint8 bits, F4 -> uint8 with the last dim halved (two
        E2M1 codes per byte, low nibble = even element).  F6_* have no per-element view: use raw().
        """
        info = self._info(name)
        shape, view = self.view_of(name)
        return np.frombuffer(self._mapping(), dtype=view, count=math.prod(shape), offset=info.offset).reshape(shape)

    def view_of(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, numpy dtype) of the typed view array() gives (F4: last dim halved)."""
        info = self._info(name)
        shape = info.shape
        if info.dtype == "F4":
            if not shape or shape[-1] % 2:
                self._fail(
                    f"tensor {name!r}: F4 shape {list(shape)} has an odd (or no) last dim, so bytes "
                    "do not map to rows; read it with raw()"
                )
            shape = shape[:-1] + (shape[-1] // 2,)
        view = _NUMPY_VIEW.get(info.dtype)
        if view is None:
            self._fail(f"tensor {name!r}: dtype {info.dtype} has no numpy view; read it with raw()")
        return shape, view

    def read_into(self, offset: int, out) -> None:
        """Fill the writable buffer `out` with the file's bytes from absolute `offset` (pread; the
        GIL is released). A short read means the file shrank: SafetensorsChangedError."""
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise SafetensorsFormatError(f"{self.path}: cannot read the file ({e.strerror or e}); "
                                             "check the disk") from None
            if n == 0:
                raise SafetensorsChangedError(
                    f"{self.path}: the file shrank while it was being read (it ends before byte "
                    f"{offset + len(view)}; it was {self.size} bytes): another program is writing or "
                    "replacing it")
            done += n

    def read(self, name: str) -> np.ndarray:
        """A copy of the tensor as a typed array (read_into a fresh buffer)."""
        info = self._info(name)
        shape, view = self.view_of(name)
        buf = np.empty(info.nbytes, dtype=np.uint8)
        self.read_into(info.offset, buf)
        return buf.view(view).reshape(shape)

    def check_unchanged(self) -> None:
        """SafetensorsChangedError if the file's size or mtime differ from when it was opened."""
        if self._closed:
            return
        st = os.fstat(self._fd)
        if st.st_size < self.size:
            raise SafetensorsChangedError(
                f"{self.path}: the file shrank while it was being read ({self.size} -> {st.st_size} bytes): "
                "another program is writing or replacing it")
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise SafetensorsChangedError(
                f"{self.path}: the file changed while it was being read (its size or modification time): "
                "another program is writing or replacing it")

    def release(self, name: str) -> None:
        """Drop this process's mapping of a tensor's pages (they stay in the page cache and fault
        back in if read again), so that resident memory does not grow with the bytes streamed
        through the mapping."""
        info = self._info(name)
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED") or info.nbytes == 0:
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def close(self) -> None:
        self._closed = True
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Views are still alive: they keep the mapping referenced; it is unmapped when the
                # last one goes away.
                pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.tensors)} tensors"
        return f"SafetensorsFile({str(self.path)!r}, {state})"


# -- writing ------------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"safetensors metadata must map str to str, got {metadata!r}")
    return dict(metadata)


def plan_file(
    entries: list[tuple[str, str, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
    align: int = 64,
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Plan a safetensors file: the header bytes and ``{name: (absolute_file_offset, nbytes)}``.

    The header is the 8-byte little-endian length plus the JSON, right-padded with spaces so that
    the data buffer starts at a multiple of `align` (for align a multiple of 8 this also keeps the
    reference writer's ``N % 8 == 0``).  Tensors are placed contiguously in the given order (the
    format allows no gaps), so each one starts at a multiple of `align` exactly when the sizes of
    the ones before it are multiples of `align`; choosing the order/sizes is the caller's job.
    `metadata` None writes no ``__metadata__``.  Caller mistakes raise ValueError.
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = _check_metadata(metadata)
    begin = 0
    relative: dict[str, tuple[int, int]] = {}
    for name, dtype, shape in entries:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in relative:
            raise ValueError(f"duplicate tensor name {name!r}")
        try:
            nbytes = tensor_nbytes(dtype, shape)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        relative[name] = (begin, nbytes)
        begin += nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    n = len(body) + (-(8 + len(body)) % align)
    if n > MAX_HEADER_SIZE:
        raise ValueError(f"header of {n} bytes exceeds the safetensors limit {MAX_HEADER_SIZE}")
    header_bytes = n.to_bytes(8, "little") + body + b" " * (n - len(body))
    base = 8 + n
    return header_bytes, {name: (base + b, nb) for name, (b, nb) in relative.items()}


def _as_bytes(name: str, data: bytes | bytearray | memoryview | np.ndarray) -> memoryview:
    if isinstance(data, np.ndarray):
        arr = data
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        return memoryview(arr.reshape(-1).view(np.uint8))
    try:
        return memoryview(data).cast("B")
    except TypeError as e:
        raise TypeError(f"tensor {name!r}: data must be bytes-like or a numpy array, got {type(data)}") from e


def save_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, tuple[int, ...], bytes | np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``{name: (dtype, shape, data)}`` as a safetensors file, tensors in the given order.

    `data` is bytes-like or a numpy array whose (little-endian, C-order) bytes are written; its
    length must match dtype/shape (F4: the logical shape, two codes per byte).  `metadata` None
    writes ``{"format": "pt"}`` (what transformers expects); pass ``{}`` for none.  Written with
    fsio.atomic_write: a crash never leaves a complete-looking file.
    """
    path = pathlib.Path(path)
    if metadata is None:
        metadata = {"format": "pt"}
    entries = [(name, dtype, tuple(shape)) for name, (dtype, shape, _) in tensors.items()]
    header, offsets = plan_file(entries, metadata)
    buffers = []
    for name, (_, _, data) in tensors.items():
        buf = _as_bytes(name, data)
        if buf.nbytes != offsets[name][1]:
            raise ValueError(
                f"tensor {name!r}: got {buf.nbytes} bytes of data, dtype/shape need {offsets[name][1]}"
            )
        buffers.append(buf)
    def write(fd: int, tmp: pathlib.Path) -> None:
        for buf in (header, *buffers):
            fsio.write_all(fd, buf, tmp)

    fsio.atomic_write(path, write)
