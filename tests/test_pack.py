"""Packer numerics: the torch reference against an element-wise oracle, and the C++ packer
(every ISA available here, several thread counts) against the reference, byte for byte."""
import importlib.util

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from kt_convert.kt_runtime.format.methods import INT4, INT8, RAWINT4_G32, RAWINT4_G128
from kt_convert.quant.amx_tiling import tile, untile
from kt_convert.quant.cpu import PackTarget, SourceMatrix, pack_cpu
from kt_convert.quant.decoders import decode_source, encode_int4_words
from kt_convert.quant.kt_quant import quantize_rows
from kt_convert.quant.mxfp4 import E2M1_VALUES, decode_mxfp4
from kt_convert.quant.reference import dequantize_packed, pack_reference
from kt_convert.quant.source_formats import SOURCE_FORMATS
from helpers.numerics import available_isas, random_bf16

AVAILABLE_ISAS = available_isas()


def oracle_tiled_offset(r, c, n, k, method):
    """Closed-form byte offset and nibble of element (r, c) (docs/FORMAT.md §3)."""
    nb_size = method.n_block
    nb = r // nb_size * nb_size
    nbs = min(nb_size, n - nb)
    rl = r - nb
    kb = c // 3584 * 3584
    kbs = min(3584, k - kb)
    cl = c - kb
    ns = rl // 32 * 32
    ri = rl - ns
    if method is INT8:
        ks = cl // 64 * 64
        ci = cl - ks
        return nb * k + kb * nbs + ns * kbs + ks * 32 + (ri // 16) * 1024 + (ci // 4) * 64 + (ri % 16) * 4 + ci % 4, None
    ks = cl // 128 * 128
    ci = cl - ks
    half, cj = ci // 64, ci % 64
    off = (nb * k + kb * nbs + ns * kbs + ks * 32) // 2 + (ri // 16) * 1024 + (cj // 4) * 64 + (ri % 16) * 4 + cj % 4
    return off, half


@pytest.mark.parametrize("method,n,k", [(INT8, 96, 3904), (INT4, 160, 3968), (INT4, 32, 128), (INT8, 32, 64)])
def test_reference_tiling_matches_closed_form_offsets(method, n, k):
    q, _, _ = quantize_rows(random_bf16(n, k, 1), method)
    tiled = tile(q, method).numpy()
    qn = q.numpy()
    # element-wise check on a strided subset plus rows/columns at every block boundary
    check_r = sorted(r for r in set(range(0, n, 7)) | {n - 1, 31, 32, 63, 64, 127, 128} if r < n)
    check_c = sorted(c for c in set(range(0, k, 13)) | {k - 1, 63, 64, 127, 128, 3583, 3584} if c < k)
    for r in check_r:
        for c in check_c:
            off, half = oracle_tiled_offset(r, c, n, k, method)
            byte = int(tiled[off])
            if half is None:
                got = byte - 256 if byte >= 128 else byte
            else:
                nib = byte & 0x0F if half == 0 else byte >> 4
                got = nib - 16 if nib >= 8 else nib
            assert got == qn[r, c], (r, c)


@pytest.mark.parametrize("method", [INT4, INT8])
def test_untile_inverts_tile(method):
    q, d, _ = quantize_rows(random_bf16(160, 3968, 2), method)
    assert torch.equal(untile(tile(q, method), 160, 3968, method), q)


def test_int8_rounding_is_half_to_even():
    # amax 127 gives d = 1 and 1/d = 1, so x*id = x exactly: bf16 ties at .5 round to even.
    row = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 0.0] + [0.0] * 56], dtype=torch.bfloat16)
    q, d, _ = quantize_rows(row, INT8)
    assert d.item() == 1.0
    assert q[0, :8].tolist() == [127, 0, 2, 2, -2, 0, 4, 0]


def test_int4_levels_follow_kt_round_4bit():
    # amax 112 gives d = 1; int8 grid values then map to 4-bit levels with ties away from zero.
    vals = [112.0, 7.5, 8.0, 23.5, 104.0, 111.0, 7.0, -8.0, -24.0, 0.0]
    row = torch.tensor([vals + [0.0] * (128 - len(vals))], dtype=torch.bfloat16)
    q, d, _ = quantize_rows(row, INT4)
    assert d.item() == 1.0
    # 7.5 -> rne 8 -> 1; 23.5 -> 24 -> 2; 104 -> 7; 111 -> 7; 7 -> 0; -8 -> -1; -24 -> -2
    assert q[0, : len(vals)].tolist() == [7, 1, 1, 2, 7, 7, 0, -1, -2, 0]
    assert q.min() >= -7 and q.max() <= 7


def test_zero_row_gives_zero_scale_and_bytes():
    w = torch.zeros(32, 128, dtype=torch.bfloat16)
    for method in (INT4, INT8):
        weight, scales, _ = pack_reference(w, method)
        assert not weight.any() and not scales.any()


def test_mxfp4_decode_matches_formula():
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(8, 64), dtype=np.uint8)
    scales = rng.integers(118, 133, size=(8, 4), dtype=np.uint8)
    got = decode_mxfp4(blocks, scales).float().numpy()
    for r in range(8):
        for c in range(128):
            code = blocks[r, c // 2] & 0x0F if c % 2 == 0 else blocks[r, c // 2] >> 4
            assert got[r, c] == E2M1_VALUES[code] * 2.0 ** (int(scales[r, c // 32]) - 127)


def test_mxfp4_edge_scales_follow_kt():
    blocks = np.full((1, 32), 0x22, dtype=np.uint8)  # value 1.0 everywhere
    scales = np.array([[0, 255]], dtype=np.uint8)
    got = decode_mxfp4(blocks, scales).float()
    assert (got[0, :32] == 0).all() and torch.isinf(got[0, 32:]).all()


def _cpu_pack(method, src, col0, k, isa, threads):
    n = src.shape[0]
    dst = PackTarget.empty(method, n, k)
    nonfinite = pack_cpu(method, [(src, col0, k, dst)], isa=isa, num_threads=threads)
    return dst, nonfinite[0]


SHAPES = [(INT4, 160, 3968), (INT4, 256, 7168), (INT8, 96, 3904), (INT8, 160, 4096), (INT4, 32, 128), (INT8, 32, 64)]


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method,n,k", SHAPES)
def test_cpu_bf16_matches_reference(isa, method, n, k):
    w = random_bf16(n, k, seed=n + k)
    ref_w, ref_s, _ = pack_reference(w, method)
    src = SourceMatrix("bf16", w.view(torch.uint16).numpy())
    for threads in (1, 2, 4):
        dst, bad = _cpu_pack(method, src, 0, k, isa, threads)
        assert bad == 0
        assert np.array_equal(dst.weight, ref_w.numpy()), f"{isa} threads={threads}"
        assert np.array_equal(dst.scales.view(np.uint32), ref_s.numpy().view(np.uint32))


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
def test_cpu_mxfp4_column_slices_match_reference(isa, method):
    rng = np.random.default_rng(7)
    n, ktot = 160, 4096 + 512
    blocks = rng.integers(0, 256, size=(n, ktot // 2), dtype=np.uint8)
    scales = rng.integers(110, 141, size=(n, ktot // 32), dtype=np.uint8)
    full = decode_mxfp4(blocks, scales)
    src = SourceMatrix("mxfp4", blocks, scales)
    for col0, k in ((0, ktot), (512, 3840), (ktot - 256, 256)):
        ref_w, ref_s, _ = pack_reference(full[:, col0 : col0 + k], method)
        dst, bad = _cpu_pack(method, src, col0, k, isa, 2)
        assert bad == 0
        assert np.array_equal(dst.weight, ref_w.numpy()), (col0, k)
        assert np.array_equal(dst.scales, ref_s.numpy())


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_cpu_row_slice_of_mxfp4(isa):
    rng = np.random.default_rng(8)
    blocks = rng.integers(0, 256, size=(256, 128), dtype=np.uint8)
    scales = rng.integers(110, 141, size=(256, 8), dtype=np.uint8)
    src = SourceMatrix("mxfp4", blocks, scales).rows(128, 128)
    ref_w, ref_s, _ = pack_reference(decode_mxfp4(blocks[128:], scales[128:]), INT4)
    dst, _ = _cpu_pack(INT4, src, 0, 256, isa, 2)
    assert np.array_equal(dst.weight, ref_w.numpy()) and np.array_equal(dst.scales, ref_s.numpy())


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8])
def test_nonfinite_values_are_counted_and_packed_as_zero(isa, method):
    w = random_bf16(64, 256, 9)
    w[3, 7] = float("nan")
    w[10, 100] = float("inf")
    w[11, 0] = float("-inf")
    ref_w, ref_s, ref_bad = pack_reference(w, method)
    dst, bad = _cpu_pack(method, SourceMatrix("bf16", w.view(torch.uint16).numpy()), 0, 256, isa, 2)
    assert bad == ref_bad == 3
    assert np.array_equal(dst.weight, ref_w.numpy()) and np.array_equal(dst.scales, ref_s.numpy())


def test_dequantize_round_trip_error_is_bounded():
    w = random_bf16(128, 512, 4)
    # INT8: half a step of amax/127. INT4 rounds twice (to the int8 grid of amax/112, then to a
    # multiple of 16 of it), so up to 8.5 grid units.
    for method, bound in ((INT8, 0.5 / 127), (INT4, 8.5 / 112)):
        weight, scales, _ = pack_reference(w, method)
        back = dequantize_packed(weight, scales, 128, 512, method)
        amax = w.float().abs().amax(dim=1, keepdim=True)
        err = (back - w.float()).abs()
        assert (err <= amax * bound * 1.0001 + 1e-6).all()
        assert err.max() > amax.max() * bound * 0.5  # the bound is tight, not vacuous


@pytest.mark.parametrize("bad", [dict(n=48), dict(k=96), dict(col0=16)])
def test_cpu_packer_rejects_unaligned_shapes(bad):
    n, k, col0 = bad.get("n", 64), bad.get("k", 128), bad.get("col0", 0)
    if "col0" in bad:
        src = SourceMatrix("mxfp4", np.zeros((n, 128), np.uint8), np.full((n, 8), 127, np.uint8))
    else:
        src = SourceMatrix("bf16", np.zeros((n, k), np.uint16))
    dst = PackTarget(np.empty(n * k // 2, np.uint8), np.empty(n, np.float32))
    with pytest.raises(ValueError):
        pack_cpu(INT4, [(src, col0, k, dst)])


def test_cpu_packer_rejects_wrong_output_size():
    src = SourceMatrix("bf16", np.zeros((64, 128), np.uint16))
    dst = PackTarget(np.empty(10, np.uint8), np.empty(64, np.float32))
    with pytest.raises(ValueError, match="out_weight"):
        pack_cpu(INT8, [(src, 0, 128, dst)])


def test_one_name_per_source_format():
    """The source-format table, the C++ packer's SourceKind, the Triton kernel's KIND codes and the CLI's
    --input-type choices name the same formats."""
    import re

    from kt_convert.convert.cli.conversion import convert_command as cli
    from kt_convert.quant.source_formats import INPUT_TYPES, SOURCE_FORMATS

    with pytest.raises(ValueError, match="unknown source kind") as e:
        pack_cpu(INT8, [(SourceMatrix("nope", np.zeros((32, 64), np.uint16)), 0, 64, PackTarget.empty(INT8, 32, 64))])
    cpp_kinds = re.split(r", | or ", re.search(r"\(expected (.*)\)", str(e.value))[1])
    assert sorted(cpp_kinds) == sorted(SOURCE_FORMATS)
    option = next(p for p in cli.params if p.name == "input_type")
    assert list(option.type.choices) == ["auto", "fp4", "fp8", "bf16", "fp16", "int4", "nvfp4", "mxfp8"] == \
        ["auto", *INPUT_TYPES]
    for kind, f in SOURCE_FORMATS.items():
        assert SourceMatrix(kind, np.zeros((32, 4), np.uint8)).shape == (32, 4 * f.elements_per_item)
    if importlib.util.find_spec("triton") is not None:
        from kt_convert.quant import triton_kernels

        codes = {k: getattr(triton_kernels, "KIND_" + k.upper()) for k in SOURCE_FORMATS if k != "int4_group"}
        codes["int4_group"] = triton_kernels.KIND_INT4_GROUP_BF16
        assert codes == {k: f.gpu_code for k, f in SOURCE_FORMATS.items()}
        assert triton_kernels.KIND_INT4_GROUP_F32 == SOURCE_FORMATS["int4_group"].gpu_code + 1
        assert triton_kernels.KIND_NVFP4_DIV == SOURCE_FORMATS["nvfp4"].gpu_code + 1


# -- the dispatch table: every ISA level forced in turn, every source kind, every method ---------------


@pytest.mark.parametrize("kind", sorted(SOURCE_FORMATS))
def test_each_isa_level_runs_its_own_row(kind):
    """Forcing a level runs that level's kernels, each row filling every entry (the RAWINT4 group quantizer
    included); AMX CPUs run the AVX-512 row; every source kind has a decoder in every SIMD row."""
    for isa, row in (("portable", "portable"), ("avx2", "avx2"), ("avx512", "avx512"), ("amx", "avx512")):
        assert kt_kernels._testing.pack_kernel_rows(isa, kind) == {
            "decode": row, "quantize_row": row, "pack_nibbles": row, "tile_block": row,
            "quantize_groups_row": row}, isa


def _strided(a: np.ndarray) -> np.ndarray:
    """`a` as every other row of an array twice as tall, the rows between of 0xFF bytes (NaN in every float
    format): rows with a stride, as gpt-oss's interleaved gate/up are read, and a decoder that read the wrong
    row would count non-finite values."""
    both = np.full((2 * a.shape[0], a.shape[1] * a.itemsize), 0xFF, np.uint8).view(a.dtype)
    both[0::2] = a
    return both[0::2]


def _source(kind: str, n: int, k: int) -> SourceMatrix:
    """A random [n, k] source of `kind` with strided rows and a few non-finite values (or codes / scales that
    decode to them) in columns 130..200, as stored in checkpoints."""
    rng = np.random.default_rng(sorted(SOURCE_FORMATS).index(kind))
    if kind == "bf16":
        w = random_bf16(n, k, 11).view(torch.uint16).numpy()
        w[3, 140], w[5, 200], w[6, 135] = 0x7FC0, 0xFF80, 0x7F80  # NaN, -inf, inf
        return SourceMatrix(kind, _strided(w))
    if kind == "f32":  # bf16-exact float32
        w = (random_bf16(n, k, 12).view(torch.uint16).numpy().astype(np.uint32) << 16).view(np.float32)
        w[4, 150] = np.inf
        return SourceMatrix(kind, _strided(w))
    if kind == "f16":
        h = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
        h[2, 130:136] = [6e-8, -3e-6, 65504, -65504, np.inf, np.nan]  # subnormals, extremes, non-finite
        return SourceMatrix(kind, _strided(h.view(np.uint16)))
    if kind == "mxfp4":
        blocks = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
        scales = rng.integers(110, 141, size=(n, k // 32), dtype=np.uint8)
        scales[7, 4], scales[8, 5] = 255, 0  # E8M0 255 -> inf scale (non-finite), 0 -> zero
        return SourceMatrix(kind, _strided(blocks), _strided(scales))
    if kind == "fp8_block":
        w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
        w[(w & 0x7F) == 0x7F] = 0x3C
        w[9, 160] = 0x7F  # E4M3FN NaN
        grid = (-(-n // 32), -(-k // 64))
        s = (2.0 ** rng.integers(-12, -4, size=grid) * rng.uniform(1, 2, size=grid)).astype(np.float32)
        return SourceMatrix(kind, _strided(w), s, (32, 64))
    if kind == "int4_group":
        words = encode_int4_words(rng.integers(0, 16, size=(n, k)))
        sc = rng.uniform(0.001, 0.01, size=(n, k // 32)).astype(np.float32)
        scales = (sc.view(np.uint32) >> 16).astype(np.uint16)
        scales[10, 5] = 0x7F80  # an inf scale
        return SourceMatrix(kind, _strided(words), _strided(scales), (1, 32))
    if kind == "nvfp4":  # compressed-tensors' layout: the group scales divided by a non-power-of-two global scale
        blocks = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
        scales = rng.integers(0x20, 0x58, size=(n, k // 16), dtype=np.uint8)  # E4M3 0.0078..12
        # groups 8..12 (columns 128..207): E4M3 NaN of either sign, a zero, a subnormal and a negative scale
        scales[3, 8], scales[4, 9], scales[5, 10], scales[6, 11], scales[8, 12] = 0x7F, 0xFF, 0x00, 0x03, 0xB8
        return SourceMatrix(kind, _strided(blocks), _strided(scales), global_scale=float(np.float32(7264.86)),
                            global_divides=True)
    if kind == "mxfp8":
        w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
        w[(w & 0x7F) == 0x7F] = 0x30
        w[0, 128:144] = np.arange(16)  # zero, the subnormal E4M3 codes and the smallest normals
        w[1, 144:152] = 0x80 | np.arange(8)  # negative subnormals
        w[9, 160], w[10, 161] = 0x7F, 0xFF  # E4M3FN NaN of either sign
        scales = rng.integers(115, 132, size=(n, k // 32), dtype=np.uint8)
        # E8M0 255 -> inf scale, 0 -> zero (kt's reading), 1 (2^-126) times subnormal codes -> float32 subnormals,
        # 254 (2^127) times codes above 2 -> overflow to inf
        scales[7, 4], scales[8, 5], scales[2, 6], scales[11, 6] = 255, 0, 1, 254
        w[2, 192:200] = np.arange(8)
        return SourceMatrix(kind, _strided(w), _strided(scales))
    raise AssertionError(f"no test source for kind {kind!r}: add one")


ALL_KINDS_N, ALL_KINDS_K = 64, 512
_REFERENCE: dict = {}


def _reference(kind, method, col0, k):
    """The torch reference's bytes, scales and non-finite count for columns [col0, col0 + k) of _source(kind)."""
    key = (kind, method.name, col0, k)
    if key not in _REFERENCE:
        full = decode_source(_source(kind, ALL_KINDS_N, ALL_KINDS_K))
        w, s, bad = pack_reference(full[:, col0 : col0 + k], method)
        _REFERENCE[key] = (w.numpy().reshape(-1), s.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)
                           if s.dtype == torch.bfloat16 else s.numpy().view(np.uint32), bad)
    return _REFERENCE[key]


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize("method", [INT4, INT8, RAWINT4_G32, RAWINT4_G128], ids=lambda m: m.name)
@pytest.mark.parametrize("kind", sorted(SOURCE_FORMATS))
def test_every_source_kind_and_method_on_every_isa(kind, method, isa):
    """The C++ packer at each ISA level, forced, gives the torch reference's bytes (and the reference C++'s) for
    every source kind, with strided rows, column slices and non-finite values. For the kinds that allow it, slices
    start off a SIMD step (column 4: decoded by the reference), inside a scale block (24: on the 8-column step of
    AVX2's fp8_block, int4_group and mxfp8 decoders, off the 16-column steps of AVX-512 and of AVX2's nvfp4) and
    inside a 32-column scale group (48)."""
    src = _source(kind, ALL_KINDS_N, ALL_KINDS_K)
    slices = [(0, ALL_KINDS_K), (128, 256)]
    if kind != "mxfp4" and method is not INT4 and method is not RAWINT4_G128:  # k of 256 from columns 4, 24, 48
        slices += [(4, 256), (24, 256), (48, 256)]
    for col0, k in slices:
        ref_w, ref_s, ref_bad = _reference(kind, method, col0, k)
        assert ref_bad > 0  # every slice holds non-finite values
        if src.carries_codes(method, col0):
            ref_w, ref_s = _carried(src, method, col0, k, ref_w, ref_s)
        for threads in (1, 3):
            dst, bad = _cpu_pack(method, src, col0, k, isa, threads)
            assert bad == ref_bad, (col0, k, threads)
            assert np.array_equal(dst.weight, ref_w), (col0, k, threads)
            assert np.array_equal(dst.scales.view(ref_s.dtype), ref_s), (col0, k, threads)


def _carried(src, method, col0, k, ref_w, ref_s):
    """An INT4 source on the output's grid: its code bytes and bf16 scales (each source scale repeated over the
    output groups it holds), except groups whose scale cannot decode finitely (|scale| >= 2^124, NaN, inf),
    which are quantized from the decoded values (the reference's bytes)."""
    g, n = method.group_size, src.shape[0]
    codes = np.ascontiguousarray(src.weight).view(np.uint8)[:, col0 // 2 : (col0 + k) // 2]
    scales = np.ascontiguousarray(src.scales)[:, (col0 + g * np.arange(k // g)) // src.block[1]]
    usable = (scales & 0x7FFF) < 0x7D80
    assert not usable.all()  # the test source has an unusable scale in every slice
    want_w = np.where(np.repeat(usable, g // 2, axis=1), codes, ref_w.reshape(n, -1)).reshape(-1)
    return want_w, np.where(usable, scales, ref_s.reshape(n, -1)).reshape(-1)


def _group_rows() -> torch.Tensor:
    """RAWINT4 rows (groups of 32) at the quantizer's edges: groups with several zero-error scales, one where
    clipping pays, a zero group, subnormals, magnitudes on both sides of where the SIMD rows leave the search to
    the reference (amax below 2^-90 or from 2^100), exact error ties on a coarse grid, heavy tails."""
    rows = []

    def group(*head):
        g = torch.zeros(32, dtype=torch.float64)
        g[: len(head)] = torch.tensor(head, dtype=torch.float64)
        return g

    tiny = 2.0**-133  # the smallest bf16 subnormal
    rows.append(torch.cat([group(1.5, 0.5, -0.5), group(*[0.625] * 31, 1.0), group(), group(-56.0)]))
    rows.append(torch.cat([group(-7 * 2.0**-20), group(1.0), group(15 * tiny, tiny), group(2.0**-126, -tiny)]))
    g = torch.Generator().manual_seed(5)
    unit = [torch.randn(32, generator=g, dtype=torch.float64) for _ in range(4)]
    rows.append(torch.cat([v / v.abs().max() * 2.0**e for v, e in zip(unit, (-90, -90.5, 99.9, 100))]))
    rows.append(torch.randn(128, generator=g) * 1e-3)
    rows.append(torch.round(torch.randn(128, generator=g) * 4) * 0.25)  # a coarse grid: many exact error ties
    rows.append(torch.distributions.StudentT(2.0).sample((128,)) * 0.01)
    return torch.stack(rows).to(torch.bfloat16)


def _sse(x: np.ndarray, d: float) -> float:
    """A group's squared error at scale d with codes clamp(rint(x / d), -7, 7), float64."""
    return float(((x - np.clip(np.round(x / d), -7, 7) * d) ** 2).sum())


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
def test_group_quantizer_edges_on_every_isa(isa):
    """Every ISA level writes the torch reference's bytes on these groups; the reference's scales of the first
    groups are worked by hand (the least squared error over codes -7..7; on a tie the smallest scale)."""
    w = _group_rows()
    x = w.double().numpy()
    assert x[1, 64] == 15 * 2.0**-133 and np.abs(x[2, :32]).max() == 2.0**-90  # the edges survive bf16
    assert np.abs(x[2, 32:64]).max() < 2.0**-90 and np.abs(x[2, 96:]).max() == 2.0**100
    ref_w, ref_s, _ = pack_reference(w, RAWINT4_G32)
    want_s = ref_s.view(torch.int16).numpy().reshape(-1).view(np.uint16)
    codes = (np.stack([ref_w.numpy() & 0xF, ref_w.numpy() >> 4], axis=-1).reshape(len(x), -1)).astype(int) - 8
    # [1.5, 0.5, -0.5]: exact at 0.5 and at 0.25 (codes 6 2 -2), the smaller kept; 0.125 would clip 1.5 (12)
    assert want_s[0] == 0x3E80 and list(codes[0, :3]) == [6, 2, -2]
    # 31 x 0.625 and 1.0: codes 3 and 5 at 0.2080078125 (the bf16 value beside S/Q = 63.125/304), error
    # 31 x 0.0009765625^2 + 0.0400390625^2, below its bf16 neighbours' and amax/7 rounded up's (codes 4 and 7)
    assert want_s[1] == 0x3E55 and set(codes[0, 32:63]) == {3} and codes[0, 63] == 5
    best = 31 * 0.0009765625**2 + 0.0400390625**2
    assert _sse(x[0, 32:64], 0.2080078125) == best
    assert min(_sse(x[0, 32:64], d) for d in (0.20703125, 0.208984375, 0.142578125)) > best
    # zeros: scale 0, codes 0; [-56]: exact at 8 (code -7), the smallest exact scale (56 / c for c <= 7)
    assert list(want_s[2:4]) == [0, 0x4100] and codes[0, 96] == -7 and not codes[0, 64:96].any()
    # [-7 2^-20]: exact at 2^-20 (code -7); [1]: exact at 1, 0.5 and 0.25 (1/3, 1/5, 1/6, 1/7 are not bf16): 0.25,
    # code 4; [15 t, t] (t = 2^-133): no exact scale; 3 t errs t^2 (codes 5, 0), as do 5 t and 15 t, every
    # smaller multiple of t more
    assert list(want_s[4:7]) == [0x3580, 0x3E80, 0x0003]
    assert codes[1, 0] == -7 and codes[1, 32] == 4 and list(codes[1, 64:66]) == [5, 0]
    assert not codes.min() < -7  # never the level -8
    src = SourceMatrix("bf16", w.view(torch.uint16).numpy())
    for threads in (1, 2):
        dst, bad = _cpu_pack(RAWINT4_G32, src, 0, 128, isa, threads)
        assert bad == 0
        assert np.array_equal(dst.weight, ref_w.numpy().reshape(-1))
        assert np.array_equal(dst.scales.view(np.uint16), want_s)


# -- KT_PACK_ISA: the converter's packer at a forced level ---------------------------------------------


def test_pack_isa_variable():
    from kt_convert.convert.errors import UserError
    from kt_convert.convert.packers import pack_isa

    assert pack_isa({}) == pack_isa({"KT_PACK_ISA": "auto"}) == pack_isa({"KT_PACK_ISA": " "}) == kt_kernels.best_isa()
    for isa in AVAILABLE_ISAS:
        assert pack_isa({"KT_PACK_ISA": isa}) == isa
    assert pack_isa({"KT_PACK_ISA": " Portable\n"}) == "portable"
    with pytest.raises(UserError, match=r"KT_PACK_ISA=sse9: unknown ISA 'sse9' \(expected auto, portable, avx2"):
        pack_isa({"KT_PACK_ISA": "sse9"})
    # undecodable bytes (os.environ keeps them as surrogates), control characters, a huge value: a short,
    # printable message, never an encoding error
    for hostile, shown in (("\udcff", "\\udcff"), ("avx2\x1b[2J", "avx2\\x1b[2j"), ("a" * 100_000, "a" * 32)):
        with pytest.raises(UserError) as e:
            pack_isa({"KT_PACK_ISA": hostile})
        assert f"unknown ISA '{shown}'" in str(e.value) and len(str(e.value)) < 200 and str(e.value).isprintable()
    for isa in ("portable", "avx2", "avx512", "amx")[len(AVAILABLE_ISAS):]:
        with pytest.raises(UserError, match=f"KT_PACK_ISA={isa}: this CPU cannot run ISA '{isa}'.*unset it"):
            pack_isa({"KT_PACK_ISA": isa})


def test_conversion_at_every_forced_isa_level_writes_the_same_bytes(tiny_checkpoint, tmp_path, monkeypatch):
    from helpers.outputs import tree_hashes
    from kt_convert.convert.cli import main
    from kt_convert.convert.packers import CpuPacker

    outputs = {}
    for isa in AVAILABLE_ISAS:
        monkeypatch.setenv("KT_PACK_ISA", isa)
        assert CpuPacker(1).isa == isa  # what the converter's packer hands to kt_kernels.pack
        out = tmp_path / isa
        assert main(["-i", str(tiny_checkpoint.path), "-o", str(out), "--device", "cpu", "--no-progress"]) == 0
        outputs[isa] = {name: h for name, h in tree_hashes(out).items() if name != "kt_manifest.json"}
    assert len(outputs["portable"]) > 2 and all(o == outputs["portable"] for o in outputs.values())
    monkeypatch.setenv("KT_PACK_ISA", "avx3")
    assert main(["-i", str(tiny_checkpoint.path), "-o", str(tmp_path / "bad"), "--device", "cpu", "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()
