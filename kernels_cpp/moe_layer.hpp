// kt_kernels.MoELayer: one MoE layer's routed experts as Python hands them over (numpy arrays of the packed
// format, read in place), checked once when the layer is built; forward() checks each call's arguments and runs
// moe::forward on the ISA table's row for `isa`. HostJob: the same layer over fixed buffers, stream-ordered
// (moe_host_job.hpp). Every bad argument raises std::invalid_argument (Python: KernelArgumentError, a ValueError).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "moe.hpp"
#include "moe_host_job.hpp"

namespace kt {

class MoELayer {
 public:
  // weights[e][t] = (gate_w, gate_s, up_w, up_s, down_w, down_s)
  MoELayer(const std::string& method, const pybind11::sequence& weights, int64_t hidden, int64_t intermediate,
           int64_t threadpool_count, std::optional<double> swiglu_limit, const std::string& activation = "silu",
           double alpha = 1.702, double up_offset = 1.0, const pybind11::object& gate_bias = pybind11::none(),
           const pybind11::object& up_bias = pybind11::none(), const pybind11::object& down_bias = pybind11::none(),
           double beta = 4.0, double linear_beta = 25.0);

  pybind11::array_t<float> forward(const pybind11::array& x, const pybind11::array& ids, const pybind11::array& topk_w,
                                   const std::string& isa_name, int64_t num_threads);

  const moe::Config& config() const { return w_.cfg; }
  const char* activation() const;  // its name: silu, gpt_oss or situ
  const moe::Weights& weights() const { return w_; }
  bool has_biases() const { return !w_.gate_bias.empty() || !w_.up_bias.empty() || !w_.down_bias.empty(); }

 private:
  void read_bias(const pybind11::object& o, const std::string& name, int64_t n, std::vector<float>& dst);

  moe::Weights w_;
  pybind11::list keep_;  // the numpy arrays whose memory the pointers refer to
};

// A stream-ordered job of one MoELayer over fixed buffers; keeps the layer and the buffers alive while it exists.
class PyHostJob {
 public:
  PyHostJob(pybind11::object layer, pybind11::array x, pybind11::array ids, pybind11::array w, pybind11::array out,
            const std::string& isa_name, int64_t num_threads);
  // Runs already submitted must finish before the buffers and the job go away. (Host functions still queued
  // on a stream, or a CUDA graph that captured the address, must not outlive the job: HybridMoE keeps it.)
  ~PyHostJob();
  uintptr_t address() { return reinterpret_cast<uintptr_t>(&job_); }
  moe::HostJob& job() { return job_; }

 private:
  pybind11::object layer_;
  pybind11::array x_, ids_, w_, out_;
  moe::HostJob job_;
};

}  // namespace kt
