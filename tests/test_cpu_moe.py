"""CPU MoE engine (kernels_cpp/moe*.cpp, kt_runtime/cpu_moe.py).

- Every row of the engine's ISA table this CPU runs (kt_kernels.moe_isas(): portable, avx2, avxvnni,
  avx512, amx) gives results bit-identical to the portable reference (the int32 sums are exact and every
  float step does the same operations in the same order). isa="avx2" (VPMADDUBSW) runs on every x86-64-v3
  CPU (so on CI), isa="avxvnni" (VPDPBUSD) where the CPU has AVX-VNNI. The table's selection and
  inheritance agree with the CPU's features (test_isa_table_selection).
- Against a torch model that quantizes the activations the same way (x per token, the
  intermediate per token and NUMA slice) in float64 on the dequantized weights: relative L2
  error < 1e-4 (only fp32 rounding of the scaling, and rare one-level flips of the intermediate's
  rounding caused by it; measured ~1e-7).
- Against the plain float MoE on the dequantized weights: relative L2 error < 0.05. The int8
  activation quantization (step amax/127 per token, applied to x and to the intermediate) adds
  uniform noise of std Δ/√12 ≈ 1-2 % of the signal per stage; measured ≈ 1-2 % here.
Shapes: no N-block tails exist for MoE shards (every n is also some matrix's k, which must be a
multiple of N_BLOCK), K-block tails do (H = 3840 = 3584 + 256).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_convert import kt_kernels
from helpers.engine_knobs import knobs
from kt_convert.kt_kernels import _testing
from kt_convert.kt_runtime.cpu_moe import CPUMoE
from kt_convert.kt_runtime.format.methods import get_method
from helpers.moe import FakeExperts, float_moe, rel_err, routing
from kt_convert.quant.amx_tiling import untile

ISAS = kt_kernels.moe_isas()  # the engine's ISA rows this CPU runs, portable first
AMX = "amx" in ISAS
SIMD_ISAS = [i for i in ISAS if i not in ("portable", "amx")]  # AMX has its own tests (amx-marked)


def make_x(tokens, hidden, seed=2):
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


CASES = [
    # method, hidden, inter, experts, threadpool_count, tokens, topk, limit
    ("int4", 256, 256, 4, 1, 1, 2, None),
    ("int8", 256, 256, 4, 1, 1, 2, None),
    ("int4", 256, 512, 4, 2, 5, 2, None),
    ("int8", 256, 512, 4, 4, 5, 3, 0.5),
    ("int4", 256, 512, 8, 4, 40, 2, 0.5),
    ("int8", 128, 256, 8, 2, 40, 4, None),
    ("int4", 3840, 256, 4, 2, 3, 2, None),   # K-block tail (3584 + 256)
    ("int8", 3840, 128, 3, 1, 20, 2, 0.5),   # K-block tail, INT8
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_against_reference_and_float(case):
    method, H, I, E, T, tokens, topk, limit = case
    w = FakeExperts(method, H, I, E, T, topk=topk, swiglu_limit=limit)
    ids, tw = routing(tokens, E, topk)
    x = make_x(tokens, H)
    ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
    for isa in SIMD_ISAS + ["auto"]:
        y = CPUMoE(w, 0, isa=isa).forward(x, ids, tw)
        assert torch.equal(y, ref), f"{isa} differs from the portable reference"
    emu = float_moe(w, 0, x, ids, tw, limit, quant_act=True)
    assert rel_err(ref, emu) < 1e-4
    flt = float_moe(w, 0, x, ids, tw, limit)
    assert rel_err(ref, flt) < 0.05


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_dot_kernels_exact(method):
    """Every dot kernel (portable, AVX2, AVX-VNNI, AVX-512, AMX) returns the exact
    int32 products of the tiled weights with int8 activations, computed independently in int64 from
    the untiled levels (INT4 as q*16): random bytes plus the extremes (0x80 / 0x7F INT8 bytes, 0x88 /
    0xFF INT4 bytes = nibbles -8 and -1 that the packer never writes, activations with and without
    -128), row counts that hit every row block and tail of the kernels, K-block tails, N-blocks."""
    rng = np.random.default_rng(7)
    mt = get_method(method)
    shapes = [(256, 3840), (128, 256)] if method == "int4" else [(192, 3840), (64, 192)]
    with knobs(amx_min_tokens=1):
        for n, k in shapes:
            w = rng.integers(0, 256, n * k // (2 if method == "int4" else 1), dtype=np.uint8)
            w[:64], w[64:128], w[128:192], w[192:256] = 0x80, 0x88, 0x7F, 0xFF
            levels = untile(torch.from_numpy(w), n, k, mt).numpy().astype(np.int64) * (16 if method == "int4" else 1)
            for m, lowest in [(m, -127) for m in (1, 2, 3, 4, 5, 8, 9, 17)] + [(1, -128), (5, -128), (9, -128)]:
                a = rng.integers(lowest, 128, (m, k), dtype=np.int8)  # -127: AVX2 INT8 takes VPSIGNB
                a[0, :64], a[-1, 64:128] = lowest, 127  # -128: the exact nibble fallback
                want = a.astype(np.int64) @ levels.T
                for isa in ISAS:
                    got = _testing.dot(method, w, n, k, a, isa)
                    assert got.dtype == np.int32 and got.shape == (m, n)
                    assert np.array_equal(got, want), f"{isa} n={n} k={k} m={m}"
        with pytest.raises(ValueError, match="bytes, expected"):
            _testing.dot(method, w[:-1], n, k, a, "portable")


# The engine's ISA table (kernels_cpp/moe_isa.cpp), restated: each row's base, the CPU features it needs of its
# own (kt_kernels.cpu_features()), and the entries it provides itself; every other entry comes from its base.
ENTRIES = ("tiled.dot", "tiled.prepare_thread", "tiled.hint_next_group", "tiled.hint_next_rows", "group.dot",
           "group.scale", "group.prepare", "group.gemm", "epilogue")
AMX_ONLY = ("tiled.prepare_thread", "tiled.hint_next_group", "tiled.hint_next_rows")
TABLE = {
    "portable": (None, lambda f: True, set(ENTRIES) - set(AMX_ONLY)),
    "avx2": ("portable", lambda f: f["avx2"] and f["fma"], set(ENTRIES) - set(AMX_ONLY)),
    "avxvnni": ("avx2", lambda f: f["avx_vnni"], {"tiled.dot"}),
    "avx512": ("avx2", lambda f: all(f[k] for k in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "fma")),
               set(ENTRIES) - set(AMX_ONLY)),
    "amx": ("avx512", lambda f: f["amx_usable"], {"tiled.dot", *AMX_ONLY, "group.dot", "group.gemm"}),
}


def test_isa_table_selection():
    """The table's rows, bases, inheritance and which rows this CPU runs equal the restatement above; the rows
    forced by name are those rows (auto: the last one the CPU runs), the others refused with a clear message;
    CPUMoE and the kernels accept exactly the names the engine lists."""
    f = kt_kernels.cpu_features()
    rows = _testing.isa_table()
    assert [r["name"] for r in rows] == list(TABLE)

    def runs(name):
        return name is None or (TABLE[name][1](f) and runs(TABLE[name][0]))

    def chain(name):
        return [] if name is None else [name] + chain(TABLE[name][0])

    for r in rows:
        base, _, own = TABLE[r["name"]]
        assert r["base"] == (base or "") and r["runs"] == runs(r["name"]), r
        assert set(r["providers"]) == set(ENTRIES)
        for entry, provider in r["providers"].items():
            # the nearest row on the base chain that provides the entry itself ('' for the AMX-only entries
            # below the amx row)
            want = next((c for c in chain(r["name"]) if entry in TABLE[c][2]), "")
            assert provider == want, (r["name"], entry, provider)
    expected = [name for name in TABLE if runs(name)]
    assert kt_kernels.moe_isas() == expected
    assert expected[:2] == ["portable", "avx2"] or not f["avx2"]  # x86-64-v3 CI machines run both
    assert _testing.isa_row("auto") == expected[-1]
    w = FakeExperts("int8", 256, 256, 4, 1, topk=2)
    for name in TABLE:
        if name in expected:
            assert _testing.isa_row(name) == name
            assert CPUMoE(w, 0, isa=name).isa == name
        else:
            with pytest.raises(ValueError, match="cannot run isa"):
                _testing.isa_row(name)
            with pytest.raises(ValueError, match="not one this CPU runs"):
                CPUMoE(w, 0, isa=name)
    with pytest.raises(ValueError, match="unknown isa 'sse9' .*avxvnni"):
        _testing.isa_row("sse9")


def test_scaling_probe():
    """The benchmarks' register-only probes: a rate per thread that a core can reach, and refusals naming the
    argument (kind, the CPU list, an ISA this CPU does not run)."""
    rows = _testing.probe("clock", 2, [], 0.05)
    assert len(rows) == 2 and all(0.2e9 < r["per_cpu_s"] < 10e9 and 0 < r["cpu_share"] <= 1.01 for r in rows)
    if "avx512" in ISAS:
        (r,) = _testing.probe("vnni", 1, [0], 0.05)
        assert r["cpu"] == 0 and 0.1e9 < r["per_cpu_s"] < 50e9  # VPDPBUSD per CPU second
    with pytest.raises(ValueError, match="kind must be clock, vnni or amx"):
        _testing.probe("fma")
    with pytest.raises(ValueError, match="one CPU per thread"):
        _testing.probe("clock", 2, [0], 0.05)
    if not AMX:
        with pytest.raises(ValueError, match="cannot run isa 'amx'"):
            _testing.probe("amx")


def test_bf16_input_and_threads():
    w = FakeExperts("int4", 256, 256, 4, 2, topk=2)
    ids, tw = routing(6, 4, 2)
    x = make_x(6, 256).to(torch.bfloat16)
    y = CPUMoE(w, 0).forward(x, ids, tw)
    assert y.dtype == torch.bfloat16 and y.shape == (6, 256)
    y32 = CPUMoE(w, 0, num_threads=1).forward(x.float(), ids, tw)
    assert torch.equal(y, y32.to(torch.bfloat16))


def test_clamp_changes_result_and_override():
    w = FakeExperts("int8", 256, 256, 4, 1, topk=2, swiglu_limit=0.3)
    ids, tw = routing(4, 4, 2)
    x = make_x(4, 256) * 3
    a = CPUMoE(w, 0).forward(x, ids, tw)
    b = CPUMoE(w, 0, swiglu_limit=100.0).forward(x, ids, tw)
    assert not torch.equal(a, b)
    assert rel_err(b, float_moe(w, 0, x, ids, tw, None)) < 0.05
    assert rel_err(a, float_moe(w, 0, x, ids, tw, 0.3)) < 0.05


def test_duplicate_ids_zero_tokens_and_zero_rows():
    w = FakeExperts("int4", 256, 256, 4, 1, topk=2)
    x = make_x(3, 256)
    x[1] = 0  # all-zero token: d = 0
    ids = torch.tensor([[1, 1], [0, 2], [3, 3]])
    tw = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.3, 0.7]])
    moe = CPUMoE(w, 0)
    y = moe.forward(x, ids, tw)
    assert torch.equal(y, CPUMoE(w, 0, isa="portable").forward(x, ids, tw))
    assert torch.all(y[1] == 0)
    assert rel_err(y, float_moe(w, 0, x, ids, tw)) < 0.05
    e = moe.forward(torch.zeros(0, 256), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert e.shape == (0, 256)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_fused_stages_modes_and_thread_counts(method):
    """One parallel region with dependency counters: results must not depend on the thread count,
    on the down-projection mode (per expert without a barrier, or per column chunk over all
    experts), or on the ISA."""
    w = FakeExperts(method, 384 if method == "int8" else 512, 512, 6, 2, topk=3, swiglu_limit=0.5)
    H = w.hidden_size
    with knobs(per_expert_down_limit_bytes=0):
        for tokens in (1, 2, 9, 33):
            ids, tw = routing(tokens, 6, 3, seed=tokens)
            if tokens == 9:
                ids[:, 1] = ids[:, 0]  # duplicate ids: two rows of one expert add into one token
            x = make_x(tokens, H, seed=tokens)
            ref = CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw)
            for limit in (0, 1 << 40):  # 0: column chunks over all experts; huge: per-expert chunks
                _testing.knob("per_expert_down_limit_bytes", limit)
                for threads in (1, 2, 3, 5, 8):
                    for isa in ["portable"] + SIMD_ISAS:
                        y = CPUMoE(w, 0, isa=isa, num_threads=threads).forward(x, ids, tw)
                        assert torch.equal(y, ref), f"{isa} threads={threads} limit={limit} tokens={tokens}"


def test_repeated_calls_concurrent_threads():
    """Back-to-back calls (spinning workers) and calls from several Python threads at once."""
    import threading
    w = FakeExperts("int4", 256, 256, 4, 1, topk=2)
    ids, tw = routing(3, 4, 2)
    x = make_x(3, 256)
    moe = CPUMoE(w, 0, num_threads=3)
    ref = CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw)
    for _ in range(200):
        assert torch.equal(moe.forward(x, ids, tw), ref)
    errors = []

    def worker():
        try:
            for _ in range(50):
                assert torch.equal(moe.forward(x, ids, tw), ref)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


@pytest.mark.amx
@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("min_tokens", [1, 16])
def test_amx_tiles(method, min_tokens):
    with knobs(amx_min_tokens=min_tokens, per_expert_down_limit_bytes=_testing.knob("per_expert_down_limit_bytes")):
        w = FakeExperts(method, 3840, 512, 4, 2, topk=2, swiglu_limit=0.5)
        for tokens in (1, 7, 40, 100):
            ids, tw = routing(tokens, 4, 2, seed=tokens)
            x = make_x(tokens, 3840, seed=tokens)
            ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
            y = CPUMoE(w, 0, isa="amx").forward(x, ids, tw)
            assert torch.equal(y, ref), f"amx differs (tokens={tokens})"
            for limit in (0, 1 << 40):  # both down-projection schedules, several thread counts
                _testing.knob("per_expert_down_limit_bytes", limit)
                for threads in (1, 3, 16):
                    y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                    assert torch.equal(y, ref), f"amx differs (tokens={tokens}, threads={threads}, limit={limit})"


def test_bad_inputs():
    w = FakeExperts("int4", 256, 256, 4, 1, topk=2)
    moe = CPUMoE(w, 0)
    x = make_x(2, 256)
    ids = torch.tensor([[0, 1], [2, 3]])
    tw = torch.ones(2, 2)
    bad = [
        (x, torch.tensor([[0, 4], [2, 3]]), tw, "out of range"),
        (x, torch.tensor([[0, -2], [2, 3]]), tw, "out of range"),
        (x, ids.int(), tw, "int64"),
        (x, ids, tw.double(), "float32"),
        (x.half(), ids, tw, "bfloat16 or float32"),
        (x[:, :128], ids, tw, "x must be"),
        (x[0], ids, tw, "x must be"),
        (x, ids[:1], tw[:1], "topk_ids"),
        (x, ids, tw[:, :1], "topk_weights"),
        (torch.full((2, 256), float("nan")), ids, tw, "non-finite"),
        (x, ids, torch.tensor([[1.0, float("inf")], [1, 1]]), "non-finite"),
    ]
    for xx, ii, ww, msg in bad:
        with pytest.raises(ValueError, match=msg):
            moe.forward(xx, ii, ww)
    with pytest.raises(ValueError, match="layer"):
        CPUMoE(w, 5)
    with pytest.raises(ValueError):
        CPUMoE(w, 0, activation="gelu")
    with pytest.raises(ValueError):
        CPUMoE(w, 0, swiglu_limit=-1.0)
    with pytest.raises(ValueError, match="not one this CPU runs"):
        CPUMoE(w, 0, isa="sse9")


def test_bad_weights():
    w = FakeExperts("int4", 256, 256, 2, 1, topk=2)
    good = [[tuple(a for p in ("gate", "up", "down") for a in w.expert_tensors(0, e, p, 0))] for e in range(2)]
    kt_kernels.MoELayer("int4", good, 256, 256, 1)
    with pytest.raises(ValueError, match="bytes, expected"):  # INT4 data declared as INT8
        kt_kernels.MoELayer("int8", good, 256, 256, 1)
    with pytest.raises(ValueError, match="NUMA shards"):
        kt_kernels.MoELayer("int4", good, 256, 256, 2)
    with pytest.raises(ValueError, match="multiple of"):
        kt_kernels.MoELayer("int4", good, 256, 320, 1)
    short = [list(good[0]), list(good[1])]
    short[1][0] = tuple(a[:-1] if i == 0 else a for i, a in enumerate(short[1][0]))
    with pytest.raises(ValueError, match=r"weights\[1\]\[0\] gate weight"):
        kt_kernels.MoELayer("int4", short, 256, 256, 1)
    f64 = [list(good[0]), [tuple(a.astype(np.float64) if i == 1 else a for i, a in enumerate(good[1][0]))]]
    with pytest.raises(ValueError, match="float32"):
        kt_kernels.MoELayer("int4", f64, 256, 256, 1)
    with pytest.raises(ValueError):
        kt_kernels.MoELayer("int5", good, 256, 256, 1)


PREFILL_CASES = [
    # method, hidden, inter, experts, threadpool_count, tokens, topk, limit: rows per expert with 8/16/32 tails
    ("int4", 3840, 256, 4, 2, 37, 3, 0.5),   # K-block tail, numa 2
    ("int8", 3840, 128, 3, 1, 45, 2, None),
    ("int4", 256, 512, 5, 4, 70, 3, None),
    ("int8", 512, 256, 2, 1, 100, 2, 0.5),  # > 32 rows per expert: several token blocks
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_prefill_schedule(case):
    """The prefill schedule (per-token quantization, per-expert AMX A panels, gate/up tasks over
    several row groups, down per column chunk over every expert) gives exactly the results of the
    decode schedule, for every ISA and thread count, and matches the float model."""
    method, H, I, E, T, tokens, topk, limit = case
    w = FakeExperts(method, H, I, E, T, topk=topk, swiglu_limit=limit)
    ids, tw = routing(tokens, E, topk, seed=tokens)
    ids[::5, 1] = ids[::5, 0]  # duplicate ids: two rows of one expert add into one token
    x = make_x(tokens, H, seed=tokens)
    with knobs(prefill_min_avg_rows=1 << 40, per_expert_down_limit_bytes=1 << 40):  # never: the decode schedule
        ref = CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw)
        _testing.knob("per_expert_down_limit_bytes", 0)
        assert torch.equal(CPUMoE(w, 0, isa="portable", num_threads=3).forward(x, ids, tw), ref)
        _testing.knob("prefill_min_avg_rows", 0)  # always: the prefill schedule
        for threads in (1, 2, 3, 7, 16):
            for isa in ["portable"] + SIMD_ISAS + ["auto"]:
                y = CPUMoE(w, 0, isa=isa, num_threads=threads).forward(x, ids, tw)
                assert torch.equal(y, ref), f"{isa} threads={threads}"
    # rare one-level flips of the intermediate's rounding (numa 4: four slices) weigh a bit more here
    assert rel_err(ref, float_moe(w, 0, x, ids, tw, limit, quant_act=True)) < 5e-4
    assert rel_err(ref, float_moe(w, 0, x, ids, tw, limit)) < 0.05


def test_prefill_threshold_and_profile():
    """Default threshold: a call with many rows per expert takes the prefill schedule (its stage
    profile is recorded), a decode call does not; both agree with the portable reference."""
    w = FakeExperts("int8", 256, 256, 4, 1, topk=2)
    assert _testing.knob("prefill_min_avg_rows") >= 1
    with knobs(profiling=1):
        ids, tw = routing(64, 4, 2)
        x = make_x(64, 256)
        y = CPUMoE(w, 0, num_threads=2).forward(x, ids, tw)
        p = _testing.profile()
        assert {"wall", "q", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait"} <= set(p)
        assert p["wall"] > 0 and p["g_dot"] > 0 and p["threads"] == 2 and "rows_per_token_block" in p
        assert torch.equal(y, CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw))


@pytest.mark.amx
@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("min_tokens", [1, 16])
def test_amx_prefill_schedule(method, min_tokens):
    """AMX tiles on the panel layout (A tiles of 16 rows x 64 contiguous bytes, INT4 unpacked once
    per row group), rows per expert with 16/32 tails, K-block tail, numa 2."""
    with knobs(amx_min_tokens=min_tokens, prefill_min_avg_rows=1 << 40):
        w = FakeExperts(method, 3840, 512, 4, 2, topk=3, swiglu_limit=0.5)
        for tokens in (5, 23, 50, 90):
            ids, tw = routing(tokens, 4, 3, seed=tokens)
            x = make_x(tokens, 3840, seed=tokens)
            _testing.knob("prefill_min_avg_rows", 1 << 40)
            ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
            _testing.knob("prefill_min_avg_rows", 0)
            for threads in (1, 3, 16):
                y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                assert torch.equal(y, ref), f"amx prefill differs (tokens={tokens}, threads={threads})"


@pytest.mark.amx
@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_amx_prefill_blocking(method):
    """The AMX kernel's K chunks (B unpacked / copied per chunk, C tiles stored and reloaded between
    chunks, next chunks prefetched or not, hinted next row group) and the prefill schedule's token blocks (each gate/up task
    walks its expert's rows in blocks of the activation panel) never change a result: K chunks of
    128 (many reloads), 384 (chunks that do not divide the 3584 K-block), 512 and 4096 (one chunk per
    K-block), token blocks of 32 rows up to all rows, every INT8 read mode and INT4 with and without
    prefetch; rows per expert with 16/32 tails and a K-block tail (H=3840)."""
    saved = {name: _testing.knob(name) for name in ("amx_k_chunk", "prefill_a_block_bytes", "amx_int4_prefetch",
                                                      "amx_int8_mode", "amx_prefetch_chunks", "prefill_min_avg_rows")}
    with knobs(**saved):
        w = FakeExperts(method, 3840, 512, 3, 2, topk=2, swiglu_limit=0.5)
        tokens = 83  # rows per expert around 55: two 32-row blocks (the second a 16-row + tail) or 1 block
        ids, tw = routing(tokens, 3, 2, seed=7)
        x = make_x(tokens, 3840, seed=7)
        _testing.knob("prefill_min_avg_rows", 1 << 40)
        ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
        assert rel_err(ref, float_moe(w, 0, x, ids, tw, 0.5, quant_act=True)) < 5e-4
        _testing.knob("prefill_min_avg_rows", 0)
        modes = (0, 1) if method == "int4" else (0, 1, 2, 3)
        for k_chunk in (128, 384, 512, 4096, 0, 100, 1000):  # 100, 1000: taken as 128, 896
            _testing.knob("amx_k_chunk", k_chunk)
            for a_block in (1, 3840 * 32, 1 << 30):  # 32-row blocks (the minimum), 32 rows, all rows
                _testing.knob("prefill_a_block_bytes", a_block)
                for mode in modes:
                    _testing.knob("amx_int4_prefetch" if method == "int4" else "amx_int8_mode", mode)
                    for threads in (1, 3):
                        y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                        assert torch.equal(y, ref), (k_chunk, a_block, mode, threads)
            for dist in (0, 1, 40):  # prefetch off, one chunk ahead, past the next row group's end
                _testing.knob("amx_prefetch_chunks", dist)
                y = CPUMoE(w, 0, isa="amx", num_threads=2).forward(x, ids, tw)
                assert torch.equal(y, ref), (k_chunk, dist)
            _testing.knob("amx_prefetch_chunks", saved["amx_prefetch_chunks"])


# ---- float stages (kernels_cpp/moe_epilogue*.cpp): deterministic exp, bit identity on special values

def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32 if np.asarray(a).dtype.itemsize == 4 else np.uint8)


def test_exp_det_accuracy():
    """exp_det (fixed range reduction + Cephes polynomial, no libm) against float64 exp: max relative
    error < 1.5e-7 (< 1.3 ulp; measured 8.1e-8, 0.98 ulp) on [-87, 88], finer on the SiLU core
    [-20, 20]; clamped outside; monotone non-decreasing on a fine grid."""
    x = np.concatenate([np.linspace(-87, 88, 2_000_001), np.linspace(-20, 20, 2_000_001),
                        np.linspace(-1e-3, 1e-3, 100_001)]).astype(np.float32)
    t = np.exp(x.astype(np.float64))
    for isa in ["portable"] + SIMD_ISAS:
        y = _testing.exp(x, isa).astype(np.float64)
        rel = np.abs(y - t) / t
        assert rel.max() < 1.5e-7, (isa, rel.max(), x[rel.argmax()])
        assert np.sqrt((rel ** 2).mean()) < 5e-8
    g = np.linspace(-10, 10, 1_000_001).astype(np.float32)
    assert (np.diff(_testing.exp(g, "portable").astype(np.float64)) >= 0).all()
    e = _testing.exp(np.array([0.0, -0.0, 1.0, -200.0, 200.0, np.inf, -np.inf], np.float32), "portable")
    assert e[0] == 1.0 and e[1] == 1.0 and abs(e[2] - np.e) < 3e-7
    assert e[3] == np.float32(_testing.exp(np.array([-87.0], np.float32), "portable")[0])  # clamped
    assert np.isfinite(e[4]) and e[4] == e[5] and e[6] == e[3] and e[3] > 0
    assert np.isnan(_testing.exp(np.array([np.nan], np.float32), "portable")[0])
    # SiLU-gate through exp_det against float64 on the same fp32 g, u: g = float(acc) * (xd * sg)
    ints = np.arange(-(1 << 20), 1 << 20, 7, dtype=np.int32)
    ints = ints[: (len(ints) // 32) * 32].reshape(-1, 32)
    xd = np.full(ints.shape[0], 30.0 / (1 << 20), np.float32)
    a = _testing.silu_gate(ints, np.ones_like(ints), xd, np.ones(32, np.float32), np.full(32, 1 << 20, np.float32),
                                  None, "portable").astype(np.float64)
    g64 = (ints.astype(np.float32) * (xd[:, None] * np.float32(1.0))).astype(np.float64)
    u64 = (np.float32(1.0) * (xd[:, None] * np.float32(1 << 20))).astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * u64
    err = np.abs(a - want) / np.maximum(np.abs(want), 1e-30)
    assert err[np.abs(want) > 1e-30].max() < 5e-7


def _special_floats(n, seed):
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38, -3.4e38, 0.5, -0.5, 1.5, 2.5,
                        88.5, -88.5, 100.0, -100.0, 126.99, -127.0], np.float32)
    idx = rng.integers(0, n, n // 8)
    v[idx] = special[rng.integers(0, len(special), len(idx))]
    return v


@pytest.mark.skipif(not SIMD_ISAS, reason="needs AVX2")
def test_epilogues_bit_identical_on_special_values():
    """Every float stage of the AVX-512 and AVX2 epilogues equals the scalar reference bit for bit,
    NaN/inf, subnormals, ±0, clamp and rounding ties included, for odd lengths (masked / scalar tails)."""
    rng = np.random.default_rng(0)
    x = _special_floats(100_003, 1)
    x = np.concatenate([x, np.frombuffer(rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
                                         .tobytes(), np.float32)])
    ref = _testing.exp(x, "portable")
    for isa in SIMD_ISAS:
        assert np.array_equal(_bits(_testing.exp(x, isa)), _bits(ref))
    for k in (16, 48, 64, 100, 256, 3840):
        rows = _special_floats(9 * k, k).reshape(9, k)
        rows[0] = 0.0
        rows[1] = np.arange(k) - k / 2 + 0.5  # exact ties after scaling
        rows[2, : k // 2] = np.nan
        rows[3] = np.inf
        r = _testing.quantize(rows, "portable")
        for isa in SIMD_ISAS:
            s = _testing.quantize(rows, isa)
            assert np.array_equal(s[0], r[0]) and np.array_equal(_bits(s[1]), _bits(r[1])) and np.array_equal(s[2], r[2])
    m = 37
    ag = rng.integers(-(1 << 24), 1 << 24, (m, 32), dtype=np.int64).astype(np.int32)
    au = rng.integers(-(1 << 24), 1 << 24, (m, 32), dtype=np.int64).astype(np.int32)
    ag[0] = np.iinfo(np.int32).max
    ag[1] = np.iinfo(np.int32).min
    xd = np.abs(_special_floats(m, 3)) * 1e-6
    xd[5] = np.inf
    xd[6] = np.nan
    sg, su = np.abs(_special_floats(32, 4)) * 1e-3, np.abs(_special_floats(32, 5)) * 1e-3
    bg, bu = _special_floats(32, 7), _special_floats(32, 8)
    for limit in (None, 0.5, 7.0):
        for act in ({}, {"gpt_oss": True}, {"gpt_oss": True, "alpha": 1.0, "up_offset": 0.0},
                    {"bg": bg, "bu": bu}, {"gpt_oss": True, "bg": bg, "bu": bu}, {"gpt_oss": True, "bu": bu},
                    {"situ": True}, {"situ": True, "beta": 0.75, "linear_beta": 3.0}, {"situ": True, "bg": bg, "bu": bu}):
            r = _testing.silu_gate(ag, au, xd, sg, su, limit, "portable", **act)
            for isa in SIMD_ISAS:
                s = _testing.silu_gate(ag, au, xd, sg, su, limit, isa, **act)
                assert np.array_equal(_bits(s), _bits(r)), (limit, isa, sorted(act))
        pg = _special_floats(m * 32, 10).reshape(m, 32)  # the group-wise SiLU-gate, from float products
        pu = _special_floats(m * 32, 11).reshape(m, 32)
        r = _testing.group_silu_gate(pg, pu, xd, limit, "portable")
        for isa in SIMD_ISAS:
            assert np.array_equal(_bits(_testing.group_silu_gate(pg, pu, xd, limit, isa)), _bits(r)), (limit, isa)
    acc = ag
    y0 = _special_floats(m * 32, 6).reshape(m, 32)
    for w in (0.25, -1.5, 0.0):
        for b in (None, _special_floats(32, 9)):
            r = _testing.down(acc, xd, sg, y0, w, "portable", b)
            for isa in SIMD_ISAS:
                s = _testing.down(acc, xd, sg, y0, w, isa, b)
                for a, c in zip(s, r):
                    assert np.array_equal(_bits(a), _bits(c))


def _gate_up_inputs(rng, m, acc_max):
    """One 32-row group's epilogue inputs (ag, au, xd, sg, su, bg, bu) and its g, u with the biases in float64."""
    ag = rng.integers(-acc_max, acc_max, (m, 32)).astype(np.int32)
    au = rng.integers(-acc_max, acc_max, (m, 32)).astype(np.int32)
    xd = rng.uniform(1e-3, 4e-3, m).astype(np.float32)
    sg, su = rng.uniform(0.5, 1.5, 32).astype(np.float32), rng.uniform(0.5, 1.5, 32).astype(np.float32)
    bg, bu = rng.standard_normal(32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    g = ag * (xd[:, None].astype(np.float64) * sg) + bg
    u = au * (xd[:, None].astype(np.float64) * su) + bu
    return (ag, au, xd, sg, su, bg, bu), g, u


def test_gpt_oss_epilogue_values():
    """The gpt-oss activation and the biases, computed independently in float64: g = acc*xd*sg + bg,
    u likewise, g <= L, |u| <= L, a = g*sigmoid(alpha g)*(u + 1); down: y = b + acc*ad*sd (first), and
    the SiLU path without biases stays g*sigmoid(g)*u."""
    rng = np.random.default_rng(3)
    m = 5
    (ag, au, xd, sg, su, bg, bu), g, u = _gate_up_inputs(rng, m, 3000)
    assert g.max() > 7.0 and u.min() < -7.0 and u.max() > 7.0  # the clamp is exercised
    g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
    want = g / (1 + np.exp(-1.702 * g)) * (u + 1.0)
    for isa in ["portable"] + SIMD_ISAS:
        got = _testing.silu_gate(ag, au, xd, sg, su, 7.0, isa, gpt_oss=True, bg=bg, bu=bu)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    g0, u0 = ag * (xd[:, None].astype(np.float64) * sg), au * (xd[:, None].astype(np.float64) * su)
    np.testing.assert_allclose(_testing.silu_gate(ag, au, xd, sg, su, None, "portable"),
                               g0 / (1 + np.exp(-g0)) * u0, rtol=2e-6, atol=2e-6)
    b = rng.standard_normal(32).astype(np.float32)
    y, _, _, o1, _ = _testing.down(ag, xd, sg, np.zeros((m, 32), np.float32), 0.5, "portable", b)
    np.testing.assert_allclose(y, b + ag * (xd[:, None].astype(np.float64) * sg), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o1, 0.5 * y, rtol=1e-6, atol=1e-6)


def test_situ_epilogue_values():
    """SiTU (Kimi K3), computed independently in float64: g = acc*xd*sg + bg, u likewise, g <= L, |u| <= L,
    a = beta tanh(g/beta) sigmoid(g) * linear_beta tanh(u/linear_beta), on every ISA; inputs reach both tanh
    saturations (|g| >> beta, |u| >> linear_beta)."""
    (ag, au, xd, sg, su, bg, bu), g0, u0 = _gate_up_inputs(np.random.default_rng(5), 6, 40000)
    for limit, beta, linear_beta in ((None, 4.0, 25.0), (30.0, 4.0, 25.0), (None, 1.5, 6.0)):
        assert np.abs(g0).max() > 8 * beta and np.abs(u0).max() > 2 * linear_beta
        g, u = (g0, u0) if limit is None else (np.minimum(g0, limit), np.clip(u0, -limit, limit))
        want = beta * np.tanh(g / beta) / (1 + np.exp(-g)) * (linear_beta * np.tanh(u / linear_beta))
        for isa in ["portable"] + SIMD_ISAS:
            got = _testing.silu_gate(ag, au, xd, sg, su, limit, isa, situ=True, beta=beta, linear_beta=linear_beta,
                                     bg=bg, bu=bu)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_knob_table():
    """Every knob reads back what was set, refuses values outside its range (naming the range), and an unknown
    name is refused naming the knobs; knobs() lists them with their meaning."""
    table = _testing.knobs()
    assert {"prefill_min_avg_rows", "group_gemm_min_rows", "amx_int8_mode", "spin_us", "profiling"} <= set(table)
    for name, (value, lo, hi, meaning) in table.items():
        assert lo <= value <= hi and len(meaning) > 20, name
        with knobs(**{name: lo}):
            assert _testing.knob(name) == lo
            assert _testing.knob(name, value) == lo  # returns the old value
            assert _testing.knob(name) == value
        assert _testing.knob(name) == value
        if lo > 0:
            with pytest.raises(ValueError, match=rf"knob {name} takes values in \[{lo}, {hi}\], got {lo - 1}"):
                _testing.knob(name, lo - 1)
    with pytest.raises(ValueError, match=r"knob amx_int8_mode takes values in \[0, 3\], got 7"):
        _testing.knob("amx_int8_mode", 7)
    with pytest.raises(ValueError, match="unknown knob 'nope' .*prefill_min_avg_rows"):
        _testing.knob("nope")


@pytest.mark.amx
@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_amx_int8_modes(mode):
    """Every way the INT8 tile kernel reads B (in place, prefetched, copied) gives the reference
    result: prefill and decode schedules, K-block tail (H=3840), row groups in both halves of a
    64-row block, 16/32-token tails."""
    with knobs(amx_min_tokens=1, prefill_min_avg_rows=1 << 40, amx_int8_mode=mode):
        w = FakeExperts("int8", 3840, 512, 4, 2, topk=3, swiglu_limit=0.5)
        for tokens in (5, 23, 50, 90):
            ids, tw = routing(tokens, 4, 3, seed=tokens)
            x = make_x(tokens, 3840, seed=tokens)
            _testing.knob("prefill_min_avg_rows", 1 << 40)
            ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
            for rows in (1 << 40, 0):
                _testing.knob("prefill_min_avg_rows", rows)
                for threads in (1, 16):
                    y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                    assert torch.equal(y, ref), f"amx int8 mode {mode} differs (tokens={tokens}, rows={rows})"


@pytest.mark.amx
@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX tiles")
def test_amx_tiles_reconfigured_per_call():
    """forward() loads the tile configuration once per thread and call: torch bf16 matmuls (oneDNN,
    which may reconfigure the tiles) on the calling thread between calls do not disturb it."""
    w = FakeExperts("int8", 256, 256, 4, 1, topk=2)
    ids, tw = routing(64, 4, 2)
    x = make_x(64, 256)
    ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
    a = torch.randn(64, 512, dtype=torch.bfloat16)
    for _ in range(3):
        (a @ a.T).sum()
        assert torch.equal(CPUMoE(w, 0, isa="amx", num_threads=1).forward(x, ids, tw), ref)
        assert torch.equal(CPUMoE(w, 0, isa="amx", num_threads=4).forward(x, ids, tw), ref)
