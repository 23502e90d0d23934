"""Layer digests: the streaming hasher and the parallel verifier agree, and the digest changes
with any byte, with file order and with where files start."""
import hashlib

import numpy as np
import pytest

from kt_convert.kt_runtime.format import digest
from kt_convert.kt_runtime.format.digest import TreeHasher, tree_sha256_files


def manual(files: list[bytes], block: int) -> str:
    top = hashlib.sha256()
    for data in files:
        for off in range(0, len(data), block):
            top.update(hashlib.sha256(data[off:off + block]).digest())
    return top.hexdigest()


def test_streaming_and_verifier_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(digest, "BLOCK", 1000)
    rng = np.random.default_rng(0)
    files = [rng.bytes(n) for n in (2500, 0, 1000, 7)]
    paths = []
    hasher = TreeHasher(threads=3, max_pending=2)
    for i, data in enumerate(files):
        hasher.start_file()
        # uneven writes that straddle block boundaries
        for a, b in ((0, 1), (1, 999), (999, 1500), (1500, len(data))):
            if a < len(data):
                hasher.update(np.frombuffer(data[a:min(b, len(data))], np.uint8))
        p = tmp_path / f"f{i}"
        p.write_bytes(data)
        paths.append(p)
    streamed = hasher.hexdigest()
    assert streamed == manual(files, 1000) == tree_sha256_files(paths, threads=2)
    # order and boundaries matter; a flipped byte changes it
    assert tree_sha256_files(paths[::-1]) != streamed
    merged = tmp_path / "merged"
    merged.write_bytes(files[0] + files[2])  # same bytes, other file boundary
    assert tree_sha256_files([merged]) != manual([files[0], files[2]], 1000)
    flipped = bytearray(files[3])
    flipped[0] ^= 1
    paths[3].write_bytes(bytes(flipped))
    assert tree_sha256_files(paths) != streamed


def test_single_small_file_is_sha256_of_sha256(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert tree_sha256_files([p]) == hashlib.sha256(hashlib.sha256(b"abc").digest()).hexdigest()


def test_first_piece_given_at_the_end(tmp_path, monkeypatch):
    """A header written with a placeholder and completed after the data: the first block is held, hashed with
    the final header, and the digest is the file's as it ends up (blocks of one file and of several)."""
    monkeypatch.setattr(digest, "BLOCK", 1000)
    rng = np.random.default_rng(1)
    for size in (300, 2500):
        data = rng.bytes(size)
        placeholder, final = b"H" * 40, b"header:" + b"x" * 33
        hasher = TreeHasher(threads=2, first_piece_later=True)
        hasher.start_file()
        hasher.update(placeholder)
        for a in range(0, size, 700):
            hasher.update(np.frombuffer(data[a:a + 700], np.uint8))
        p = tmp_path / f"f{size}"
        p.write_bytes(final + data)
        got = hasher.hexdigest(final)
        assert got == manual([final + data], 1000) == tree_sha256_files([p])
        assert got != manual([placeholder + data], 1000)
    hasher = TreeHasher(first_piece_later=True)
    hasher.update(b"abc")
    with pytest.raises(ValueError, match="placeholder's length"):
        hasher.hexdigest(b"abcd")
    hasher.close()


def test_file_digests_are_the_plain_sha256_of_one_block_files(monkeypatch):
    """Files of one block (or empty) get their plain sha256 for free; longer ones None (the caller hashes them);
    the tree digest of one-block files follows from their sha256s."""
    monkeypatch.setattr(digest, "BLOCK", 1000)
    rng = np.random.default_rng(1)
    files = [rng.bytes(n) for n in (1000, 0, 2500, 1, 999)]
    hasher = TreeHasher(threads=2)
    for data in files:
        hasher.start_file()
        for a in range(0, len(data), 300):  # writes that straddle the block boundary
            hasher.update(np.frombuffer(data[a:a + 300], np.uint8))
    hasher.hexdigest()
    sums = hasher.file_digests()
    assert sums == [hashlib.sha256(files[0]).hexdigest(), hashlib.sha256(b"").hexdigest(), None,
                    hashlib.sha256(files[3]).hexdigest(), hashlib.sha256(files[4]).hexdigest()]
    one_block = [files[0], files[3], files[4]]
    assert digest.tree_sha256_of_files([hashlib.sha256(d).hexdigest() for d in one_block]) == manual(one_block, 1000)


def test_buffers_are_free_once_hashed_even_the_held_first_block(tmp_path, monkeypatch):
    """The GPU path reuses a batch's pinned arena once nothing references it: the hasher must not keep the
    buffers given to update() past their block's hashing, not even those of the first block, which waits for
    the final header (its bytes are copied), and end_file() hashes the last block before the commit's fsync."""
    from kt_convert.convert.host_memory import HostBlock

    monkeypatch.setattr(digest, "BLOCK", 4096)
    block = HostBlock(np.zeros(64 * 4096, np.uint8))
    rng = np.random.default_rng(2)
    data = rng.bytes(5 * 4096 + 123)
    placeholder, final = b"H" * 40, b"F" * 40
    hasher = TreeHasher(threads=2, first_piece_later=True)
    hasher.start_file()
    hasher.update(placeholder)
    for a in range(0, len(data), 3000):
        lease = block.lease(4096)
        lease[: len(data[a:a + 3000])] = np.frombuffer(data[a:a + 3000], np.uint8)
        hasher.update(lease[: len(data[a:a + 3000])])
        del lease
    hasher.end_file()
    for f in hasher._digests[1:]:
        f.result()
    assert block.free_bytes() == 64 * 4096  # every lease back before the digest is asked for
    assert hasher.hexdigest(final) == manual([final + data], 4096)
