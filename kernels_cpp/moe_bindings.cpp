// Python bindings of the CPU MoE engine: kt_kernels.MoELayer (weights parsed once, forward per
// call) and kt_kernels.moe_forward (one-shot). Every input is validated; errors raise ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "moe.hpp"
#include "moe_host_job.hpp"
#include "moe_group.hpp"
#include "thread_pool.hpp"
#include "tuning.hpp"

namespace py = pybind11;

namespace kt {
namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}


bool is_f32(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 4; }

class MoELayer {
 public:
  // weights[e][t] = (gate_w, gate_s, up_w, up_s, down_w, down_s)
  MoELayer(const std::string& method, const py::sequence& weights, int64_t hidden, int64_t intermediate,
           int64_t threadpool_count, std::optional<double> swiglu_limit, const std::string& activation = "silu",
           double alpha = 1.702, double up_offset = 1.0, const py::object& gate_bias = py::none(),
           const py::object& up_bias = py::none(), const py::object& down_bias = py::none(), double beta = 4.0,
           double linear_beta = 25.0) {
    moe::Config& cfg = w_.cfg;
    cfg.method = parse_method(method);
    cfg.hidden = hidden;
    cfg.intermediate = intermediate;
    cfg.threadpool_count = threadpool_count;
    cfg.experts = static_cast<int64_t>(py::len(weights));
    require(cfg.experts > 0, "weights: no experts given");
    if (swiglu_limit) {
      cfg.clamp = true;
      cfg.limit = static_cast<float>(*swiglu_limit);
    }
    require(activation == "silu" || activation == "gpt_oss" || activation == "situ",
            "activation must be 'silu', 'gpt_oss' or 'situ', got '" + activation + "'");
    cfg.gpt_oss = activation == "gpt_oss";
    cfg.situ = activation == "situ";
    cfg.beta = static_cast<float>(beta);
    cfg.linear_beta = static_cast<float>(linear_beta);
    cfg.alpha = static_cast<float>(alpha);
    cfg.up_offset = static_cast<float>(up_offset);
    moe::validate_config(cfg);
    read_bias(gate_bias, "gate_bias", cfg.intermediate, w_.gate_bias);
    read_bias(up_bias, "up_bias", cfg.intermediate, w_.up_bias);
    read_bias(down_bias, "down_bias", cfg.hidden, w_.down_bias);
    const int64_t il = cfg.i_local();
    w_.shards.resize(cfg.experts * threadpool_count);
    for (int64_t e = 0; e < cfg.experts; ++e) {
      const py::sequence per_pool = weights[e].cast<py::sequence>();
      require(static_cast<int64_t>(py::len(per_pool)) == threadpool_count,
              "weights[" + std::to_string(e) + "]: expected " + std::to_string(threadpool_count) + " NUMA shards, got " +
                  std::to_string(py::len(per_pool)));
      for (int64_t t = 0; t < threadpool_count; ++t) {
        const py::sequence six = per_pool[t].cast<py::sequence>();
        const std::string where = "weights[" + std::to_string(e) + "][" + std::to_string(t) + "]";
        require(py::len(six) == 6, where + ": expected (gate_w, gate_s, up_w, up_s, down_w, down_s)");
        moe::ExpertShard& sh = w_.shards[e * threadpool_count + t];
        static const char* names[3] = {"gate", "up", "down"};
        moe::PackedMat* mats[3] = {&sh.gate, &sh.up, &sh.down};
        for (int p = 0; p < 3; ++p) {
          const int64_t n = p < 2 ? il : hidden, k = p < 2 ? hidden : il;
          const std::string wh = where + " " + names[p];
          py::object wo = six[2 * p], so = six[2 * p + 1];
          require(py::isinstance<py::array>(wo) && py::isinstance<py::array>(so), wh + ": weight and scales must be numpy arrays");
          py::array wa = wo.cast<py::array>(), sa = so.cast<py::array>();
          require(wa.itemsize() == 1 && (wa.dtype().kind() == 'u' || wa.dtype().kind() == 'i'),
                  wh + " weight: dtype must be uint8 or int8");
          require(wa.flags() & py::array::c_style, wh + " weight: must be C-contiguous");
          const int64_t want = packed_weight_bytes(cfg.method, n, k);
          require(wa.size() == want, wh + " weight: " + std::to_string(wa.size()) + " bytes, expected " +
                                         std::to_string(want) + " for " + method + " [" + std::to_string(n) + ", " +
                                         std::to_string(k) + "]");
          require(sa.flags() & py::array::c_style, wh + " scales: must be C-contiguous");
          mats[p]->w = static_cast<const uint8_t*>(wa.data());
          if (const int64_t group = method_info(cfg.method).group_size) {
            require(sa.itemsize() == 2 && sa.dtype().kind() != 'f',
                    wh + " scales: dtype must be uint16 (bf16 bits) for " + method);
            require(sa.size() == n * (k / group), wh + " scales: " + std::to_string(sa.size()) + " values, expected " +
                                                      std::to_string(n * (k / group)) + " (" + std::to_string(n) +
                                                      " rows x " + std::to_string(k / group) + " groups)");
            std::vector<uint16_t>& st = w_.group_scales.emplace_back(static_cast<size_t>(sa.size()));
            moe::group_scales_by_rowgroup(static_cast<const uint16_t*>(sa.data()), n, k / group, st.data());
            mats[p]->gs = st.data();
          } else {
            require(is_f32(sa), wh + " scales: dtype must be float32");
            require(sa.size() == n, wh + " scales: " + std::to_string(sa.size()) + " values, expected " + std::to_string(n));
            mats[p]->s = static_cast<const float*>(sa.data());
          }
          keep_.append(wa);
          if (!mats[p]->gs) keep_.append(sa);  // group-wise scales: the engine reads its own copy
        }
      }
    }
  }

  py::array_t<float> forward(const py::array& x, const py::array& ids, const py::array& topk_w,
                             const std::string& isa_name, int64_t num_threads) {
    const moe::Config& cfg = w_.cfg;
    const Isa isa = resolve_isa(isa_name);
    const int threads = checked_thread_count(num_threads);
    require(x.ndim() == 2, "x must be 2-D [tokens, hidden], got shape " + shape_str(x));
    require(is_f32(x), "x must be float32");
    require(x.flags() & py::array::c_style, "x must be C-contiguous");
    require(x.shape(1) == cfg.hidden,
            "x has hidden size " + std::to_string(x.shape(1)) + ", the experts have " + std::to_string(cfg.hidden));
    const int64_t tokens = x.shape(0);
    require(ids.ndim() == 2 && ids.shape(0) == tokens,
            "topk_ids must be [tokens, k] with tokens = " + std::to_string(tokens) + ", got shape " + shape_str(ids));
    require(ids.dtype().kind() == 'i' && ids.itemsize() == 8, "topk_ids must be int64");
    require(ids.flags() & py::array::c_style, "topk_ids must be C-contiguous");
    const int64_t topk = ids.shape(1);
    require(topk_w.ndim() == 2 && topk_w.shape(0) == tokens && topk_w.shape(1) == topk,
            "topk_weights must have the shape of topk_ids " + shape_str(ids) + ", got " + shape_str(topk_w));
    require(is_f32(topk_w), "topk_weights must be float32");
    require(topk_w.flags() & py::array::c_style, "topk_weights must be C-contiguous");
    const int64_t* id = static_cast<const int64_t*>(ids.data());
    for (int64_t i = 0; i < tokens * topk; ++i)
      if (id[i] < -1 || id[i] >= cfg.experts)
        throw std::invalid_argument("topk_ids[" + std::to_string(i / topk) + ", " + std::to_string(i % topk) +
                                    "] = " + std::to_string(id[i]) + " is out of range [0, " +
                                    std::to_string(cfg.experts) + ") (-1: a skipped slot)");
    const float* xp = static_cast<const float*>(x.data());
    const float* wp = static_cast<const float*>(topk_w.data());
    for (int64_t i = 0; i < tokens * topk; ++i)
      if (!std::isfinite(wp[i])) throw std::invalid_argument("topk_weights has a non-finite value");
    {  // branch-free (vectorizable) scan per row: exponent bits all ones = inf or nan
      const uint32_t* xb = static_cast<const uint32_t*>(x.data());
      for (int64_t t = 0; t < tokens; ++t) {
        uint32_t bad = 0;
        const uint32_t* row = xb + t * cfg.hidden;
        for (int64_t i = 0; i < cfg.hidden; ++i) bad |= static_cast<uint32_t>((row[i] & 0x7f800000u) == 0x7f800000u);
        if (bad) throw std::invalid_argument("x has a non-finite value at token " + std::to_string(t));
      }
    }
    py::array_t<float> out({tokens, cfg.hidden});
    float* op = out.mutable_data();
    {
      py::gil_scoped_release release;
      moe::forward(w_, xp, tokens, id, wp, topk, op, isa, threads);
    }
    return out;
  }

  const moe::Config& config() const { return w_.cfg; }
  const moe::Weights& weights() const { return w_; }
  bool has_biases() const { return !w_.gate_bias.empty() || !w_.up_bias.empty() || !w_.down_bias.empty(); }

 private:
  // A bias: None, or a finite float32 C-contiguous [experts, n] array, copied.
  void read_bias(const py::object& o, const std::string& name, int64_t n, std::vector<float>& dst) {
    if (o.is_none()) return;
    require(py::isinstance<py::array>(o), name + ": must be a numpy array or None");
    const py::array a = o.cast<py::array>();
    const int64_t E = w_.cfg.experts;
    require(is_f32(a), name + ": dtype must be float32");
    require(a.flags() & py::array::c_style, name + ": must be C-contiguous");
    require(a.ndim() == 2 && a.shape(0) == E && a.shape(1) == n,
            name + ": expected shape (" + std::to_string(E) + ", " + std::to_string(n) + "), got " + shape_str(a));
    const float* p = static_cast<const float*>(a.data());
    for (int64_t i = 0; i < E * n; ++i)
      if (!std::isfinite(p[i]))
        throw std::invalid_argument(name + ": non-finite value at expert " + std::to_string(i / n) + ", column " +
                                    std::to_string(i % n));
    dst.assign(p, p + E * n);
  }

  moe::Weights w_;
  py::list keep_;  // the numpy arrays whose memory the pointers refer to
};

// A stream-ordered job of one MoELayer over fixed buffers (moe_host_job.hpp); keeps the layer and the
// buffers alive while it exists.
class PyHostJob {
 public:
  PyHostJob(py::object layer, py::array x, py::array ids, py::array w, py::array out, const std::string& isa_name,
            int64_t num_threads)
      : layer_(layer), x_(x), ids_(ids), w_(w), out_(out) {
    const MoELayer& l = layer.cast<const MoELayer&>();
    const int64_t H = l.config().hidden;
    require(x.ndim() == 2 && x.shape(1) == H && is_f32(x) && (x.flags() & py::array::c_style),
            "x must be a C-contiguous float32 [tokens, " + std::to_string(H) + "] array, got " + shape_str(x));
    const int64_t T = x.shape(0);
    require(ids.ndim() == 2 && ids.shape(0) == T && ids.dtype().kind() == 'i' && ids.itemsize() == 8 &&
                (ids.flags() & py::array::c_style),
            "topk_ids must be a C-contiguous int64 [tokens, k] array, got " + shape_str(ids));
    const int64_t k = ids.shape(1);
    require(w.ndim() == 2 && w.shape(0) == T && w.shape(1) == k && is_f32(w) && (w.flags() & py::array::c_style),
            "topk_weights must be a C-contiguous float32 array of topk_ids' shape, got " + shape_str(w));
    require(out.ndim() == 2 && out.shape(0) == T && out.shape(1) == H && is_f32(out) &&
                (out.flags() & py::array::c_style) && out.writeable(),
            "out must be a writable C-contiguous float32 [tokens, hidden] array, got " + shape_str(out));
    job_.weights = &l.weights();
    job_.x = static_cast<const float*>(x.data());
    job_.ids = static_cast<const int64_t*>(ids.data());
    job_.w = static_cast<const float*>(w.data());
    job_.out = static_cast<float*>(out.mutable_data());
    job_.tokens = T;
    job_.topk = k;
    job_.isa = resolve_isa(isa_name);
    job_.threads = checked_thread_count(num_threads);
  }
  // Runs already submitted must finish before the buffers and the job go away. (Host functions still queued
  // on a stream, or a CUDA graph that captured the address, must not outlive the job: HybridMoE keeps it.)
  ~PyHostJob() {
    if (job_.done.load() < job_.submitted.load()) {
      py::gil_scoped_release release;
      moe::host_wait(&job_);
    }
  }
  uintptr_t address() { return reinterpret_cast<uintptr_t>(&job_); }
  moe::HostJob& job() { return job_; }

 private:
  py::object layer_;
  py::array x_, ids_, w_, out_;
  moe::HostJob job_;
};

// The dot kernel of one ISA (Amx: the tile kernel, which configures the tiles on every call).
moe::DotFn dot_kernel(Isa isa) {
  switch (isa) {
    case Isa::Amx: return moe::amx::dot_rowgroup;
    case Isa::Avx512: return moe::avx512::dot_rowgroup;
    case Isa::Avx2: return moe::avx2::dot_rowgroup;
    default: return moe::ref::dot_rowgroup;
  }
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

}  // namespace

void bind_moe(py::module_& m) {
  py::class_<MoELayer>(m, "MoELayer",
                       "One MoE layer's routed experts in the AMXINT4/AMXINT8 packed format, read in place.")
      .def(py::init<const std::string&, const py::sequence&, int64_t, int64_t, int64_t, std::optional<double>,
                    const std::string&, double, double, const py::object&, const py::object&, const py::object&, double,
                    double>(),
           py::arg("method"), py::arg("weights"), py::arg("hidden_size"), py::arg("intermediate_size"),
           py::arg("threadpool_count"), py::arg("swiglu_limit") = py::none(), py::kw_only(),
           py::arg("activation") = "silu", py::arg("alpha") = 1.702, py::arg("up_offset") = 1.0,
           py::arg("gate_bias") = py::none(), py::arg("up_bias") = py::none(), py::arg("down_bias") = py::none(),
           py::arg("beta") = 4.0, py::arg("linear_beta") = 25.0,
           "weights[e][t] = (gate_w, gate_s, up_w, up_s, down_w, down_s): uint8 tiled bytes and float32 scales "
           "of NUMA shard t of expert e (gate/up: [I/T, H], down: [H, I/T]). activation 'silu', 'gpt_oss' "
           "(g*sigmoid(alpha*g) * (u + up_offset)) or 'situ' (beta*tanh(g/beta)*sigmoid(g) * "
           "linear_beta*tanh(u/linear_beta)); gate_bias / up_bias float32 [E, I], down_bias [E, H] or None.")
      .def("forward", &MoELayer::forward, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"),
           py::arg("isa") = "auto", py::arg("num_threads") = 0,
           "x float32 [T, H], topk_ids int64 [T, k], topk_weights float32 [T, k] -> float32 [T, H]")
      .def_property_readonly("num_experts", [](const MoELayer& l) { return l.config().experts; })
      .def_property_readonly("hidden_size", [](const MoELayer& l) { return l.config().hidden; })
      .def_property_readonly("intermediate_size", [](const MoELayer& l) { return l.config().intermediate; })
      .def_property_readonly("threadpool_count", [](const MoELayer& l) { return l.config().threadpool_count; })
      .def_property_readonly("activation", [](const MoELayer& l) {
        return l.config().gpt_oss ? "gpt_oss" : l.config().situ ? "situ" : "silu";
      })
      .def("host_job", [](py::object self, py::array x, py::array ids, py::array w, py::array out,
                          const std::string& isa, int64_t num_threads) {
             return new PyHostJob(self, x, ids, w, out, isa, num_threads);
           }, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("out"), py::arg("isa") = "auto",
           py::arg("num_threads") = 0, py::return_value_policy::take_ownership,
           "A stream-ordered job over these fixed buffers (HostJob): forward(x, topk_ids, topk_weights) into out "
           "each time it is submitted, on the submission thread. The buffers are read when the job runs, not "
           "checked then: ids outside [-1, E) fail the run (out filled with NaN, counted in failures, last_error); "
           "non-finite x or weights give non-finite rows.")
      .def_property_readonly("has_biases", &MoELayer::has_biases);

  py::class_<PyHostJob>(m, "HostJob", "A MoELayer's stream-ordered job (MoELayer.host_job).")
      .def_property_readonly("address", &PyHostJob::address, "the job's address: the host functions' argument")
      .def("submit", [](PyHostJob& j) { moe::host_submit(&j.job()); }, "queue one run (what the stream's host "
           "function does)")
      .def("wait", [](PyHostJob& j) {
             py::gil_scoped_release release;
             moe::host_wait(&j.job());
           }, "block until every submission so far has run")
      .def_property_readonly("submitted", [](PyHostJob& j) { return j.job().submitted.load(); })
      .def_property_readonly("done", [](PyHostJob& j) { return j.job().done.load(); })
      .def_property_readonly("failures", [](PyHostJob& j) { return j.job().failures.load(); })
      .def_property_readonly("last_error", [](PyHostJob& j) {
        return j.job().failures.load() ? j.job().last_error : std::string();
      });
  m.def("_host_functions", [] {
    return py::make_tuple(reinterpret_cast<uintptr_t>(&moe::host_submit), reinterpret_cast<uintptr_t>(&moe::host_wait));
  }, "(submit, wait) addresses of the host functions that take a HostJob's address (cudaLaunchHostFunc's shape)");
  m.def(
      "moe_forward",
      [](const std::string& method, const py::array& x, const py::array& ids, const py::array& topk_w,
         const py::sequence& weights, int64_t hidden, int64_t intermediate, int64_t threadpool_count,
         std::optional<double> swiglu_limit, const std::string& isa, int64_t num_threads) {
        MoELayer layer(method, weights, hidden, intermediate, threadpool_count, swiglu_limit);
        return layer.forward(x, ids, topk_w, isa, num_threads);
      },
      py::arg("method"), py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("weights"),
      py::arg("hidden_size"), py::arg("intermediate_size"), py::arg("threadpool_count"), py::arg("swiglu_limit") = py::none(),
      py::arg("isa") = "auto", py::arg("num_threads") = 0,
      "One-shot MoE forward (parses the weights each call; use MoELayer for repeated calls).");
  m.def("start_moe_pool", [](int64_t num_threads) {
    const int n = checked_thread_count(num_threads);
    py::gil_scoped_release release;
    return moe::start_pool(n);
  }, py::arg("num_threads") = 0,
  "Starts the MoE engine's pool of num_threads threads now (0: every hardware thread) and returns its size; "
  "ThreadStartError when the system refuses a thread.");
  // ---- tuning knobs (tuning.hpp): each call gets (value out of range) or sets the knob, returns the old value
  m.def("_moe_amx_min_tokens", [](int v) {
    return v > 0 ? tuning().amx_min_tokens.exchange(v) : tuning().amx_min_tokens.load();
  }, py::arg("value") = 0, "Get (value=0) or set the smallest expert group sent to the AMX kernel; returns the old value.");
  m.def("_moe_amx_int8_mode", [](int v) {
    return v >= 0 ? tuning().amx_int8_mode.exchange(v > 3 ? 1 : v) : tuning().amx_int8_mode.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set how the AMX INT8 kernel reads each K chunk of B (0 in place, 1 in place and the next "
  "chunk prefetched, 2 copied, 3 copied and prefetched); returns the old value. Results are identical in every mode.");
  m.def("_moe_amx_int4_prefetch", [](int v) {
    return v >= 0 ? tuning().amx_int4_prefetch.exchange(v != 0) : tuning().amx_int4_prefetch.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set whether the AMX INT4 kernel prefetches the next chunk of B (1) or not (0); returns the old "
  "value. Results are identical either way.");
  m.def("_moe_amx_prefetch_chunks", [](int64_t v) {
    return v >= 0 ? tuning().amx_prefetch_chunks.exchange(v) : tuning().amx_prefetch_chunks.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set how many K chunks ahead the AMX kernel prefetches B (0: none); returns the old value. "
  "Results are identical for every value.");
  m.def("_moe_amx_k_chunk", [](int64_t v) {
    return v >= 0 ? tuning().amx_k_chunk.exchange(v == 0 ? 0 : v < 128 ? 128 : v / 128 * 128)
                  : tuning().amx_k_chunk.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set the K per chunk of B in the AMX kernel (rounded down to a multiple of 128, at least 128; "
  "0: by the call's tokens); returns the old value. Results are identical for every value.");
  m.def("_moe_read_bandwidth", [](const py::array& buf, int64_t num_threads, int reps) {
    const int threads = checked_thread_count(num_threads);
    require(buf.itemsize() == 1 && (buf.flags() & py::array::c_style), "buf must be a C-contiguous byte array");
    require(reinterpret_cast<uintptr_t>(buf.data()) % 64 == 0, "buf must be 64-byte aligned");
    const uint8_t* p = static_cast<const uint8_t*>(buf.data());
    const int64_t n = buf.size();
    py::gil_scoped_release release;
    return moe::read_bandwidth_gbs(p, n, threads, reps < 1 ? 1 : reps);
  }, py::arg("buf"), py::arg("num_threads") = 0, py::arg("reps") = 3,
  "GB/s of a streaming read of buf by the MoE thread pool (best of reps).");
  m.def("_moe_prefill_min_avg_rows", [](int64_t v) {
    return v >= 0 ? tuning().prefill_min_avg_rows.exchange(v) : tuning().prefill_min_avg_rows.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set the average rows per active expert from which the prefill schedule runs "
  "(0: always; huge: never).");
  m.def("_moe_prefill_a_block_bytes", [](int64_t v) {
    return v > 0 ? tuning().prefill_a_block_bytes.exchange(v) : tuning().prefill_a_block_bytes.load();
  }, py::arg("value") = 0,
  "Get (value=0) or set the activation-panel bytes (rows x H) one prefill gate/up task covers at most; returns the "
  "old value. Results are identical for every value.");
  m.def("_moe_per_expert_down_limit", [](int64_t v) {
    return v >= 0 ? tuning().per_expert_down_limit_bytes.exchange(v) : tuning().per_expert_down_limit_bytes.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set the largest rows*H*4 for which the down projection runs per expert without a barrier.");
  m.def("_moe_spin_us", [](int64_t v) {
    return v >= 0 ? tuning().spin_us.exchange(v) : tuning().spin_us.load();
  }, py::arg("value") = -1,
  "Get (value<0) or set the microseconds the MoE pool's workers spin after a call before sleeping "
  "(KT_MOE_SPIN_US at start, default 2000); takes effect after the workers' current wait.");
  m.def("_moe_profile", [](int enable) {
    if (enable >= 0) tuning().profiling.store(enable != 0);
    py::dict d;
    for (const auto& kv : moe::last_profile()) d[py::str(kv.first)] = kv.second;
    return d;
  }, py::arg("enable") = -1,
  "Stage profile of the last prefill-schedule forward (seconds summed over threads; enable=1/0 turns "
  "recording on/off).");
  // ---- the float stages on their own (tests: bit identity across ISAs on special values)
  using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
  using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
  m.def("_moe_exp", [](F32 x, const std::string& isa) {
    const moe::Epilogue& e = moe::epilogue_for(resolve_isa(isa));
    F32 y(x.size());
    e.exp(x.data(), x.size(), y.mutable_data());
    return y;
  }, py::arg("x"), py::arg("isa") = "auto", "exp_det of every element (1-D float32) on that ISA's epilogue.");
  m.def("_moe_quantize", [](F32 x, const std::string& isa) {
    require(x.ndim() == 2, "x must be [rows, k]");
    const moe::Epilogue& e = moe::epilogue_for(resolve_isa(isa));
    const int64_t rows = x.shape(0), k = x.shape(1);
    py::array_t<int8_t> q({rows, k});
    F32 d(rows);
    I32 qs(rows);
    for (int64_t r = 0; r < rows; ++r)
      d.mutable_data()[r] = e.quantize(x.data() + r * k, k, q.mutable_data() + r * k, qs.mutable_data() + r);
    return py::make_tuple(q, d, qs);
  }, py::arg("x"), py::arg("isa") = "auto", "Per-row int8 quantization: (q, d, Σq).");
  m.def("_moe_silu_gate", [](I32 ag, I32 au, F32 xd, F32 sg, F32 su, std::optional<double> limit,
                             const std::string& isa, bool gpt_oss, double alpha, double up_offset,
                             std::optional<F32> bg, std::optional<F32> bu) {
    const int64_t mm = xd.size();
    require(ag.size() == mm * 32 && au.size() == mm * 32 && sg.size() == 32 && su.size() == 32,
            "ag, au: [m, 32]; xd: [m]; sg, su: [32]");
    require((!bg || bg->size() == 32) && (!bu || bu->size() == 32), "bg, bu: [32]");
    const moe::Epilogue& e = moe::epilogue_for(resolve_isa(isa));
    F32 act({mm, int64_t(32)});
    moe::GateAct p;
    p.clamp = limit.has_value();
    p.limit = limit ? static_cast<float>(*limit) : 0.f;
    p.gpt_oss = gpt_oss;
    p.alpha = static_cast<float>(alpha);
    p.up_offset = static_cast<float>(up_offset);
    p.bg = bg ? bg->data() : nullptr;
    p.bu = bu ? bu->data() : nullptr;
    e.silu_gate(ag.data(), au.data(), mm, xd.data(), sg.data(), su.data(), p, act.mutable_data(), 32);
    return act;
  }, py::arg("ag"), py::arg("au"), py::arg("xd"), py::arg("sg"), py::arg("su"), py::arg("limit") = py::none(),
  py::arg("isa") = "auto", py::arg("gpt_oss") = false, py::arg("alpha") = 1.702, py::arg("up_offset") = 1.0,
  py::arg("bg") = py::none(), py::arg("bu") = py::none(),
  "Gate/up activation epilogue of one 32-row group -> act [m, 32] (SiLU, or gpt-oss with gpt_oss=True; biases "
  "bg, bu [32] or None).");
  m.def("_moe_down", [](I32 acc, F32 ad, F32 sd, F32 y0, float w, const std::string& isa, std::optional<F32> b) {
    const int64_t mm = ad.size();
    require(acc.size() == mm * 32 && sd.size() == 32 && y0.size() == mm * 32, "acc, y0: [m, 32]; ad: [m]; sd: [32]");
    require(!b || b->size() == 32, "b: [32]");
    const float* bp = b ? b->data() : nullptr;
    const moe::Epilogue& e = moe::epilogue_for(resolve_isa(isa));
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
  m.def("_moe_avx2_vnni", [](int v) {
    const bool old = moe::avx2::vnni();
    if (v >= 0) moe::avx2::set_vnni(v != 0);
    return old;
  }, py::arg("value") = -1,
  "Get (value<0) or set whether isa='avx2' runs the AVX-VNNI kernel (only possible on CPUs with AVX-VNNI; "
  "off: the VPMADDUBSW kernel); returns the old value.");
  using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
  using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;
  m.def("_moe_dot", [](const std::string& method_name, U8 w, int64_t n, int64_t k, I8 a, const std::string& isa_name) {
    const Method method = parse_method(method_name);
    const Isa isa = resolve_isa(isa_name);
    require(!is_grouped(method), "group-wise methods: use _moe_group_dot");
    require(n > 0 && n % 32 == 0, "n must be a positive multiple of 32");
    require(k > 0 && k % method_info(method).k_align == 0,
            "k must be a positive multiple of " + std::to_string(method_info(method).k_align));
    require(w.size() == packed_weight_bytes(method, n, k), "w: " + std::to_string(w.size()) + " bytes, expected " +
                                                              std::to_string(packed_weight_bytes(method, n, k)));
    require(a.ndim() == 2 && a.shape(1) == k, "a must be int8 [m, k]");
    const int64_t m = a.shape(0);
    const moe::DotFn dot = dot_kernel(isa);
    std::vector<int8_t> ap((m + 16) * k, 0);  // + 16 rows: the AMX kernel reads whole 16-row tiles
    std::copy(a.data(), a.data() + m * k, ap.begin());
    std::vector<int32_t> asum(m, 0), acc(m * 32);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < k; ++c) asum[i] += ap[i * k + c];
    py::array_t<int32_t> out({m, n});
    int32_t* o = out.mutable_data();
    for (int64_t r0 = 0; r0 < n; r0 += 32) {
      dot(method, w.data(), n, k, r0, ap.data(), moe::ALayout::row_major(k), asum.data(), m, acc.data());
      for (int64_t i = 0; i < m; ++i) std::copy(acc.begin() + i * 32, acc.begin() + i * 32 + 32, o + i * n + r0);
    }
    return out;
  }, py::arg("method"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("a"), py::arg("isa") = "auto",
  "Exact int32 products [m, n] of a packed [n, k] matrix (tiled bytes) with int8 activations a [m, k] on "
  "that ISA's dot kernel (tests).");
  m.def("_moe_group_dot", [](U8 w, int64_t n, int64_t k, int64_t group, I8 a, const std::string& isa_name,
                             bool prepared) {
    const Isa isa = resolve_isa(isa_name);
    require(group == 32 || group == 64 || group == 128, "group must be 32, 64 or 128");
    require(n > 0 && n % 32 == 0 && k > 0 && k % group == 0, "n must be a multiple of 32 and k of the group");
    require(w.size() == n * k / 2, "w must hold n * k / 2 bytes");
    require(a.ndim() == 2 && a.shape(1) == k, "a must be int8 [m, k]");
    const int64_t m = a.shape(0), G = k / group;
    require(m >= 1 && m <= 16, "a must have 1 to 16 rows");
    const moe::GroupDotFn dot = moe::group_dot_for(isa);
    py::array_t<int32_t> out({m, G, n});
    std::vector<int32_t> gsum(m * G * 32), corr(m * G);
    std::vector<int8_t> split(m * k);
    if (prepared) moe::group_prepare(a.data(), k, m, k, group, split.data(), corr.data());
    for (int64_t r0 = 0; r0 < n; r0 += 32) {
      dot(w.data(), k, group, r0, a.data(), k, prepared ? split.data() : nullptr, prepared ? corr.data() : nullptr, m,
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
  "activations a [m <= 16, k] on that ISA's kernel; prepared: the rows split by group_prepare first, as the "
  "engine does, else the kernel prepares them (tests).");
  m.def("_moe_group_scale", [](I32 gsum, py::array_t<uint16_t, py::array::c_style | py::array::forcecast> st,
                               const std::string& isa_name) {
    const Isa isa = resolve_isa(isa_name);
    require(gsum.ndim() == 2 && gsum.shape(1) == 32 && gsum.shape(0) >= 1, "gsum must be int32 [G, 32]");
    require(st.ndim() == 2 && st.shape(0) == gsum.shape(0) && st.shape(1) == 32, "st must be uint16 [G, 32]");
    py::array_t<float> out(32);
    moe::group_scale_for(isa)(gsum.data(), st.data(), gsum.shape(0), out.mutable_data());
    return out;
  }, py::arg("gsum"), py::arg("st"), py::arg("isa") = "auto",
  "The float product [32] of one row's group sums gsum [G, 32] and bf16 scales st [G, 32] on that ISA's "
  "implementation (tests).");
  m.def("_core_clock_ghz", [] {
    py::gil_scoped_release release;
    return core_clock_ghz();
  }, "GHz of this core while it runs (dependent register adds over thread CPU time; benchmarks).");
  m.def("_moe_dot_stream", [](const std::string& method_name, const py::array& buf, int64_t n, int64_t k, int64_t m,
                              const std::string& isa_name, int threads, double seconds) {
    // Benchmark: the dot kernel alone over buf cut into packed [n, k] matrices, every 32-row group
    // of each with m activation rows (one call per group, as the decode schedule makes them);
    // thread t streams over its own contiguous share of the matrices until `seconds` have passed.
    const Method method = parse_method(method_name);
    const moe::DotFn dot = dot_kernel(resolve_isa(isa_name));
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
        std::vector<int32_t> out(m * 32);
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = thread_cpu_seconds();
        double dt = 0;
        int64_t done = 0;
        do {
          for (int64_t j = t * per; j < (t + 1) * per && dt < seconds; ++j, ++done) {
            for (int64_t r0 = 0; r0 < n; r0 += 32)
              dot(method, w + j * mat, n, k, r0, a.data(), moe::ALayout::row_major(k), asum.data(), m, out.data());
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
    double wps = 0, wps_cpu = 0;
    for (int t = 0; t < threads; ++t) {
      wps += static_cast<double>(mats[t]) * n * k / wall[t];
      wps_cpu += static_cast<double>(mats[t]) * n * k / cpu[t];
    }
    r["weights_per_s"] = wps;
    r["weights_per_cpu_s"] = wps_cpu / threads;  // per thread, per second it actually ran
    r["GBps"] = wps * mat / (static_cast<double>(n) * k) / 1e9;
    r["cpu_share"] = [&] {
      double c = 0, wl = 0;
      for (int t = 0; t < threads; ++t) c += cpu[t], wl += wall[t];
      return c / wl;
    }();
    return r;
  }, py::arg("method"), py::arg("buf"), py::arg("n"), py::arg("k"), py::arg("m") = 1, py::arg("isa") = "auto",
  py::arg("threads") = 1, py::arg("seconds") = 0.5,
  "Benchmark of a dot kernel alone: weights/s over buf (packed [n, k] matrices, one call per 32-row group).");
}

}  // namespace kt
