"""kt_runtime.format.safetensors_file: interop with the real safetensors library, every validation rule,
zero-copy views, and a seeded fuzz over malformed files."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save_file

from kt_convert.kt_runtime.format.errors import SafetensorsFormatError
from kt_convert.kt_runtime.format.safetensors_file import (DTYPE_BITS, MAX_HEADER_SIZE, SafetensorsFile, TensorInfo,
                                                           plan_file, save_file, tensor_nbytes)

ALL_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
              "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
              "F64", "I64", "U64"]


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """Little-endian bytes of a torch tensor (any dtype, incl. fp8/fp4/0-d)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _torch_fixture() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bits = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, generator=g)  # noqa: E731
    return {
        "bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "f16": torch.randn(7, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(3, generator=g).double(),
        "i8": bits(4, 6).view(torch.int8),
        "u8": bits(5),
        "i16": torch.randint(-300, 300, (3, 3), dtype=torch.int16, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (4,), dtype=torch.int32, generator=g),
        "i64": torch.randint(-(2**40), 2**40, (2, 2), dtype=torch.int64, generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "e8m0": bits(4, 3).view(torch.float8_e8m0fnu),
        "e4m3": bits(3, 4).view(torch.float8_e4m3fn),
        "e5m2": bits(2, 2).view(torch.float8_e5m2),
        "fp4": bits(2, 8).view(torch.float4_e2m1fn_x2),  # header: F4 [2, 16]
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


# -- interop ----------------------------------------------------------------------------------------


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = _torch_fixture()
    path = tmp_path / "ref.safetensors"
    st_save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "note": "x"}
        assert set(f.keys()) == set(tensors)
        assert "fp4" in f and "nope" not in f
        for name, t in tensors.items():
            assert np.array_equal(f.raw(name), _as_bytes(t)), name
        assert f.tensors["fp4"].dtype == "F4" and f.tensors["fp4"].shape == (2, 16)
        assert f.array("fp4").shape == (2, 8) and f.array("fp4").dtype == np.uint8
        assert np.array_equal(f.array("fp4"), tensors["fp4"].view(torch.uint8).numpy())
        assert np.array_equal(f.array("e8m0"), tensors["e8m0"].view(torch.uint8).numpy())
        assert np.array_equal(f.array("bf16"), tensors["bf16"].view(torch.int16).numpy().view(np.uint16))
        assert np.array_equal(f.array("f32"), tensors["f32"].numpy())
        assert np.array_equal(f.array("i64"), tensors["i64"].numpy())
        assert np.array_equal(f.array("bool"), tensors["bool"].numpy())
        assert f.array("scalar").shape == () and f.array("scalar") == np.float32(3.5)
        assert f.array("empty").shape == (0, 4)
        for name, info in f.tensors.items():
            assert info.offset + info.nbytes <= path.stat().st_size
            assert info.nbytes == tensor_nbytes(info.dtype, info.shape)


def test_files_we_write_load_in_safetensors(tmp_path):
    tensors = _torch_fixture()
    ours = {}
    for name, t in tensors.items():
        dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                 torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
                 torch.int64: "I64", torch.bool: "BOOL", torch.float8_e8m0fnu: "F8_E8M0",
                 torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
                 torch.float4_e2m1fn_x2: "F4"}[t.dtype]
        shape = tuple(t.shape)
        if dtype == "F4":
            shape = shape[:-1] + (shape[-1] * 2,)  # header holds the logical element count
        ours[name] = (dtype, shape, _as_bytes(t).tobytes() if name == "u8" else _as_bytes(t))
    path = tmp_path / "ours.safetensors"
    save_file(path, ours)
    with safe_open(str(path), framework="pt") as g:
        assert g.metadata() == {"format": "pt"}
        assert set(g.keys()) == set(tensors)
        for name, t in tensors.items():
            got = g.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert np.array_equal(_as_bytes(got), _as_bytes(t)), name
    # and our reader agrees with itself
    with SafetensorsFile(path) as f:
        for name, t in tensors.items():
            assert np.array_equal(f.raw(name), _as_bytes(t))


def test_numpy_arrays_are_written_by_their_bytes(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    big_endian = np.arange(5, dtype=">i4")
    save_file(tmp_path / "a.safetensors", {"a": ("F32", (3, 4), a.T.copy().T), "b": ("I32", (5,), big_endian)},
              metadata={})
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert f.metadata == {}
        assert np.array_equal(f.array("a"), a)
        assert np.array_equal(f.array("b"), np.arange(5))
    with pytest.raises(ValueError, match="'a'.*48"):
        save_file(tmp_path / "b.safetensors", {"a": ("F32", (3, 3), a)})
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "b.safetensors.tmp").exists()


def test_plan_layout_alignment_and_offsets():
    entries = [("x", "U8", (64,)), ("y", "F32", (16, 4)), ("z", "BF16", (3,)), ("w", "F4", (2, 6))]
    header, offsets = plan_file(entries, {"format": "pt"}, align=64)
    n = int.from_bytes(header[:8], "little")
    assert len(header) == 8 + n and len(header) % 64 == 0 and n % 8 == 0
    assert header[8:9] == b"{" and header.rstrip(b" ") == header[: len(header.rstrip(b" "))]
    doc = json.loads(header[8:])
    assert list(doc) == ["__metadata__", "x", "y", "z", "w"]  # order as given
    assert offsets == {"x": (len(header), 64), "y": (len(header) + 64, 256),
                       "z": (len(header) + 320, 6), "w": (len(header) + 326, 6)}
    assert offsets["x"][0] % 64 == 0 and offsets["y"][0] % 64 == 0 and offsets["z"][0] % 64 == 0
    for align in (1, 8, 4096):
        h, _ = plan_file(entries, None, align=align)
        assert len(h) % align == 0 and "__metadata__" not in json.loads(h[8:])
    with pytest.raises(ValueError, match="duplicate"):
        plan_file([("a", "U8", (1,)), ("a", "U8", (1,))])
    with pytest.raises(ValueError, match="unknown"):
        plan_file([("a", "X9", (1,))])
    with pytest.raises(ValueError, match="whole number"):
        plan_file([("a", "F4", (3,))])
    with pytest.raises(ValueError):
        plan_file([("a", "U8", (-1,))])
    with pytest.raises(ValueError):
        plan_file([], {"format": 1})


def test_streamed_layout_is_readable(tmp_path):
    """The converter's pattern: write header, then each tensor at its planned offset."""
    entries = [("a", "I8", (8, 32)), ("b", "F8_E8M0", (8, 2)), ("c", "F4", (4, 64))]
    header, offsets = plan_file(entries, {"format": "pt", "kt": "1"})
    path = tmp_path / "s.safetensors"
    rng = np.random.default_rng(1)
    payload = {name: rng.integers(0, 256, nbytes, dtype=np.uint8) for name, (_, nbytes) in offsets.items()}
    with open(path, "wb") as f:
        f.write(header)
        for name, (off, nbytes) in offsets.items():
            f.seek(off)
            f.write(payload[name].tobytes())
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "kt": "1"}
        for name, (off, nbytes) in offsets.items():
            assert f.tensors[name].offset == off
            assert np.array_equal(f.raw(name), payload[name])
        assert f.array("c").shape == (4, 32)


def test_dtype_table_is_complete():
    assert list(DTYPE_BITS) == ALL_DTYPES
    assert DTYPE_BITS["F4"] == 4 and DTYPE_BITS["F6_E2M3"] == 6 and DTYPE_BITS["C64"] == 64
    assert tensor_nbytes("F6_E3M2", (4,)) == 3 and tensor_nbytes("C64", (2,)) == 16


def test_views_are_zero_copy_read_only_and_survive_close(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file(path, {"a": ("F32", (4,), np.arange(4, dtype=np.float32)), "e": ("F6_E2M3", (4,), b"abc")})
    f = SafetensorsFile(path)
    a, r = f.array("a"), f.raw("a")
    assert not a.flags.writeable and not r.flags.writeable and not a.flags.owndata
    assert np.shares_memory(a, r)
    with pytest.raises(ValueError):
        a[0] = 1
    with pytest.raises(SafetensorsFormatError, match="raw"):
        f.array("e")  # F6 has no per-element view
    assert bytes(f.raw("e")) == b"abc"
    with pytest.raises(KeyError, match="missing"):
        f.raw("missing")
    f.close()
    f.close()  # idempotent
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0]  # the mapping stays alive while views exist
    del a, r
    with pytest.raises(ValueError, match="closed"):
        f.raw("a")
    with SafetensorsFile(path) as g:
        assert isinstance(g.tensors["a"], TensorInfo)
    assert "closed" in repr(g)


# -- validation rules -------------------------------------------------------------------------------


def _file_bytes(header: dict | str | bytes, data: bytes = b"", n: int | None = None, pad: int = 0) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    header += b" " * pad
    return (len(header) if n is None else n).to_bytes(8, "little") + header + data


def _valid_header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [16, 20]},
    }


def _with(entry: str, **fields) -> dict:
    h = _valid_header()
    h[entry] = {**h[entry], **fields}
    return h


def _without(entry: str, field: str) -> dict:
    h = _valid_header()
    del h[entry][field]
    return h


DATA = bytes(range(20))
BAD_FILES = {
    "too_short": b"\x01\x00\x00",
    "zero_header_length": _file_bytes(b"", DATA, n=0),
    "header_too_large": _file_bytes(_valid_header(), DATA, n=MAX_HEADER_SIZE + 1),
    "header_past_eof": _file_bytes(_valid_header(), DATA, n=10_000),
    "header_length_huge_u64": _file_bytes(_valid_header(), DATA, n=2**64 - 1),
    "not_utf8": _file_bytes(b'{"a\xff\xfe":1}', DATA),
    "leading_space": _file_bytes(" " + json.dumps(_valid_header()), DATA),
    "not_json": _file_bytes("{not json", DATA),
    "trailing_garbage_json": _file_bytes(json.dumps(_valid_header()) + "x", DATA),
    "nan_constant": _file_bytes('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'),
    "deep_nesting": _file_bytes('{"a":' + "[" * 200_000 + "]" * 200_000 + "}"),
    "duplicate_tensor": _file_bytes(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        b"xy"),
    "duplicate_field": _file_bytes('{"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    "entry_not_object": _file_bytes({**_valid_header(), "c": [1, 2]}, DATA),
    "missing_dtype": _file_bytes(_without("a", "dtype"), DATA),
    "missing_shape": _file_bytes(_without("a", "shape"), DATA),
    "missing_offsets": _file_bytes(_without("a", "data_offsets"), DATA),
    "unknown_dtype": _file_bytes(_with("a", dtype="F128"), DATA),
    "lowercase_dtype": _file_bytes(_with("a", dtype="f32"), DATA),
    "dtype_not_string": _file_bytes(_with("a", dtype=32), DATA),
    "shape_negative": _file_bytes(_with("b", shape=[-4]), DATA),
    "shape_float": _file_bytes(_with("b", shape=[4.0]), DATA),
    "shape_bool": _file_bytes(_with("b", shape=[True, 4]), DATA),
    "shape_not_list": _file_bytes(_with("b", shape=4), DATA),
    "shape_string_dim": _file_bytes(_with("b", shape=["4"]), DATA),
    "offsets_three": _file_bytes(_with("b", data_offsets=[16, 20, 24]), DATA),
    "offsets_reversed": _file_bytes(_with("b", data_offsets=[20, 16]), DATA),
    "offsets_negative": _file_bytes(_with("a", data_offsets=[-16, 0]), DATA),
    "offsets_float": _file_bytes(_with("b", data_offsets=[16.0, 20]), DATA),
    "offsets_not_list": _file_bytes(_with("b", data_offsets="16,20"), DATA),
    "size_mismatch": _file_bytes(_with("b", shape=[5]), DATA),
    "partial_byte": _file_bytes({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"xy"),
    "partial_byte_f6": _file_bytes({"a": {"dtype": "F6_E2M3", "shape": [3], "data_offsets": [0, 3]}}, b"xyz"),
    "gap": _file_bytes(_with("b", data_offsets=[17, 21]), DATA + b"x"),
    "overlap": _file_bytes(
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
         "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"123456"),
    "not_starting_at_zero": _file_bytes(
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"12345678"),
    "trailing_bytes": _file_bytes(_valid_header(), DATA + b"extra"),
    "truncated_data": _file_bytes(_valid_header(), DATA[:-1]),
    "offsets_past_eof": _file_bytes(_with("b", shape=[1_000_000], data_offsets=[16, 1_000_016]), DATA),
    "metadata_nested": _file_bytes({**_valid_header(), "__metadata__": {"format": {"x": 1}}}, DATA),
    "metadata_int_value": _file_bytes({**_valid_header(), "__metadata__": {"n": 1}}, DATA),
    "metadata_not_object": _file_bytes({**_valid_header(), "__metadata__": ["pt"]}, DATA),
}


def test_reference_accepts_the_valid_baseline(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_file_bytes(_valid_header(), DATA, pad=5))
    with SafetensorsFile(path) as f:
        assert f.raw("b").tolist() == [16, 17, 18, 19]
        assert f.tensors["a"].offset == path.stat().st_size - 20
    with safe_open(str(path), framework="pt") as g:
        assert g.get_tensor("b").tolist() == [16, 17, 18, 19]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_each_rule_raises_with_the_file_name(tmp_path, case):
    path = tmp_path / f"bad_{case}.safetensors"
    path.write_bytes(BAD_FILES[case])
    with pytest.raises(SafetensorsFormatError) as exc:
        SafetensorsFile(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)), msg
    assert path.name in msg


@pytest.mark.parametrize("case", ["size_mismatch", "shape_negative", "unknown_dtype", "gap"])
def test_messages_name_the_tensor_and_say_what_to_do(tmp_path, case):
    path = tmp_path / "m.safetensors"
    path.write_bytes(BAD_FILES[case])
    with pytest.raises(SafetensorsFormatError, match=r"tensor '(a|b)'") as exc:
        SafetensorsFile(path)
    assert "re-" in str(exc.value) or "reader" in str(exc.value)


def test_edge_cases_that_are_valid(tmp_path):
    cases = {
        "no_tensors": _file_bytes({}),
        "metadata_only": _file_bytes({"__metadata__": {}}),
        "null_metadata": _file_bytes({"__metadata__": None, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
        "zero_sized_between": _file_bytes(
            {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
             "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [2, 2]},
             "b": {"dtype": "U8", "shape": [], "data_offsets": [2, 3]}}, b"xyz"),
        "unsorted_header": _file_bytes(
            {"b": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
             "a": {"dtype": "U16", "shape": [1], "data_offsets": [0, 2]}}, b"xyz"),
        "extra_fields_ignored": _file_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"x"),
        "unaligned_f32": _file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, pad=3),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with SafetensorsFile(path) as f:
            for k in f.keys():
                f.raw(k)
                f.array(k)
    with SafetensorsFile(tmp_path / "unsorted_header.safetensors") as f:
        assert f.keys() == ["b", "a"] and bytes(f.raw("b")) == b"z"


def test_os_errors_become_format_errors(tmp_path):
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(SafetensorsFormatError) as exc:
            SafetensorsFile(path)
        assert str(exc.value).startswith(str(path))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(SafetensorsFormatError, match="empty.safetensors.*0 bytes"):
        SafetensorsFile(empty)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(tmp_path):
    path = tmp_path / "locked.safetensors"
    path.write_bytes(_file_bytes(_valid_header(), DATA))
    path.chmod(0)
    try:
        with pytest.raises(SafetensorsFormatError, match="locked.safetensors.*readable"):
            SafetensorsFile(path)
    finally:
        path.chmod(0o600)


# -- fuzz ---------------------------------------------------------------------------------------------

_JUNK = [-1, 0, 1, 3, 7, 16, 2**31, 2**63, 2**64 + 5, 10**30, 1.5, -0.0, "", "F4", "x", None, True,
         False, [], {}, [1], [0, 0], [1, 2, 3], [-1, 2], [[1]], {"a": 1}]


def _fuzz_base() -> tuple[bytes, dict]:
    rng = np.random.default_rng(0)
    tensors = {
        "w": ("I8", (4, 16), rng.integers(0, 256, 64, dtype=np.uint8)),
        "s": ("F8_E8M0", (4, 1), rng.integers(118, 133, 4, dtype=np.uint8)),
        "f4": ("F4", (2, 8), rng.integers(0, 256, 8, dtype=np.uint8)),
        "bf": ("BF16", (3,), rng.integers(0, 256, 6, dtype=np.uint8)),
        "z": ("F32", (0,), b""),
        "c": ("C64", (), rng.integers(0, 256, 8, dtype=np.uint8)),
    }
    header, offsets = plan_file([(k, d, s) for k, (d, s, _) in tensors.items()], {"format": "pt"}, align=8)
    data = b"".join(bytes(memoryview(v[2])) for v in tensors.values())
    return header + data, json.loads(header[8:])


def _mutate(r: random.Random, base: bytes, doc: dict) -> bytes:
    n = int.from_bytes(base[:8], "little")
    kind = r.randrange(7)
    if kind == 6:  # edits that keep the file valid: same-size dtype swaps, reshapes, padding
        doc = json.loads(json.dumps(doc))
        for entry in (v for k, v in doc.items() if k != "__metadata__"):
            if DTYPE_BITS[entry["dtype"]] == 8 and r.random() < 0.5:
                entry["dtype"] = r.choice([d for d in ALL_DTYPES if DTYPE_BITS[d] == 8])
            if entry["dtype"] != "F4" and r.random() < 0.5:
                entry["shape"] = [int(np.prod(entry["shape"]))] + [1] * r.randrange(3)
        items = list(doc.items())
        r.shuffle(items)
        body = json.dumps(dict(items)).encode() + b" " * r.randrange(16)
        return len(body).to_bytes(8, "little") + body + base[8 + n:]
    if kind == 0:  # corrupt bytes in the length field or the header
        buf = bytearray(base)
        for _ in range(r.randint(1, 4)):
            buf[r.randrange(8 + n)] = r.randrange(256)
        return bytes(buf)
    if kind == 1:  # a wrong header length
        new_n = r.choice([0, 1, 2, n - 1, n + 1, n - 8, n + 8, r.randrange(2**64), r.randrange(1000),
                          MAX_HEADER_SIZE, len(base) - 8, len(base)])
        return max(new_n, 0).to_bytes(8, "little") + base[8:]
    if kind == 2:  # truncate or extend
        if r.random() < 0.7:
            return base[: r.randrange(len(base))]
        return base + bytes(r.randrange(256) for _ in range(r.randint(1, 9)))
    # JSON-level edits, then re-serialised (sometimes keeping the old length field)
    doc = json.loads(json.dumps(doc))
    names = [k for k in doc if k != "__metadata__"]
    for _ in range(r.randint(1, 3)):
        name = r.choice(names + ["__metadata__", "new"])
        entry = doc.get(name)
        op = r.randrange(6)
        if op == 0 or not isinstance(entry, dict):
            doc[name] = r.choice(_JUNK + [{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}])
        elif op == 1:
            entry[r.choice(["dtype", "shape", "data_offsets", "extra"])] = r.choice(_JUNK)
        elif op == 2:
            entry.pop(r.choice(list(entry) or ["dtype"]), None)
        elif op == 3 and "dtype" in entry:
            entry["dtype"] = r.choice(ALL_DTYPES + ["f32", "U9", "F8"])
        elif op == 4 and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
            i = r.randrange(len(entry["data_offsets"]))
            if isinstance(entry["data_offsets"][i], int):
                entry["data_offsets"][i] += r.choice([-9, -1, 1, 8, 64])
        elif op == 5 and isinstance(entry.get("shape"), list):
            entry["shape"] = [r.choice([0, 1, 2, 3, 4, 8, 16, -1, 2**40]) for _ in range(r.randint(0, 3))]
    text = json.dumps(doc)
    if kind == 5 and len(text) > 2:  # damage the JSON text itself
        i = r.randrange(len(text))
        text = text[:i] + r.choice(['"', "{", "}", ",", "]", ":", "\\", "\u00e9", "NaN", " "]) + text[i + 1:]
    body = text.encode() + b" " * r.randrange(8)
    length = len(body) if r.random() < 0.9 else n
    return length.to_bytes(8, "little") + body + base[8 + n:]


def test_fuzz_only_format_errors(tmp_path):
    base, doc = _fuzz_base()
    r = random.Random(1234)
    path = tmp_path / "fuzz.safetensors"
    opened = rejected = 0
    start = time.perf_counter()
    for _ in range(3000):
        path.write_bytes(_mutate(r, base, doc))
        try:
            with SafetensorsFile(path) as f:
                for name in f.keys():
                    info = f.tensors[name]
                    raw = f.raw(name)
                    assert raw.nbytes == info.nbytes
                    int(raw.sum())  # touch every byte
                    try:
                        arr = f.array(name)
                        assert arr.nbytes == info.nbytes
                    except SafetensorsFormatError as e:
                        assert str(e).startswith(str(path))
            opened += 1
            accepted = True
        except SafetensorsFormatError as e:
            assert str(e).startswith(str(path))
            rejected += 1
            accepted = False
        # The reference reader agrees on every case: we are neither laxer nor stricter.
        try:
            with safe_open(str(path), framework="pt") as g:
                for name in g.keys():
                    if not g.get_slice(name).get_dtype().startswith("F6"):  # torch has no F6 dtype
                        g.get_tensor(name)
            reference_accepted = True
        except Exception:  # noqa: BLE001 - safetensors raises several types
            reference_accepted = False
        assert accepted == reference_accepted, path.read_bytes()[:400]
    assert opened > 300 and rejected > 1000, (opened, rejected)
    assert time.perf_counter() - start < 15


def test_permission_error_is_wrapped(tmp_path, monkeypatch):
    """Same as above but works as root: simulate EACCES from opening the file."""
    import kt_convert.kt_runtime.format.safetensors_file as mod

    path = tmp_path / "denied.safetensors"
    path.write_bytes(_file_bytes(_valid_header(), DATA))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(mod, "open_regular", denied)
    with pytest.raises(SafetensorsFormatError, match="denied.safetensors.*Permission denied.*readable"):
        SafetensorsFile(path)
