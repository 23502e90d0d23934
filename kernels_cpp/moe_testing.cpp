// kt_kernels._testing: hooks for tests and benchmarks, not an API. The tuning knobs (tuning.hpp's table), the ISA
// table, each kernel of one ISA row on its own (exactness and bit identity across rows), the stage profile, and
// the bandwidth and clock probes of scripts/bench_moe.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "moe.hpp"
#include "moe_group.hpp"
#include "moe_isa.hpp"
#include "moe_probe.hpp"
#include "py_args.hpp"
#include "thread_pool.hpp"
#include "tuning.hpp"

namespace py = pybind11;

namespace kt {
namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using U16 = py::array_t<uint16_t, py::array::c_style | py::array::forcecast>;
using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;

const Knob& knob_named(const std::string& name) {
  std::string names;
  for (const Knob& k : knob_table()) {
    if (name == k.name) return k;
    names += std::string(names.empty() ? "" : ", ") + k.name;
  }
  throw std::invalid_argument("unknown knob '" + name + "' (knobs: " + names + ")");
}

double thread_cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Core clock while this thread runs: a chain of dependent register adds (one cycle each; a
// register operand, since newer cores fold add-immediate chains) over thread CPU time.
double core_clock_ghz() {
  const int64_t n = 200000000;
  int64_t x = 0, y = 1;
  const double t0 = thread_cpu_seconds();
  for (int64_t i = 0; i < n / 8; ++i)
    __asm__ volatile(
        "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
        "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
        : "+r"(x)
        : "r"(y));
  return n / (thread_cpu_seconds() - t0) / 1e9;
}

// int8 activations a [m, k] with 16 zero rows after them (the AMX kernels read whole 16-row tiles) and Σ per row.
struct Rows {
  std::vector<int8_t> a;
  std::vector<int32_t> sum;
  Rows(const int8_t* p, int64_t m, int64_t k) : a((m + 16) * k, 0), sum(m, 0) {
    std::copy(p, p + m * k, a.begin());
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < k; ++c) sum[i] += a[i * k + c];
  }
};

// Checks of a group-wise matrix (n x k/2 bytes) and its activations [m, k] for the group-wise hooks.
void check_group_args(const U8& w, int64_t n, int64_t k, int64_t group, const I8& a) {
  require(group == 32 || group == 64 || group == 128, "group must be 32, 64 or 128");
  require(n > 0 && n % 32 == 0 && k > 0 && k % group == 0, "n must be a multiple of 32 and k of the group");
  require(w.size() == n * k / 2, "w must hold n * k / 2 bytes");
  require(a.ndim() == 2 && a.shape(1) == k && a.shape(0) >= 1, "a must be int8 [m >= 1, k]");
}

void bind_knobs(py::module_& t) {
  t.def("knob", [](const std::string& name, std::optional<int64_t> value) {
    const Knob& k = knob_named(name);
    std::atomic<int64_t>& v = tuning().*(k.field);
    if (!value) return v.load();
    require(*value >= k.min && *value <= k.max, "knob " + name + " takes values in [" + std::to_string(k.min) + ", " +
                                                     std::to_string(k.max) + "], got " + std::to_string(*value));
    return v.exchange(*value);
  }, py::arg("name"), py::arg("value") = py::none(),
  "The engine's tuning knob `name` (knobs()): its value, or with value set it and return the old one. No value "
  "changes a result.");
  t.def("knobs", [] {
    py::dict d;
    for (const Knob& k : knob_table())
      d[py::str(k.name)] = py::make_tuple((tuning().*(k.field)).load(), k.min, k.max, k.meaning);
    return d;
  }, "Every tuning knob: name -> (value, min, max, meaning).");
  t.def("profile", [](int enable) {
    if (enable >= 0) tuning().profiling.store(enable != 0);
    py::dict d;
    for (const auto& kv : moe::last_profile()) d[py::str(kv.first)] = kv.second;
    return d;
  }, py::arg("enable") = -1,
  "Stage profile of the last prefill-schedule or group-wise forward (seconds summed over threads; enable=1/0 turns "
  "recording on/off).");
}

void bind_isa_table(py::module_& t) {
  t.def("isa_table", [] {
    py::list rows;
    for (const moe::IsaRowInfo& r : moe::isa_table_info()) {
      py::dict d, providers;
      d["name"] = r.name;
      d["base"] = r.base;
      d["runs"] = r.runs;
      for (const auto& p : r.providers) providers[py::str(p.first)] = p.second;
      d["providers"] = providers;
      rows.append(d);
    }
    return rows;
  }, "The engine's ISA table in order: per row its name, base, whether this CPU runs it, and per entry the row "
     "that provides it ('' where no row does).");
  t.def("isa_row", [](const std::string& name) { return std::string(moe::isa_kernels(name).name); }, py::arg("name"),
        "The name of the row that isa=name selects (as MoELayer.forward does); ValueError where it selects none.");
}

// The float stages of one row's Epilogue on their own (bit identity across rows on special values).
void bind_epilogue(py::module_& t) {
  auto epilogue = [](const std::string& isa) -> const moe::Epilogue& { return *moe::isa_kernels(isa).epilogue; };
  auto gate_act = [](std::optional<double> limit, bool gpt_oss, double alpha, double up_offset,
                     const std::optional<F32>& bg, const std::optional<F32>& bu, bool situ = false, double beta = 4.0,
                     double linear_beta = 25.0) {
    require((!bg || bg->size() == 32) && (!bu || bu->size() == 32), "bg, bu: [32]");
    moe::GateAct p;
    p.clamp = limit.has_value();
    p.limit = limit ? static_cast<float>(*limit) : 0.f;
    p.gpt_oss = gpt_oss;
    p.alpha = static_cast<float>(alpha);
    p.up_offset = static_cast<float>(up_offset);
    p.situ = situ;
    p.beta = static_cast<float>(beta);
    p.linear_beta = static_cast<float>(linear_beta);
    p.bg = bg ? bg->data() : nullptr;
    p.bu = bu ? bu->data() : nullptr;
    return p;
  };
  t.def("exp", [epilogue](F32 x, const std::string& isa) {
    F32 y(x.size());
    epilogue(isa).exp(x.data(), x.size(), y.mutable_data());
    return y;
  }, py::arg("x"), py::arg("isa") = "auto", "exp_det of every element (1-D float32) on that ISA's epilogue.");
  t.def("quantize", [epilogue](F32 x, const std::string& isa) {
    require(x.ndim() == 2, "x must be [rows, k]");
    const moe::Epilogue& e = epilogue(isa);
    const int64_t rows = x.shape(0), k = x.shape(1);
    py::array_t<int8_t> q({rows, k});
    F32 d(rows);
    I32 qs(rows);
    for (int64_t r = 0; r < rows; ++r)
      d.mutable_data()[r] = e.quantize(x.data() + r * k, k, q.mutable_data() + r * k, qs.mutable_data() + r);
    return py::make_tuple(q, d, qs);
  }, py::arg("x"), py::arg("isa") = "auto", "Per-row int8 quantization: (q, d, Σq).");
  t.def("silu_gate", [epilogue, gate_act](I32 ag, I32 au, F32 xd, F32 sg, F32 su, std::optional<double> limit,
                                         const std::string& isa, bool gpt_oss, double alpha, double up_offset,
                                         std::optional<F32> bg, std::optional<F32> bu, bool situ, double beta,
                                         double linear_beta) {
    const int64_t mm = xd.size();
    require(ag.size() == mm * 32 && au.size() == mm * 32 && sg.size() == 32 && su.size() == 32,
            "ag, au: [m, 32]; xd: [m]; sg, su: [32]");
    const moe::GateAct p = gate_act(limit, gpt_oss, alpha, up_offset, bg, bu, situ, beta, linear_beta);
    F32 act({mm, int64_t(32)});
    epilogue(isa).silu_gate(ag.data(), au.data(), mm, xd.data(), sg.data(), su.data(), p, act.mutable_data(), 32);
    return act;
  }, py::arg("ag"), py::arg("au"), py::arg("xd"), py::arg("sg"), py::arg("su"), py::arg("limit") = py::none(),
  py::arg("isa") = "auto", py::arg("gpt_oss") = false, py::arg("alpha") = 1.702, py::arg("up_offset") = 1.0,
  py::arg("bg") = py::none(), py::arg("bu") = py::none(), py::arg("situ") = false, py::arg("beta") = 4.0,
  py::arg("linear_beta") = 25.0,
  "Gate/up activation epilogue of one 32-row group -> act [m, 32] (SiLU, gpt-oss with gpt_oss=True, SiTU with "
  "situ=True; biases bg, bu [32] or None).");
  t.def("group_silu_gate", [epilogue, gate_act](F32 pg, F32 pu, F32 xd, std::optional<double> limit,
                                               const std::string& isa) {
    const int64_t mm = xd.size();
    require(pg.size() == mm * 32 && pu.size() == mm * 32, "pg, pu: [m, 32]; xd: [m]");
    const moe::GateAct p = gate_act(limit, false, 1.702, 1.0, std::nullopt, std::nullopt);
    F32 act({mm, int64_t(32)});
    epilogue(isa).group_silu_gate(pg.data(), pu.data(), mm, xd.data(), p, act.mutable_data(), 32);
    return act;
  }, py::arg("pg"), py::arg("pu"), py::arg("xd"), py::arg("limit") = py::none(), py::arg("isa") = "auto",
  "The group-wise SiLU-gate from float products pg, pu [m, 32] and row scales xd [m] -> act [m, 32].");
  t.def("down", [epilogue](I32 acc, F32 ad, F32 sd, F32 y0, float w, const std::string& isa, std::optional<F32> b) {
    const int64_t mm = ad.size();
    require(acc.size() == mm * 32 && sd.size() == 32 && y0.size() == mm * 32, "acc, y0: [m, 32]; ad: [m]; sd: [32]");
    require(!b || b->size() == 32, "b: [32]");
    const float* bp = b ? b->data() : nullptr;
    const moe::Epilogue& e = epilogue(isa);
    F32 y({mm, int64_t(32)}), y2({mm, int64_t(32)}), o({mm, int64_t(32)}), o1({mm, int64_t(32)}), o2({mm, int64_t(32)});
    e.down(acc.data(), mm, ad.data(), sd.data(), y.mutable_data(), 32, true, bp);
    std::copy(y0.data(), y0.data() + mm * 32, y2.mutable_data());
    e.down(acc.data(), mm, ad.data(), sd.data(), y2.mutable_data(), 32, false, bp);
    std::copy(y0.data(), y0.data() + mm * 32, o.mutable_data());
    for (int64_t i = 0; i < mm; ++i) e.axpy(o.mutable_data() + i * 32, w, y2.data() + i * 32, i % 32 + 1);
    // down_out into zeroed rows (token i = row i, weight w): from nothing (bias) and after y2. (Zero, not y0:
    // which NaN payload o + NaN keeps is the compiler's operand order in the scalar reference.)
    std::vector<float> wv(mm, w);
    std::vector<int64_t> tok(mm);
    for (int64_t i = 0; i < mm; ++i) tok[i] = i;
    std::fill(o1.mutable_data(), o1.mutable_data() + mm * 32, 0.f);
    e.down_out(acc.data(), 32 * mm, 1, mm, ad.data(), sd.data(), nullptr, bp, wv.data(), tok.data(), o1.mutable_data(), 32);
    std::fill(o2.mutable_data(), o2.mutable_data() + mm * 32, 0.f);
    e.down_out(acc.data(), 32 * mm, 1, mm, ad.data(), sd.data(), y2.data(), bp, wv.data(), tok.data(), o2.mutable_data(), 32);
    return py::make_tuple(y, y2, o, o1, o2);
  }, py::arg("acc"), py::arg("ad"), py::arg("sd"), py::arg("y0"), py::arg("w"), py::arg("isa") = "auto",
  py::arg("b") = py::none(),
  "Down epilogue: (y first=true (from bias b or 0), y0 + down, y0 row i += w * that row's first i%32+1 columns, "
  "0 + w * down_out from b, 0 + w * down_out after y0 + down).");
}

// The product kernels of one row on their own (exact int32 sums, the float product, bit for bit).
void bind_products(py::module_& t) {
  t.def("dot", [](const std::string& method_name, U8 w, int64_t n, int64_t k, I8 a, const std::string& isa) {
    const Method method = parse_method(method_name);
    const moe::TiledKernels& tk = moe::isa_kernels(isa).tiled;
    require(!is_grouped(method), "group-wise methods: use group_dot");
    require(n > 0 && n % 32 == 0, "n must be a positive multiple of 32");
    require(k > 0 && k % method_info(method).k_align == 0,
            "k must be a positive multiple of " + std::to_string(method_info(method).k_align));
    require(w.size() == packed_weight_bytes(method, n, k), "w: " + std::to_string(w.size()) + " bytes, expected " +
                                                              std::to_string(packed_weight_bytes(method, n, k)));
    require(a.ndim() == 2 && a.shape(1) == k, "a must be int8 [m, k]");
    const int64_t m = a.shape(0);
    const Rows rows(a.data(), m, k);
    std::vector<int32_t> acc(m * 32);
    py::array_t<int32_t> out({m, n});
    int32_t* o = out.mutable_data();
    if (tk.prepare_thread) tk.prepare_thread();
    for (int64_t r0 = 0; r0 < n; r0 += 32) {
      tk.dot(method, w.data(), n, k, r0, rows.a.data(), moe::ALayout::row_major(k), rows.sum.data(), m, acc.data());
      for (int64_t i = 0; i < m; ++i) std::copy(acc.begin() + i * 32, acc.begin() + i * 32 + 32, o + i * n + r0);
    }
    return out;
  }, py::arg("method"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("a"), py::arg("isa") = "auto",
  "Exact int32 products [m, n] of a packed [n, k] matrix (tiled bytes) with int8 activations a [m, k] on "
  "that ISA's dot kernel.");
  t.def("group_dot", [](U8 w, int64_t n, int64_t k, int64_t group, I8 a, const std::string& isa, bool prepared) {
    const moe::GroupKernels& gk = moe::isa_kernels(isa).group;
    check_group_args(w, n, k, group, a);
    const int64_t m = a.shape(0), G = k / group;
    require(m <= 16, "a must have 1 to 16 rows");
    py::array_t<int32_t> out({m, G, n});
    std::vector<int32_t> gsum(m * G * 32), corr(m * G);
    std::vector<int8_t> split(m * k);
    if (prepared) gk.prepare(a.data(), k, m, k, group, split.data(), corr.data());
    for (int64_t r0 = 0; r0 < n; r0 += 32) {
      gk.dot(w.data(), k, group, r0, a.data(), k, prepared ? split.data() : nullptr, prepared ? corr.data() : nullptr, m,
             gsum.data(), false);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < G; ++g)
          std::copy(gsum.begin() + (i * G + g) * 32, gsum.begin() + (i * G + g) * 32 + 32,
                    out.mutable_data() + (i * G + g) * n + r0);
    }
    return out;
  }, py::arg("w"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("a"), py::arg("isa") = "auto",
  py::arg("prepared") = false,
  "Exact int32 group sums [m, k/group, n] of a row-major group-wise INT4 matrix (n x k/2 bytes) with int8 "
  "activations a [m <= 16, k] on that ISA's kernel; prepared: the rows split by that ISA's group prepare first, as "
  "the engine does, else the kernel prepares them.");
  t.def("group_scale", [](I32 gsum, U16 st, const std::string& isa) {
    const moe::GroupScaleFn scale = moe::isa_kernels(isa).group.scale;
    require(gsum.ndim() == 2 && gsum.shape(1) == 32 && gsum.shape(0) >= 1, "gsum must be int32 [G, 32]");
    require(st.ndim() == 2 && st.shape(0) == gsum.shape(0) && st.shape(1) == 32, "st must be uint16 [G, 32]");
    py::array_t<float> out(32);
    scale(gsum.data(), st.data(), gsum.shape(0), out.mutable_data());
    return out;
  }, py::arg("gsum"), py::arg("st"), py::arg("isa") = "auto",
  "The float product [32] of one row's group sums gsum [G, 32] and bf16 scales st [G, 32] on that ISA's "
  "implementation.");
  t.def("group_gemm", [](U8 w, U16 s, int64_t n, int64_t k, int64_t group, I8 a, const std::string& isa) {
    const moe::GroupKernels& gk = moe::isa_kernels(isa).group;
    check_group_args(w, n, k, group, a);
    const int64_t m = a.shape(0), G = k / group;
    require(s.size() == n * G, "s must hold n * k / group bf16 scales (row-major)");
    std::vector<uint16_t> st(n * G);
    moe::group_scales_by_rowgroup(s.data(), n, G, st.data());
    const Rows rows(a.data(), m, k);
    std::vector<int8_t> split(m * k);
    std::vector<int32_t> corr(m * G);
    gk.prepare(rows.a.data(), k, m, k, group, split.data(), corr.data());
    std::vector<float> p(m * 32);
    py::array_t<float> out({m, n});
    for (int64_t r0 = 0; r0 < n; r0 += 32) {
      gk.gemm(w.data(), st.data(), k, group, r0, rows.a.data(), k, split.data(), corr.data(), m, p.data());
      for (int64_t i = 0; i < m; ++i) std::copy(p.begin() + i * 32, p.begin() + i * 32 + 32, out.mutable_data() + i * n + r0);
    }
    return out;
  }, py::arg("w"), py::arg("s"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("a"), py::arg("isa") = "auto",
  "The float products [m, n] of a row-major group-wise INT4 matrix (n x k/2 bytes, bf16 scales s [n, k/group]) "
  "with int8 activations a [m, k] on that ISA's GEMM.");
}

void bind_probes(py::module_& t) {
  t.def("read_bandwidth", [](const py::array& buf, int64_t num_threads, int reps) {
    const int threads = checked_thread_count(num_threads);
    require(buf.itemsize() == 1 && (buf.flags() & py::array::c_style), "buf must be a C-contiguous byte array");
    require(reinterpret_cast<uintptr_t>(buf.data()) % 64 == 0, "buf must be 64-byte aligned");
    const uint8_t* p = static_cast<const uint8_t*>(buf.data());
    const int64_t n = buf.size();
    py::gil_scoped_release release;
    return moe::read_bandwidth_gbs(p, n, threads, reps < 1 ? 1 : reps);
  }, py::arg("buf"), py::arg("num_threads") = 0, py::arg("reps") = 3,
  "GB/s of a streaming read of buf by the MoE thread pool (best of reps).");
  t.def("core_clock_ghz", [] {
    py::gil_scoped_release release;
    return core_clock_ghz();
  }, "GHz of this core while it runs (dependent register adds over thread CPU time).");
  t.def("probe", [](const std::string& kind, int threads, std::vector<int> cpus, double seconds) {
    // kind's register-only loop on `threads` threads at once (thread i pinned to cpus[i] when given)
    require(kind == "clock" || kind == "vnni" || kind == "amx", "kind must be clock, vnni or amx");
    if (kind != "clock") moe::isa_kernels(kind == "amx" ? "amx" : "avx512");  // refuses an ISA the CPU lacks
    require(threads > 0 && threads <= kMaxThreads, "threads must be in [1, " + std::to_string(kMaxThreads) + "]");
    require(cpus.empty() || static_cast<int>(cpus.size()) == threads, "cpus: one CPU per thread, or none");
    std::vector<double> count(threads, 0), cpu(threads, 0), wall(threads, 0);
    std::vector<int> pinned(threads, 1);
    {
      py::gil_scoped_release release;
      auto body = [&](int i) {
        if (!cpus.empty()) {
          cpu_set_t set;
          CPU_ZERO(&set);
          CPU_SET(cpus[i], &set);
          pinned[i] = pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
        }
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = thread_cpu_seconds();
        if (kind == "clock") {
          count[i] = core_clock_ghz() * 1e9;  // dependent adds per CPU second
        } else {
          count[i] = static_cast<double>(kind == "amx" ? moe::amx::tile_probe(seconds) : moe::avx512::vnni_probe(seconds));
        }
        cpu[i] = thread_cpu_seconds() - c0;
        wall[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      };
      std::vector<std::thread> pool;
      for (int i = 1; i < threads; ++i) pool.emplace_back(body, i);
      body(0);
      for (auto& th : pool) th.join();
    }
    py::list out;
    for (int i = 0; i < threads; ++i) {
      if (!pinned[i]) throw std::invalid_argument("could not pin a thread to CPU " + std::to_string(cpus[i]));
      py::dict d;
      d["cpu"] = cpus.empty() ? -1 : cpus[i];
      d["per_cpu_s"] = kind == "clock" ? count[i] : count[i] / cpu[i];  // clock: adds per CPU second already
      d["cpu_share"] = cpu[i] / wall[i];
      out.append(d);
    }
    return out;
  }, py::arg("kind"), py::arg("threads") = 1, py::arg("cpus") = std::vector<int>(), py::arg("seconds") = 0.5,
  "Scaling probe: a register-only loop on `threads` threads at once (thread i on cpus[i] when given): 'clock' "
  "dependent adds (the core clock), 'vnni' VPDPBUSD (64 int8 products each), 'amx' TDPBSSD (16x16x64); per "
  "thread its rate per CPU second and the share of the wall time it ran.");
  t.def("dot_stream", [](const std::string& method_name, const py::array& buf, int64_t n, int64_t k, int64_t m,
                         const std::string& isa, int threads, double seconds) {
    // The dot kernel alone over buf cut into packed [n, k] matrices, every 32-row group of each with m activation
    // rows (one call per group, as the decode schedule makes them); thread t streams over its own contiguous share
    // of the matrices until `seconds` have passed.
    const Method method = parse_method(method_name);
    const moe::TiledKernels& tk = moe::isa_kernels(isa).tiled;
    require(buf.itemsize() == 1 && (buf.flags() & py::array::c_style), "buf must be a C-contiguous byte array");
    require(n > 0 && n % 32 == 0 && k > 0 && k % method_info(method).k_align == 0 && m > 0 && threads > 0,
            "need n % 32 == 0, k a multiple of the method's K alignment, m > 0, threads > 0");
    const int64_t mat = packed_weight_bytes(method, n, k);
    const int64_t per = buf.size() / mat / threads;
    require(per > 0, "buf holds fewer than `threads` matrices");
    const uint8_t* w = static_cast<const uint8_t*>(buf.data());
    std::vector<int8_t> a((m + 16) * k);
    for (size_t i = 0; i < a.size(); ++i)  // -127..127, as quantize gives for finite inputs
      a[i] = static_cast<int8_t>(static_cast<int>(((i * 2654435761u) >> 13) % 255) - 127);
    std::vector<int32_t> asum(m, 0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < k; ++c) asum[i] += a[i * k + c];
    std::vector<int64_t> mats(threads, 0);
    std::vector<double> wall(threads, 0), cpu(threads, 0);
    {
      py::gil_scoped_release release;
      auto body = [&](int t) {
        if (tk.prepare_thread) tk.prepare_thread();
        std::vector<int32_t> out(m * 32);
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = thread_cpu_seconds();
        double dt = 0;
        int64_t done = 0;
        do {
          for (int64_t j = t * per; j < (t + 1) * per && dt < seconds; ++j, ++done) {
            for (int64_t r0 = 0; r0 < n; r0 += 32)
              tk.dot(method, w + j * mat, n, k, r0, a.data(), moe::ALayout::row_major(k), asum.data(), m, out.data());
            dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          }
        } while (dt < seconds);
        mats[t] = done;
        wall[t] = dt;
        cpu[t] = thread_cpu_seconds() - c0;
      };
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) pool.emplace_back(body, t);
      body(0);
      for (auto& th : pool) th.join();
    }
    py::dict r;
    double wps = 0, wps_cpu = 0, c = 0, wl = 0;
    for (int t = 0; t < threads; ++t) {
      wps += static_cast<double>(mats[t]) * n * k / wall[t];
      wps_cpu += static_cast<double>(mats[t]) * n * k / cpu[t];
      c += cpu[t];
      wl += wall[t];
    }
    r["weights_per_s"] = wps;
    r["weights_per_cpu_s"] = wps_cpu / threads;  // per thread, per second it actually ran
    r["GBps"] = wps * mat / (static_cast<double>(n) * k) / 1e9;
    r["cpu_share"] = c / wl;
    return r;
  }, py::arg("method"), py::arg("buf"), py::arg("n"), py::arg("k"), py::arg("m") = 1, py::arg("isa") = "auto",
  py::arg("threads") = 1, py::arg("seconds") = 0.5,
  "Benchmark of a dot kernel alone: weights/s over buf (packed [n, k] matrices, one call per 32-row group).");
}

}  // namespace

void bind_moe_testing(py::module_& t) {
  bind_knobs(t);
  bind_isa_table(t);
  bind_epilogue(t);
  bind_products(t);
  bind_probes(t);
}

}  // namespace kt
