"""AMX BufferB tiling (docs/FORMAT.md §3): the byte order of a packed matrix.

The quantized [N, K] matrix is cut into N-blocks (128 rows INT4 / 64 INT8), each into K-blocks of
3584 elements, each into groups of 32 rows and steps of 64 bytes; every (32 rows x 64 bytes) step
is one 2048-byte tile pair whose two 16-row halves are 16x16 matrices of 32-bit words stored
transposed (the AMX/VNNI B-tile layout). INT4 first packs elements k0+j and k0+64+j of each
128-wide step into one byte (low, high nibble).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from kt_convert.kt_runtime.format.methods import TILE_BYTES, TILE_ROWS, QuantMethod


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] 4-bit levels -> uint8 [N, K/2]; byte j of step s = (q[s*128+j], q[s*128+64+j])."""
    n, k = q.shape
    steps = q.to(torch.int16).reshape(n, k // 128, 2, 64) & 0x0F
    return (steps[:, :, 0, :] | (steps[:, :, 1, :] << 4)).to(torch.uint8).reshape(n, k // 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [N, K/2] -> int8 [N, K] sign-extended 4-bit levels."""
    n, half = packed.shape
    b = packed.contiguous().numpy().reshape(n, half // 64, 1, 64)
    # arithmetic shifts of the int8 view sign-extend: (b << 4) >> 4 is the low nibble, b >> 4 the high one
    s = b.view(np.int8)
    nib = np.concatenate(((s << 4) >> 4, s >> 4), axis=2)
    return torch.from_numpy(nib.reshape(n, half * 2))


@lru_cache(maxsize=16)
def tile_permutation(n: int, kbytes: int, n_block: int, k_block_bytes: int) -> torch.Tensor:
    """perm such that tiled = row_major.ravel()[perm] for an [n, kbytes] byte matrix."""
    if n % TILE_ROWS or kbytes % TILE_BYTES:
        raise ValueError(f"cannot tile a {n}x{kbytes}-byte matrix: rows must be a multiple of 32, bytes of 64")
    index = np.arange(n * kbytes, dtype=np.int64).reshape(n, kbytes)
    parts = []
    for nb in range(0, n, n_block):
        nbs = min(n_block, n - nb)
        for kb in range(0, kbytes, k_block_bytes):
            kbs = min(k_block_bytes, kbytes - kb)
            sub = index[nb : nb + nbs, kb : kb + kbs]
            # (row group, half, row, step, word, byte) -> (row group, step, half, word, row, byte)
            sub = sub.reshape(nbs // 32, 2, 16, kbs // 64, 16, 4).transpose(0, 3, 1, 4, 2, 5)
            parts.append(sub.reshape(-1))
    return torch.from_numpy(np.concatenate(parts))


def tile(q: torch.Tensor, method: QuantMethod) -> torch.Tensor:
    """Quantized int8 [N, K] (INT4: levels -7..7) -> tiled uint8 bytes (1-D)."""
    rows = pack_nibbles(q) if method.bits == 4 else q.view(torch.uint8)
    n, kbytes = rows.shape
    perm = tile_permutation(n, kbytes, method.n_block, method.k_block_bytes)
    return rows.contiguous().reshape(-1)[perm]


def untile(tiled: torch.Tensor, n: int, k: int, method: QuantMethod) -> torch.Tensor:
    """Tiled bytes (1-D uint8) -> int8 [N, K] quantized levels. The inverse of tile's permutation, block by
    block as numpy reshapes and transposes (no index arrays)."""
    kbytes = k // method.elems_per_byte
    if tiled.numel() != n * kbytes:
        raise ValueError(f"tiled weight has {tiled.numel()} bytes, expected {n * kbytes} for {n}x{k} {method.name}")
    if n % TILE_ROWS or kbytes % TILE_BYTES:
        raise ValueError(f"cannot untile a {n}x{kbytes}-byte matrix: rows must be a multiple of 32, bytes of 64")
    src = tiled.reshape(-1).view(torch.uint8).numpy().view(np.uint32)  # 4-byte words move whole
    rows = np.empty((n, kbytes // 4), dtype=np.uint32)
    off = 0
    for nb in range(0, n, method.n_block):
        nbs = min(method.n_block, n - nb)
        for kb in range(0, kbytes, method.k_block_bytes):
            kbs = min(method.k_block_bytes, kbytes - kb)
            seg = src[off : off + nbs * kbs // 4].reshape(nbs // 32, kbs // 64, 2, 16, 16)
            # (row group, step, half, word, row) -> (row group, half, row, step, word)
            rows[nb : nb + nbs, kb // 4 : (kb + kbs) // 4] = seg.transpose(0, 2, 4, 1, 3).reshape(nbs, kbs // 4)
            off += nbs * kbs // 4
    rows = rows.view(np.uint8)
    rows_t = torch.from_numpy(rows)
    return unpack_nibbles(rows_t) if method.bits == 4 else rows_t.view(torch.int8)
