"""CPU MoE engine (kernels_cpp/moe*.cpp, kt_runtime/cpu_moe.py).

- Every ISA path this CPU has gives results bit-identical to the portable reference kernel
  (the int32 sums are exact and every float step is shared code). isa="avx2" runs on every
  x86-64-v3 CPU (so on CI); on CPUs with AVX-VNNI it has two kernels (VPDPBUSD and VPMADDUBSW),
  both tested (avx2_kernel fixture, test_dot_kernels_exact).
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

import kt_kernels
from kt_runtime.cpu_moe import CPUMoE
from kt_runtime.format.methods import get_method
from helpers.moe import FakeExperts, float_moe, rel_err, routing
from quant.amx_tiling import untile

ISA_ORDER = ["portable", "avx2", "avx512", "amx"]
BEST = kt_kernels.best_isa()
SIMD_ISAS = [i for i in ("avx2", "avx512") if ISA_ORDER.index(i) <= ISA_ORDER.index(BEST)]
AVX_VNNI = kt_kernels.cpu_features().get("avx_vnni", False)
# the kernels behind isa="avx2" on this CPU: VPMADDUBSW always, VPDPBUSD where AVX-VNNI exists
AVX2_KERNELS = ["maddubs", "vnni"] if AVX_VNNI else ["maddubs"]


@pytest.fixture(params=AVX2_KERNELS)
def avx2_kernel(request):
    """Runs the test once per AVX2 kernel this CPU has (isa="avx2" picks VPDPBUSD on AVX-VNNI CPUs)."""
    old = kt_kernels._moe_avx2_vnni(1 if request.param == "vnni" else 0)
    yield request.param
    kt_kernels._moe_avx2_vnni(int(old))


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
def test_against_reference_and_float(case, avx2_kernel):
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
    """Every dot kernel (portable, AVX2 with and without AVX-VNNI, AVX-512, AMX) returns the exact
    int32 products of the tiled weights with int8 activations, computed independently in int64 from
    the untiled levels (INT4 as q*16): random bytes plus the extremes (0x80 / 0x7F INT8 bytes, 0x88 /
    0xFF INT4 bytes = nibbles -8 and -1 that the packer never writes, activations with and without
    -128), row counts that hit every row block and tail of the kernels, K-block tails, N-blocks."""
    rng = np.random.default_rng(7)
    mt = get_method(method)
    kernels = ([("portable", None)] + [("avx2", v) for v in AVX2_KERNELS if "avx2" in SIMD_ISAS]
               + [(i, None) for i in SIMD_ISAS if i != "avx2"])
    if BEST == "amx":
        kernels.append(("amx", None))
    shapes = [(256, 3840), (128, 256)] if method == "int4" else [(192, 3840), (64, 192)]
    old_vnni, old_min = kt_kernels._moe_avx2_vnni(), kt_kernels._moe_amx_min_tokens(1)
    try:
        for n, k in shapes:
            w = rng.integers(0, 256, n * k // (2 if method == "int4" else 1), dtype=np.uint8)
            w[:64], w[64:128], w[128:192], w[192:256] = 0x80, 0x88, 0x7F, 0xFF
            levels = untile(torch.from_numpy(w), n, k, mt).numpy().astype(np.int64) * (16 if method == "int4" else 1)
            for m, lowest in [(m, -127) for m in (1, 2, 3, 4, 5, 8, 9, 17)] + [(1, -128), (5, -128), (9, -128)]:
                a = rng.integers(lowest, 128, (m, k), dtype=np.int8)  # -127: AVX2 INT8 takes VPSIGNB
                a[0, :64], a[-1, 64:128] = lowest, 127  # -128: the exact nibble fallback
                want = a.astype(np.int64) @ levels.T
                for isa, vnni in kernels:
                    if vnni is not None:
                        kt_kernels._moe_avx2_vnni(1 if vnni == "vnni" else 0)
                    got = kt_kernels._moe_dot(method, w, n, k, a, isa)
                    assert got.dtype == np.int32 and got.shape == (m, n)
                    assert np.array_equal(got, want), f"{isa} {vnni or ''} n={n} k={k} m={m}"
        with pytest.raises(ValueError, match="bytes, expected"):
            kt_kernels._moe_dot(method, w[:-1], n, k, a, "portable")
    finally:
        kt_kernels._moe_avx2_vnni(int(old_vnni))
        kt_kernels._moe_amx_min_tokens(old_min)


def test_avx2_vnni_setting():
    old = kt_kernels._moe_avx2_vnni()
    try:
        assert old == AVX_VNNI  # the default: VPDPBUSD where the CPU has it
        kt_kernels._moe_avx2_vnni(1)
        assert kt_kernels._moe_avx2_vnni() == AVX_VNNI  # cannot be turned on without AVX-VNNI
        kt_kernels._moe_avx2_vnni(0)
        assert kt_kernels._moe_avx2_vnni() is False
    finally:
        kt_kernels._moe_avx2_vnni(int(old))


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
    old = kt_kernels._moe_per_expert_down_limit()
    try:
        for tokens in (1, 2, 9, 33):
            ids, tw = routing(tokens, 6, 3, seed=tokens)
            if tokens == 9:
                ids[:, 1] = ids[:, 0]  # duplicate ids: two rows of one expert add into one token
            x = make_x(tokens, H, seed=tokens)
            ref = CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw)
            for limit in (0, 1 << 40):  # 0: column chunks over all experts; huge: per-expert chunks
                kt_kernels._moe_per_expert_down_limit(limit)
                for threads in (1, 2, 3, 5, 8):
                    for isa in ["portable"] + SIMD_ISAS:
                        y = CPUMoE(w, 0, isa=isa, num_threads=threads).forward(x, ids, tw)
                        assert torch.equal(y, ref), f"{isa} threads={threads} limit={limit} tokens={tokens}"
    finally:
        kt_kernels._moe_per_expert_down_limit(old)


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
@pytest.mark.skipif(BEST != "amx", reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("min_tokens", [1, 16])
def test_amx_tiles(method, min_tokens):
    old = kt_kernels._moe_amx_min_tokens(min_tokens)
    old_limit = kt_kernels._moe_per_expert_down_limit()
    try:
        w = FakeExperts(method, 3840, 512, 4, 2, topk=2, swiglu_limit=0.5)
        for tokens in (1, 7, 40, 100):
            ids, tw = routing(tokens, 4, 2, seed=tokens)
            x = make_x(tokens, 3840, seed=tokens)
            ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
            y = CPUMoE(w, 0, isa="amx").forward(x, ids, tw)
            assert torch.equal(y, ref), f"amx differs (tokens={tokens})"
            for limit in (0, 1 << 40):  # both down-projection schedules, several thread counts
                kt_kernels._moe_per_expert_down_limit(limit)
                for threads in (1, 3, 16):
                    y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                    assert torch.equal(y, ref), f"amx differs (tokens={tokens}, threads={threads}, limit={limit})"
            kt_kernels._moe_per_expert_down_limit(old_limit)
    finally:
        kt_kernels._moe_amx_min_tokens(old)
        kt_kernels._moe_per_expert_down_limit(old_limit)


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
    with pytest.raises(ValueError):
        CPUMoE(w, 0, isa="sse9")
    if BEST != "amx":
        with pytest.raises(ValueError, match="cannot run"):
            CPUMoE(w, 0, isa="amx")


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
def test_prefill_schedule(case, avx2_kernel):
    """The prefill schedule (per-token quantization, per-expert AMX A panels, gate/up tasks over
    several row groups, down per column chunk over every expert) gives exactly the results of the
    decode schedule, for every ISA and thread count, and matches the float model."""
    method, H, I, E, T, tokens, topk, limit = case
    w = FakeExperts(method, H, I, E, T, topk=topk, swiglu_limit=limit)
    ids, tw = routing(tokens, E, topk, seed=tokens)
    ids[::5, 1] = ids[::5, 0]  # duplicate ids: two rows of one expert add into one token
    x = make_x(tokens, H, seed=tokens)
    old = kt_kernels._moe_prefill_min_avg_rows()
    old_limit = kt_kernels._moe_per_expert_down_limit()
    try:
        kt_kernels._moe_prefill_min_avg_rows(1 << 40)  # never: the decode schedule
        ref = CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw)
        kt_kernels._moe_per_expert_down_limit(0)
        assert torch.equal(CPUMoE(w, 0, isa="portable", num_threads=3).forward(x, ids, tw), ref)
        kt_kernels._moe_prefill_min_avg_rows(0)  # always: the prefill schedule
        for threads in (1, 2, 3, 7, 16):
            for isa in ["portable"] + SIMD_ISAS + ["auto"]:
                y = CPUMoE(w, 0, isa=isa, num_threads=threads).forward(x, ids, tw)
                assert torch.equal(y, ref), f"{isa} threads={threads}"
    finally:
        kt_kernels._moe_prefill_min_avg_rows(old)
        kt_kernels._moe_per_expert_down_limit(old_limit)
    # rare one-level flips of the intermediate's rounding (numa 4: four slices) weigh a bit more here
    assert rel_err(ref, float_moe(w, 0, x, ids, tw, limit, quant_act=True)) < 5e-4
    assert rel_err(ref, float_moe(w, 0, x, ids, tw, limit)) < 0.05


def test_prefill_threshold_and_profile():
    """Default threshold: a call with many rows per expert takes the prefill schedule (its stage
    profile is recorded), a decode call does not; both agree with the portable reference."""
    w = FakeExperts("int8", 256, 256, 4, 1, topk=2)
    assert kt_kernels._moe_prefill_min_avg_rows() >= 1
    old = kt_kernels._moe_profile(1)
    try:
        ids, tw = routing(64, 4, 2)
        x = make_x(64, 256)
        y = CPUMoE(w, 0, num_threads=2).forward(x, ids, tw)
        p = kt_kernels._moe_profile()
        assert {"wall", "q", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait"} <= set(p)
        assert p["wall"] > 0 and p["g_dot"] > 0 and p["threads"] == 2
        assert torch.equal(y, CPUMoE(w, 0, isa="portable", num_threads=1).forward(x, ids, tw))
    finally:
        kt_kernels._moe_profile(0)
    del old


@pytest.mark.amx
@pytest.mark.skipif(BEST != "amx", reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("min_tokens", [1, 16])
def test_amx_prefill_schedule(method, min_tokens):
    """AMX tiles on the panel layout (A tiles of 16 rows x 64 contiguous bytes, INT4 unpacked once
    per row group), rows per expert with 16/32 tails, K-block tail, numa 2."""
    old = kt_kernels._moe_amx_min_tokens(min_tokens)
    old_rows = kt_kernels._moe_prefill_min_avg_rows()
    try:
        w = FakeExperts(method, 3840, 512, 4, 2, topk=3, swiglu_limit=0.5)
        for tokens in (5, 23, 50, 90):
            ids, tw = routing(tokens, 4, 3, seed=tokens)
            x = make_x(tokens, 3840, seed=tokens)
            kt_kernels._moe_prefill_min_avg_rows(1 << 40)
            ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
            kt_kernels._moe_prefill_min_avg_rows(0)
            for threads in (1, 3, 16):
                y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                assert torch.equal(y, ref), f"amx prefill differs (tokens={tokens}, threads={threads})"
    finally:
        kt_kernels._moe_amx_min_tokens(old)
        kt_kernels._moe_prefill_min_avg_rows(old_rows)


@pytest.mark.amx
@pytest.mark.skipif(BEST != "amx", reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_amx_prefill_blocking(method):
    """The AMX kernel's K chunks (B unpacked / copied per chunk, C tiles stored and reloaded between
    chunks, next chunks prefetched or not, hinted next row group) and the prefill schedule's token blocks (each gate/up task
    walks its expert's rows in blocks of the activation panel) never change a result: K chunks of
    128 (many reloads), 384 (chunks that do not divide the 3584 K-block), 512 and 4096 (one chunk per
    K-block), token blocks of 32 rows up to all rows, every INT8 read mode and INT4 with and without
    prefetch; rows per expert with 16/32 tails and a K-block tail (H=3840)."""
    knobs = {"k": kt_kernels._moe_amx_k_chunk(), "a": kt_kernels._moe_prefill_a_block_bytes(),
             "pf": kt_kernels._moe_amx_int4_prefetch(), "mode": kt_kernels._moe_amx_int8_mode(),
             "dist": kt_kernels._moe_amx_prefetch_chunks(),
             "rows": kt_kernels._moe_prefill_min_avg_rows()}
    try:
        w = FakeExperts(method, 3840, 512, 3, 2, topk=2, swiglu_limit=0.5)
        tokens = 83  # rows per expert around 55: two 32-row blocks (the second a 16-row + tail) or 1 block
        ids, tw = routing(tokens, 3, 2, seed=7)
        x = make_x(tokens, 3840, seed=7)
        kt_kernels._moe_prefill_min_avg_rows(1 << 40)
        ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
        assert rel_err(ref, float_moe(w, 0, x, ids, tw, 0.5, quant_act=True)) < 5e-4
        kt_kernels._moe_prefill_min_avg_rows(0)
        modes = (0, 1) if method == "int4" else (0, 1, 2, 3)
        for k_chunk in (128, 384, 512, 4096, 0):
            kt_kernels._moe_amx_k_chunk(k_chunk)
            assert kt_kernels._moe_amx_k_chunk() == k_chunk
            for a_block in (1, 3840 * 32, 1 << 30):  # 32-row blocks (the minimum), 32 rows, all rows
                kt_kernels._moe_prefill_a_block_bytes(a_block)
                for mode in modes:
                    if method == "int4":
                        kt_kernels._moe_amx_int4_prefetch(mode)
                    else:
                        kt_kernels._moe_amx_int8_mode(mode)
                    for threads in (1, 3):
                        y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                        assert torch.equal(y, ref), (k_chunk, a_block, mode, threads)
            for dist in (0, 1, 40):  # prefetch off, one chunk ahead, past the next row group's end
                kt_kernels._moe_amx_prefetch_chunks(dist)
                y = CPUMoE(w, 0, isa="amx", num_threads=2).forward(x, ids, tw)
                assert torch.equal(y, ref), (k_chunk, dist)
            kt_kernels._moe_amx_prefetch_chunks(knobs["dist"])
        kt_kernels._moe_amx_k_chunk(100)  # rounded to a multiple of 128, at least 128
        assert kt_kernels._moe_amx_k_chunk() == 128
        kt_kernels._moe_amx_k_chunk(1000)
        assert kt_kernels._moe_amx_k_chunk() == 896
    finally:
        kt_kernels._moe_amx_k_chunk(knobs["k"])
        kt_kernels._moe_prefill_a_block_bytes(knobs["a"])
        kt_kernels._moe_amx_int4_prefetch(knobs["pf"])
        kt_kernels._moe_amx_int8_mode(knobs["mode"])
        kt_kernels._moe_amx_prefetch_chunks(knobs["dist"])
        kt_kernels._moe_prefill_min_avg_rows(knobs["rows"])


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
        y = kt_kernels._moe_exp(x, isa).astype(np.float64)
        rel = np.abs(y - t) / t
        assert rel.max() < 1.5e-7, (isa, rel.max(), x[rel.argmax()])
        assert np.sqrt((rel ** 2).mean()) < 5e-8
    g = np.linspace(-10, 10, 1_000_001).astype(np.float32)
    assert (np.diff(kt_kernels._moe_exp(g, "portable").astype(np.float64)) >= 0).all()
    e = kt_kernels._moe_exp(np.array([0.0, -0.0, 1.0, -200.0, 200.0, np.inf, -np.inf], np.float32), "portable")
    assert e[0] == 1.0 and e[1] == 1.0 and abs(e[2] - np.e) < 3e-7
    assert e[3] == np.float32(kt_kernels._moe_exp(np.array([-87.0], np.float32), "portable")[0])  # clamped
    assert np.isfinite(e[4]) and e[4] == e[5] and e[6] == e[3] and e[3] > 0
    assert np.isnan(kt_kernels._moe_exp(np.array([np.nan], np.float32), "portable")[0])
    # SiLU-gate through exp_det against float64 on the same fp32 g, u: g = float(acc) * (xd * sg)
    ints = np.arange(-(1 << 20), 1 << 20, 7, dtype=np.int32)
    ints = ints[: (len(ints) // 32) * 32].reshape(-1, 32)
    xd = np.full(ints.shape[0], 30.0 / (1 << 20), np.float32)
    a = kt_kernels._moe_silu_gate(ints, np.ones_like(ints), xd, np.ones(32, np.float32), np.full(32, 1 << 20, np.float32),
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
    ref = kt_kernels._moe_exp(x, "portable")
    for isa in SIMD_ISAS:
        assert np.array_equal(_bits(kt_kernels._moe_exp(x, isa)), _bits(ref))
    for k in (16, 48, 64, 100, 256, 3840):
        rows = _special_floats(9 * k, k).reshape(9, k)
        rows[0] = 0.0
        rows[1] = np.arange(k) - k / 2 + 0.5  # exact ties after scaling
        rows[2, : k // 2] = np.nan
        rows[3] = np.inf
        r = kt_kernels._moe_quantize(rows, "portable")
        for isa in SIMD_ISAS:
            s = kt_kernels._moe_quantize(rows, isa)
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
                    {"bg": bg, "bu": bu}, {"gpt_oss": True, "bg": bg, "bu": bu}, {"gpt_oss": True, "bu": bu}):
            r = kt_kernels._moe_silu_gate(ag, au, xd, sg, su, limit, "portable", **act)
            for isa in SIMD_ISAS:
                s = kt_kernels._moe_silu_gate(ag, au, xd, sg, su, limit, isa, **act)
                assert np.array_equal(_bits(s), _bits(r)), (limit, isa, sorted(act))
    acc = ag
    y0 = _special_floats(m * 32, 6).reshape(m, 32)
    for w in (0.25, -1.5, 0.0):
        for b in (None, _special_floats(32, 9)):
            r = kt_kernels._moe_down(acc, xd, sg, y0, w, "portable", b)
            for isa in SIMD_ISAS:
                s = kt_kernels._moe_down(acc, xd, sg, y0, w, isa, b)
                for a, c in zip(s, r):
                    assert np.array_equal(_bits(a), _bits(c))


def test_gpt_oss_epilogue_values():
    """The gpt-oss activation and the biases, computed independently in float64: g = acc*xd*sg + bg,
    u likewise, g <= L, |u| <= L, a = g*sigmoid(alpha g)*(u + 1); down: y = b + acc*ad*sd (first), and
    the SiLU path without biases stays g*sigmoid(g)*u."""
    rng = np.random.default_rng(3)
    m = 5
    ag = rng.integers(-3000, 3000, (m, 32)).astype(np.int32)
    au = rng.integers(-3000, 3000, (m, 32)).astype(np.int32)
    xd = rng.uniform(1e-3, 4e-3, m).astype(np.float32)
    sg, su = rng.uniform(0.5, 1.5, 32).astype(np.float32), rng.uniform(0.5, 1.5, 32).astype(np.float32)
    bg, bu = rng.standard_normal(32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    g = ag * (xd[:, None].astype(np.float64) * sg) + bg
    u = au * (xd[:, None].astype(np.float64) * su) + bu
    assert g.max() > 7.0 and u.min() < -7.0 and u.max() > 7.0  # the clamp is exercised
    g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
    want = g / (1 + np.exp(-1.702 * g)) * (u + 1.0)
    for isa in ["portable"] + SIMD_ISAS:
        got = kt_kernels._moe_silu_gate(ag, au, xd, sg, su, 7.0, isa, gpt_oss=True, bg=bg, bu=bu)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    g0, u0 = ag * (xd[:, None].astype(np.float64) * sg), au * (xd[:, None].astype(np.float64) * su)
    np.testing.assert_allclose(kt_kernels._moe_silu_gate(ag, au, xd, sg, su, None, "portable"),
                               g0 / (1 + np.exp(-g0)) * u0, rtol=2e-6, atol=2e-6)
    b = rng.standard_normal(32).astype(np.float32)
    y, _, _, o1, _ = kt_kernels._moe_down(ag, xd, sg, np.zeros((m, 32), np.float32), 0.5, "portable", b)
    np.testing.assert_allclose(y, b + ag * (xd[:, None].astype(np.float64) * sg), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o1, 0.5 * y, rtol=1e-6, atol=1e-6)


def test_amx_int8_mode_setting():
    old = kt_kernels._moe_amx_int8_mode()
    try:
        for mode in (0, 1, 2, 3):
            kt_kernels._moe_amx_int8_mode(mode)
            assert kt_kernels._moe_amx_int8_mode() == mode
        kt_kernels._moe_amx_int8_mode(7)  # out of range: the default
        assert kt_kernels._moe_amx_int8_mode() == 1
    finally:
        kt_kernels._moe_amx_int8_mode(old)


@pytest.mark.amx
@pytest.mark.skipif(BEST != "amx", reason="needs a CPU with AMX tiles")
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_amx_int8_modes(mode):
    """Every way the INT8 tile kernel reads B (in place, prefetched, copied) gives the reference
    result: prefill and decode schedules, K-block tail (H=3840), row groups in both halves of a
    64-row block, 16/32-token tails."""
    old = kt_kernels._moe_amx_min_tokens(1)
    old_rows = kt_kernels._moe_prefill_min_avg_rows()
    old_mode = kt_kernels._moe_amx_int8_mode(mode)
    try:
        w = FakeExperts("int8", 3840, 512, 4, 2, topk=3, swiglu_limit=0.5)
        for tokens in (5, 23, 50, 90):
            ids, tw = routing(tokens, 4, 3, seed=tokens)
            x = make_x(tokens, 3840, seed=tokens)
            kt_kernels._moe_prefill_min_avg_rows(1 << 40)
            ref = CPUMoE(w, 0, isa="portable").forward(x, ids, tw)
            for rows in (1 << 40, 0):
                kt_kernels._moe_prefill_min_avg_rows(rows)
                for threads in (1, 16):
                    y = CPUMoE(w, 0, isa="amx", num_threads=threads).forward(x, ids, tw)
                    assert torch.equal(y, ref), f"amx int8 mode {mode} differs (tokens={tokens}, rows={rows})"
    finally:
        kt_kernels._moe_amx_min_tokens(old)
        kt_kernels._moe_prefill_min_avg_rows(old_rows)
        kt_kernels._moe_amx_int8_mode(old_mode)


@pytest.mark.amx
@pytest.mark.skipif(BEST != "amx", reason="needs a CPU with AMX tiles")
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
