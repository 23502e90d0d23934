// kt_kernels.MoELayer and its HostJob (moe_layer.hpp).
#include "moe_layer.hpp"

#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>

#include "moe_group.hpp"
#include "moe_isa.hpp"
#include "py_args.hpp"
#include "thread_pool.hpp"

namespace py = pybind11;

namespace kt {

namespace {

// The activations by name, each with the Config flag it sets (silu: none).
struct ActivationKind {
  const char* name;
  bool moe::Config::*flag;
};
constexpr ActivationKind kActivations[] = {
    {"silu", nullptr}, {"gpt_oss", &moe::Config::gpt_oss}, {"situ", &moe::Config::situ}};

void set_activation(moe::Config& cfg, const std::string& name) {
  std::string names;
  for (const ActivationKind& a : kActivations) {
    if (name == a.name) {
      if (a.flag) cfg.*(a.flag) = true;
      return;
    }
    names += std::string(names.empty() ? "'" : ", '") + a.name + "'";
  }
  throw std::invalid_argument("activation must be one of " + names + ", got '" + name + "'");
}

}  // namespace

MoELayer::MoELayer(const std::string& method, const py::sequence& weights, int64_t hidden, int64_t intermediate,
                   int64_t threadpool_count, std::optional<double> swiglu_limit, const std::string& activation,
                   double alpha, double up_offset, const py::object& gate_bias, const py::object& up_bias,
                   const py::object& down_bias, double beta, double linear_beta) {
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
  set_activation(cfg, activation);
  cfg.alpha = static_cast<float>(alpha);
  cfg.up_offset = static_cast<float>(up_offset);
  cfg.beta = static_cast<float>(beta);
  cfg.linear_beta = static_cast<float>(linear_beta);
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

py::array_t<float> MoELayer::forward(const py::array& x, const py::array& ids, const py::array& topk_w,
                                     const std::string& isa_name, int64_t num_threads) {
  const moe::Config& cfg = w_.cfg;
  const moe::IsaKernels& kernels = moe::isa_kernels(isa_name);
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
    moe::forward(w_, xp, tokens, id, wp, topk, op, kernels, threads);
  }
  return out;
}

const char* MoELayer::activation() const {
  for (const ActivationKind& a : kActivations)
    if (a.flag && w_.cfg.*(a.flag)) return a.name;
  return "silu";
}

// A bias: None, or a finite float32 C-contiguous [experts, n] array, copied.
void MoELayer::read_bias(const py::object& o, const std::string& name, int64_t n, std::vector<float>& dst) {
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

PyHostJob::PyHostJob(py::object layer, py::array x, py::array ids, py::array w, py::array out,
                     const std::string& isa_name, int64_t num_threads)
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
  job_.kernels = &moe::isa_kernels(isa_name);
  job_.threads = checked_thread_count(num_threads);
}

PyHostJob::~PyHostJob() {
  if (job_.done.load() < job_.submitted.load()) {
    py::gil_scoped_release release;
    moe::host_wait(&job_);
  }
}

}  // namespace kt
